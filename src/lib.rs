//! legate: an ambassador sidecar proxy.
//!
//! Modules in the order a connection meets them:
//! - [`config`]: YAML files in the config directory → a validated `Config`.
//! - [`table`]: `Config` → the immutable `RoutingTable` snapshot, published through `ArcSwap`.
//! - [`listener`]: bind, accept, one snapshot per connection.
//! - [`tcp`]: forward bytes both ways with half-close.
//! - [`upstream`]: clusters, endpoint choice, connect.
//!
//! Around them: [`admin`] (probes, metrics, config), [`metrics`] (the families),
//! [`shutdown`] (signals and the sidecar drain). [`run`] wires them together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

pub mod admin;
pub mod config;
pub mod listener;
pub mod metrics;
pub mod shutdown;
pub mod table;
pub mod tcp;
pub mod upstream;

use config::{Config, ConfigError};
use listener::BoundAddrs;
use shutdown::{Shutdown, Timing};

/// What `legate` (the proxy) runs with: the command line, parsed.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_dir: PathBuf,
    pub admin: SocketAddr,
    pub timing: Timing,
}

/// Why legate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigError),
    #[error("cannot bind the admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the proxy until a shutdown (signal or `POST /quitquitquit`) has drained.
pub async fn run(opts: Options) -> Result<(), StartError> {
    let config = Config::load(&opts.config_dir)?;
    let tables = Arc::new(ArcSwap::from_pointee(table::compile(&config, 1)));
    tracing::info!(
        config = %opts.config_dir.display(),
        listeners = config.listeners.len(),
        clusters = config.clusters.len(),
        "configuration loaded"
    );

    let shutdown = Shutdown::default();
    let bound = BoundAddrs::default();
    let ready = Arc::new(AtomicBool::new(false));

    // The admin server comes first so probes get an honest 503 while listeners bind.
    let admin_socket = TcpListener::bind(opts.admin)
        .await
        .map_err(|source| StartError::Admin {
            addr: opts.admin,
            source,
        })?;
    if let Ok(addr) = admin_socket.local_addr() {
        tracing::info!(listener = "admin", address = %addr, "listening");
    }
    tokio::spawn(admin::serve(
        admin_socket,
        admin::AdminState {
            tables: tables.clone(),
            bound: bound.clone(),
            ready: ready.clone(),
            shutdown: shutdown.clone(),
        },
    ));
    tokio::spawn(shutdown::on_signals(shutdown.clone()));

    start_listeners(&tables, &bound, &shutdown).await;
    if !shutdown.begun.is_cancelled() {
        ready.store(true, Ordering::Release);
        tracing::info!("ready: every listener is bound");
    }

    shutdown.run(opts.timing).await;
    Ok(())
}

/// Binds every listener of the current table (concurrently: one port that is
/// still taken must not hold up the others) and starts its accept loop.
/// Returns once all are bound, or when shutdown begins first.
async fn start_listeners(
    tables: &Arc<ArcSwap<RoutingTable>>,
    bound: &BoundAddrs,
    shutdown: &Shutdown,
) {
    let table = tables.load_full();
    let (bound_tx, mut bound_rx) = tokio::sync::mpsc::channel(table.listeners.len().max(1));
    for l in &table.listeners {
        let (name, addr) = (l.name.clone(), l.addr);
        let (tables, bound, shutdown, bound_tx) = (
            tables.clone(),
            bound.clone(),
            shutdown.clone(),
            bound_tx.clone(),
        );
        shutdown.clone().accept_loops.spawn(async move {
            let Some(socket) = listener::bind(&name, addr, &shutdown).await else {
                return;
            };
            let local = socket.local_addr().unwrap_or(addr);
            if let Ok(mut b) = bound.lock() {
                b.insert(name.clone(), local);
            }
            tracing::info!(listener = %name, address = %local, "listening");
            let _ = bound_tx.send(()).await;
            listener::serve(socket, name, tables, shutdown).await;
        });
    }
    drop(bound_tx);
    for _ in 0..table.listeners.len() {
        tokio::select! {
            r = bound_rx.recv() => if r.is_none() { return },
            _ = shutdown.begun.cancelled() => return,
        }
    }
}

use table::RoutingTable;

/// `legate check`: validates the directory and returns the compiled table as JSON.
pub fn check(dir: &Path) -> Result<serde_json::Value, ConfigError> {
    let config = Config::load(dir)?;
    Ok(table::compile(&config, 1).describe(&Default::default()))
}
