//! The listener's `stream_idle_timeout`: a request whose bodies move no byte
//! either way for that long is ended (HTTP/2: its stream is reset; HTTP/1.1:
//! the connection closes mid-response), so a streaming response or a gRPC
//! stream that went quiet cannot hold its slot forever. While the head is
//! awaited the route timeout governs; the idle limit applies there only when
//! the route has no timeout (or a longer one), so the common request pays for
//! no timer.
//!
//! A request body's progress is shared with its response through one atomic;
//! a request without a body has none and its response needs no sharing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::clock::now_ms;

/// One request's idle clock.
#[derive(Clone)]
pub struct StreamIdle {
    limit: Duration,
    /// [`now_ms`] of the request body's last frame; `None`: no request body.
    request: Option<Arc<AtomicU64>>,
}

/// The idle deadline passed.
#[derive(Debug)]
pub struct Expired;

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stream idle timeout")
    }
}

impl std::error::Error for Expired {}

impl StreamIdle {
    pub fn new(limit: Duration, request_has_body: bool) -> Self {
        StreamIdle {
            limit,
            request: request_has_body.then(|| Arc::new(AtomicU64::new(now_ms()))),
        }
    }

    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The request body, stamping the clock as its frames pass.
    pub fn request_body<B>(&self, body: B) -> RequestBody<B> {
        RequestBody {
            inner: body,
            clock: self.request.clone(),
        }
    }

    /// Awaits `head` unless nothing moves for the limit: no request body
    /// frame while the upstream has not answered.
    pub async fn until_head<F: Future>(&self, head: F) -> Result<F::Output, Expired> {
        tokio::pin!(head);
        let mut last = now_ms();
        loop {
            let quiet_until = Instant::now() + self.limit;
            tokio::select! {
                out = head.as_mut() => return Ok(out),
                _ = tokio::time::sleep_until(quiet_until) => {
                    let moved = self.request.as_ref().map_or(last, |c| c.load(Ordering::Relaxed));
                    if moved <= last {
                        return Err(Expired);
                    }
                    last = moved;
                }
            }
        }
    }

    /// Watches a response body for the same limit.
    pub fn response(&self) -> ResponseIdle {
        ResponseIdle {
            limit: self.limit,
            request: self.request.clone(),
            last: 0,
            timer: None,
        }
    }
}

/// A request body that stamps its stream's clock.
pub struct RequestBody<B> {
    inner: B,
    clock: Option<Arc<AtomicU64>>,
}

impl<B: Body<Data = Bytes> + Unpin> Body for RequestBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(_))), Some(clock)) = (&polled, &self.clock) {
            clock.store(now_ms(), Ordering::Relaxed);
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

/// What a response body keeps to know when it went quiet.
pub struct ResponseIdle {
    limit: Duration,
    request: Option<Arc<AtomicU64>>,
    /// [`now_ms`] of the last frame, 0 until the body first waits: a body
    /// that is ready at once never reads the clock or arms a timer.
    last: u64,
    timer: Option<Pin<Box<Sleep>>>,
}

impl ResponseIdle {
    /// A frame went out.
    pub fn moved(&mut self) {
        if self.last != 0 {
            self.last = now_ms();
        }
    }

    /// The body has nothing to send: has it been quiet too long? Otherwise
    /// wakes `cx` when it would be.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<Expired> {
        if self.last == 0 {
            self.last = now_ms();
        }
        let limit = self.limit.as_millis() as u64;
        loop {
            let request = self
                .request
                .as_ref()
                .map_or(0, |c| c.load(Ordering::Relaxed));
            let quiet_until = self.last.max(request) + limit;
            let now = now_ms();
            if now >= quiet_until {
                return Poll::Ready(Expired);
            }
            // An armed timer fires at or before the deadline; then it is
            // looked at again, so activity since costs no timer reset.
            let timer = self.timer.get_or_insert_with(|| {
                Box::pin(tokio::time::sleep_until(
                    Instant::now() + Duration::from_millis(quiet_until - now),
                ))
            });
            ready!(timer.as_mut().poll(cx));
            self.timer = None;
        }
    }
}
