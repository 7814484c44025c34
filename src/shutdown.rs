//! Graceful shutdown, sidecar-style: stop being ready, keep accepting for a
//! while, stop accepting, let open connections finish, then force the rest.
//!
//! A leaf: listeners, connections and the admin server each hold a clone of
//! [`Shutdown`] and watch the token for their phase. `lib::run` drives the
//! phases; connection tasks are spawned on [`Shutdown::connections`] so the
//! drain can wait for exactly them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
}

/// How long each phase may take.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub shutdown_delay: Duration,
    pub drain_timeout: Duration,
}

// === impl Shutdown ===

impl Shutdown {
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
        tracing::info!("drained, exiting");
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
