//! Listening sockets and their accept loops: one snapshot per connection.
//!
//! Owns the set of listening sockets ([`Listeners`], kept in step with each
//! new routing table), binding (with retry while the port is still taken, so a
//! restarted sidecar waits instead of crash-looping; `/readyz` stays 503
//! meanwhile), the accept loops, and the life of each accepted connection: load
//! the routing table once, pick a route, connect, then hand both sockets to
//! `tcp::forward` until they finish or the route is retired by a reload.
//! Connections run on the shutdown tracker so the drain can wait for them.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::shutdown::Shutdown;
use crate::table::{ListenerKind, RoutingTable};
use crate::tcp;
use crate::upstream;

/// The address each listener actually bound (port 0 resolved), shown by `/config`.
/// Written on bind, read by the admin server: never on the connection path.
pub type BoundAddrs = Arc<Mutex<HashMap<Arc<str>, SocketAddr>>>;

/// Pending connections the kernel queues before `accept`; bursts of new
/// connections from an app at start-up must not be refused.
const BACKLOG: i32 = 1024;

/// Binds `addr`, retrying with backoff while it fails (e.g. the port is still
/// held by a previous instance) until it succeeds or shutdown begins.
async fn bind(name: &str, addr: SocketAddr, shutdown: &Shutdown) -> Option<TcpListener> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match bind_now(addr) {
            Ok(listener) => return Some(listener),
            Err(e) => {
                tracing::warn!(listener = name, address = %addr, error = %e, retry_in = ?backoff, "cannot bind listener, will retry");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.begun.cancelled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn bind_now(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Rebinding right after a restart must not fail on connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The running accept loops, kept in step with the routing table.
///
/// Owned by the task that applies new tables (`lib`); reload reaches it only
/// through that task's watch channel.
pub struct Listeners {
    running: HashMap<Arc<str>, Running>,
    tables: Arc<ArcSwap<RoutingTable>>,
    bound: BoundAddrs,
    shutdown: Shutdown,
}

/// One accept loop.
struct Running {
    /// As configured (port 0 stays 0), to tell a moved listener from an unchanged one.
    addr: SocketAddr,
    /// Cancelling it ends the accept loop and closes the socket; a child of
    /// `shutdown.stop_accepting`, so the shutdown ends every loop too.
    stop: CancellationToken,
    /// Completes once the socket is closed.
    task: JoinHandle<()>,
    /// Completes once the socket is bound (or binding was abandoned).
    bound: Option<oneshot::Receiver<()>>,
}

impl Listeners {
    pub fn new(tables: Arc<ArcSwap<RoutingTable>>, bound: BoundAddrs, shutdown: Shutdown) -> Self {
        Listeners {
            running: HashMap::new(),
            tables,
            bound,
            shutdown,
        }
    }

    /// Makes the running accept loops match `table`: unchanged listeners keep
    /// their socket, removed ones stop accepting (their connections drain on
    /// their own), moved ones close their old address and bind the new one, new
    /// ones bind. Closing happens first, so an address can pass from one
    /// listener to another within one reload.
    pub async fn apply(&mut self, table: &RoutingTable) {
        let stale: Vec<Arc<str>> = self
            .running
            .iter()
            .filter(|(name, r)| table.listener(name).is_none_or(|l| l.addr != r.addr))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                r.stop.cancel();
                let _ = r.task.await;
                if let Ok(mut b) = self.bound.lock() {
                    b.remove(&name);
                }
            }
        }
        for l in &table.listeners {
            if !self.running.contains_key(&l.name) {
                let running = self.start(l.name.clone(), l.addr);
                self.running.insert(l.name.clone(), running);
            }
        }
    }

    /// Waits until every listener started so far is bound, or shutdown begins.
    pub async fn all_bound(&mut self) {
        for r in self.running.values_mut() {
            if let Some(rx) = r.bound.take() {
                let _ = rx.await;
            }
        }
    }

    fn start(&self, name: Arc<str>, addr: SocketAddr) -> Running {
        let stop = self.shutdown.stop_accepting.child_token();
        let (bound_tx, bound_rx) = oneshot::channel();
        let (tables, bound, shutdown, stop_loop) = (
            self.tables.clone(),
            self.bound.clone(),
            self.shutdown.clone(),
            stop.clone(),
        );
        let task = self.shutdown.accept_loops.spawn(async move {
            let socket = tokio::select! {
                s = bind(&name, addr, &shutdown) => s,
                _ = stop_loop.cancelled() => None,
            };
            let Some(socket) = socket else {
                let _ = bound_tx.send(());
                return;
            };
            let local = socket.local_addr().unwrap_or(addr);
            if let Ok(mut b) = bound.lock() {
                b.insert(name.clone(), local);
            }
            tracing::info!(listener = %name, address = %local, "listening");
            let _ = bound_tx.send(());
            serve(socket, name, tables, shutdown, stop_loop).await;
        });
        Running {
            addr,
            stop,
            task,
            bound: Some(bound_rx),
        }
    }
}

/// Accepts on `socket` until `stop` is cancelled; each connection is served
/// from the table snapshot current at its accept.
async fn serve(
    socket: TcpListener,
    name: Arc<str>,
    tables: Arc<ArcSwap<RoutingTable>>,
    shutdown: Shutdown,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            // Cancel-safe: a connection is either returned by `accept` or left
            // in the kernel queue, which closes with the socket.
            r = socket.accept() => r,
            _ = stop.cancelled() => break,
        };
        let (client, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let table = tables.load_full();
        let force_close = shutdown.force_close.clone();
        let name = name.clone();
        let http = HttpContext {
            tables: tables.clone(),
            stop: stop.clone(),
        };
        shutdown.connections.spawn(async move {
            tokio::select! {
                _ = handle(client, peer, &name, &table, http) => {}
                _ = force_close.cancelled() => {
                    tracing::debug!(listener = %name, client = %peer, "connection closed by drain timeout");
                }
            }
        });
    }
    // Close the socket before saying so: anyone who reads the log line and
    // connects must be refused, not queued in a backlog nobody accepts.
    drop(socket);
    tracing::info!(listener = %name, "listener closed");
}

/// Serves one accepted connection from one table snapshot.
async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    name: &Arc<str>,
    table: &RoutingTable,
    http: HttpContext,
) {
    let Some(listener) = table.listener(name) else {
        // The listener left the config between accept and here; the socket closes.
        return;
    };
    let m = &listener.metrics;
    m.connections_total.inc();
    m.connections_active.inc();
    let _active = scopeguard(|| m.connections_active.dec());
    let _ = client.set_nodelay(true);

    let target = match &listener.kind {
        ListenerKind::Tcp(target) => target,
        ListenerKind::Http(_) => {
            let conn = crate::http::Conn {
                listener: name.clone(),
                client: peer,
                tables: http.tables,
            };
            crate::http::serve(client, conn, http.stop).await;
            return;
        }
    };
    let began = Instant::now();
    let route = target.pick();
    let upstream::Connected {
        stream: mut upstream,
        cluster,
        endpoint,
        active: _active_on_endpoint,
    } = match upstream::connect(&route.cluster, &route.failover, peer).await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(listener = %name, client = %peer, error = %e, "closing client: no upstream");
            return;
        }
    };
    let forwarded = tokio::select! {
        r = tcp::forward(&mut client, &mut upstream, &m.bytes_upstream, &m.bytes_downstream) => r,
        _ = route.retired.cancelled() => {
            tracing::info!(
                listener = %name, client = %peer, cluster = %cluster.name, endpoint = %endpoint.label,
                "closing connection: a reload moved this route (drain_on_change)"
            );
            return;
        }
    };
    match forwarded {
        Ok(t) => tracing::debug!(
            listener = %name, client = %peer, cluster = %cluster.name, endpoint = %endpoint.label,
            bytes_upstream = t.upstream, bytes_downstream = t.downstream,
            duration_ms = began.elapsed().as_millis() as u64, "connection closed"
        ),
        Err(e) => tracing::debug!(
            listener = %name, client = %peer, cluster = %cluster.name, endpoint = %endpoint.label,
            error = %e, duration_ms = began.elapsed().as_millis() as u64, "connection ended with error"
        ),
    }
}

/// What an HTTP connection needs beyond the snapshot: the live table (each
/// request reads the current one) and the signal to close gracefully.
struct HttpContext {
    tables: Arc<ArcSwap<RoutingTable>>,
    stop: CancellationToken,
}

/// Runs `f` on drop: keeps the active-connections gauge right on every exit path.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
