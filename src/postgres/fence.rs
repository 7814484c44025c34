//! `cutover: fenced`: when a reload moves a Postgres listener away from a
//! fenced cluster, new sessions for the new target are held (their startup
//! packet read and kept, nothing sent upstream) until every session on the
//! old target has closed at an idle point, or the old cluster's
//! `drain_on_change` grace ran out. So the old and the new database never
//! take writes at the same time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The sessions open on one route, for a fence to wait on.
#[derive(Default)]
pub struct Sessions {
    open: AtomicUsize,
    emptied: Notify,
}

/// Counts one session on its route while it lives.
pub struct Entered(Arc<Sessions>);

impl Sessions {
    pub fn enter(self: &Arc<Self>) -> Entered {
        self.open.fetch_add(1, Ordering::AcqRel);
        Entered(self.clone())
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    async fn until_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.emptied.notify_waiters();
        }
    }
}

/// Holds new sessions of a route until the routes it replaced are empty.
pub struct Fence {
    old: Vec<Arc<Sessions>>,
    raised: Instant,
    deadline: tokio::time::Instant,
    opened: AtomicBool,
}

/// How a held session got through.
pub enum Passed {
    /// The fence was already open: no wait.
    Open,
    /// Held this long; `forced` when the grace ran out first.
    Held { waited: Duration, forced: bool },
}

impl Fence {
    pub fn new(old: Vec<Arc<Sessions>>, grace: Duration) -> Self {
        Fence {
            old,
            raised: Instant::now(),
            deadline: tokio::time::Instant::now() + grace,
            opened: AtomicBool::new(false),
        }
    }

    /// Waits until the old sessions are gone or the grace ran out.
    pub async fn pass(&self) -> Passed {
        if self.opened.load(Ordering::Acquire) {
            return Passed::Open;
        }
        let began = Instant::now();
        let emptied = async {
            for sessions in &self.old {
                sessions.until_empty().await;
            }
        };
        let forced = tokio::time::timeout_at(self.deadline, emptied)
            .await
            .is_err();
        if !self.opened.swap(true, Ordering::AcqRel) {
            tracing::info!(
                fence_ms = self.raised.elapsed().as_millis() as u64,
                forced,
                "cut-over fence open: new sessions go to the new target"
            );
        }
        Passed::Held {
            waited: began.elapsed(),
            forced,
        }
    }
}
