//! Getting a connection for a route: the primary cluster first, then each
//! failover cluster in order, trying endpoints as the load balancer picks them.
//!
//! A cluster is skipped when none of its endpoints is available (down by active
//! checks or ejected by failed connects); within a cluster a failed connect
//! moves on to the next endpoint at once, so the app sees no error while
//! health catches up. Failback is implicit: the primary is always tried first,
//! and its endpoints come back once their `healthy` threshold is met (or their
//! ejection ends and a connect succeeds). TCP and HTTP share the walk; HTTP
//! first looks for a pooled connection to the chosen endpoint.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::client::conn::{http1, http2};
use hyper_util::rt::TokioIo;

use super::pool::{ProxyBody, Sender};
use super::{ActiveGuard, Cluster, Endpoint, Failure, UpstreamStream, lb};
use crate::fds;
use crate::metrics;
use crate::shutdown::Tasks;

/// A connected upstream and where it went.
pub struct Connected {
    pub stream: UpstreamStream,
    /// The socket's fd in the data path's budget, given back when dropped.
    pub fd: fds::Reserved,
    pub cluster: Arc<Cluster>,
    pub endpoint: Arc<Endpoint>,
    /// Counts this connection on the endpoint until dropped.
    pub active: ActiveGuard,
}

/// An HTTP connection ready for one request.
pub struct HttpConn {
    pub sender: Sender,
    pub cluster: Arc<Cluster>,
    pub endpoint: Arc<Endpoint>,
    /// Whether it came from the pool (a stale pooled connection may fail
    /// before the request is sent; that is retried for free).
    pub reused: bool,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No cluster of the route had an endpoint that accepted. Nothing was sent,
    /// so the caller may always try elsewhere. `attempts` is how many connects
    /// were tried: 0 means no endpoint was even available.
    #[error("no healthy endpoint in cluster \"{cluster}\"{} ({attempts} connects tried)", if *.failover > 0 { " or its failover clusters" } else { "" })]
    NoHealthyEndpoint {
        cluster: Arc<str>,
        failover: usize,
        attempts: usize,
    },
    /// legate itself ran out of fds, memory or ports. No endpoint is blamed
    /// and no failover cluster tried: they would fail the same way.
    #[error("legate is out of a local resource ({0}); no upstream was blamed")]
    Local(std::io::Error),
}

/// Connects for a new app connection from `client`. `fd` is the upstream
/// socket's place in the fd budget, taken when the app's connection was
/// admitted, so an admitted connection never fails for want of an fd.
pub async fn connect(
    primary: &Arc<Cluster>,
    failover: &[Arc<Cluster>],
    client: SocketAddr,
    fd: fds::Reserved,
) -> Result<Connected, ConnectError> {
    let mut walk = Walk::new(primary, failover, client);
    while let Some((cluster, endpoint)) = walk.next().await {
        match cluster.try_connect(&endpoint).await {
            Ok(stream) => {
                walk.succeeded(cluster);
                let active = endpoint.track();
                return Ok(Connected {
                    stream,
                    fd,
                    cluster: cluster.clone(),
                    endpoint,
                    active,
                });
            }
            Err(Failure::Local(e)) => return Err(ConnectError::Local(e)),
            Err(_) => {}
        }
    }
    Err(walk.exhausted())
}

/// An HTTP connection for one request from `client`: a pooled one to the
/// chosen endpoint when there is one (unless `fresh`, for upgrades, which
/// consume the connection), otherwise a new one.
pub async fn connect_http(
    primary: &Arc<Cluster>,
    failover: &[Arc<Cluster>],
    client: SocketAddr,
    fresh: bool,
    drivers: &Tasks,
) -> Result<HttpConn, ConnectError> {
    let mut walk = Walk::new(primary, failover, client);
    while let Some((cluster, endpoint)) = walk.next().await {
        if !fresh {
            // An h2 connection exists when the cluster says http2 or ALPN chose it.
            let pooled = endpoint
                .pool
                .h2()
                .map(Sender::H2)
                .or_else(|| endpoint.pool.checkout_h1().map(Sender::H1));
            if let Some(sender) = pooled {
                walk.succeeded(cluster);
                return Ok(HttpConn {
                    sender,
                    cluster: cluster.clone(),
                    endpoint,
                    reused: true,
                });
            }
        }
        let fd = match cluster.reserve_fd() {
            Ok(fd) => fd,
            Err(Failure::Local(e)) => return Err(ConnectError::Local(e)),
            Err(_) => continue,
        };
        // Boxed: connecting (TCP, TLS, the HTTP/2 handshake) is the rare
        // path, and inline its state would make every request's future
        // kilobytes larger, copied each time the future moves.
        let stream = match Box::pin(cluster.try_connect(&endpoint)).await {
            Ok(stream) => stream,
            Err(Failure::Local(e)) => return Err(ConnectError::Local(e)),
            Err(_) => continue,
        };
        let http2 = cluster.spec.http2 || stream.alpn_h2();
        match Box::pin(handshake(stream, fd, http2, drivers, &endpoint)).await {
            Ok(sender) => {
                if let Sender::H2(s) = &sender {
                    endpoint.pool.set_h2(s.clone());
                }
                walk.succeeded(cluster);
                return Ok(HttpConn {
                    sender,
                    cluster: cluster.clone(),
                    endpoint,
                    reused: false,
                });
            }
            Err(e) => {
                tracing::warn!(cluster = %cluster.name, endpoint = %endpoint.label, error = %e, "HTTP handshake failed");
            }
        }
    }
    Err(walk.exhausted())
}

/// Starts an HTTP/1.1 (with upgrades) or h2c client connection on `stream`.
/// Its driver runs on `drivers` and holds the socket's fd reservation; it
/// ends when the last sender is dropped (the pool let the connection go), the
/// upstream closes, or the shutdown ends the drivers.
async fn handshake(
    stream: UpstreamStream,
    fd: fds::Reserved,
    http2: bool,
    drivers: &Tasks,
    endpoint: &Arc<Endpoint>,
) -> hyper::Result<Sender> {
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, conn) = http2::Builder::new(drivers.clone())
            .handshake::<_, ProxyBody>(io)
            .await?;
        let endpoint = Arc::downgrade(endpoint);
        drivers.spawn(async move {
            let _fd = fd;
            let _ = conn.await;
            // The pool's sender would keep a request queued at the very end
            // (see `send` in http/proxy.rs) until the next request replaced it.
            if let Some(endpoint) = endpoint.upgrade() {
                endpoint.pool.forget_closed_h2();
            }
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new().handshake::<_, ProxyBody>(io).await?;
        drivers.spawn(async move {
            let _fd = fd;
            let _ = conn.with_upgrades().await;
        });
        Ok(Sender::H1(sender))
    }
}

/// The route's clusters in order, and in each its available endpoints in LB order.
struct Walk<'a> {
    primary: &'a Arc<Cluster>,
    failover: &'a [Arc<Cluster>],
    client: SocketAddr,
    /// Index of the cluster being tried: 0 the primary, then the failovers.
    index: usize,
    /// What is left to try in the current cluster.
    candidates: Candidates,
    attempts: usize,
}

/// A cluster's endpoints still to try, per stage of the walk.
enum Candidates {
    /// The cluster was not looked at yet.
    Unentered,
    /// One endpoint was picked from the full set (all were available).
    FirstPicked(Arc<Endpoint>),
    /// The available endpoints not tried yet.
    Left(Vec<Arc<Endpoint>>),
}

impl<'a> Walk<'a> {
    fn new(primary: &'a Arc<Cluster>, failover: &'a [Arc<Cluster>], client: SocketAddr) -> Self {
        Walk {
            primary,
            failover,
            client,
            index: 0,
            candidates: Candidates::Unentered,
            attempts: 0,
        }
    }

    fn cluster(&self, index: usize) -> Option<&'a Arc<Cluster>> {
        match index {
            0 => Some(self.primary),
            i => self.failover.get(i - 1),
        }
    }

    /// The next endpoint to try, moving on to the next cluster when this one is used up.
    async fn next(&mut self) -> Option<(&'a Arc<Cluster>, Arc<Endpoint>)> {
        loop {
            let cluster = self.cluster(self.index)?;
            match &mut self.candidates {
                Candidates::Unentered => {
                    cluster.wait_resolved().await;
                    // The common case, every endpoint available: pick from the
                    // live set without building a candidate list.
                    let all = cluster.endpoints.load();
                    if !all.is_empty() && all.iter().all(|e| e.is_available()) {
                        let pick =
                            lb::pick(cluster.spec.lb, &all, &cluster.cursor, self.client.ip());
                        let endpoint = all[pick].clone();
                        self.candidates = Candidates::FirstPicked(endpoint.clone());
                        self.attempts += 1;
                        return Some((cluster, endpoint));
                    }
                    self.candidates = Candidates::Left(cluster.available());
                }
                Candidates::FirstPicked(tried) => {
                    let mut left = cluster.available();
                    left.retain(|e| !Arc::ptr_eq(e, tried));
                    self.candidates = Candidates::Left(left);
                }
                Candidates::Left(left) if !left.is_empty() => {
                    let pick = lb::pick(cluster.spec.lb, left, &cluster.cursor, self.client.ip());
                    self.attempts += 1;
                    return Some((cluster, left.swap_remove(pick)));
                }
                Candidates::Left(_) => {
                    if self.index < self.failover.len() {
                        tracing::debug!(cluster = %cluster.name, "no available endpoint, trying the next failover cluster");
                    }
                    self.index += 1;
                    self.candidates = Candidates::Unentered;
                }
            }
        }
    }

    /// `cluster` gave the connection: count a failover if it is not the primary.
    fn succeeded(&self, cluster: &Cluster) {
        if self.index > 0 {
            metrics::get()
                .cluster_failovers_total
                .with_label_values(&[&self.primary.name, &cluster.name])
                .inc();
            tracing::debug!(cluster = %self.primary.name, to = %cluster.name, "failed over");
        }
    }

    /// Every cluster was tried: the error, counted on the primary.
    fn exhausted(self) -> ConnectError {
        self.primary.metrics.no_healthy_endpoint.inc();
        ConnectError::NoHealthyEndpoint {
            cluster: self.primary.name.clone(),
            failover: self.failover.len(),
            attempts: self.attempts,
        }
    }
}
