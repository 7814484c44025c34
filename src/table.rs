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

use crate::config::{Config, Protocol};
use crate::metrics;
use crate::upstream::{Cluster, Endpoint};

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
    Cluster(Arc<Cluster>),
    /// Weighted choice per connection. Weights are positive (zero-weight
    /// entries are dropped at compile time) and `total` is their sum.
    Split {
        clusters: Box<[(Arc<Cluster>, u32)]>,
        total: u32,
    },
}

// === impl RoutingTable ===

/// Compiles a validated config. Infallible: everything that could be wrong was
/// rejected by `Config::load`.
pub fn compile(config: &Config, generation: u64) -> RoutingTable {
    let m = metrics::get();
    let clusters: Vec<Arc<Cluster>> = config
        .clusters
        .iter()
        .map(|c| {
            let name: Arc<str> = Arc::from(c.name.value.as_str());
            let endpoints = c
                .endpoints
                .value
                .iter()
                .map(|e| Endpoint {
                    written: Arc::from(e.value.written.as_str()),
                    addr: e.value.addr,
                })
                .collect();
            Arc::new(Cluster::new(
                name.clone(),
                endpoints,
                c.connect_timeout.0,
                m.cluster(&name),
            ))
        })
        .collect();
    let by_name: HashMap<&str, &Arc<Cluster>> = clusters.iter().map(|c| (&*c.name, c)).collect();
    let resolve = |name: &str| Arc::clone(by_name[name]);

    let listeners = config
        .listeners
        .iter()
        .map(|l| {
            let target = match (&l.cluster, &l.split) {
                (Some(c), _) => Target::Cluster(resolve(&c.value)),
                (None, Some(split)) => {
                    let clusters: Box<[(Arc<Cluster>, u32)]> = split
                        .value
                        .iter()
                        .filter(|s| s.weight > 0)
                        .map(|s| (resolve(&s.cluster.value), s.weight))
                        .collect();
                    let total = clusters.iter().map(|(_, w)| w).sum();
                    Target::Split { clusters, total }
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
                    Target::Cluster(c) => json!({ "cluster": &*c.name }),
                    Target::Split { clusters, .. } => json!({
                        "split": clusters
                            .iter()
                            .map(|(c, w)| json!({ "cluster": &*c.name, "weight": w }))
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
                json!({
                    "name": &*c.name,
                    "endpoints": c.endpoints().iter().map(|e| json!({
                        "endpoint": &*e.written,
                        "address": e.addr.to_string(),
                    })).collect::<Vec<_>>(),
                    "lb": "round_robin",
                    "connect_timeout": humantime::format_duration(c.connect_timeout()).to_string(),
                })
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

// === impl Target ===

impl Target {
    /// The cluster for one new connection.
    pub fn pick(&self) -> &Arc<Cluster> {
        match self {
            Target::Cluster(c) => c,
            Target::Split { clusters, total } => {
                let mut ticket = rand::random_range(0..*total);
                for (cluster, weight) in clusters.iter() {
                    if ticket < *weight {
                        return cluster;
                    }
                    ticket -= weight;
                }
                // Unreachable while `total` is the sum of the weights; stay total anyway.
                &clusters[clusters.len() - 1].0
            }
        }
    }
}
