//! One local port per broker: the address legate advertises for it, bound on
//! demand (the first time a response names the broker) on the bootstrap
//! listener's IP, forwarding to the broker's own advertised address.
//!
//! A node id keeps its port for the life of the process (across reconnects
//! and reloads); the address behind it follows what the brokers advertise.
//! When the range is used up, the response that names one more broker fails
//! (the app's connection is closed with a log line naming the range): the
//! client is never handed a broker address that bypasses legate.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::rewrite::{Brokers, Local};
use crate::config::PortRange;
use crate::table::Route;

/// A broker as its cluster advertises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    pub host: String,
    pub port: u16,
}

/// One broker's local port and where it leads now.
pub struct Broker {
    pub port: u16,
    pub node_id: i32,
    pub target: ArcSwap<Advertised>,
    /// The route whose response last named this broker: its cluster's
    /// connect settings and TLS, and its retire signal (a cut-over).
    pub route: ArcSwap<Route>,
    /// Stops its accept loop (the bootstrap listener stopped).
    pub stop: CancellationToken,
}

/// The brokers of one Kafka listener.
pub struct BrokerPorts {
    pub listener: Arc<str>,
    pub ip: IpAddr,
    range: PortRange,
    by_node: Mutex<HashMap<i32, Arc<Broker>>>,
}

/// Binds and serves a new broker port: set by the listener module.
pub type Spawn = Arc<dyn Fn(Arc<Broker>, std::net::TcpListener) + Send + Sync>;

static REGISTRY: LazyLock<Mutex<HashMap<Arc<str>, Arc<BrokerPorts>>>> =
    LazyLock::new(Default::default);

impl BrokerPorts {
    /// The configured `broker_ports`.
    pub fn range(&self) -> PortRange {
        self.range
    }
}

/// The brokers of listener `name` (kept for the life of the process, so a
/// node id keeps its port across reloads).
pub fn of(name: &Arc<str>, ip: IpAddr, range: PortRange) -> Arc<BrokerPorts> {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let entry = registry.entry(name.clone()).or_insert_with(|| {
        Arc::new(BrokerPorts {
            listener: name.clone(),
            ip,
            range,
            by_node: Mutex::default(),
        })
    });
    if entry.ip != ip || entry.range != range {
        // The listener moved or got another range: start over.
        *entry = Arc::new(BrokerPorts {
            listener: name.clone(),
            ip,
            range,
            by_node: Mutex::default(),
        });
    }
    entry.clone()
}

impl BrokerPorts {
    /// The local port of broker `node_id` at `advertised`, bound now if it
    /// is not yet (or its accept loop has stopped).
    pub fn local_port(
        &self,
        node_id: i32,
        advertised: Advertised,
        route: &Arc<Route>,
        spawn: &Spawn,
    ) -> Result<u16, String> {
        let mut by_node = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = by_node.get(&node_id)
            && !b.stop.is_cancelled()
        {
            if !Arc::ptr_eq(&b.route.load(), route) {
                b.route.store(route.clone());
            }
            if **b.target.load() != advertised {
                tracing::info!(listener = %self.listener, node_id, port = b.port,
                    host = %advertised.host, to_port = advertised.port, "broker address changed");
                b.target.store(Arc::new(advertised));
            }
            return Ok(b.port);
        }
        let reuse = by_node.get(&node_id).map(|b| b.port);
        let in_use: Vec<u16> = by_node
            .values()
            .filter(|b| !b.stop.is_cancelled())
            .map(|b| b.port)
            .collect();
        let candidates = reuse
            .into_iter()
            .chain(self.range.first..=self.range.last)
            .filter(|p| !in_use.contains(p));
        for port in candidates {
            let Ok(socket) = std::net::TcpListener::bind(SocketAddr::new(self.ip, port)) else {
                continue;
            };
            let broker = Arc::new(Broker {
                port,
                node_id,
                target: ArcSwap::from_pointee(advertised),
                route: ArcSwap::new(route.clone()),
                stop: CancellationToken::new(),
            });
            tracing::info!(listener = %self.listener, node_id, port,
                host = %broker.target.load().host, to_port = broker.target.load().port,
                "broker port bound");
            spawn(broker.clone(), socket);
            by_node.insert(node_id, broker);
            return Ok(port);
        }
        Err(format!(
            "no free port left in broker_ports {}-{} on {} for broker {node_id}",
            self.range.first, self.range.last, self.ip
        ))
    }
}

/// Adapts [`BrokerPorts`] to the rewriter.
pub struct Mapper<'a> {
    pub ports: &'a BrokerPorts,
    pub route: &'a Arc<Route>,
    pub spawn: &'a Spawn,
}

impl Brokers for Mapper<'_> {
    fn local(&mut self, node_id: i32, host: &str, port: i32) -> Result<Local, String> {
        let port = u16::try_from(port).map_err(|_| format!("broker port {port} out of range"))?;
        let local = self.ports.local_port(
            node_id,
            Advertised {
                host: host.to_string(),
                port,
            },
            self.route,
            self.spawn,
        )?;
        Ok(Local {
            host: self.ports.ip.to_string(),
            port: i32::from(local),
        })
    }
}
