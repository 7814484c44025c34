//! Getting a connection for a route: the primary cluster first, then each
//! failover cluster in order, trying endpoints as the load balancer picks them.
//!
//! A cluster is skipped when none of its endpoints is available (down by active
//! checks or ejected by failed connects); within a cluster a failed connect
//! moves on to the next endpoint at once, so the app sees no error while
//! health catches up. Failback is implicit: the primary is always tried first,
//! and its endpoints come back once their `healthy` threshold is met (or their
//! ejection ends and a connect succeeds).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{ActiveGuard, Cluster, Endpoint, lb};
use crate::metrics;

/// A connected upstream and where it went.
pub struct Connected {
    pub stream: TcpStream,
    pub cluster: Arc<Cluster>,
    pub endpoint: Arc<Endpoint>,
    /// Counts this connection on the endpoint until dropped.
    pub active: ActiveGuard,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No cluster of the route had an endpoint that accepted. Nothing was sent,
    /// so the caller may always try elsewhere.
    #[error("no healthy endpoint in cluster \"{cluster}\"{}", if *.failover > 0 { " or its failover clusters" } else { "" })]
    NoHealthyEndpoint { cluster: Arc<str>, failover: usize },
}

/// Connects for a new app connection from `client`.
pub async fn connect(
    primary: &Arc<Cluster>,
    failover: &[Arc<Cluster>],
    client: SocketAddr,
) -> Result<Connected, ConnectError> {
    for (i, cluster) in std::iter::once(primary).chain(failover).enumerate() {
        cluster.wait_resolved().await;
        let mut candidates = cluster.available();
        while !candidates.is_empty() {
            let pick = lb::pick(cluster.spec.lb, &candidates, &cluster.cursor, client.ip());
            let endpoint = candidates.swap_remove(pick);
            if let Ok(stream) = cluster.try_connect(&endpoint).await {
                if i > 0 {
                    metrics::get()
                        .cluster_failovers_total
                        .with_label_values(&[&primary.name, &cluster.name])
                        .inc();
                    tracing::debug!(cluster = %primary.name, to = %cluster.name, "connection failed over");
                }
                let active = endpoint.track();
                return Ok(Connected {
                    stream,
                    cluster: cluster.clone(),
                    endpoint,
                    active,
                });
            }
        }
        if i < failover.len() {
            tracing::debug!(cluster = %cluster.name, "no available endpoint, trying the next failover cluster");
        }
    }
    primary.metrics.no_healthy_endpoint.inc();
    Err(ConnectError::NoHealthyEndpoint {
        cluster: primary.name.clone(),
        failover: failover.len(),
    })
}
