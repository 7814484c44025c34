//! Listening sockets and their accept loops: one snapshot per connection.
//!
//! Owns binding (with retry while the port is still taken, so a restarted
//! sidecar waits instead of crash-looping; `/readyz` stays 503 meanwhile), the
//! accept loop, and the life of each accepted connection: load the routing
//! table once, pick a cluster, connect, then hand both sockets to `tcp::forward`.
//! Connections run on the shutdown tracker so the drain can wait for them.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::shutdown::Shutdown;
use crate::table::RoutingTable;
use crate::tcp;

/// The address each listener actually bound (port 0 resolved), shown by `/config`.
/// Written on bind, read by the admin server: never on the connection path.
pub type BoundAddrs = Arc<Mutex<HashMap<Arc<str>, SocketAddr>>>;

/// Pending connections the kernel queues before `accept`; bursts of new
/// connections from an app at start-up must not be refused.
const BACKLOG: i32 = 1024;

/// Binds `addr`, retrying with backoff while it fails (e.g. the port is still
/// held by a previous instance) until it succeeds or shutdown begins.
pub async fn bind(name: &str, addr: SocketAddr, shutdown: &Shutdown) -> Option<TcpListener> {
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

/// Accepts on `socket` until shutdown stops accepting; each connection is
/// served from the table snapshot current at its accept.
pub async fn serve(
    socket: TcpListener,
    name: Arc<str>,
    tables: Arc<ArcSwap<RoutingTable>>,
    shutdown: Shutdown,
) {
    loop {
        let accepted = tokio::select! {
            // Cancel-safe: a connection is either returned by `accept` or left
            // in the kernel queue, which closes with the socket.
            r = socket.accept() => r,
            _ = shutdown.stop_accepting.cancelled() => break,
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
        let shutdown_for_conn = shutdown.clone();
        let name = name.clone();
        shutdown.connections.spawn(async move {
            tokio::select! {
                _ = handle(client, peer, &name, &table) => {}
                _ = shutdown_for_conn.force_close.cancelled() => {
                    tracing::debug!(listener = %name, client = %peer, "connection closed by drain timeout");
                }
            }
        });
    }
    tracing::info!(listener = %name, "listener closed");
}

/// Serves one accepted connection from one table snapshot.
async fn handle(mut client: TcpStream, peer: SocketAddr, name: &str, table: &RoutingTable) {
    let Some(listener) = table.listener(name) else {
        // The listener left the config between accept and here; the socket closes.
        return;
    };
    let m = &listener.metrics;
    m.connections_total.inc();
    m.connections_active.inc();
    let _active = scopeguard(|| m.connections_active.dec());
    let _ = client.set_nodelay(true);

    let began = Instant::now();
    let cluster = listener.target.pick();
    let (mut upstream, endpoint) = match cluster.connect().await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(listener = name, client = %peer, cluster = %cluster.name, error = %e, "closing client: no upstream");
            return;
        }
    };
    let result = tcp::forward(
        &mut client,
        &mut upstream,
        &m.bytes_upstream,
        &m.bytes_downstream,
    )
    .await;
    match result {
        Ok(t) => tracing::debug!(
            listener = name, client = %peer, cluster = %cluster.name, endpoint = %endpoint.written,
            bytes_upstream = t.upstream, bytes_downstream = t.downstream,
            duration_ms = began.elapsed().as_millis() as u64, "connection closed"
        ),
        Err(e) => tracing::debug!(
            listener = name, client = %peer, cluster = %cluster.name, endpoint = %endpoint.written,
            error = %e, duration_ms = began.elapsed().as_millis() as u64, "connection ended with error"
        ),
    }
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
