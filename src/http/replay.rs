//! A request body that can be sent again when an HTTP/2 upstream refuses the
//! request unprocessed (GOAWAY past its last stream, REFUSED_STREAM).
//!
//! The frames that went out are kept (clones of `Bytes`: reference counts, no
//! copies) up to [`REPLAY_LIMIT`]; the part not yet read stays in the source,
//! which every attempt shares. A request whose body outgrew the limit before
//! it was refused cannot go again and fails as before. Once the upstream
//! answers, the request was processed and the kept frames are let go.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::upstream::pool::{BoxError, ProxyBody};

/// Most body bytes kept for a second attempt (Envoy keeps 16 KiB to 1 MiB).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// The handle the proxy keeps: makes a body for each attempt.
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    source: ProxyBody,
    /// Every frame read from `source` so far, unless `given_up`.
    sent: Vec<Frame<Bytes>>,
    sent_bytes: usize,
    given_up: bool,
    /// Which attempt's body may read: an older one, still held by a refused
    /// stream, must not take frames or the source's waker.
    attempt: u32,
}

/// One attempt's body.
pub struct Attempt {
    shared: Arc<Mutex<Shared>>,
    attempt: u32,
    /// The next kept frame to replay.
    next: usize,
}

impl Replay {
    pub fn new(source: ProxyBody) -> Self {
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                source,
                sent: Vec::new(),
                sent_bytes: 0,
                given_up: false,
                attempt: 0,
            })),
        }
    }

    /// The body for the next attempt, which starts over from the first byte;
    /// `None` when the kept part was outgrown (the request cannot go again).
    pub fn attempt(&self) -> Option<ProxyBody> {
        let mut shared = lock(&self.shared);
        if shared.given_up {
            return None;
        }
        shared.attempt += 1;
        let body = Attempt {
            shared: self.shared.clone(),
            attempt: shared.attempt,
            next: 0,
        };
        Some(http_body_util::BodyExt::boxed_unsync(body))
    }

    /// Whether another attempt could still send the whole body.
    pub fn can_repeat(&self) -> bool {
        !lock(&self.shared).given_up
    }

    /// The upstream answered: no attempt will follow. What was kept is let
    /// go once the current attempt has replayed it.
    pub fn settle(&self) {
        lock(&self.shared).given_up = true;
    }
}

impl Shared {
    fn give_up(&mut self) {
        self.given_up = true;
        self.sent = Vec::new();
        self.sent_bytes = 0;
    }

    fn keep(&mut self, frame: &Frame<Bytes>) {
        if self.given_up {
            return;
        }
        let copy = if let Some(data) = frame.data_ref() {
            self.sent_bytes += data.len();
            Frame::data(data.clone())
        } else if let Some(trailers) = frame.trailers_ref() {
            Frame::trailers(trailers.clone())
        } else {
            // A frame kind this body cannot repeat.
            self.give_up();
            return;
        };
        if self.sent_bytes > REPLAY_LIMIT {
            self.give_up();
        } else {
            self.sent.push(copy);
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves frames that are still valid.
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn clone_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(Frame::data(data.clone()))
    } else {
        frame.trailers_ref().map(|t| Frame::trailers(t.clone()))
    }
}

impl Body for Attempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut shared = lock(&this.shared);
        if shared.attempt != this.attempt {
            return Poll::Ready(Some(Err("request body moved to a new attempt".into())));
        }
        if this.next < shared.sent.len() {
            let frame = clone_frame(&shared.sent[this.next]);
            this.next += 1;
            return Poll::Ready(frame.map(Ok));
        }
        if shared.given_up && !shared.sent.is_empty() {
            // Caught up after the request was settled: the kept frames are
            // no longer needed by anyone.
            shared.sent = Vec::new();
            shared.sent_bytes = 0;
            this.next = 0;
        }
        let polled = Pin::new(&mut shared.source).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            shared.keep(frame);
            this.next = shared.sent.len();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let shared = lock(&self.shared);
        self.next >= shared.sent.len() && shared.source.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let shared = lock(&self.shared);
        let kept: u64 = shared.sent[self.next.min(shared.sent.len())..]
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let rest = shared.source.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body(chunks: &[&'static [u8]]) -> ProxyBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    async fn read_some(body: &mut ProxyBody, frames: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..frames {
            let frame = body.frame().await.unwrap().unwrap();
            out.extend_from_slice(frame.data_ref().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_second_attempt_sends_the_whole_body_even_if_the_first_stopped_midway() {
        let replay = Replay::new(body(&[b"ab", b"cd", b"ef"]));
        let mut first = replay.attempt().unwrap();
        assert_eq!(read_some(&mut first, 2).await, b"abcd");
        let second = replay.attempt().unwrap();
        assert_eq!(
            second.size_hint().lower(),
            4,
            "kept bytes count toward the hint"
        );
        assert_eq!(second.collect().await.unwrap().to_bytes(), &b"abcdef"[..]);
        // The refused attempt, if polled late, cannot steal frames.
        assert!(first.frame().await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_body_past_the_limit_cannot_go_again() {
        static BIG: [u8; REPLAY_LIMIT + 1] = [b'x'; REPLAY_LIMIT + 1];
        let replay = Replay::new(body(&[&BIG]));
        let first = replay.attempt().unwrap();
        assert_eq!(
            first.collect().await.unwrap().to_bytes().len(),
            REPLAY_LIMIT + 1
        );
        assert!(replay.attempt().is_none());
    }

    #[tokio::test]
    async fn a_settled_request_keeps_nothing() {
        let replay = Replay::new(body(&[b"ab"]));
        let mut first = replay.attempt().unwrap();
        assert_eq!(read_some(&mut first, 1).await, b"ab");
        replay.settle();
        assert!(replay.attempt().is_none());
        assert!(first.frame().await.is_none());
        assert!(lock(&replay.shared).sent.is_empty());
    }
}
