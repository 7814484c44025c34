//! The compiled routing table: the immutable snapshot every connection reads.
//!
//! `compile` turns a validated [`Config`] into a [`RoutingTable`] with names
//! interned, cluster references resolved to `Arc<Cluster>` and metric handles
//! looked up, so the hot path does no string lookups and no validation. The
//! table is published whole through one `ArcSwap`; a connection loads it once
//! and keeps that snapshot for its whole life.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use serde_saphyr::Spanned;

use crate::config::{
    Config, EndpointTarget, HeaderMatchConfig, HeaderOpsConfig, LbPolicy, Protocol, RouteConfig,
    SplitConfig,
};
use crate::metrics;
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
    pub kind: ListenerKind,
    pub metrics: metrics::ListenerMetrics,
}

/// What a listener does with its connections.
pub enum ListenerKind {
    /// Forward the bytes to the target's cluster.
    Tcp(Target),
    /// Serve HTTP/1.1 and h2c; route each request.
    Http(http::HttpListener),
}

/// Where a listener's new connections go.
pub enum Target {
    Cluster(Route),
    /// Weighted choice per connection. Weights are positive (zero-weight
    /// entries are dropped at compile time) and `total` is their sum.
    Split {
        routes: Box<[(Route, u32)]>,
        total: u32,
    },
}

/// One listener → cluster path, and the signal that retires it.
pub struct Route {
    pub cluster: Arc<Cluster>,
    /// Tried in order when `cluster` has no healthy endpoint.
    pub failover: Box<[Arc<Cluster>]>,
    /// Shared by every table generation in which this listener still sends to
    /// this cluster with the same endpoints ([`carry_over`]). Cancelled, after
    /// the cluster's `drain_on_change` grace, once a reload sends the traffic
    /// elsewhere; connections on the route then close so the app reconnects.
    pub retired: CancellationToken,
}

/// A route the new table no longer has, whose connections close after `grace`.
#[derive(Debug)]
pub struct Retired {
    pub listener: Arc<str>,
    pub cluster: Arc<str>,
    pub grace: std::time::Duration,
    pub token: CancellationToken,
}

pub mod http;

// === impl RoutingTable ===

/// Compiles a validated config. Infallible: everything that could be wrong was
/// rejected by `Config::load`. A cluster whose spec equals one in `previous`
/// is taken over as is, so its endpoint health, DNS answers and background
/// tasks carry on across the reload.
pub fn compile(
    config: &Config,
    tls: &HashMap<String, Arc<TlsClient>>,
    generation: u64,
    previous: Option<&RoutingTable>,
) -> RoutingTable {
    let m = metrics::get();
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
                tls: tls.get(&c.name.value).cloned(),
            };
            let kept = previous
                .and_then(|p| p.clusters.iter().find(|old| *old.name == *c.name.value))
                .filter(|old| *old.spec() == spec);
            match kept {
                Some(old) => old.clone(),
                None => Arc::new(Cluster::new(Arc::from(c.name.value.as_str()), spec)),
            }
        })
        .collect();
    let by_name: HashMap<&str, &Arc<Cluster>> = clusters.iter().map(|c| (&*c.name, c)).collect();
    let failover_of: HashMap<&str, Box<[Arc<Cluster>]>> = config
        .clusters
        .iter()
        .map(|c| {
            let chain = c
                .failover
                .iter()
                .map(|f| Arc::clone(by_name[f.value.as_str()]))
                .collect();
            (c.name.value.as_str(), chain)
        })
        .collect();
    let route = |name: &str| Route {
        cluster: Arc::clone(by_name[name]),
        failover: failover_of[name].clone(),
        retired: CancellationToken::new(),
    };

    let target =
        |cluster: &Option<Spanned<String>>, split: &Option<Spanned<Vec<SplitConfig>>>| match (
            cluster, split,
        ) {
            (Some(c), _) => Target::Cluster(route(&c.value)),
            (None, Some(split)) => {
                let routes: Box<[(Route, u32)]> = split
                    .value
                    .iter()
                    .filter(|s| s.weight > 0)
                    .map(|s| (route(&s.cluster.value), s.weight))
                    .collect();
                let total = routes.iter().map(|(_, w)| w).sum();
                Target::Split { routes, total }
            }
            (None, None) => unreachable!("validated: a listener or route has a cluster or a split"),
        };

    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let name: Arc<str> = Arc::from(l.name.value.as_str());
            let kind = match (l.protocol, &l.routes) {
                (Protocol::Tcp, _) => ListenerKind::Tcp(target(&l.cluster, &l.split)),
                (Protocol::Http, Some(routes)) => ListenerKind::Http(http::HttpListener {
                    routes: routes
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
                                target(&r.cluster, &r.split),
                                &by_name,
                            )
                        })
                        .collect(),
                    access_log: l.access_log,
                    no_route: m.http_codes(&name, "none", "none")[3].clone(),
                }),
                (Protocol::Http, None) => ListenerKind::Http(http::HttpListener {
                    routes: Box::new([compile_route(
                        &name,
                        Arc::from("0"),
                        &RouteConfig::catch_all(),
                        target(&l.cluster, &l.split),
                        &by_name,
                    )]),
                    access_log: l.access_log,
                    no_route: m.http_codes(&name, "none", "none")[3].clone(),
                }),
            };
            Listener {
                metrics: m.listener(&name),
                name,
                addr: l.listen.value.0,
                kind,
            }
        })
        .collect();

    RoutingTable {
        generation,
        listeners,
        clusters,
    }
}

impl Listener {
    /// Every route (listener → cluster path) this listener may use.
    pub fn routes(&self) -> Box<dyn Iterator<Item = &Route> + '_> {
        match &self.kind {
            ListenerKind::Tcp(t) => Box::new(t.routes()),
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
                });
                match &l.kind {
                    ListenerKind::Tcp(target) => {
                        v["protocol"] = json!("tcp");
                        merge_json(&mut v, describe_target(target));
                    }
                    ListenerKind::Http(h) => {
                        v["protocol"] = json!("http");
                        v["access_log"] = json!(h.access_log);
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
                    "resolved": c.endpoints().iter().map(|e| json!({
                        "address": &*e.label,
                        "healthy": e.is_available(),
                        "active_connections": e.active(),
                    })).collect::<Vec<_>>(),
                    "lb": match spec.lb {
                        LbPolicy::RoundRobin => "round_robin",
                        LbPolicy::LeastConn => "least_conn",
                        LbPolicy::Random => "random",
                        LbPolicy::Hash => "hash",
                    },
                    "connect_timeout": humantime::format_duration(spec.connect_timeout).to_string(),
                });
                if let Some(grace) = spec.drain_on_change {
                    v["drain_on_change"] = json!(humantime::format_duration(grace).to_string());
                }
                if let Some(h) = &spec.health {
                    v["health"] = json!({
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

fn describe_target(target: &Target) -> serde_json::Value {
    match target {
        Target::Cluster(r) => json!({ "cluster": &*r.cluster.name }),
        Target::Split { routes, .. } => json!({
            "split": routes
                .iter()
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
        "timeout": humantime::format_duration(r.timeout).to_string(),
        "retries": r.retries,
    });
    merge_json(&mut v, describe_target(&r.target));
    if let Some(h) = &r.rewrite_host {
        v["rewrite"]["host"] = json!(h.to_str().unwrap_or(""));
    }
    if let Some(p) = &r.rewrite_prefix {
        v["rewrite"]["path_prefix"] = json!(p);
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
) -> http::HttpRoute {
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
    http::HttpRoute {
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
        timeout: r.timeout.map_or(DEFAULT_HTTP_TIMEOUT, |t| t.0),
        retries: r.retries,
        budget: http::RetryBudget::default(),
        mirror: r.mirror.as_ref().map(|mirror| http::Mirror {
            cluster: Arc::clone(clusters[mirror.value.cluster.as_str()]),
            fraction: mirror.value.percent / 100.0,
        }),
        metrics: http::RouteMetrics {
            seconds: m.http_request_seconds.with_label_values(&[listener, &name]),
            by_cluster,
        },
        name,
    }
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

/// Carries the retire tokens of routes that survive from `old` into `new`, and
/// returns the routes of `old` that `new` no longer has and whose cluster asks
/// for `drain_on_change`. A route survives when the same listener still sends to
/// a cluster of the same name with the same endpoints (a weight change alone
/// keeps it). Pure: the caller schedules the returned retirements.
pub fn carry_over(old: &RoutingTable, new: &mut RoutingTable) -> Vec<Retired> {
    let mut retired = Vec::new();
    for old_listener in &old.listeners {
        let new_listener = new
            .listeners
            .iter_mut()
            .find(|l| l.name == old_listener.name);
        let listener_stays = new_listener.is_some();
        let mut new_routes: Vec<&mut Route> = match new_listener {
            Some(l) => match &mut l.kind {
                ListenerKind::Tcp(target) => target.routes_mut().collect(),
                // HTTP requests are short and each reads the current table: nothing to drain.
                ListenerKind::Http(_) => Vec::new(),
            },
            None => Vec::new(),
        };
        let ListenerKind::Tcp(old_target) = &old_listener.kind else {
            continue;
        };
        for old_route in old_target.routes() {
            let survivor = new_routes
                .iter_mut()
                .find(|r| r.cluster.same_target(&old_route.cluster));
            match survivor {
                Some(r) => r.retired = old_route.retired.clone(),
                // A listener that left the config drains on its own: its app cannot reconnect to it.
                None if listener_stays => {
                    if let Some(grace) = old_route.cluster.spec().drain_on_change {
                        retired.push(Retired {
                            listener: old_listener.name.clone(),
                            cluster: old_route.cluster.name.clone(),
                            grace,
                            token: old_route.retired.clone(),
                        });
                    }
                }
                None => {}
            }
        }
    }
    retired
}

// === impl Target ===

impl Target {
    /// The route for one new connection.
    pub fn pick(&self) -> &Route {
        match self {
            Target::Cluster(r) => r,
            Target::Split { routes, total } => {
                let mut ticket = rand::random_range(0..*total);
                for (route, weight) in routes.iter() {
                    if ticket < *weight {
                        return route;
                    }
                    ticket -= weight;
                }
                // Unreachable while `total` is the sum of the weights; stay total anyway.
                &routes[routes.len() - 1].0
            }
        }
    }

    /// Every route this target may pick.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        let (single, split) = match self {
            Target::Cluster(r) => (Some(r), &[][..]),
            Target::Split { routes, .. } => (None, &routes[..]),
        };
        single.into_iter().chain(split.iter().map(|(r, _)| r))
    }

    fn routes_mut(&mut self) -> impl Iterator<Item = &mut Route> {
        let (single, split) = match self {
            Target::Cluster(r) => (Some(r), &mut [][..]),
            Target::Split { routes, .. } => (None, &mut routes[..]),
        };
        single.into_iter().chain(split.iter_mut().map(|(r, _)| r))
    }
}

#[cfg(test)]
mod tests;
