//! legate: an ambassador sidecar proxy.
//!
//! Modules in the order a connection meets them:
//! - [`config`]: YAML files in the config directory → a validated `Config`.
//! - [`table`]: `Config` → the immutable `RoutingTable` snapshot, published through `ArcSwap`.
//! - [`reload`]: watch the directory, publish each new valid table.
//! - [`listener`]: bind, accept, one snapshot per connection.
//! - [`tcp`]: forward bytes both ways with half-close.
//! - [`upstream`]: clusters, endpoint choice, connect.
//!
//! Around them: [`admin`] (probes, metrics, config), [`metrics`] (the families),
//! [`shutdown`] (signals and the sidecar drain, and the task owners), [`fds`]
//! (the file descriptor budget). [`run`] wires them together.

#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

pub mod admin;
pub mod clock;
pub mod config;
pub mod diff;
pub mod fds;
pub mod http;
pub mod inject;
pub mod kafka;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod postgres;
pub mod reload;
pub mod shutdown;
pub mod status;
pub mod table;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod wake;

use config::ConfigError;
use listener::{BoundAddrs, Listeners};
use shutdown::{Shutdown, Timing};

/// What `legate` (the proxy) runs with: the command line, parsed.
#[derive(Debug, Clone)]
pub struct Options {
    pub config_dir: PathBuf,
    pub admin: SocketAddr,
    pub timing: Timing,
    pub reload: reload::Settings,
}

/// Why legate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Compile(#[from] table::CompileError),
    #[error("cannot bind the admin server on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the proxy until a shutdown (signal or `POST /quitquitquit`) has drained.
pub async fn run(opts: Options) -> Result<(), StartError> {
    match fds::raise_limit() {
        Ok(l) => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard = l.hard,
            data_path_budget = fds::limit(),
            "file descriptor limit"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise RLIMIT_NOFILE"),
    }
    let initial = reload::load_initial(&opts.config_dir)?;
    let tables = Arc::new(ArcSwap::from_pointee(table::compile(
        &initial.config,
        &initial.tls,
        1,
        None,
    )?));
    tables.load().start();
    tracing::info!(
        config = %opts.config_dir.display(),
        listeners = initial.config.listeners.len(),
        clusters = initial.config.clusters.len(),
        "configuration loaded"
    );

    let shutdown = Shutdown::default();
    let bound = BoundAddrs::default();
    let ready = Arc::new(AtomicBool::new(false));
    let (reloads, mut applied) = reload::spawn(
        opts.config_dir.clone(),
        &initial,
        tables.clone(),
        opts.reload,
        shutdown.clone(),
    );

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
    // Background tasks: they run through the drain (probes keep answering)
    // and end with it (`Shutdown::run` stops and waits for them).
    let background = shutdown.background_tasks();
    background.spawn(admin::serve(
        admin_socket,
        admin::AdminState {
            tables: tables.clone(),
            bound: bound.clone(),
            ready: ready.clone(),
            shutdown: shutdown.clone(),
            reloads,
            started: std::time::Instant::now(),
            history: Arc::default(),
        },
    ));
    background.spawn(shutdown::on_signals(shutdown.clone()));
    background.spawn(memory::return_freed());

    let mut listeners = Listeners::new(tables.clone(), bound, shutdown.clone());
    listeners.apply(&tables.load_full()).await;
    tokio::select! {
        _ = listeners.all_bound() => {
            ready.store(true, Ordering::Release);
            tracing::info!("ready: every listener is bound");
        }
        _ = shutdown.begun.cancelled() => {}
    }
    // From here on, each applied reload brings the listeners in step.
    background.spawn(async move {
        while applied.changed().await.is_ok() {
            let table = applied.borrow_and_update().clone();
            listeners.apply(&table).await;
        }
    });

    shutdown.run(opts.timing).await;
    // The clusters' DNS, health and pool tasks are owned by their tokens.
    for cluster in &tables.load().clusters {
        cluster.retire();
    }
    Ok(())
}

/// `legate check`: validates the directory and returns the compiled table as
/// JSON. Reads exactly as a reload does, so whatever it accepts can run.
pub fn check(dir: &Path) -> Result<serde_json::Value, StartError> {
    let initial = reload::load_initial(dir)?;
    let table = table::compile(&initial.config, &initial.tls, 1, None)?;
    Ok(table.describe(&Default::default()))
}
