//! Listening sockets and their accept loops: one snapshot per connection.
//!
//! Owns the set of listening sockets ([`Listeners`], kept in step with each
//! new routing table), binding (with retry while the port is still taken, so a
//! restarted sidecar waits instead of crash-looping; `/readyz` stays 503
//! meanwhile), and the accept loops with their admission: a connection slot
//! (`max_connections`) and an fd from the budget before each accept. Each
//! accepted connection loads the routing table once and is dispatched to its
//! session, [`tcp::serve`] or [`crate::http::serve`], which owns its timeouts.
//! Connections run on the shutdown tracker so the drain can wait for them.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::now_ms;
use crate::fds;
use crate::metrics;
use crate::shutdown::{Shutdown, Tasks};
use crate::table::{ListenerKind, RoutingTable, Wire};
use crate::tcp;
use crate::wake::OnWake;

/// The address each listener actually bound (port 0 resolved), shown by `/config`.
/// Written on bind, read by the admin server: never on the connection path.
pub type BoundAddrs = Arc<Mutex<HashMap<Arc<str>, SocketAddr>>>;

/// Pending connections the kernel queues before `accept`; bursts of new
/// connections from an app at start-up must not be refused.
const BACKLOG: i32 = 1024;

/// How long the kernel holds a connection whose client has not written yet
/// on a deferred listener ([`Deferred::Yes`]); a client still silent then is
/// handed over anyway, and the listener's own timeouts take it from there.
const DEFER_ACCEPT_SECS: libc::c_int = 1;

/// Whether the kernel hands over a connection at once or only once its
/// client has written (`TCP_DEFER_ACCEPT`, nginx's `deferred`).
///
/// On an HTTP listener the client speaks first, and most clients write their
/// request with the connect. Accepted before it arrives, the connection costs
/// a read that finds nothing (tokio tries the socket once on accept) and a
/// wake-up when the request lands; deferred, its first read finds the
/// request: 3-6 µs of CPU less per new connection. A TCP listener may front
/// a protocol whose server speaks first (MySQL, SMTP), so it is never
/// deferred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deferred {
    Yes,
    No,
}

impl Deferred {
    fn of(kind: &ListenerKind) -> Deferred {
        match kind {
            ListenerKind::Http(_) => Deferred::Yes,
            ListenerKind::Tcp(_) => Deferred::No,
        }
    }
}

/// Binds `addr`, retrying with backoff while it fails (e.g. the port is still
/// held by a previous instance) until it succeeds or shutdown begins.
async fn bind(
    name: &str,
    addr: SocketAddr,
    deferred: Deferred,
    shutdown: &Shutdown,
) -> Option<TcpListener> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match bind_now(addr, deferred) {
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

fn bind_now(addr: SocketAddr, deferred: Deferred) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // Rebinding right after a restart must not fail on connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener (Linux copies
    // the option at accept): one setsockopt here instead of one per
    // connection. legate writes whole heads and chunks, so Nagle only delays.
    socket.set_tcp_nodelay(true)?;
    if deferred == Deferred::Yes {
        defer_accept(&socket)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Sets `TCP_DEFER_ACCEPT` (see [`Deferred`]); socket2 has no setter for it.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[allow(unsafe_code)]
fn defer_accept(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let secs = DEFER_ACCEPT_SECS;
    // SAFETY: the fd is the open socket borrowed for the call; the option
    // value is a c_int that lives across it, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere connections are handed over at once.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn defer_accept(_: &Socket) -> io::Result<()> {
    Ok(())
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
    /// Fixed at bind: a reload that changes it binds the socket anew.
    deferred: Deferred,
    /// Cancelling it ends the accept loop and closes the socket; a child of
    /// `shutdown.stop_accepting`, so the shutdown ends every loop too.
    stop: CancellationToken,
    /// Completes once the socket is closed.
    task: JoinHandle<()>,
    /// Completes once the socket is bound (or binding was abandoned).
    bound: Option<oneshot::Receiver<()>>,
    /// The listener's `max_connections`, shared with its accept loop.
    limit: Arc<Limit>,
}

/// A listener's connection limit: one permit per open connection. A reload
/// may change `max`; the permits follow.
struct Limit {
    permits: Arc<Semaphore>,
    max: Mutex<usize>,
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
    /// their socket (and take a new `max_connections`), removed ones stop
    /// accepting (their connections drain on their own), moved ones (a new
    /// address, or between HTTP and TCP, which decides [`Deferred`]) close
    /// their old socket and bind the new one, new ones bind. Closing happens
    /// first, so an address can pass from one listener to another within one
    /// reload.
    pub async fn apply(&mut self, table: &RoutingTable) {
        let stale: Vec<Arc<str>> = self
            .running
            .iter()
            .filter(|(name, r)| {
                table
                    .listener(name)
                    .is_none_or(|l| l.addr != r.addr || Deferred::of(&l.kind) != r.deferred)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(r) = self.running.remove(&name) {
                // The loop closes the socket and its semaphore as it ends.
                r.stop.cancel();
                let _ = r.task.await;
                if let Ok(mut b) = self.bound.lock() {
                    b.remove(&name);
                }
            }
        }
        for l in &table.listeners {
            match self.running.get(&l.name) {
                Some(r) => r.limit.resize(l.max_connections),
                None => {
                    let deferred = Deferred::of(&l.kind);
                    let running = self.start(l.name.clone(), l.addr, deferred, l.max_connections);
                    self.running.insert(l.name.clone(), running);
                }
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

    fn start(
        &self,
        name: Arc<str>,
        addr: SocketAddr,
        deferred: Deferred,
        max_connections: usize,
    ) -> Running {
        let stop = self.shutdown.stop_accepting.child_token();
        let (bound_tx, bound_rx) = oneshot::channel();
        let limit = Arc::new(Limit {
            permits: Arc::new(Semaphore::new(max_connections)),
            max: Mutex::new(max_connections),
        });
        let (tables, bound, shutdown, stop_loop, permits) = (
            self.tables.clone(),
            self.bound.clone(),
            self.shutdown.clone(),
            stop.clone(),
            limit.permits.clone(),
        );
        let task = self.shutdown.accept_loops.spawn(async move {
            let socket = tokio::select! {
                s = bind(&name, addr, deferred, &shutdown) => s,
                _ = stop_loop.cancelled() => None,
            };
            let Some(socket) = socket else {
                // No loop will run: a `resize` waiting for permits ends too.
                permits.close();
                let _ = bound_tx.send(());
                return;
            };
            let local = socket.local_addr().unwrap_or(addr);
            if let Ok(mut b) = bound.lock() {
                b.insert(name.clone(), local);
            }
            tracing::info!(listener = %name, address = %local, "listening");
            let _ = bound_tx.send(());
            let accept = Accept {
                socket,
                name,
                tables,
                stop: Arc::new(stop_loop),
                force_close: Arc::new(shutdown.force_close.clone()),
                tasks: shutdown.connection_tasks(),
                drivers: shutdown.background_tasks(),
                connections: shutdown.connections.clone(),
                permits,
                last_warned: AtomicU64::new(0),
            };
            accept.run().await;
        });
        Running {
            addr,
            deferred,
            stop,
            task,
            bound: Some(bound_rx),
            limit,
        }
    }
}

// === impl Limit ===

impl Limit {
    /// Moves the limit to `max`. Lowering it takes permits back as open
    /// connections end (no connection is closed for it).
    fn resize(&self, max: usize) {
        let Ok(mut current) = self.max.lock() else {
            return;
        };
        if max > *current {
            self.permits.add_permits(max - *current);
        } else if max < *current {
            let (permits, fewer) = (self.permits.clone(), (*current - max) as u32);
            // Owned by the semaphore: ends when the permits are had, or when
            // the accept loop closes the semaphore as it ends (the listener
            // was removed or moved by a reload, or the shutdown stopped it).
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many_owned(fewer).await {
                    p.forget();
                }
            });
        }
        *current = max;
    }
}

/// One listener's accept loop and what it hands each connection.
struct Accept {
    socket: TcpListener,
    name: Arc<str>,
    tables: Arc<ArcSwap<RoutingTable>>,
    // The tokens each connection keeps are shared, not cloned: cloning or
    // dropping a `CancellationToken` locks its tree, four times a connection.
    stop: Arc<CancellationToken>,
    /// `shutdown.force_close`: ends connections still open at the drain timeout.
    force_close: Arc<CancellationToken>,
    tasks: Tasks,
    drivers: Tasks,
    /// `shutdown.connections`, where connection tasks are spawned.
    connections: TaskTracker,
    /// One per open connection (`max_connections`).
    permits: Arc<Semaphore>,
    /// [`now_ms`] of the last "not accepting" warning; 0: never.
    last_warned: AtomicU64,
}

/// At most one "not accepting" warning per listener this often.
const PAUSE_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long an accept loop that is out of fds waits before looking again.
const FD_RETRY: Duration = Duration::from_millis(20);

impl Accept {
    /// Accepts until `stop` is cancelled; each connection is served from the
    /// table snapshot current at its accept. Before each accept the loop takes
    /// a connection permit and an fd from the budget: at either limit it stops
    /// accepting, and the kernel's backlog holds the app's new connections
    /// until a connection ends.
    async fn run(self) {
        // One wait on `stop` for the loop's life, looked at only when the
        // token wakes it: not registered and removed again per accept.
        let stopped = OnWake::new(self.stop.cancelled());
        tokio::pin!(stopped);
        loop {
            let Some((permit, client_fd, upstream_fd)) = self.admission().await else {
                break;
            };
            let accepted = tokio::select! {
                // Cancel-safe: a connection is either returned by `accept` or left
                // in the kernel queue, which closes with the socket.
                r = self.socket.accept() => r,
                _ = &mut stopped => break,
            };
            let (client, peer) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of fds or memory regardless of the budget: back off instead of spinning.
                    tracing::warn!(listener = %self.name, error = %e, "accept failed");
                    tokio::time::sleep(FD_RETRY).await;
                    continue;
                }
            };
            let table = self.tables.load_full();
            let force_close = self.force_close.clone();
            let name = self.name.clone();
            let http = HttpContext {
                tables: self.tables.clone(),
                stop: self.stop.clone(),
                tasks: self.tasks.clone(),
                drivers: self.drivers.clone(),
            };
            // Boxed once here: tokio moves a spawned future four times on its
            // way into the task, and this one is ~5 KB (the connection's whole
            // state), ~2,000 instructions of memcpy per connection unboxed.
            self.connections.spawn(Box::pin(async move {
                // Held for the connection's life: its slot and its fd.
                let _admitted = (permit, client_fd);
                tokio::select! {
                    // The connection first, and no random pick of a first
                    // branch at each of its wake-ups.
                    biased;
                    _ = dispatch(client, peer, name.clone(), table, http, upstream_fd) => {}
                    _ = OnWake::new(force_close.cancelled()) => {
                        tracing::debug!(listener = %name, client = %peer, "connection closed by drain timeout");
                    }
                }
            }));
        }
        // Close the socket before saying so: anyone who reads the log line and
        // connects must be refused, not queued in a backlog nobody accepts.
        drop(self.socket);
        // Ends a `resize` still waiting for permits (its task is owned by the
        // semaphore), and any late admission.
        self.permits.close();
        tracing::info!(listener = %self.name, "listener closed");
    }

    /// A connection slot and fds for the next accept (the app's socket, and
    /// for a TCP listener the upstream's too, so an admitted session never
    /// fails for want of an fd), waiting while the listener is at
    /// `max_connections` or the data path is out of fds. `None` once the loop
    /// must stop.
    async fn admission(
        &self,
    ) -> Option<(OwnedSemaphorePermit, fds::Reserved, Option<fds::Reserved>)> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {
                self.paused("max_connections");
                tokio::select! {
                    p = self.permits.clone().acquire_owned() => p.ok()?,
                    _ = self.stop.cancelled() => return None,
                }
            }
        };
        let tcp = self
            .tables
            .load()
            .listener(&self.name)
            .is_some_and(|l| matches!(l.kind, ListenerKind::Tcp(_)));
        let mut waited = false;
        loop {
            let reserved = if tcp {
                fds::reserve(1)
                    .zip(fds::reserve(1))
                    .map(|(client, upstream)| (client, Some(upstream)))
            } else {
                fds::reserve(1).map(|client| (client, None))
            };
            if let Some((client, upstream)) = reserved {
                return Some((permit, client, upstream));
            }
            if !waited {
                waited = true;
                self.paused("fds");
            }
            tokio::select! {
                _ = tokio::time::sleep(FD_RETRY) => {}
                _ = self.stop.cancelled() => return None,
            }
        }
    }

    fn paused(&self, reason: &'static str) {
        metrics::get()
            .listener_accept_paused_total
            .with_label_values(&[&self.name, reason])
            .inc();
        // At a steady limit every connection pauses the loop: log once a while.
        let now = now_ms();
        let last = self.last_warned.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= PAUSE_LOG_EVERY.as_millis() as u64 {
            self.last_warned.store(now.max(1), Ordering::Relaxed);
            tracing::warn!(listener = %self.name, reason,
                "not accepting: at the limit (new connections wait in the kernel backlog)");
        }
    }
}

/// Serves one accepted connection: the listener's kind decides how.
async fn dispatch(
    client: TcpStream,
    peer: SocketAddr,
    name: Arc<str>,
    table: Arc<RoutingTable>,
    http: HttpContext,
    upstream_fd: Option<fds::Reserved>,
) {
    let Some(listener) = table.listener(&name) else {
        // The listener left the config between accept and here; the socket closes.
        return;
    };
    let m = listener.metrics.clone();
    m.connections_total.inc();
    m.connections_active.inc();
    let _active = scopeguard(|| m.connections_active.dec());

    match &listener.kind {
        ListenerKind::Tcp(tcp) => {
            // Admitted as an HTTP listener, changed to TCP by a reload since:
            // the upstream's fd is taken now, or the connection closes.
            let Some(upstream_fd) = upstream_fd.or_else(|| fds::reserve(1)) else {
                return;
            };
            if let Wire::Kafka { metrics, ports } = &tcp.wire {
                let ctx = crate::kafka::Context {
                    listener: name.clone(),
                    metrics: m.clone(),
                    kafka: metrics.clone(),
                    ports: ports.clone(),
                    tasks: http.tasks.clone(),
                    stop: (*http.stop).clone(),
                    idle_timeout: tcp.idle_timeout,
                };
                let route = tcp.target.pick().clone();
                drop(table);
                crate::kafka::serve(client, peer, route, ctx, upstream_fd).await;
                return;
            }
            if let Wire::Postgres(pg) = &tcp.wire {
                let session = crate::postgres::Session {
                    listener: name.clone(),
                    client: peer,
                    route: tcp.target.pick().clone(),
                    metrics: m.clone(),
                    pg: pg.clone(),
                    stop: (*http.stop).clone(),
                    idle_timeout: tcp.idle_timeout,
                };
                drop(table);
                crate::postgres::serve(client, session, upstream_fd).await;
                return;
            }
            let session = tcp::Session {
                upstream_fd,
                listener: name.clone(),
                client: peer,
                route: tcp.target.pick().clone(),
                idle_timeout: tcp.idle_timeout,
                metrics: m.clone(),
            };
            // The session keeps its route, not the table: an old generation
            // is freed as soon as no connection uses its routes.
            drop(table);
            tcp::serve(client, session).await;
        }
        ListenerKind::Http(h) => {
            let conn = crate::http::Conn {
                listener: name.clone(),
                client: peer,
                tables: http.tables,
                tasks: http.tasks,
                drivers: http.drivers,
                tunnels: TaskTracker::new(),
                rejected: h.no_route.clone(),
            };
            let limits = h.limits;
            drop(table);
            crate::http::serve(client, conn, limits, &http.stop).await;
        }
    }
}

/// What an HTTP connection needs beyond the snapshot: the live table (each
/// request reads the current one), the signal to close gracefully, and where
/// its tasks run.
struct HttpContext {
    tables: Arc<ArcSwap<RoutingTable>>,
    stop: Arc<CancellationToken>,
    tasks: Tasks,
    drivers: Tasks,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections are accepted with Nagle off, without a setsockopt each.
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay() {
        let listener = bind_now("127.0.0.1:0".parse().unwrap(), Deferred::No).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    /// A lowered `max_connections` waits for open connections to give
    /// their permits back in a task of its own; closing the semaphore (what
    /// the accept loop does as it ends) ends that task.
    #[tokio::test]
    async fn a_waiting_resize_ends_when_the_semaphore_closes() {
        let permits = Arc::new(Semaphore::new(2));
        let limit = Limit {
            permits: permits.clone(),
            max: Mutex::new(2),
        };
        let _open = permits.clone().acquire_many_owned(2).await.unwrap();
        limit.resize(1);
        tokio::task::yield_now().await;
        // Ours, the limit's, the open connections' permit and the resize task's.
        assert_eq!(Arc::strong_count(&permits), 4, "the resize task waits");
        permits.close();
        tokio::time::timeout(Duration::from_secs(10), async {
            while Arc::strong_count(&permits) > 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the resize task ended");
    }

    /// A deferred listener hands over first the connection whose client
    /// wrote, although a silent one connected before it; the silent one is
    /// handed over too once the kernel's wait ends (not lost). A listener
    /// that is not deferred hands them over in connect order.
    #[tokio::test]
    async fn a_deferred_listener_hands_over_connections_that_wrote_first() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let deferred = bind_now("127.0.0.1:0".parse().unwrap(), Deferred::Yes).unwrap();
        let addr = deferred.local_addr().unwrap();
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut talker = tokio::net::TcpStream::connect(addr).await.unwrap();
        talker.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut first, peer) = deferred.accept().await.unwrap();
        assert_eq!(peer, talker.local_addr().unwrap());
        let mut buf = [0u8; 4];
        first.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET ");
        let (_, peer) = tokio::time::timeout(Duration::from_secs(30), deferred.accept())
            .await
            .expect("a silent client is handed over after the defer wait")
            .unwrap();
        assert_eq!(peer, silent.local_addr().unwrap());

        let plain = bind_now("127.0.0.1:0".parse().unwrap(), Deferred::No).unwrap();
        let addr = plain.local_addr().unwrap();
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut talker = tokio::net::TcpStream::connect(addr).await.unwrap();
        talker.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (_, peer) = plain.accept().await.unwrap();
        assert_eq!(peer, silent.local_addr().unwrap());
    }
}
