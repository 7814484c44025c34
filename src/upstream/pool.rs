//! HTTP connections to one endpoint, kept for reuse.
//!
//! HTTP/1.1: idle connections wait in a lock-free queue; a connection goes back
//! only once its response body has been read to the end (see `Checkin`), so a
//! connection taken from the queue is always free. HTTP/2: one multiplexed
//! connection per endpoint, shared by cloning its sender. Closed connections
//! are dropped when met. Lives in [`super::Endpoint`], so a cluster kept across
//! reloads keeps its warm connections. A connection unused for the cluster's
//! `pool_idle_timeout` is closed ([`expire`]), before an upstream's own idle
//! timeout can close it under a request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};

use crate::clock::now_ms;

/// Any error a proxied body may carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type legate sends and returns: streamed, boxed once per message.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when returned.
const MAX_IDLE: usize = 256;

/// An endpoint's reusable connections.
pub struct Pool {
    /// Each with the [`now_ms`] it went idle.
    idle: ArrayQueue<(http1::SendRequest<ProxyBody>, u64)>,
    h2: ArcSwapOption<http2::SendRequest<ProxyBody>>,
    /// [`now_ms`] of the last request handed the h2 connection.
    h2_used: AtomicU64,
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
            h2_used: AtomicU64::new(0),
        }
    }
}

impl Pool {
    /// An idle HTTP/1.1 connection, if one is still open.
    pub fn checkout_h1(&self) -> Option<http1::SendRequest<ProxyBody>> {
        while let Some((s, _)) = self.idle.pop() {
            if s.is_ready() && !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    pub fn checkin_h1(&self, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_ready() && !sender.is_closed() {
            // A full queue drops (closes) the connection: enough are idle.
            let _ = self.idle.push((sender, now_ms()));
        }
    }

    /// The shared HTTP/2 connection, if open.
    pub fn h2(&self) -> Option<http2::SendRequest<ProxyBody>> {
        let s = self.h2.load();
        let s = s.as_ref().filter(|s| !s.is_closed())?;
        self.h2_used.store(now_ms(), Ordering::Relaxed);
        Some((**s).clone())
    }

    pub fn set_h2(&self, sender: http2::SendRequest<ProxyBody>) {
        self.h2_used.store(now_ms(), Ordering::Relaxed);
        self.h2.store(Some(Arc::new(sender)));
    }

    /// Lets the shared HTTP/2 connection go (it refused a stream: GOAWAY);
    /// the next request opens a new one, streams still on it finish.
    pub fn forget_h2(&self) {
        self.h2.store(None);
    }

    /// Lets the shared HTTP/2 connection go if its dispatcher has ended.
    pub fn forget_closed_h2(&self) {
        self.h2
            .rcu(|s| s.as_ref().filter(|s| !s.is_closed()).cloned());
    }

    /// Closes every idle connection (the way to connect changed).
    pub fn clear(&self) {
        self.expire(u64::MAX);
    }

    /// Closes connections idle since before `cutoff` ([`now_ms`]). HTTP/1.1
    /// ones are idle by construction; the h2 one is let go when no request
    /// was handed it since, and closes once its last stream ends.
    fn expire(&self, cutoff: u64) {
        for _ in 0..self.idle.len() {
            let Some((sender, since)) = self.idle.pop() else {
                break;
            };
            if since >= cutoff && !sender.is_closed() {
                // Back at the tail: the queue stays in idle order.
                let _ = self.idle.push((sender, since));
            }
        }
        if self.h2_used.load(Ordering::Relaxed) < cutoff {
            self.h2.store(None);
        }
    }
}

/// Closes the cluster's pooled connections once they sat unused for its
/// `pool_idle_timeout`; runs until the cluster is retired or dropped.
pub async fn expire(cluster: Weak<super::Cluster>) {
    let Some(idle) = cluster.upgrade().map(|c| c.spec().pool_idle_timeout) else {
        return;
    };
    // A connection lives at most a quarter of the timeout beyond it.
    let every = (idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(c) = cluster.upgrade() else { return };
        let cutoff = now_ms().saturating_sub(idle.as_millis() as u64);
        for e in c.endpoints().iter() {
            e.pool.expire(cutoff);
        }
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
