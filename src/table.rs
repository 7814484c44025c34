//! The compiled routing table: the immutable snapshot every connection reads.
//!
//! `compile` turns a validated [`Config`] into a [`RoutingTable`] with names
//! interned, cluster references resolved to `Arc<Cluster>` and metric handles
//! looked up, so the hot path does no string lookups and no validation. The
//! table is published whole through one `ArcSwap`; a connection loads it once
//! and keeps that snapshot for its whole life.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use serde_saphyr::Spanned;

use crate::config::{
    Config, Cutover, EndpointTarget, HeaderMatchConfig, HeaderOpsConfig, HealthKind, LbPolicy,
    Protocol, RouteConfig, SplitConfig,
};
use crate::metrics::{self, Series};
use crate::postgres::fence;
use crate::tls::TlsClient;
use crate::upstream::{Cluster, ClusterSpec};

/// One generation of the whole configuration, ready to serve.
pub struct RoutingTable {
    /// 1 for the table loaded at start; each successful reload adds one.
    pub generation: u64,
    pub listeners: Vec<Listener>,
    /// In config order, for `/config`.
    pub clusters: Vec<Arc<Cluster>>,
}

/// A listener as compiled: where it binds and where its connections go.
pub struct Listener {
    pub name: Arc<str>,
    /// As configured; port 0 means "any free port".
    pub addr: SocketAddr,
    /// Connections open at once before the accept loop pauses.
    pub max_connections: usize,
    pub kind: ListenerKind,
    pub metrics: metrics::ListenerMetrics,
}

/// What a listener does with its connections.
pub enum ListenerKind {
    /// Forward the bytes to the target's cluster.
    Tcp(TcpListener),
    /// Serve HTTP/1.1 and h2c; route each request.
    Http(http::HttpListener),
}

/// A TCP listener: where its connections go, and how long one may sit idle.
pub struct TcpListener {
    pub target: Target,
    /// What legate understands of the bytes.
    pub wire: Wire,
    /// Close a connection that moved no byte either way for this long; `None`: never.
    pub idle_timeout: Option<std::time::Duration>,
}

/// How much of a TCP listener's protocol legate reads.
pub enum Wire {
    /// Opaque bytes (spliced).
    Raw,
    /// PostgreSQL: startup, cancel keys, transaction boundaries.
    Postgres(metrics::PostgresMetrics),
    /// Kafka: broker addresses rewritten to local ports.
    Kafka {
        metrics: metrics::KafkaMetrics,
        ports: Arc<crate::kafka::brokers::BrokerPorts>,
    },
}

/// Where a listener's new connections go.
pub enum Target {
    Cluster(Arc<Route>),
    /// Weighted choice per connection.
    Split(Split),
}

/// A weighted choice that cannot be empty: `first` always exists, weights are
/// positive (zero-weight entries are dropped at compile time) and `total` is
/// their sum, summed in u64 so no config can wrap it.
pub struct Split {
    first: (Arc<Route>, u64),
    rest: Box<[(Arc<Route>, u64)]>,
    total: u64,
}

/// One listener → cluster path, and the signal that retires it. A TCP
/// session holds its route (not the whole table) for its life.
pub struct Route {
    pub cluster: Arc<Cluster>,
    /// Tried in order when `cluster` has no healthy endpoint.
    pub failover: Box<[Arc<Cluster>]>,
    /// Shared by every table generation in which this listener still sends to
    /// this cluster with the same endpoints ([`carry_over`]). Cancelled, after
    /// the cluster's `drain_on_change` grace, once a reload sends the traffic
    /// elsewhere; connections on the route then close so the app reconnects.
    pub retired: CancellationToken,
    /// Cancelled at once by that reload: sessions that can tell (Postgres)
    /// close at their next idle point, before the grace.
    pub leaving: CancellationToken,
    /// Postgres sessions open on this route (carried over with `retired`).
    pub sessions: Arc<fence::Sessions>,
    /// Postgres `cutover: fenced`: new sessions wait for the routes this one
    /// replaced to empty.
    pub fence: Option<Arc<fence::Fence>>,
}

/// A route or an endpoint the new table no longer has, whose connections
/// close after `grace`.
#[derive(Debug)]
pub struct Retired {
    /// The listener whose route moved; `None` for an endpoint that left its cluster.
    pub listener: Option<Arc<str>>,
    pub cluster: Arc<str>,
    /// The endpoint that left; `None` for a whole route.
    pub endpoint: Option<Arc<str>>,
    pub grace: std::time::Duration,
    pub token: CancellationToken,
    /// Cancelled when the retirement is scheduled (see [`Route::leaving`]).
    pub leaving: CancellationToken,
}

pub mod described;
pub mod http;

// === impl RoutingTable ===

/// A config that passed validation but still cannot be compiled: validation
/// and compile disagree. Rejected like any invalid config, never a panic.
#[derive(Debug, thiserror::Error)]
#[error("cannot compile the configuration: {0} (it passed validation; this is a bug in legate)")]
pub struct CompileError(String);

/// Compiles a validated config. Validation rejected everything that could be
/// wrong, but compile does not trust it blindly: a reference it cannot resolve
/// is an error, not a panic. A cluster whose spec equals one in `previous` is
/// taken over as is, so its endpoint health, DNS answers and background tasks
/// carry on across the reload.
pub fn compile(
    config: &Config,
    tls: &HashMap<String, Arc<TlsClient>>,
    generation: u64,
    previous: Option<&RoutingTable>,
) -> Result<RoutingTable, CompileError> {
    let m = metrics::get();
    let postgres_clusters = postgres_clusters(config);
    let clusters: Vec<Arc<Cluster>> = config
        .clusters
        .iter()
        .map(|c| {
            let spec = ClusterSpec {
                endpoints: c.endpoints.value.iter().map(|e| e.value.clone()).collect(),
                lb: c.lb,
                connect_timeout: c.connect_timeout.0,
                drain_on_change: c.drain_on_change.map(|d| d.0),
                health: c.health.as_ref().map(|h| h.value.clone()),
                resolver: config.resolver.clone(),
                http2: c.http2,
                pool_idle_timeout: c.pool_idle_timeout.0,
                tls: tls.get(&c.name.value).cloned(),
                postgres: postgres_clusters.contains(c.name.value.as_str()),
                cutover: c.cutover,
            };
            let same_name =
                previous.and_then(|p| p.clusters.iter().find(|old| *old.name == *c.name.value));
            match same_name {
                Some(old) if *old.spec() == spec => old.clone(),
                _ => Arc::new(Cluster::new(
                    Arc::from(c.name.value.as_str()),
                    spec,
                    same_name.map(|c| &**c),
                )),
            }
        })
        .collect();
    let by_name: HashMap<&str, &Arc<Cluster>> = clusters.iter().map(|c| (&*c.name, c)).collect();
    let cluster = |name: &str| {
        by_name
            .get(name)
            .map(|c| Arc::clone(c))
            .ok_or_else(|| CompileError(format!("unknown cluster \"{name}\"")))
    };
    let mut failover_of: HashMap<&str, Box<[Arc<Cluster>]>> = HashMap::new();
    for c in &config.clusters {
        let chain = c
            .failover
            .iter()
            .map(|f| cluster(&f.value))
            .collect::<Result<_, _>>()?;
        failover_of.insert(c.name.value.as_str(), chain);
    }
    let route = |name: &str| -> Result<Arc<Route>, CompileError> {
        Ok(Arc::new(Route {
            cluster: cluster(name)?,
            failover: failover_of.get(name).cloned().unwrap_or_default(),
            retired: CancellationToken::new(),
            leaving: CancellationToken::new(),
            sessions: Arc::default(),
            fence: None,
        }))
    };
    let target = |cluster: &Option<Spanned<String>>,
                  split: &Option<Spanned<Vec<SplitConfig>>>|
     -> Result<Target, CompileError> {
        match (cluster, split) {
            (Some(c), _) => Ok(Target::Cluster(route(&c.value)?)),
            (None, Some(split)) => {
                let routes: Vec<(Arc<Route>, u64)> = split
                    .value
                    .iter()
                    .filter(|s| s.weight > 0)
                    .map(|s| Ok((route(&s.cluster.value)?, u64::from(s.weight))))
                    .collect::<Result<_, CompileError>>()?;
                Split::new(routes)
                    .map(Target::Split)
                    .ok_or_else(|| CompileError("a split whose weights are all 0".to_string()))
            }
            (None, None) => Err(CompileError(
                "a listener or route with neither cluster nor split".to_string(),
            )),
        }
    };

    let mut listeners = Vec::with_capacity(config.listeners.len());
    for l in &config.listeners {
        let name: Arc<str> = Arc::from(l.name.value.as_str());
        let kind = match (l.protocol, &l.routes) {
            (Protocol::Tcp | Protocol::Postgres | Protocol::Kafka, _) => {
                ListenerKind::Tcp(TcpListener {
                    target: target(&l.cluster, &l.split)?,
                    wire: match (l.protocol, &l.broker_ports) {
                        (Protocol::Postgres, _) => Wire::Postgres(m.postgres(&name)),
                        (Protocol::Kafka, Some(range)) => Wire::Kafka {
                            metrics: m.kafka(&name),
                            ports: crate::kafka::brokers::of(
                                &name,
                                l.listen.value.0.ip(),
                                range.value,
                            ),
                        },
                        (Protocol::Kafka, None) => {
                            return Err(CompileError(
                                "a kafka listener without broker_ports".to_string(),
                            ));
                        }
                        _ => Wire::Raw,
                    },
                    idle_timeout: l.idle_timeout.map(|t| t.0),
                })
            }
            (Protocol::Http, routes) => {
                let routes: Box<[http::HttpRoute]> = match routes {
                    Some(routes) => routes
                        .value
                        .iter()
                        .enumerate()
                        .map(|(i, r)| {
                            let r = &r.value;
                            let route_name: Arc<str> = match &r.name {
                                Some(n) => Arc::from(n.value.as_str()),
                                None => Arc::from(i.to_string()),
                            };
                            compile_route(
                                &name,
                                route_name,
                                r,
                                target(&r.cluster, &r.split)?,
                                &by_name,
                            )
                        })
                        .collect::<Result<_, _>>()?,
                    None => Box::new([compile_route(
                        &name,
                        Arc::from("0"),
                        &RouteConfig::catch_all(),
                        target(&l.cluster, &l.split)?,
                        &by_name,
                    )?]),
                };
                ListenerKind::Http(http::HttpListener {
                    routes,
                    access_log: l.access_log,
                    no_route: m.http_codes(&name, "none", "none")[3].clone(),
                    limits: http::ConnLimits {
                        header_timeout: l.header_timeout.map_or(DEFAULT_HEADER_TIMEOUT, |t| t.0),
                        idle_timeout: l.idle_timeout.map_or(DEFAULT_HTTP_IDLE_TIMEOUT, |t| t.0),
                        max_headers_size: l.max_request_headers_size as usize,
                        stream_idle_timeout: l
                            .stream_idle_timeout
                            .map_or(DEFAULT_STREAM_IDLE_TIMEOUT, |t| t.0),
                        versions: l
                            .http_versions
                            .as_ref()
                            .map_or(http::HttpVersions::Both, |v| {
                                http::HttpVersions::from_config(&v.value)
                            }),
                    },
                })
            }
        };
        listeners.push(Listener {
            metrics: m.listener(&name),
            name,
            addr: l.listen.value.0,
            max_connections: l.max_connections as usize,
            kind,
        });
    }

    Ok(RoutingTable {
        generation,
        listeners,
        clusters,
    })
}

/// Default `header_timeout` of HTTP listeners.
const DEFAULT_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Default `idle_timeout` of HTTP listeners: below the 60-75 s that common
/// clients and load balancers keep idle connections, so legate is not the one
/// surprising them mid-request.
const DEFAULT_HTTP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
const DEFAULT_STREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl Listener {
    /// Every route (listener → cluster path) this listener may use.
    pub fn routes(&self) -> Box<dyn Iterator<Item = &Arc<Route>> + '_> {
        match &self.kind {
            ListenerKind::Tcp(t) => Box::new(t.target.routes()),
            ListenerKind::Http(h) => Box::new(h.routes.iter().flat_map(|r| r.target.routes())),
        }
    }
}

impl RoutingTable {
    /// Starts the background work of every cluster (DNS refresh, health
    /// probes); clusters kept from an earlier table are already running.
    pub fn start(&self) {
        for c in &self.clusters {
            c.start();
        }
    }

    /// The metric series that exist because of this table's objects.
    pub fn series(&self) -> HashSet<Series> {
        let mut series = HashSet::new();
        for l in &self.listeners {
            series.insert(Series::Listener(l.name.clone()));
            for route in l.routes() {
                for to in route.failover.iter() {
                    series.insert(Series::Failover {
                        cluster: route.cluster.name.clone(),
                        to: to.name.clone(),
                    });
                }
            }
            if let ListenerKind::Http(h) = &l.kind {
                for r in h.routes.iter() {
                    series.insert(Series::Route {
                        listener: l.name.clone(),
                        route: r.name.clone(),
                    });
                    for (cluster, _) in r.metrics.by_cluster.iter() {
                        series.insert(Series::RouteCluster {
                            listener: l.name.clone(),
                            route: r.name.clone(),
                            cluster: cluster.clone(),
                        });
                    }
                }
            }
        }
        for c in &self.clusters {
            series.insert(Series::Cluster(c.name.clone()));
            for e in c.endpoints().iter() {
                series.insert(Series::Endpoint {
                    cluster: c.name.clone(),
                    endpoint: e.label.clone(),
                });
            }
        }
        series
    }

    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| &*l.name == name)
    }

    /// The effective configuration as JSON, for `GET /config` and `legate check`.
    /// `bound` maps listener names to the addresses they actually bound.
    pub fn describe(&self, bound: &HashMap<Arc<str>, SocketAddr>) -> serde_json::Value {
        let listeners: Vec<_> = self
            .listeners
            .iter()
            .map(|l| {
                let mut v = json!({
                    "name": &*l.name,
                    "listen": l.addr.to_string(),
                    "max_connections": l.max_connections,
                });
                match &l.kind {
                    ListenerKind::Tcp(tcp) => {
                        v["protocol"] = json!(match &tcp.wire {
                            Wire::Raw => "tcp",
                            Wire::Postgres(_) => "postgres",
                            Wire::Kafka { .. } => "kafka",
                        });
                        if let Wire::Kafka { ports, .. } = &tcp.wire {
                            v["broker_ports"] = json!(ports.range().to_string());
                        }
                        merge_json(&mut v, describe_target(&tcp.target));
                        if let Some(t) = tcp.idle_timeout {
                            v["idle_timeout"] = json!(humantime::format_duration(t).to_string());
                        }
                    }
                    ListenerKind::Http(h) => {
                        v["protocol"] = json!("http");
                        v["access_log"] = json!(h.access_log);
                        v["header_timeout"] =
                            json!(humantime::format_duration(h.limits.header_timeout).to_string());
                        v["idle_timeout"] =
                            json!(humantime::format_duration(h.limits.idle_timeout).to_string());
                        v["max_request_headers_size"] = json!(h.limits.max_headers_size);
                        v["http_versions"] = json!(h.limits.versions.describe());
                        v["routes"] = h.routes.iter().map(describe_route).collect();
                    }
                }
                if let Some(addr) = bound.get(&l.name) {
                    v["bound"] = json!(addr.to_string());
                }
                v
            })
            .collect();
        let clusters: Vec<_> = self
            .clusters
            .iter()
            .map(|c| {
                let spec = c.spec();
                let mut v = json!({
                    "name": &*c.name,
                    "endpoints": spec.endpoints.iter().map(|e| match &e.target {
                        EndpointTarget::Addr(a) => json!({ "endpoint": e.written, "address": a.to_string() }),
                        EndpointTarget::Name { .. } => json!({ "endpoint": e.written, "dns": true }),
                    }).collect::<Vec<_>>(),
                    "resolved": c.endpoints().iter().map(describe_endpoint).collect::<Vec<_>>(),
                    "lb": match spec.lb {
                        LbPolicy::RoundRobin => "round_robin",
                        LbPolicy::LeastConn => "least_conn",
                        LbPolicy::Random => "random",
                        LbPolicy::Hash => "hash",
                    },
                    "connect_timeout": humantime::format_duration(spec.connect_timeout).to_string(),
                });
                let dns = c.dns_answers();
                if !dns.is_empty() {
                    v["dns"] = dns
                        .iter()
                        .map(|a| {
                            json!({
                                "name": a.name,
                                "port": a.port,
                                "addresses": a.addrs.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>(),
                                "ttl": a.ttl.map(|t| humantime::format_duration(t).to_string()),
                                "resolved_at": a.at.map(rfc3339),
                                "error": a.error,
                            })
                        })
                        .collect();
                }
                if let Some(grace) = spec.drain_on_change {
                    v["drain_on_change"] = json!(humantime::format_duration(grace).to_string());
                }
                if spec.http2 {
                    v["http2"] = json!(true);
                }
                if spec.cutover == Cutover::Fenced {
                    v["cutover"] = json!("fenced");
                }
                if let Some(tls) = &spec.tls {
                    v["tls"] = tls.describe();
                }
                if let Some(h) = &spec.health {
                    v["health"] = json!({
                        "kind": match h.kind {
                            HealthKind::Tcp => "tcp",
                            HealthKind::Postgres => "postgres",
                        },
                        "interval": humantime::format_duration(h.interval.0).to_string(),
                        "timeout": humantime::format_duration(h.timeout.0).to_string(),
                        "unhealthy": h.unhealthy,
                        "healthy": h.healthy,
                        "http_path": h.http_path,
                    });
                }
                let failover: Vec<&str> = self
                    .listeners
                    .iter()
                    .flat_map(|l| l.routes())
                    .find(|r| Arc::ptr_eq(&r.cluster, c))
                    .map(|r| r.failover.iter().map(|f| &*f.name).collect())
                    .unwrap_or_default();
                if !failover.is_empty() {
                    v["failover"] = json!(failover);
                }
                v
            })
            .collect();
        json!({
            "generation": self.generation,
            "listeners": listeners,
            "clusters": clusters,
        })
    }
}

/// One endpoint's live state: health by active checks (`up`), a passive
/// ejection still running (`ejected_for`), open connections, the last failure.
fn describe_endpoint(e: &Arc<crate::upstream::Endpoint>) -> serde_json::Value {
    let (up, ejected) = e.health_state();
    let mut v = json!({
        "address": &*e.label,
        "healthy": e.is_available(),
        "up": up,
        "active_connections": e.active(),
    });
    if let Some(left) = ejected {
        // Whole milliseconds: the exact nanoseconds are noise to a reader.
        let left = std::time::Duration::from_millis(left.as_millis() as u64);
        v["ejected_for"] = json!(humantime::format_duration(left).to_string());
        v["ejected_until"] = json!(rfc3339(std::time::SystemTime::now() + left));
    }
    if let Some(error) = e.last_error() {
        let (message, at) = &*error;
        v["last_error"] = json!({ "message": message, "at": rfc3339(*at) });
    }
    v
}

/// A wall-clock time as `/config` writes it, to the second.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn describe_target(target: &Target) -> serde_json::Value {
    match target {
        Target::Cluster(r) => json!({ "cluster": &*r.cluster.name }),
        Target::Split(split) => json!({
            "split": split
                .weighted()
                .map(|(r, w)| json!({ "cluster": &*r.cluster.name, "weight": w }))
                .collect::<Vec<_>>()
        }),
    }
}

fn describe_route(r: &http::HttpRoute) -> serde_json::Value {
    let m = &r.matches;
    let mut matches = json!({});
    match &m.host {
        Some(http::HostMatch::Exact(h)) => matches["host"] = json!(h),
        Some(http::HostMatch::Suffix(s)) => matches["host"] = json!(format!("*{s}")),
        None => {}
    }
    match &m.path {
        Some(http::PathMatch::Exact(p)) => matches["path"] = json!(p),
        Some(http::PathMatch::Prefix(p)) => matches["path_prefix"] = json!(p),
        None => {}
    }
    if let Some(method) = &m.method {
        matches["method"] = json!(method.as_str());
    }
    if !m.headers.is_empty() {
        matches["headers"] = m
            .headers
            .iter()
            .map(|(k, v)| {
                let v = v
                    .as_ref()
                    .map_or(json!(true), |v| json!(v.to_str().unwrap_or("")));
                (k.to_string(), v)
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    let mut v = json!({
        "name": &*r.name,
        "match": matches,
        "timeout": r.timeout.map_or("none".to_string(), |t| humantime::format_duration(t).to_string()),
        "retries": r.retries,
    });
    merge_json(&mut v, describe_target(&r.target));
    if let Some(h) = &r.rewrite_host {
        v["rewrite"]["host"] = json!(h.to_str().unwrap_or(""));
    }
    if let Some(p) = &r.rewrite_prefix {
        v["rewrite"]["path_prefix"] = json!(p);
    }
    for (key, ops) in [
        ("request_headers", &r.request_headers),
        ("response_headers", &r.response_headers),
    ] {
        if !ops.add.is_empty() || !ops.remove.is_empty() {
            v[key] = json!({
                "add": ops.add.iter().map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("")))).collect::<serde_json::Map<_, _>>(),
                "remove": ops.remove.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            });
        }
    }
    if let Some(t) = r.max_grpc_timeout {
        v["max_grpc_timeout"] = json!(humantime::format_duration(t).to_string());
    }
    if let Some(mirror) = &r.mirror {
        v["mirror"] =
            json!({ "cluster": &*mirror.cluster.name, "percent": mirror.fraction * 100.0 });
    }
    v
}

fn merge_json(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// Compiles one HTTP route. Header names and values were validated, so the
/// parses below cannot fail; a value that somehow does is skipped.
fn compile_route(
    listener: &str,
    name: Arc<str>,
    r: &RouteConfig,
    target: Target,
    clusters: &HashMap<&str, &Arc<Cluster>>,
) -> Result<http::HttpRoute, CompileError> {
    let mirror = match &r.mirror {
        Some(mirror) => {
            let cluster = clusters.get(mirror.value.cluster.as_str()).ok_or_else(|| {
                CompileError(format!(
                    "unknown mirror cluster \"{}\"",
                    mirror.value.cluster
                ))
            })?;
            Some(http::Mirror {
                cluster: Arc::clone(cluster),
                fraction: mirror.value.percent / 100.0,
            })
        }
        None => None,
    };
    let m = metrics::get();
    let mut reachable: Vec<Arc<str>> = Vec::new();
    for route in target.routes() {
        for c in std::iter::once(&route.cluster).chain(route.failover.iter()) {
            if !reachable.contains(&c.name) {
                reachable.push(c.name.clone());
            }
        }
    }
    let by_cluster = reachable
        .into_iter()
        .map(|c| {
            let codes = m.http_codes(listener, &name, &c);
            (c, codes)
        })
        .collect();
    let matches = &r.matches;
    Ok(http::HttpRoute {
        matches: http::RouteMatch {
            host: matches.host.as_ref().map(|h| match h.strip_prefix('*') {
                Some(suffix) => http::HostMatch::Suffix(suffix.to_ascii_lowercase().into()),
                None => http::HostMatch::Exact(h.to_ascii_lowercase().into()),
            }),
            path: match (&matches.path, &matches.path_prefix) {
                (Some(p), _) => Some(http::PathMatch::Exact(p.as_str().into())),
                (None, Some(p)) => Some(http::PathMatch::Prefix(p.as_str().into())),
                (None, None) => None,
            },
            method: matches
                .method
                .as_ref()
                .and_then(|m| ::http::Method::from_bytes(m.as_bytes()).ok()),
            headers: matches
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    let name = ::http::HeaderName::from_bytes(k.as_bytes()).ok()?;
                    let value = match v {
                        // `false` was rejected by validation.
                        HeaderMatchConfig::Present(_) => None,
                        HeaderMatchConfig::Exact(v) => Some(::http::HeaderValue::from_str(v).ok()?),
                    };
                    Some((name, value))
                })
                .collect(),
        },
        target,
        rewrite_host: r
            .rewrite
            .as_ref()
            .and_then(|rw| rw.value.host.as_ref())
            .and_then(|h| ::http::HeaderValue::from_str(h).ok()),
        rewrite_prefix: r
            .rewrite
            .as_ref()
            .and_then(|rw| rw.value.path_prefix.as_deref())
            .map(Into::into),
        request_headers: header_ops(&r.request_headers),
        response_headers: header_ops(&r.response_headers),
        timeout: match r.timeout {
            None => Some(DEFAULT_HTTP_TIMEOUT),
            Some(t) if t.0.is_zero() => None,
            Some(t) => Some(t.0),
        },
        max_grpc_timeout: r.max_grpc_timeout.map(|t| t.0),
        retries: r.retries,
        budget: http::RetryBudget::default(),
        mirror,
        metrics: http::RouteMetrics {
            seconds: m.http_seconds(listener, &name),
            by_cluster,
        },
        name,
    })
}

/// Default route timeout (until the response head), as in Envoy.
const DEFAULT_HTTP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

fn header_ops(ops: &HeaderOpsConfig) -> http::HeaderOps {
    http::HeaderOps {
        remove: ops
            .remove
            .iter()
            .filter_map(|n| ::http::HeaderName::from_bytes(n.as_bytes()).ok())
            .collect(),
        add: ops
            .add
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    ::http::HeaderName::from_bytes(k.as_bytes()).ok()?,
                    ::http::HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect(),
    }
}

/// The clusters a `protocol: postgres` listener reaches (targets and their
/// failover chains): their TLS starts with an SSLRequest.
fn postgres_clusters(config: &Config) -> std::collections::HashSet<&str> {
    let mut names: Vec<&str> = Vec::new();
    for l in config
        .listeners
        .iter()
        .filter(|l| l.protocol == Protocol::Postgres)
    {
        names.extend(l.cluster.iter().map(|c| c.value.as_str()));
        if let Some(split) = &l.split {
            names.extend(split.value.iter().map(|s| s.cluster.value.as_str()));
        }
    }
    let mut i = 0;
    while i < names.len() {
        if let Some(c) = config.clusters.iter().find(|c| c.name.value == names[i]) {
            for f in &c.failover {
                if !names.contains(&f.value.as_str()) {
                    names.push(f.value.as_str());
                }
            }
        }
        i += 1;
    }
    names.into_iter().collect()
}

/// Carries the retire tokens of routes that survive from `old` into `new`, and
/// returns what `new` no longer has whose cluster asks for `drain_on_change`:
/// - a route, when its listener stays but no longer sends to that cluster
///   (another cluster, or a split weight of 0); all its connections close;
/// - an endpoint, when its cluster stays but the endpoint left the cluster's
///   list; only connections to that endpoint close, so adding an endpoint (a
///   scale-out) closes nothing.
///
/// A route survives when the same listener still sends to a cluster of the
/// same name. A listener that left the config drains on its own: its app cannot
/// reconnect to it anyway. Pure: the caller schedules the returned retirements.
pub fn carry_over(old: &RoutingTable, new: &mut RoutingTable) -> Vec<Retired> {
    let mut retired = Vec::new();
    for old_listener in &old.listeners {
        let ListenerKind::Tcp(old_tcp) = &old_listener.kind else {
            // HTTP requests are short and each reads the current table: nothing to drain.
            continue;
        };
        let Some(new_listener) = new
            .listeners
            .iter_mut()
            .find(|l| l.name == old_listener.name)
        else {
            continue;
        };
        let mut new_routes: Vec<&mut Arc<Route>> = match &mut new_listener.kind {
            ListenerKind::Tcp(tcp) => tcp.target.routes_mut().collect(),
            ListenerKind::Http(_) => Vec::new(),
        };
        let mut fenced = Vec::new();
        for old_route in old_tcp.target.routes() {
            match new_routes
                .iter_mut()
                .find(|r| r.cluster.name == old_route.cluster.name)
            {
                Some(r) => {
                    **r = Arc::new(Route {
                        cluster: r.cluster.clone(),
                        failover: r.failover.clone(),
                        retired: old_route.retired.clone(),
                        leaving: old_route.leaving.clone(),
                        sessions: old_route.sessions.clone(),
                        fence: old_route.fence.clone(),
                    })
                }
                None => {
                    // A Kafka client must not mix two clusters: its old
                    // connections close at once unless a grace is set.
                    let grace = match &old_tcp.wire {
                        Wire::Kafka { .. } => {
                            Some(old_route.cluster.spec().drain_on_change.unwrap_or_default())
                        }
                        _ => old_route.cluster.spec().drain_on_change,
                    };
                    if let Some(grace) = grace {
                        retired.push(Retired {
                            listener: Some(old_listener.name.clone()),
                            cluster: old_route.cluster.name.clone(),
                            endpoint: None,
                            grace,
                            token: old_route.retired.clone(),
                            leaving: old_route.leaving.clone(),
                        });
                        if old_route.cluster.spec().cutover == Cutover::Fenced {
                            fenced.push((old_route.sessions.clone(), grace));
                        }
                    }
                }
            }
        }
        // The listener's new targets wait for the fenced old ones to empty.
        if !fenced.is_empty() {
            let grace = fenced.iter().map(|(_, g)| *g).max().unwrap_or_default();
            let fence = Arc::new(fence::Fence::new(
                fenced.into_iter().map(|(s, _)| s).collect(),
                grace,
            ));
            let old_names: Vec<&str> = old_tcp.target.routes().map(|r| &*r.cluster.name).collect();
            for r in new_routes.iter_mut() {
                if !old_names.contains(&&*r.cluster.name) {
                    **r = Arc::new(Route {
                        cluster: r.cluster.clone(),
                        failover: r.failover.clone(),
                        retired: r.retired.clone(),
                        leaving: r.leaving.clone(),
                        sessions: r.sessions.clone(),
                        fence: Some(fence.clone()),
                    });
                }
            }
        }
    }
    for old_cluster in &old.clusters {
        let Some(grace) = old_cluster.spec().drain_on_change else {
            continue;
        };
        let Some(new_cluster) = new.clusters.iter().find(|c| c.name == old_cluster.name) else {
            // Gone from the config: the routes that used it were retired above.
            continue;
        };
        if Arc::ptr_eq(old_cluster, new_cluster) {
            continue;
        }
        for endpoint in old_cluster.endpoints().iter() {
            if !new_cluster.lists(endpoint) {
                retired.push(Retired {
                    listener: None,
                    cluster: old_cluster.name.clone(),
                    endpoint: Some(endpoint.label.clone()),
                    grace,
                    token: endpoint.retired.clone(),
                    leaving: endpoint.leaving.clone(),
                });
            }
        }
    }
    retired
}

/// Ends what `old` had and the published `new` does not: clusters that are
/// not carried over stop their DNS and health tasks now (connections still
/// open through them are not touched), and the metric series of removed
/// listeners, routes, clusters and endpoints are removed.
pub fn retire(old: &RoutingTable, new: &RoutingTable) {
    for c in &old.clusters {
        if !new.clusters.iter().any(|n| Arc::ptr_eq(n, c)) {
            c.retire();
        }
    }
    let kept = new.series();
    for gone in old.series().difference(&kept) {
        metrics::get().remove(gone);
    }
}

// === impl Target ===

impl Target {
    /// The route for one new connection.
    pub fn pick(&self) -> &Arc<Route> {
        match self {
            Target::Cluster(r) => r,
            Target::Split(split) => split.pick(),
        }
    }

    /// Every route this target may pick.
    pub fn routes(&self) -> impl Iterator<Item = &Arc<Route>> {
        let (single, rest) = match self {
            Target::Cluster(r) => (r, &[][..]),
            Target::Split(s) => (&s.first.0, &s.rest[..]),
        };
        std::iter::once(single).chain(rest.iter().map(|(r, _)| r))
    }

    fn routes_mut(&mut self) -> impl Iterator<Item = &mut Arc<Route>> {
        let (single, rest) = match self {
            Target::Cluster(r) => (r, &mut [][..]),
            Target::Split(s) => (&mut s.first.0, &mut s.rest[..]),
        };
        std::iter::once(single).chain(rest.iter_mut().map(|(r, _)| r))
    }
}

// === impl Split ===

impl Split {
    /// `None` when no route has a positive weight.
    fn new(routes: Vec<(Arc<Route>, u64)>) -> Option<Split> {
        let mut routes = routes.into_iter().filter(|(_, w)| *w > 0);
        let first = routes.next()?;
        let rest: Box<[(Arc<Route>, u64)]> = routes.collect();
        let total = rest
            .iter()
            .fold(first.1, |sum, (_, w)| sum.saturating_add(*w));
        Some(Split { first, rest, total })
    }

    fn pick(&self) -> &Arc<Route> {
        let mut ticket = rand::random_range(0..self.total);
        for (route, weight) in std::iter::once(&self.first).chain(self.rest.iter()) {
            if ticket < *weight {
                return route;
            }
            ticket -= weight;
        }
        // Unreachable while `total` is the sum of the weights.
        &self.first.0
    }

    /// Each route with its weight, in config order.
    pub fn weighted(&self) -> impl Iterator<Item = (&Arc<Route>, u64)> {
        std::iter::once(&self.first)
            .chain(self.rest.iter())
            .map(|(r, w)| (r, *w))
    }
}

#[cfg(test)]
mod tests;
