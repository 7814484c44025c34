//! Clusters and their endpoints: choosing one and connecting to it.
//!
//! A [`Cluster`] is built by `table::compile` from a validated config and lives
//! inside one routing-table snapshot; its only mutable state is the round-robin
//! cursor, an atomic, so connections never take a lock to pick an endpoint.
//! What this module hands back is a connected `TcpStream`; what flows over it
//! is the listener's business.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::metrics::ClusterMetrics;

/// A named group of interchangeable endpoints.
pub struct Cluster {
    pub name: Arc<str>,
    endpoints: Box<[Endpoint]>,
    connect_timeout: Duration,
    drain_on_change: Option<Duration>,
    /// Round-robin cursor; wraps, only its value modulo the endpoint count matters.
    next: AtomicUsize,
    metrics: ClusterMetrics,
}

/// One backend address as the user wrote it, and where it points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// As written in the config (`10.0.0.7:5432`, `localhost:6379`): the name in logs.
    pub written: Arc<str>,
    pub addr: SocketAddr,
}

/// Why a cluster could not give a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every endpoint was tried once and none accepted in time. Nothing was sent,
    /// so the caller may always try elsewhere.
    #[error("no endpoint of cluster \"{cluster}\" answered ({attempts} tried)")]
    NoEndpointAnswered { cluster: Arc<str>, attempts: usize },
}

// === impl Cluster ===

impl Cluster {
    /// A cluster over `endpoints` (never empty: the config checked it).
    pub fn new(
        name: Arc<str>,
        endpoints: Vec<Endpoint>,
        connect_timeout: Duration,
        drain_on_change: Option<Duration>,
        metrics: ClusterMetrics,
    ) -> Self {
        Cluster {
            name,
            endpoints: endpoints.into_boxed_slice(),
            connect_timeout,
            drain_on_change,
            next: AtomicUsize::new(0),
            metrics,
        }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Grace before connections are closed when a reload moves this cluster's traffic.
    pub fn drain_on_change(&self) -> Option<Duration> {
        self.drain_on_change
    }

    /// Whether `other` sends connections to the same place: same name, same endpoints.
    pub fn same_target(&self, other: &Cluster) -> bool {
        self.name == other.name && self.endpoints == other.endpoints
    }

    /// Connects to the next endpoint in round-robin order. A refused or timed-out
    /// endpoint is skipped for the one after it, so the app only sees a failure
    /// when every endpoint failed.
    pub async fn connect(&self) -> Result<(TcpStream, &Endpoint), ConnectError> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let endpoint = &self.endpoints[(start + i) % n];
            let began = Instant::now();
            let attempt =
                tokio::time::timeout(self.connect_timeout, TcpStream::connect(endpoint.addr));
            match attempt.await {
                Ok(Ok(stream)) => {
                    self.metrics.connect_ok.inc();
                    self.metrics
                        .connect_seconds
                        .observe(began.elapsed().as_secs_f64());
                    // Small writes (protocol handshakes, queries) must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    return Ok((stream, endpoint));
                }
                Ok(Err(e)) => {
                    self.count_failure(&e);
                    tracing::warn!(cluster = %self.name, endpoint = %endpoint.written, error = %e, "upstream connect failed");
                }
                Err(_) => {
                    self.metrics.connect_timeout.inc();
                    tracing::warn!(cluster = %self.name, endpoint = %endpoint.written, timeout = ?self.connect_timeout, "upstream connect timed out");
                }
            }
        }
        self.metrics.no_healthy_endpoint.inc();
        Err(ConnectError::NoEndpointAnswered {
            cluster: self.name.clone(),
            attempts: n,
        })
    }

    fn count_failure(&self, e: &io::Error) {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => self.metrics.connect_refused.inc(),
            io::ErrorKind::TimedOut => self.metrics.connect_timeout.inc(),
            _ => self.metrics.connect_error.inc(),
        }
    }
}
