//! Layer-4 sessions: connect the app's connection to its route's upstream and
//! forward bytes both ways until both sides are done, with half-close kept.
//! Plain TCP on Linux goes through [`splice`] (zero-copy for bulk, small
//! messages copied on the stack); TLS upstreams, and kernels without splice
//! (or a moment without fds for pipes), copy through a user-space buffer.
//!
//! When one side sends FIN, the other side's write half is shut down and the
//! reverse direction keeps flowing, so clients that `shutdown(SHUT_WR)` and then
//! read their answer work. An error on either direction ends both, and both
//! sockets are closed with a reset (SO_LINGER 0), so an app whose upstream
//! reset the connection sees ECONNRESET, as it would directly, and not a clean
//! end of stream. Bytes are counted as they pass, so long-lived connections
//! show up in the metrics.
//!
//! A session owns what it needs, not the routing table: its route (cluster,
//! failover chain, retire signal), the listener's counters and its idle timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::clock::now_ms;
use crate::fds;
use crate::metrics::ListenerMetrics;
use crate::table::Route;
use crate::upstream::{self, UpstreamStream};
use crate::wake::OnWake;

#[cfg(target_os = "linux")]
mod splice;

/// What one TCP session needs, taken from the table at accept.
pub struct Session {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub route: Arc<Route>,
    /// Close after this long without a byte either way; `None`: never.
    pub idle_timeout: Option<Duration>,
    pub metrics: ListenerMetrics,
    /// The upstream socket's fd, reserved when the connection was admitted.
    pub upstream_fd: fds::Reserved,
}

/// Whether splice works here: probed once, on the first connection's socket
/// (a zero-length splice moves nothing). `LEGATE_NO_SPLICE=1` turns it off,
/// to compare the two paths.
#[cfg(target_os = "linux")]
static SPLICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

#[cfg(target_os = "linux")]
fn splice_works(socket: &TcpStream) -> bool {
    if let Some(works) = SPLICE.get() {
        return *works;
    }
    let works = if std::env::var_os("LEGATE_NO_SPLICE").is_some_and(|v| v == "1") {
        false
    } else {
        match splice::supported(socket) {
            Some(works) => works,
            // No fds to try with right now: copy this once, probe again later.
            None => return false,
        }
    };
    if SPLICE.set(works).is_ok() {
        if works {
            tracing::info!("TCP forwarding uses splice(2): zero-copy");
        } else {
            tracing::warn!("splice(2) unavailable: TCP forwarding copies through user space");
        }
    }
    works
}

/// Per-direction buffer. Larger buffers buy little on loopback past this point
/// and every open connection pays for two.
const BUF_SIZE: usize = 32 * 1024;

/// Bytes moved by one connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// App → backend.
    pub upstream: u64,
    /// Backend → app.
    pub downstream: u64,
}

/// How a forward ended without an error.
#[derive(Debug)]
pub enum Ended {
    /// Both sides finished.
    Done(Transferred),
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// When bytes last moved, for the idle timeout: one relaxed store per transfer.
pub struct Activity(AtomicU64);

impl Activity {
    pub(crate) fn new() -> Self {
        Activity(AtomicU64::new(now_ms()))
    }

    pub(crate) fn touch(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// Returns once nothing moved for `idle`.
    pub(crate) async fn idle_for(&self, idle: Duration) {
        let idle_ms = idle.as_millis() as u64;
        loop {
            let quiet = now_ms().saturating_sub(self.0.load(Ordering::Relaxed));
            if quiet >= idle_ms {
                return;
            }
            tokio::time::sleep(Duration::from_millis(idle_ms - quiet)).await;
        }
    }
}

/// Serves one app connection: connect to the route's upstream, forward until
/// both sides are done, the route or endpoint is retired by a reload, or the
/// connection sits idle past its timeout.
pub async fn serve(mut client: TcpStream, session: Session) {
    let Session {
        listener,
        client: peer,
        route,
        idle_timeout,
        metrics: m,
        upstream_fd,
    } = session;
    let began = Instant::now();
    let upstream::Connected {
        stream: mut upstream,
        fd: _fd,
        cluster,
        endpoint,
        active: _active_on_endpoint,
    } = match upstream::connect(&route.cluster, &route.failover, peer, upstream_fd).await {
        Ok(connected) => connected,
        Err(e) => {
            tracing::warn!(listener = %listener, client = %peer, error = %e, "closing client: no upstream");
            return;
        }
    };
    // Polled only when a token fires, not on each wake-up of the transfer.
    let retired = OnWake::new(async {
        tokio::select! {
            _ = route.retired.cancelled() => "a reload moved this route",
            _ = endpoint.retired.cancelled() => "a reload removed its endpoint from the cluster",
        }
    });
    // `biased` here and in `forward`: the transfer first, and no random pick
    // of a first branch at each of its wake-ups.
    let forwarded = tokio::select! {
        biased;
        r = forward(&mut client, &mut upstream, &m.bytes_upstream, &m.bytes_downstream, idle_timeout) => r,
        why = retired => {
            tracing::info!(
                listener = %listener, client = %peer, cluster = %cluster.name, endpoint = %endpoint.label,
                "closing connection: {why} (drain_on_change)"
            );
            return;
        }
    };
    let duration_ms = began.elapsed().as_millis() as u64;
    match forwarded {
        Ok(Ended::Done(t)) => tracing::debug!(
            listener = %listener, client = %peer, cluster = %cluster.name, endpoint = %endpoint.label,
            bytes_upstream = t.upstream, bytes_downstream = t.downstream,
            duration_ms, "connection closed"
        ),
        Ok(Ended::Idle) => tracing::debug!(
            listener = %listener, client = %peer, cluster = %cluster.name, endpoint = %endpoint.label,
            duration_ms, "connection closed: idle timeout"
        ),
        Err(e) => {
            // Pass the abort on: each side gets a reset, as a direct
            // connection would, instead of a FIN that reads as "done".
            reset(&client);
            if let UpstreamStream::Plain(s) = &upstream {
                reset(s);
            } else if let UpstreamStream::Tls(s) = &upstream {
                reset(s.get_ref().0);
            }
            tracing::debug!(
                listener = %listener, client = %peer, cluster = %cluster.name, endpoint = %endpoint.label,
                error = %e, duration_ms, "connection ended with error (reset passed on)"
            );
        }
    }
}

/// Makes the coming close send RST instead of FIN.
pub(crate) fn reset(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

/// Forwards between `client` and `upstream` until both directions reach EOF,
/// or nothing moved for `idle_timeout`. On the splice path the last FIN goes
/// out with the sockets' close: the caller drops them as soon as this returns.
pub async fn forward(
    client: &mut TcpStream,
    upstream: &mut UpstreamStream,
    up_bytes: &IntCounter,
    down_bytes: &IntCounter,
    idle_timeout: Option<Duration>,
) -> io::Result<Ended> {
    let activity = idle_timeout.map(|_| Activity::new());
    let idle = async {
        match (&activity, idle_timeout) {
            (Some(a), Some(t)) => a.idle_for(t).await,
            _ => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        r = both_ways(client, upstream, up_bytes, down_bytes, activity.as_ref()) => r.map(Ended::Done),
        () = idle => Ok(Ended::Idle),
    }
}

async fn both_ways(
    client: &mut TcpStream,
    upstream: &mut UpstreamStream,
    up_bytes: &IntCounter,
    down_bytes: &IntCounter,
    activity: Option<&Activity>,
) -> io::Result<Transferred> {
    #[cfg(target_os = "linux")]
    if let UpstreamStream::Plain(upstream) = upstream
        && splice_works(client)
        && let Some((up_pipe, down_pipe)) = splice::Pipe::pair()
    {
        let (client_r, client_w) = client.split();
        let (upstream_r, upstream_w) = upstream.split();
        // Both sockets close as soon as this returns (`serve` drops them).
        let directions = splice::Directions::default();
        let (up, down) = tokio::try_join!(
            splice::pipe(
                client_r,
                upstream_w,
                up_pipe,
                Tally::new(up_bytes, activity),
                &directions
            ),
            splice::pipe(
                upstream_r,
                client_w,
                down_pipe,
                Tally::new(down_bytes, activity),
                &directions
            ),
        )?;
        return Ok(Transferred {
            upstream: up,
            downstream: down,
        });
    }
    let (mut client_r, mut client_w) = client.split();
    let (upstream, downstream) = match upstream {
        UpstreamStream::Plain(upstream) => {
            let (mut upstream_r, mut upstream_w) = upstream.split();
            tokio::try_join!(
                pipe(
                    &mut client_r,
                    &mut upstream_w,
                    Tally::new(up_bytes, activity)
                ),
                pipe(
                    &mut upstream_r,
                    &mut client_w,
                    Tally::new(down_bytes, activity)
                ),
            )?
        }
        UpstreamStream::Tls(tls) => {
            // A TLS stream is one state machine for both directions: split it
            // with tokio's lock-based halves.
            let (mut upstream_r, mut upstream_w) = tokio::io::split(tls.as_mut());
            tokio::try_join!(
                pipe(
                    &mut client_r,
                    &mut upstream_w,
                    Tally::new(up_bytes, activity)
                ),
                pipe(
                    &mut upstream_r,
                    &mut client_w,
                    Tally::new(down_bytes, activity)
                ),
            )?
        }
    };
    Ok(Transferred {
        upstream,
        downstream,
    })
}

/// Copies `from` to `to` until EOF, then shuts down `to`'s write side (sends FIN).
async fn pipe<R, W>(from: &mut R, to: &mut W, mut moved: Tally<'_>) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            match to.shutdown().await {
                // The peer is already fully gone: nothing left to tell it.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                other => other?,
            }
            return Ok(moved.total);
        }
        to.write_all(&buf[..n]).await?;
        moved.add(n);
    }
}

/// Bytes one direction delivered to its destination, counted as they go.
struct Tally<'a> {
    total: u64,
    counter: &'a IntCounter,
    activity: Option<&'a Activity>,
}

impl<'a> Tally<'a> {
    fn new(counter: &'a IntCounter, activity: Option<&'a Activity>) -> Self {
        Tally {
            total: 0,
            counter,
            activity,
        }
    }

    fn add(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.total += n as u64;
        self.counter.inc_by(n as u64);
        if let Some(a) = self.activity {
            a.touch();
        }
    }
}
