//! HTTP connections to one endpoint, kept for reuse.
//!
//! HTTP/1.1: idle connections wait in a lock-free queue; a connection goes back
//! only once its response body has been read to the end (see `Checkin`), so a
//! connection taken from the queue is always free. HTTP/2: one multiplexed
//! connection per endpoint, shared by cloning its sender. Closed connections
//! are dropped when met. Lives in [`super::Endpoint`], so a cluster kept across
//! reloads keeps its warm connections.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};

/// Any error a proxied body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type legate sends and returns: streamed, boxed once per message.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when returned.
const MAX_IDLE: usize = 256;

/// An endpoint's reusable connections.
pub struct Pool {
    idle: ArrayQueue<http1::SendRequest<ProxyBody>>,
    h2: ArcSwapOption<http2::SendRequest<ProxyBody>>,
}

/// A connection ready for one request.
pub enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

/// A response body that returns its HTTP/1.1 connection to the pool once read
/// to the end. Dropped early, the connection is not reused (it closes).
pub struct Checkin {
    inner: Incoming,
    sender: Option<(http1::SendRequest<ProxyBody>, Arc<super::Endpoint>)>,
}

// === impl Pool ===

impl Default for Pool {
    fn default() -> Self {
        Pool {
            idle: ArrayQueue::new(MAX_IDLE),
            h2: ArcSwapOption::empty(),
        }
    }
}

impl Pool {
    /// An idle HTTP/1.1 connection, if one is still open.
    pub fn checkout_h1(&self) -> Option<http1::SendRequest<ProxyBody>> {
        while let Some(s) = self.idle.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    pub fn checkin_h1(&self, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_ready() && !sender.is_closed() {
            // A full queue drops (closes) the connection: enough are idle.
            let _ = self.idle.push(sender);
        }
    }

    /// The shared HTTP/2 connection, if open.
    pub fn h2(&self) -> Option<http2::SendRequest<ProxyBody>> {
        let s = self.h2.load();
        s.as_ref().filter(|s| !s.is_closed()).map(|s| (**s).clone())
    }

    pub fn set_h2(&self, sender: http2::SendRequest<ProxyBody>) {
        self.h2.store(Some(Arc::new(sender)));
    }
}

// === impl Checkin ===

impl Checkin {
    pub fn new(
        inner: Incoming,
        sender: http1::SendRequest<ProxyBody>,
        endpoint: Arc<super::Endpoint>,
    ) -> Self {
        let mut body = Checkin {
            inner,
            sender: Some((sender, endpoint)),
        };
        if body.inner.is_end_stream() {
            body.give_back();
        }
        body
    }

    fn give_back(&mut self) {
        if let Some((sender, endpoint)) = self.sender.take() {
            endpoint.pool.checkin_h1(sender);
        }
    }
}

impl Body for Checkin {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.sender = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
