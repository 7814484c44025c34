//! `protocol: postgres` listeners: TCP forwarding that understands the
//! startup and the message framing of the PostgreSQL wire protocol.
//!
//! - **Startup and TLS.** When the cluster originates TLS, the app's
//!   SSLRequest and GSSENCRequest are answered `N` here (the app speaks
//!   plaintext to localhost) and the upstream connection does the server's
//!   SSLRequest dance itself (`upstream::try_connect`). Without `tls:` on the
//!   cluster the SSLRequest goes to the server and its answer back, so an
//!   app's own TLS still works end to end (legate then relays opaque bytes).
//! - **Cancel routing.** Each session's BackendKeyData is recorded with its
//!   server ([`cancel`]); a CancelRequest goes there, whatever the table says.
//! - **Closing between transactions.** The session follows ReadyForQuery and
//!   the client's unanswered messages ([`Tracker`]). When it must leave its
//!   server (a reload moved its route or removed its endpoint, or legate is
//!   shutting down) it is closed at its next idle point: everything answered,
//!   status `I`. The server gets Terminate; the app's connection closes before
//!   its next message is forwarded. The drain grace bounds the wait.
//! - **Fenced cut-over** ([`fence`]).
//!
//! Bytes are copied once through a buffer per direction (no splice: legate
//! reads the framing); nothing is kept per message but the framing state.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::fds;
use crate::metrics::{ListenerMetrics, PostgresMetrics};
use crate::table::Route;
use crate::upstream::{self, Connected};
use wire::{Event, Framer, Startup};

pub mod cancel;
pub mod fence;
pub mod wire;

/// The whole startup (SSL negotiation included) must arrive within this.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a session that has not run a statement yet may take to send its
/// first after it was told to leave (see [`Tracker::started`]).
const FIRST_STATEMENT_GRACE: Duration = Duration::from_secs(1);
/// After Terminate, how long the server may take to close its side.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// Per-direction buffer.
const BUF_SIZE: usize = 32 * 1024;
/// At most this many SSL/GSS requests before the startup message (libpq
/// sends at most one of each).
const MAX_NEGOTIATIONS: usize = 2;

/// `f`, or a timeout error after [`STARTUP_TIMEOUT`].
async fn within_startup<F: std::future::Future>(f: F) -> io::Result<F::Output> {
    tokio::time::timeout(STARTUP_TIMEOUT, f)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no startup packet within 10s"))
}

/// Asks a server for TLS on a fresh connection: the SSLRequest, answered `S`
/// (go ahead) or `N` (this server does not do TLS). `N` is an error, never a
/// silent fall back to plaintext.
pub async fn start_tls(tcp: &mut TcpStream) -> io::Result<()> {
    tcp.write_all(&wire::SSL_REQUEST_PACKET).await?;
    match tcp.read_u8().await? {
        b'S' => Ok(()),
        b'N' => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the server does not offer TLS (it answered N to SSLRequest); legate never falls back to plaintext",
        )),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected answer {other:#04x} to SSLRequest (not a PostgreSQL server?)"),
        )),
    }
}

/// What one Postgres session needs, taken from the table at accept.
pub struct Session {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub route: Arc<Route>,
    pub metrics: ListenerMetrics,
    pub pg: PostgresMetrics,
    /// Cancelled when the listener stops accepting (shutdown, or removed by
    /// a reload): sessions close at their next idle point.
    pub stop: CancellationToken,
    /// Close a session that moved no byte either way this long.
    pub idle_timeout: Option<Duration>,
}

/// How the startup went.
enum Opened {
    /// A tracked session: the server has the startup message.
    Tracked(Connected),
    /// The app and the server agreed on their own TLS (or GSS): opaque bytes.
    Opaque(Connected),
    /// Nothing more to do (a cancel, or a refused startup).
    Done,
}

/// Serves one app connection.
pub async fn serve(mut client: TcpStream, session: Session, upstream_fd: fds::Reserved) {
    let began = Instant::now();
    // Each read of the startup is bounded by STARTUP_TIMEOUT, the connect by
    // the cluster's connect timeout, a fence by its grace.
    let opened = match open(&mut client, &session, upstream_fd).await {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!(listener = %session.listener, client = %session.client, error = %e,
                "closing client: startup failed");
            return;
        }
    };
    let (connected, tracked) = match opened {
        Opened::Tracked(c) => (c, true),
        Opened::Opaque(c) => (c, false),
        Opened::Done => return,
    };
    let _counted = session.route.sessions.enter();
    let ended = run(client, connected, tracked, &session).await;
    let duration_ms = began.elapsed().as_millis() as u64;
    match ended {
        Ended::Failed(e) => tracing::debug!(listener = %session.listener, client = %session.client,
            error = %e, duration_ms, "postgres session ended with an error (reset passed on)"),
        ended => tracing::debug!(listener = %session.listener, client = %session.client,
            ended = ?ended, duration_ms, "postgres session ended"),
    }
}

/// Reads the app's startup, answers its TLS requests, and connects.
async fn open(client: &mut TcpStream, s: &Session, fd: fds::Reserved) -> io::Result<Opened> {
    let legate_tls = s.route.cluster.spec().tls.is_some();
    let mut upstream: Option<Connected> = None;
    let mut fd = Some(fd);
    for _ in 0..=MAX_NEGOTIATIONS {
        let packet = within_startup(wire::read_startup(client))
            .await?
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match packet {
            Startup::Cancel { packet, key } => {
                let outcome = cancel::forward(&key, &packet).await;
                s.pg.cancels(outcome).inc();
                tracing::debug!(listener = %s.listener, result = outcome.label(), "cancel request");
                return Ok(Opened::Done);
            }
            Startup::SslRequest | Startup::GssEncRequest if legate_tls => {
                // legate does the TLS: the app stays plaintext to localhost.
                client.write_all(b"N").await?;
            }
            request @ (Startup::SslRequest | Startup::GssEncRequest) => {
                // The app's own encryption, end to end: ask the server.
                let up = connected(&mut upstream, &mut fd, s).await?;
                let bytes = match request {
                    Startup::SslRequest => wire::SSL_REQUEST_PACKET,
                    _ => wire::GSSENC_REQUEST_PACKET,
                };
                up.stream.write_all(&bytes).await?;
                let answer = within_startup(up.stream.read_u8()).await??;
                client.write_all(&[answer]).await?;
                if answer != b'N' {
                    let up = upstream
                        .take()
                        .ok_or_else(|| io::Error::other("no upstream"))?;
                    return Ok(Opened::Opaque(up));
                }
            }
            Startup::Message(packet) => {
                let up = connected(&mut upstream, &mut fd, s).await?;
                up.stream.write_all(&packet).await?;
                let up = upstream
                    .take()
                    .ok_or_else(|| io::Error::other("no upstream"))?;
                return Ok(Opened::Tracked(up));
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "too many SSL/GSS requests before the startup message",
    ))
}

/// The upstream connection, made on first need (after the fence, if any).
async fn connected<'a>(
    upstream: &'a mut Option<Connected>,
    fd: &mut Option<fds::Reserved>,
    s: &Session,
) -> io::Result<&'a mut Connected> {
    if upstream.is_none() {
        if let Some(fence) = &s.route.fence
            && let fence::Passed::Held { waited, forced } = fence.pass().await
        {
            s.pg.held_sessions.inc();
            s.pg.fence_wait_seconds.observe(waited.as_secs_f64());
            tracing::info!(listener = %s.listener, client = %s.client,
                waited_ms = waited.as_millis() as u64, forced,
                "session held by the cut-over fence, now sent to the new target");
        }
        let fd = fd
            .take()
            .ok_or_else(|| io::Error::other("upstream fd already used"))?;
        let c = upstream::connect(&s.route.cluster, &s.route.failover, s.client, fd)
            .await
            .map_err(|e| {
                tracing::warn!(listener = %s.listener, client = %s.client, error = %e,
                    "closing client: no upstream");
                io::Error::new(io::ErrorKind::NotConnected, e)
            })?;
        *upstream = Some(c);
    }
    upstream
        .as_mut()
        .ok_or_else(|| io::Error::other("no upstream"))
}

/// How a session ended.
#[derive(Debug)]
enum Ended {
    /// Both sides finished on their own.
    Done,
    /// legate closed it at an idle point (a drain).
    ClosedIdle,
    /// The drain grace ran out first.
    Forced,
    /// No byte moved either way for the listener's `idle_timeout`.
    Idle,
    Failed(io::Error),
}

/// Forwards until the session ends; closes it at an idle point once it must
/// leave its server.
async fn run(mut client: TcpStream, up: Connected, tracked: bool, s: &Session) -> Ended {
    let Connected {
        stream,
        fd: _fd,
        cluster,
        endpoint,
        active: _active,
    } = up;
    let tracker = Tracker::default();
    let activity = s.idle_timeout.map(|_| crate::tcp::Activity::new());
    let quiet = async {
        match (&activity, s.idle_timeout) {
            (Some(a), Some(t)) => a.idle_for(t).await,
            _ => std::future::pending().await,
        }
    };
    // The directions borrow the client socket; it is needed again after.
    let ended = {
        let (client_r, client_w) = client.split();
        let (server_r, server_w) = tokio::io::split(stream);
        let leave = async {
            tokio::select! {
                _ = s.route.leaving.cancelled() => "a reload moved its route",
                _ = endpoint.leaving.cancelled() => "a reload removed its endpoint",
                _ = s.stop.cancelled() => "the listener is closing",
            }
        };
        let forced = async {
            tokio::select! {
                _ = s.route.retired.cancelled() => {}
                _ = endpoint.retired.cancelled() => {}
            }
        };
        let to_server = client_to_server(
            client_r,
            server_w,
            &tracker,
            tracked,
            &s.metrics.bytes_upstream,
            activity.as_ref(),
        );
        let to_client = server_to_client(
            server_r,
            client_w,
            &tracker,
            tracked,
            &s.metrics.bytes_downstream,
            (&cluster, &endpoint),
            activity.as_ref(),
        );
        tokio::pin!(leave, forced, to_server, to_client, quiet);
        let (mut server_done, mut client_done, mut leaving) = (false, false, false);
        let mut closed_idle = false;
        loop {
            tokio::select! {
                r = &mut to_server, if !server_done => match r {
                    // Terminate went to the server: what it still sends (the
                    // last ReadyForQuery) reaches the app before its FIN.
                    Ok(Pumped::ClosedIdle) => {
                        closed_idle = true;
                        server_done = true;
                    }
                    Ok(Pumped::Eof) => server_done = true,
                    Err(e) => break Ended::Failed(e),
                },
                r = &mut to_client, if !client_done => match r {
                    Ok(_) => client_done = true,
                    Err(e) => break Ended::Failed(e),
                },
                why = &mut leave, if !leaving => {
                    leaving = true;
                    if !tracked {
                        // Opaque bytes: no idle point can be seen; the grace decides.
                        tracing::info!(listener = %s.listener, cluster = %cluster.name, reason = why,
                            "encrypted session must leave its server: closing after the grace");
                        continue;
                    }
                    tracing::info!(listener = %s.listener, cluster = %cluster.name, endpoint = %endpoint.label,
                        reason = why, "session must leave its server: closing at its next idle point");
                    tracker.draining.store(true, Ordering::Release);
                    tracker.wake.notify_one();
                },
                // A session that never ran a statement had its chance.
                _ = tokio::time::sleep(FIRST_STATEMENT_GRACE),
                    if leaving && tracked && !tracker.fresh_expired.load(Ordering::Acquire) => {
                    tracker.fresh_expired.store(true, Ordering::Release);
                    tracker.wake.notify_one();
                },
                _ = &mut forced, if !closed_idle => break Ended::Forced,
                () = &mut quiet, if !closed_idle => break Ended::Idle,
                _ = tokio::time::sleep(CLOSE_WAIT), if closed_idle => break Ended::ClosedIdle,
            }
            if server_done && client_done {
                break if closed_idle {
                    Ended::ClosedIdle
                } else {
                    Ended::Done
                };
            }
        }
    };
    match &ended {
        Ended::ClosedIdle => s.pg.closed_idle.inc(),
        Ended::Forced => {
            s.pg.closed_forced.inc();
            tracing::warn!(listener = %s.listener, cluster = %cluster.name, endpoint = %endpoint.label,
                "session closed by the drain grace before an idle point (a transaction may be cut)");
        }
        Ended::Failed(_) => crate::tcp::reset(&client),
        Ended::Done | Ended::Idle => {}
    }
    ended
}

/// What the two directions know about a tracked session.
#[derive(Default)]
struct Tracker {
    /// ReadyForQuery messages still owed: one per Query, Sync, FunctionCall.
    owed: AtomicU32,
    /// Extended-protocol messages sent since the last Sync: not idle.
    unsynced: AtomicBool,
    /// The last ReadyForQuery status (`I`, `T`, `E`); 0 before the first.
    status: AtomicU8,
    /// The session must leave: close at the next idle point.
    draining: AtomicBool,
    /// The app sent a statement since startup. A session that has not may be
    /// about to send its first (a connection per transaction, as pgbench -C
    /// does): it gets [`FIRST_STATEMENT_GRACE`] to do so before it counts as
    /// idle, so its first statement is not refused.
    started: AtomicBool,
    /// That grace ran out.
    fresh_expired: AtomicBool,
    /// Wakes the client direction to close at an idle point.
    wake: Notify,
}

impl Tracker {
    fn idle(&self) -> bool {
        self.owed.load(Ordering::Acquire) == 0
            && !self.unsynced.load(Ordering::Acquire)
            && self.status.load(Ordering::Acquire) == b'I'
    }

    fn must_close(&self) -> bool {
        self.draining.load(Ordering::Acquire)
            && self.idle()
            && (self.started.load(Ordering::Acquire) || self.fresh_expired.load(Ordering::Acquire))
    }

    /// A client message begins.
    fn client_sent(&self, kind: u8) {
        match kind {
            // Simple query, Sync, FunctionCall: each is answered by one ReadyForQuery.
            b'Q' | b'F' => {
                self.owed.fetch_add(1, Ordering::AcqRel);
                self.started.store(true, Ordering::Release);
            }
            b'S' => {
                self.owed.fetch_add(1, Ordering::AcqRel);
                self.unsynced.store(false, Ordering::Release);
            }
            // Parse, Bind, Execute, Describe, Close, Flush: a Sync will follow.
            b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => {
                self.unsynced.store(true, Ordering::Release);
                self.started.store(true, Ordering::Release);
            }
            _ => {}
        }
    }

    fn ready(&self, status: u8) {
        let _ = self
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(1))
            });
        self.status.store(status, Ordering::Release);
    }
}

/// How one direction ended without an error.
enum Pumped {
    Eof,
    /// Closed by legate at an idle point (client direction only).
    ClosedIdle,
}

fn client_watch(_kind: u8) -> Option<usize> {
    None
}

fn server_watch(kind: u8) -> Option<usize> {
    match kind {
        b'K' => Some(260),
        b'Z' => Some(1),
        _ => None,
    }
}

async fn client_to_server<R, W>(
    mut from: R,
    mut to: W,
    t: &Tracker,
    tracked: bool,
    counter: &IntCounter,
    activity: Option<&crate::tcp::Activity>,
) -> io::Result<Pumped>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut framer = Framer::new(client_watch);
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => n?,
            () = t.wake.notified() => {
                if t.must_close() && framer.at_boundary() {
                    return close_at_idle(&mut to).await;
                }
                continue;
            }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(Pumped::Eof);
        }
        let end = if tracked {
            framer
                .scan(&buf[..n], |event| match event {
                    Event::Begin { kind, .. } => {
                        if t.must_close() {
                            return false;
                        }
                        t.client_sent(kind);
                        true
                    }
                    Event::Whole { .. } => true,
                })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        } else {
            n
        };
        to.write_all(&buf[..end]).await?;
        counter.inc_by(end as u64);
        if let Some(a) = activity {
            a.touch();
        }
        if end < n {
            // The app's next message after an idle point: never forwarded.
            return close_at_idle(&mut to).await;
        }
    }
}

async fn close_at_idle<W: AsyncWrite + Unpin>(to: &mut W) -> io::Result<Pumped> {
    let _ = to.write_all(&wire::TERMINATE).await;
    let _ = to.shutdown().await;
    Ok(Pumped::ClosedIdle)
}

async fn server_to_client<R, W>(
    mut from: R,
    mut to: W,
    t: &Tracker,
    tracked: bool,
    counter: &IntCounter,
    (cluster, endpoint): (&Arc<upstream::Cluster>, &Arc<upstream::Endpoint>),
    activity: Option<&crate::tcp::Activity>,
) -> io::Result<Pumped>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut framer = Framer::new(server_watch);
    let mut buf = vec![0u8; BUF_SIZE];
    // Kept for the session's life: dropping it forgets the cancel key.
    let mut _registered: Option<cancel::Registered> = None;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(Pumped::Eof);
        }
        if tracked {
            let mut key: Option<Vec<u8>> = None;
            framer
                .scan(&buf[..n], |event| {
                    match event {
                        Event::Whole { kind: b'K', body } => key = Some(body.to_vec()),
                        Event::Whole { kind: b'Z', body } => {
                            t.ready(body.first().copied().unwrap_or(0))
                        }
                        _ => {}
                    }
                    true
                })
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let Some(key) = key {
                _registered = Some(cancel::register(&key, cluster, endpoint));
            }
        }
        to.write_all(&buf[..n]).await?;
        counter.inc_by(n as u64);
        if let Some(a) = activity {
            a.touch();
        }
        if tracked && t.must_close() {
            t.wake.notify_one();
        }
    }
}
