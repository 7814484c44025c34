//! Where each session lives, by its cancel key, so a CancelRequest (which
//! arrives on a new connection) reaches the server that runs the query,
//! whatever the routing table says now.
//!
//! One entry per open session (so bounded by the listeners'
//! `max_connections`), removed when the session ends.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use tokio::io::AsyncWriteExt;

use crate::fds;
use crate::upstream::{Cluster, Endpoint};

/// The server a session is on.
#[derive(Clone)]
struct Home {
    cluster: Arc<Cluster>,
    endpoint: Arc<Endpoint>,
}

static SESSIONS: LazyLock<Mutex<HashMap<Vec<u8>, Home>>> = LazyLock::new(Default::default);

fn sessions() -> std::sync::MutexGuard<'static, HashMap<Vec<u8>, Home>> {
    SESSIONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// A session's entry; dropping it forgets the session.
pub struct Registered(Vec<u8>);

/// Records that the session with BackendKeyData `key` (process id and secret)
/// lives on `endpoint`.
pub fn register(key: &[u8], cluster: &Arc<Cluster>, endpoint: &Arc<Endpoint>) -> Registered {
    sessions().insert(
        key.to_vec(),
        Home {
            cluster: cluster.clone(),
            endpoint: endpoint.clone(),
        },
    );
    Registered(key.to_vec())
}

impl Drop for Registered {
    fn drop(&mut self) {
        sessions().remove(&self.0);
    }
}

/// What became of a CancelRequest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to the session's server.
    Routed,
    /// No open session has this key: dropped, as a server would.
    Unknown,
    /// The session's server could not be reached.
    Failed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Routed => "routed",
            Outcome::Unknown => "unknown",
            Outcome::Failed => "failed",
        }
    }
}

/// Sends the whole CancelRequest `packet` to the server of the session `key`
/// names (over TLS when its cluster uses it).
pub async fn forward(key: &[u8], packet: &[u8]) -> Outcome {
    let Some(home) = sessions().get(key).cloned() else {
        return Outcome::Unknown;
    };
    let Some(_fd) = fds::reserve(1) else {
        return Outcome::Failed;
    };
    let Ok(mut stream) = home.cluster.connect_to(&home.endpoint).await else {
        return Outcome::Failed;
    };
    if stream.write_all(packet).await.is_err() {
        return Outcome::Failed;
    }
    // The server closes after reading it; wait for that (bounded) so the
    // cancel has landed before the app's connection is closed.
    let _ = stream.shutdown().await;
    let mut rest = [0u8; 16];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        use tokio::io::AsyncReadExt;
        while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
    })
    .await;
    Outcome::Routed
}
