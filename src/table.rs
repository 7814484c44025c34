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

use crate::config::{Config, Protocol};
use crate::config::{EndpointTarget, LbPolicy};
use crate::metrics;
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
    pub protocol: Protocol,
    pub target: Target,
    pub metrics: metrics::ListenerMetrics,
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

// === impl RoutingTable ===

/// Compiles a validated config. Infallible: everything that could be wrong was
/// rejected by `Config::load`. A cluster whose spec equals one in `previous`
/// is taken over as is, so its endpoint health, DNS answers and background
/// tasks carry on across the reload.
pub fn compile(config: &Config, generation: u64, previous: Option<&RoutingTable>) -> RoutingTable {
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

    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let target = match (&l.cluster, &l.split) {
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
                (None, None) => unreachable!("validated: a listener has a cluster or a split"),
            };
            Listener {
                name: Arc::from(l.name.value.as_str()),
                addr: l.listen.value.0,
                protocol: l.protocol,
                target,
                metrics: m.listener(&l.name.value),
            }
        })
        .collect();

    RoutingTable {
        generation,
        listeners,
        clusters,
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
                let target = match &l.target {
                    Target::Cluster(r) => json!({ "cluster": &*r.cluster.name }),
                    Target::Split { routes, .. } => json!({
                        "split": routes
                            .iter()
                            .map(|(r, w)| json!({ "cluster": &*r.cluster.name, "weight": w }))
                            .collect::<Vec<_>>()
                    }),
                };
                let mut v = json!({
                    "name": &*l.name,
                    "listen": l.addr.to_string(),
                    "protocol": match l.protocol { Protocol::Tcp => "tcp" },
                });
                if let Some(addr) = bound.get(&l.name) {
                    v["bound"] = json!(addr.to_string());
                }
                merge_json(&mut v, target);
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
                    .flat_map(|l| l.target.routes())
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

fn merge_json(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
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
            Some(l) => l.target.routes_mut().collect(),
            None => Vec::new(),
        };
        for old_route in old_listener.target.routes() {
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
