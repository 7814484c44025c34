//! Clusters and their endpoints: where connections may go, and getting one there.
//!
//! A [`Cluster`] is built by `table::compile` from a validated config and is
//! shared by every table generation in which its config is unchanged, so its
//! live state survives reloads: the endpoint set (static addresses plus what
//! [`dns`] resolved), each endpoint's [`health`] and active-connection count,
//! and the round-robin cursor. All of it is atomics or an `ArcSwap`, so a
//! connection never takes a lock. [`failover`] walks a route's clusters and
//! uses [`lb`] to choose an endpoint; the result is a connected `TcpStream`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use prometheus::IntGauge;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{EndpointConfig, EndpointTarget, HealthConfig, LbPolicy, ResolverConfig};
use crate::fds;
use crate::metrics::{self, ClusterMetrics};
use crate::tls::TlsClient;

pub mod dns;
pub mod failover;
pub mod health;
pub mod lb;
pub mod pool;

pub use failover::{ConnectError, Connected, HttpConn, connect, connect_http};

/// A named group of interchangeable endpoints.
pub struct Cluster {
    pub name: Arc<str>,
    spec: ClusterSpec,
    /// The endpoints connections may use now. Replaced whole by DNS refreshes;
    /// endpoints that stay keep their `Arc` (and so their health and counts).
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// True once every name has been resolved at least once (at once when
    /// there are no names), so first connections wait for DNS instead of failing.
    resolved: watch::Sender<bool>,
    /// The same as a flag, for the per-connection check without the watch's lock.
    resolved_once: AtomicBool,
    /// Round-robin cursor; wraps, only its value modulo the candidates matters.
    cursor: AtomicUsize,
    /// Set when the background tasks (DNS, health probes, pool expiry) have been started.
    started: AtomicBool,
    /// Set at the first gRPC request routed here while it speaks HTTP/1.1
    /// (warned about once, not per request).
    grpc_over_http1: AtomicBool,
    /// Ends the background tasks. Cancelled by the reload that publishes a
    /// table without this cluster (`retire`), not when the last `Arc` drops:
    /// an old generation kept alive by one open connection must not keep
    /// probing and resolving.
    stop: CancellationToken,
    metrics: ClusterMetrics,
    /// The last answer for each DNS name, for `/config` and the status page.
    dns: ArcSwap<Vec<dns::Answer>>,
}

/// Everything in the config that defines a cluster's behaviour. Two clusters
/// with equal specs are interchangeable, which is what lets a reload keep the
/// running one (and its health state) instead of starting from scratch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub endpoints: Vec<EndpointConfig>,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub drain_on_change: Option<Duration>,
    pub health: Option<HealthConfig>,
    pub resolver: ResolverConfig,
    /// Speak h2c to the endpoints (HTTP clusters).
    pub http2: bool,
    /// Pooled HTTP connections unused this long are closed.
    pub pool_idle_timeout: Duration,
    /// Originate TLS; equal when settings and file contents are equal.
    pub tls: Option<Arc<TlsClient>>,
    /// Behind a Postgres listener: TLS starts with an SSLRequest (unless `direct`).
    pub postgres: bool,
    pub cutover: crate::config::Cutover,
}

/// One backend address and its live state.
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The DNS name it was resolved from: the default TLS server name.
    pub host: Option<Arc<str>>,
    /// `IP:PORT`: the `endpoint` label in metrics and logs.
    pub label: Arc<str>,
    health: health::Health,
    /// Connections open through legate to this endpoint (for `least_conn`, `random`).
    active: AtomicUsize,
    healthy_gauge: IntGauge,
    /// Idle HTTP connections for reuse.
    pub pool: pool::Pool,
    /// Cancelled (after the cluster's `drain_on_change` grace) when a reload
    /// removes this endpoint from its cluster's list: TCP sessions to it close.
    pub retired: CancellationToken,
    /// Cancelled by that reload at once: Postgres sessions close at their
    /// next idle point.
    pub leaving: CancellationToken,
    /// The last failed connect or probe and when, for `/config` and the
    /// status page. Written only on failures.
    last_error: ArcSwapOption<(String, SystemTime)>,
}

/// Decrements an endpoint's active count when the connection ends.
pub struct ActiveGuard(Arc<Endpoint>);

// === impl Cluster ===

impl Cluster {
    /// A cluster for `spec`. When it replaces `previous` (same name, changed
    /// spec), the endpoints both list are taken over with their health, active
    /// counts and retire signal, so a scale-out or a timeout change neither
    /// resets health nor loses track of the connections open to them. If the
    /// way to connect (TLS, HTTP/2) changed, their pooled connections are
    /// dropped and their failed connects forgotten.
    pub fn new(name: Arc<str>, spec: ClusterSpec, previous: Option<&Cluster>) -> Self {
        let metrics = metrics::get().cluster(&name);
        if let Some(expiry) = spec.tls.as_ref().and_then(|t| t.cert_expiry) {
            metrics::get()
                .tls_cert_expiry
                .with_label_values(&[&name])
                .set(expiry as f64);
        }
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        if let Some(previous) = previous {
            let same_connect = previous.spec.tls == spec.tls && previous.spec.http2 == spec.http2;
            for e in previous.endpoints().iter() {
                if listed(&spec, e) {
                    if !same_connect {
                        e.pool.clear();
                        e.health.forget_failures();
                        e.update_gauge();
                    }
                    endpoints.push(e.clone());
                }
            }
        }
        for e in &spec.endpoints {
            if let EndpointTarget::Addr(addr) = e.target
                && !endpoints.iter().any(|k| k.addr == addr && k.host.is_none())
            {
                endpoints.push(Arc::new(Endpoint::new(&name, addr, None)));
            }
        }
        let has_names = spec
            .endpoints
            .iter()
            .any(|e| matches!(e.target, EndpointTarget::Name { .. }));
        Cluster {
            name,
            spec,
            endpoints: ArcSwap::from_pointee(endpoints),
            resolved: watch::Sender::new(!has_names),
            resolved_once: AtomicBool::new(!has_names),
            cursor: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            grpc_over_http1: AtomicBool::new(false),
            stop: CancellationToken::new(),
            metrics,
            dns: ArcSwap::default(),
        }
    }

    /// The last DNS answer of each name this cluster resolves (empty before
    /// the first round, and for clusters of addresses).
    pub fn dns_answers(&self) -> Arc<Vec<dns::Answer>> {
        self.dns.load_full()
    }

    pub(crate) fn set_dns_answers(&self, answers: Vec<dns::Answer>) {
        self.dns.store(Arc::new(answers));
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// Starts the background work this cluster needs (DNS refresh, health
    /// probes, expiry of idle pooled connections). Idempotent: a cluster kept
    /// across reloads is started once. The tasks end when [`Cluster::retire`]
    /// is called (or, failing that, once the last table using it is gone).
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let names: Vec<(String, u16)> = self
            .spec
            .endpoints
            .iter()
            .filter_map(|e| match &e.target {
                EndpointTarget::Name { host, port } => Some((host.clone(), *port)),
                EndpointTarget::Addr(_) => None,
            })
            .collect();
        if !names.is_empty() {
            match dns::Dns::new(&self.spec.resolver) {
                Ok(resolver) => {
                    self.spawn_owned(dns::run(Arc::downgrade(self), resolver, names));
                }
                Err(e) => {
                    tracing::error!(cluster = %self.name, error = %e, "cannot create the DNS resolver; names in this cluster stay unresolved");
                    self.mark_resolved();
                }
            }
        }
        if let Some(check) = &self.spec.health {
            self.spawn_owned(health::run(Arc::downgrade(self), check.clone()));
        }
        self.spawn_owned(pool::expire(Arc::downgrade(self)));
    }

    /// Runs `task` until it ends or the cluster is retired (a reload that
    /// drops the cluster; the final table's clusters when the process exits).
    fn spawn_owned(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        // Owned by the cluster's `stop` token, which `retire` cancels.
        tokio::spawn(self.stop.clone().run_until_cancelled_owned(task));
    }

    /// The cluster left the routing table: its background tasks stop now.
    /// Connections still open through it are not touched.
    pub fn retire(&self) {
        self.stop.cancel();
    }

    /// Whether this cluster's config lists `endpoint` (by address, or by the
    /// DNS name and port it was resolved from).
    pub fn lists(&self, endpoint: &Endpoint) -> bool {
        listed(&self.spec, endpoint)
    }

    /// Whether HTTP connections to it may be HTTP/2: `http2: true`, or TLS
    /// that offers `h2` by ALPN.
    pub fn may_speak_http2(&self) -> bool {
        self.spec.http2 || self.spec.tls.as_ref().is_some_and(|t| t.offers_h2)
    }

    /// True the first time a gRPC request is routed here over HTTP/1.1.
    pub fn first_grpc_over_http1(&self) -> bool {
        !self.grpc_over_http1.swap(true, Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// The endpoints in use now, healthy or not.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// The endpoints a new connection may try now: up by active checks and not ejected.
    pub fn available(&self) -> Vec<Arc<Endpoint>> {
        let now = health::now_ms();
        self.endpoints
            .load()
            .iter()
            .filter(|e| e.health.available(now))
            .cloned()
            .collect()
    }

    /// Replaces the resolved part of the endpoint set with `resolved` (static
    /// addresses always stay). Endpoints present before keep their state.
    pub(crate) fn set_resolved(&self, resolved: &[(SocketAddr, Arc<str>)]) {
        let old = self.endpoints.load_full();
        let mut addrs: Vec<SocketAddr> = self
            .spec
            .endpoints
            .iter()
            .filter_map(|e| match e.target {
                EndpointTarget::Addr(a) => Some(a),
                EndpointTarget::Name { .. } => None,
            })
            .collect();
        for (a, _) in resolved {
            if !addrs.contains(a) {
                addrs.push(*a);
            }
        }
        let unchanged = addrs.len() == old.len() && old.iter().all(|e| addrs.contains(&e.addr));
        if !unchanged {
            let next: Vec<Arc<Endpoint>> = addrs
                .iter()
                .map(|a| match old.iter().find(|e| e.addr == *a) {
                    Some(e) => e.clone(),
                    None => {
                        let host = resolved
                            .iter()
                            .find(|(r, _)| r == a)
                            .map(|(_, h)| h.clone());
                        Arc::new(Endpoint::new(&self.name, *a, host))
                    }
                })
                .collect();
            for gone in old.iter().filter(|e| !addrs.contains(&e.addr)) {
                let _ = metrics::get()
                    .endpoint_healthy
                    .remove_label_values(&[&self.name, &gone.label]);
            }
            tracing::info!(
                cluster = %self.name,
                endpoints = ?addrs,
                "endpoint set changed"
            );
            self.endpoints.store(Arc::new(next));
        }
        self.mark_resolved();
    }

    fn mark_resolved(&self) {
        self.resolved_once.store(true, Ordering::Release);
        self.resolved.send_replace(true);
    }

    /// Waits (up to the connect timeout) for the first DNS answers.
    async fn wait_resolved(&self) {
        if self.resolved_once.load(Ordering::Acquire) {
            return;
        }
        let mut rx = self.resolved.subscribe();
        if !*rx.borrow() {
            let _ = tokio::time::timeout(self.spec.connect_timeout, rx.wait_for(|r| *r)).await;
        }
    }

    /// An fd for one upstream socket from the data path's budget; when there
    /// is none the failure is local, counted as `local_error`.
    fn reserve_fd(&self) -> Result<fds::Reserved, Failure> {
        fds::reserve(1).ok_or_else(|| {
            self.metrics.connect_local_error.inc();
            Failure::Local(fds::exhausted())
        })
    }

    /// A connection to this very endpoint (a Postgres cancel must reach the
    /// server that has the session); the caller holds the fd reservation.
    pub(crate) async fn connect_to(&self, endpoint: &Arc<Endpoint>) -> io::Result<UpstreamStream> {
        self.try_connect(endpoint).await.map_err(|f| match f {
            Failure::Connect(e) | Failure::Tls(e) | Failure::Local(e) => e,
        })
    }

    /// One connect attempt to `endpoint` (TCP, then TLS when the cluster
    /// originates it), counted and fed to passive health. The caller holds
    /// the socket's fd reservation. When the kernel says this host is out of
    /// something the failure is local: it is counted as `local_error` and the
    /// endpoint keeps its health.
    async fn try_connect(&self, endpoint: &Arc<Endpoint>) -> Result<UpstreamStream, Failure> {
        let began = Instant::now();
        let attempt = async {
            let tcp = TcpStream::connect(endpoint.addr)
                .await
                .map_err(Failure::Connect)?;
            // Small writes (protocol handshakes, queries) must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
            match &self.spec.tls {
                None => Ok(UpstreamStream::Plain(tcp)),
                Some(tls) => {
                    let mut tcp = tcp;
                    if self.spec.postgres && !tls.direct {
                        crate::postgres::start_tls(&mut tcp)
                            .await
                            .map_err(Failure::Tls)?;
                    }
                    tls.handshake(tcp, endpoint.host.as_deref(), endpoint.addr.ip())
                        .await
                        .map(|s| UpstreamStream::Tls(Box::new(s)))
                        .map_err(Failure::Tls)
                }
            }
        };
        let result = match tokio::time::timeout(self.spec.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.spec.connect_timeout),
            ))),
        };
        let failure = match result {
            Ok(stream) => {
                self.metrics.connect_ok.inc();
                self.metrics
                    .connect_seconds
                    .observe(began.elapsed().as_secs_f64());
                endpoint.connect_succeeded();
                return Ok(stream);
            }
            Err(Failure::Connect(e)) if fds::is_local(&e) => Failure::Local(e),
            Err(f) => f,
        };
        match &failure {
            Failure::Local(e) => {
                self.metrics.connect_local_error.inc();
                tracing::warn!(cluster = %self.name, endpoint = %endpoint.label, error = %e,
                    "upstream connect failed for a local reason (not counted against the endpoint)");
                return Err(failure);
            }
            Failure::Connect(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => self.metrics.connect_refused.inc(),
                io::ErrorKind::TimedOut => self.metrics.connect_timeout.inc(),
                _ => self.metrics.connect_error.inc(),
            },
            Failure::Tls(e) => {
                self.metrics.connect_tls_error.inc();
                tracing::warn!(cluster = %self.name, endpoint = %endpoint.label, error = %e,
                    "TLS handshake with upstream failed");
            }
        }
        endpoint.record_error(format!("connect: {}", failure.error()));
        let ejected_for = endpoint.connect_failed();
        tracing::warn!(cluster = %self.name, endpoint = %endpoint.label, error = %failure.error(),
            ejected_for = ?ejected_for, "upstream connect failed");
        Err(failure)
    }
}

fn listed(spec: &ClusterSpec, endpoint: &Endpoint) -> bool {
    spec.endpoints
        .iter()
        .any(|e| match (&e.target, &endpoint.host) {
            (EndpointTarget::Addr(a), None) => *a == endpoint.addr,
            (EndpointTarget::Name { host, port }, Some(h)) => {
                **h == **host && *port == endpoint.addr.port()
            }
            _ => false,
        })
}

/// Where a connect attempt failed.
pub(crate) enum Failure {
    Connect(io::Error),
    Tls(io::Error),
    /// This host ran out of something (fds, memory, ports): not the endpoint's fault.
    Local(io::Error),
}

impl Failure {
    fn error(&self) -> &io::Error {
        match self {
            Failure::Connect(e) | Failure::Tls(e) | Failure::Local(e) => e,
        }
    }
}

/// A connection to an upstream: plain TCP, or TLS over it.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamStream {
    /// Whether TLS negotiated HTTP/2 through ALPN.
    pub fn alpn_h2(&self) -> bool {
        match self {
            UpstreamStream::Plain(_) => false,
            UpstreamStream::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl tokio::io::AsyncRead for UpstreamStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// === impl Endpoint ===

impl Endpoint {
    fn new(cluster: &str, addr: SocketAddr, host: Option<Arc<str>>) -> Self {
        let label: Arc<str> = Arc::from(addr.to_string());
        let healthy_gauge = metrics::get()
            .endpoint_healthy
            .with_label_values(&[cluster, &label]);
        healthy_gauge.set(1);
        Endpoint {
            addr,
            host,
            label,
            health: health::Health::default(),
            active: AtomicUsize::new(0),
            healthy_gauge,
            pool: pool::Pool::default(),
            retired: CancellationToken::new(),
            leaving: CancellationToken::new(),
            last_error: ArcSwapOption::empty(),
        }
    }

    /// The last failed connect or health probe, and when it happened.
    pub fn last_error(&self) -> Option<Arc<(String, SystemTime)>> {
        self.last_error.load_full()
    }

    fn record_error(&self, error: String) {
        self.last_error
            .store(Some(Arc::new((error, SystemTime::now()))));
    }

    /// Up by active checks, and how much longer a passive ejection lasts.
    pub fn health_state(&self) -> (bool, Option<Duration>) {
        self.health.state(health::now_ms())
    }

    /// Connections open to this endpoint now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether new connections may use it: up by active checks, not ejected.
    pub fn is_available(&self) -> bool {
        self.health.available(health::now_ms())
    }

    fn connect_succeeded(&self) {
        self.health.connect_succeeded();
        self.update_gauge();
    }

    fn connect_failed(&self) -> Duration {
        let d = self.health.connect_failed(health::now_ms());
        self.update_gauge();
        d
    }

    fn probed(&self, result: Result<(), String>, check: &HealthConfig, cluster: &str) {
        let ok = result.is_ok();
        if let Err(e) = result {
            self.record_error(format!("health check: {e}"));
        }
        if let Some(up) = self.health.probed(ok, check) {
            tracing::info!(cluster, endpoint = %self.label, healthy = up, "active health check changed state");
        }
        self.update_gauge();
    }

    fn update_gauge(&self) {
        self.healthy_gauge.set(i64::from(self.is_available()));
    }

    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
