//! Side branches of a connection's `select!` that are polled only when they
//! woke the task themselves.
//!
//! A connection's task selects its protocol future against a few futures
//! that almost never finish: the shutdown tokens and the watchdog's timer.
//! `select!` polls every branch on every wake-up, and a busy keep-alive
//! connection wakes several times per request, so those polls (each
//! cancellation token takes a lock to refresh its waker) were ~5% of the
//! instructions of a proxied request. [`OnWake`] gives its future a waker of
//! its own that raises a flag: it polls the future only when that flag is
//! up, and otherwise costs one atomic swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

pin_project_lite::pin_project! {
    /// Polls `inner` only on its own wake-ups (and the first poll).
    pub struct OnWake<F> {
        #[pin]
        inner: F,
        flag: Arc<Flag>,
        // `flag` as a waker, built once.
        waker: Waker,
    }
}

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F> OnWake<F> {
    pub fn new(inner: F) -> Self {
        let flag = Arc::new(Flag {
            // The first poll must reach `inner`, so it can register.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        OnWake {
            inner,
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future> Future for OnWake<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake in between is not lost.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.inner.poll(&mut Context::from_waker(this.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_util::sync::CancellationToken;

    /// The side future is cancelled by the busy branch itself after five
    /// ticks: the cancel wakes it through its own waker, and the next pass
    /// of the select takes it (biased, so it comes before another tick).
    #[tokio::test]
    async fn a_side_future_finishes_when_it_wakes_while_the_main_one_is_busy() {
        let token = CancellationToken::new();
        let side = OnWake::new(token.clone().cancelled_owned());
        tokio::pin!(side);
        let mut ticks = 0;
        let mut every = tokio::time::interval(Duration::from_millis(1));
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::select! {
                    biased;
                    () = side.as_mut() => break,
                    _ = every.tick() => {
                        ticks += 1;
                        if ticks == 5 {
                            token.cancel();
                        }
                    }
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the cancel reached the side future");
        assert_eq!(
            ticks, 5,
            "the busy branch ran until the cancel, and no longer"
        );
    }

    #[tokio::test]
    async fn a_timer_inside_fires() {
        let side = OnWake::new(tokio::time::sleep(Duration::from_millis(20)));
        tokio::time::timeout(Duration::from_secs(5), side)
            .await
            .expect("the sleep woke its own waker, and was polled again");
    }
}
