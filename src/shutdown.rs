//! Graceful shutdown, sidecar-style: stop being ready, keep accepting for a
//! while, stop accepting, let open connections finish, then force the rest.
//!
//! A leaf: listeners, connections and the admin server each hold a clone of
//! [`Shutdown`] and watch the token for their phase. `lib::run` drives the
//! phases; connection tasks are spawned on [`Shutdown::connections`] so the
//! drain can wait for exactly them.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::wake::OnWake;

/// Handles for every phase of a shutdown. Cheap to clone; all clones share state.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled by SIGTERM/SIGINT or `POST /quitquitquit`: `/readyz` turns 503.
    pub begun: CancellationToken,
    /// Cancelled after `--shutdown-delay`: accept loops end and their sockets close.
    pub stop_accepting: CancellationToken,
    /// Cancelled after `--drain-timeout`: connections still open are closed.
    pub force_close: CancellationToken,
    /// Every accept loop; all have ended (and closed their sockets) once it is empty.
    pub accept_loops: TaskTracker,
    /// Every connection task. Closed when accepting stops; empty means drained.
    pub connections: TaskTracker,
    /// Tasks that serve connections but are not one: upstream connection
    /// drivers (pooled, idle between requests). Not waited for by the drain;
    /// ended by `stop_background` once the connections are gone.
    pub background: TaskTracker,
    /// Cancelled after the drain: background tasks end.
    pub stop_background: CancellationToken,
}

/// Spawns tasks owned by one phase of the shutdown: each is tracked (so the
/// drain can wait for it) and ends when `stop` is cancelled. Also hyper's
/// executor, so the tasks hyper spawns itself (HTTP/2 streams) are owned too.
#[derive(Clone)]
pub struct Tasks {
    tracker: TaskTracker,
    /// Shared, not a token clone: every connection takes a `Tasks`, and
    /// cloning or dropping a `CancellationToken` locks its tree.
    stop: Arc<CancellationToken>,
}

/// How long each phase may take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub shutdown_delay: Duration,
    pub drain_timeout: Duration,
}

// === impl Shutdown ===

impl Shutdown {
    /// Tasks that belong to client connections: the drain waits for them,
    /// `--drain-timeout` ends them.
    pub fn connection_tasks(&self) -> Tasks {
        Tasks {
            tracker: self.connections.clone(),
            stop: Arc::new(self.force_close.clone()),
        }
    }

    /// Tasks that outlive a request but not the process (pooled upstream
    /// connections): ended once the drain is over.
    pub fn background_tasks(&self) -> Tasks {
        Tasks {
            tracker: self.background.clone(),
            stop: Arc::new(self.stop_background.clone()),
        }
    }

    /// Runs the phases once `begun` is cancelled, and returns when legate may exit.
    pub async fn run(&self, timing: Timing) {
        self.begun.cancelled().await;
        tracing::info!(
            shutdown_delay = ?timing.shutdown_delay,
            drain_timeout = ?timing.drain_timeout,
            "shutdown started: not ready, still accepting"
        );
        tokio::time::sleep(timing.shutdown_delay).await;

        self.stop_accepting.cancel();
        // Once no accept loop runs, no connection task can be added behind the drain's back.
        self.accept_loops.close();
        self.accept_loops.wait().await;
        self.connections.close();
        let open = self.connections.len();
        tracing::info!(open_connections = open, "listeners closed, draining");

        if tokio::time::timeout(timing.drain_timeout, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open_connections = self.connections.len(),
                "drain timeout passed, closing the remaining connections"
            );
            self.force_close.cancel();
            self.connections.wait().await;
        }
        self.stop_background.cancel();
        self.background.close();
        self.background.wait().await;
        tracing::info!("drained, exiting");
    }
}

// === impl Tasks ===

impl Tasks {
    /// Runs `task` until it ends or this phase's stop.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            // An upstream connection's driver wakes a few times per request:
            // the token is polled only when it woke the task (`OnWake`), and
            // `biased` spares `select!` its random pick of a first branch
            // (620 instructions per keep-alive request between the two).
            tokio::select! {
                biased;
                () = task => {}
                () = OnWake::new(stop.cancelled()) => {}
            }
        });
    }
}

impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(async move {
            fut.await;
        });
    }
}

/// Starts the shutdown on the first SIGTERM or SIGINT; a second one exits at once.
pub async fn on_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; SIGTERM will not drain");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
    shutdown.begun.cancel();
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::warn!("second signal: exiting now without draining");
    std::process::exit(1);
}
