//! `protocol: kafka` listeners: every broker behind localhost.
//!
//! A Kafka client uses its bootstrap address once, then connects to the
//! addresses brokers advertise in Metadata, FindCoordinator and
//! DescribeCluster responses. legate frames each connection's requests (size,
//! API key, version, correlation id) and matches responses to them (a
//! connection's responses come in request order; a Produce with acks=0 has
//! none), rewrites the responses that carry broker addresses ([`rewrite`]) so
//! each broker is `listen IP : its own port` from `broker_ports`
//! ([`brokers`]), and forwards everything else as it streams. Connections to
//! a broker port are proxied the same way to that broker's real address, with
//! the cluster's `tls:` (SNI = the broker's host name); SASL passes through.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_protocol::messages::ApiKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fds;
use crate::metrics::{KafkaMetrics, ListenerMetrics};
use crate::shutdown::Tasks;
use crate::table::Route;
use crate::upstream::{self, Cluster, UpstreamStream};
use brokers::{Advertised, Broker, BrokerPorts, Mapper, Spawn};

pub mod brokers;
pub mod rewrite;

/// Largest request or response frame (Kafka's `socket.request.max.bytes`).
const MAX_FRAME: i32 = 100 * 1024 * 1024;
/// Largest response legate decodes to rewrite (a Metadata response for a
/// very large cluster is a few MB).
const MAX_REWRITE: i32 = 16 * 1024 * 1024;
/// Requests remembered per connection while their responses are awaited
/// (clients pipeline 5 by default); past it the oldest are forgotten.
const MAX_IN_FLIGHT: usize = 1024;

/// What every connection of one Kafka listener shares.
#[derive(Clone)]
pub struct Context {
    pub listener: Arc<str>,
    pub metrics: ListenerMetrics,
    pub kafka: KafkaMetrics,
    pub ports: Arc<BrokerPorts>,
    /// Where broker ports' accept loops and connections run.
    pub tasks: Tasks,
    /// Stops broker ports with their bootstrap listener.
    pub stop: tokio_util::sync::CancellationToken,
    /// Close a connection that moved no byte either way this long.
    pub idle_timeout: Option<Duration>,
}

/// A request awaiting its response.
struct Pending {
    correlation_id: i32,
    api: Option<ApiKey>,
    version: i16,
    sent: Instant,
}

/// Serves one connection to the bootstrap port.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    ctx: Context,
    fd: fds::Reserved,
) {
    let connected = match upstream::connect(&route.cluster, &route.failover, peer, fd).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(listener = %ctx.listener, client = %peer, error = %e, "closing client: no upstream");
            return;
        }
    };
    let _fd = connected.fd;
    let _active = connected.active;
    let ended = tokio::select! {
        r = proxy(client, connected.stream, &ctx, &route) => r,
        _ = route.retired.cancelled() => {
            tracing::info!(listener = %ctx.listener, client = %peer,
                "closing connection: a reload moved this route (drain_on_change)");
            Ok(())
        }
    };
    if let Err(e) = ended {
        tracing::debug!(listener = %ctx.listener, client = %peer, error = %e, "kafka connection ended");
    }
}

/// How a broker port's connections are served.
pub fn spawner(ctx: &Context) -> Spawn {
    let ctx = ctx.clone();
    Arc::new(move |broker: Arc<Broker>, socket: std::net::TcpListener| {
        ctx.tasks.spawn(accept_broker(broker, socket, ctx.clone()));
    })
}

/// Serves a broker port until the listener stops, or a cut-over retires the
/// cluster that last named the broker (no newer response re-targeted it):
/// then the port is no longer advertised, and it closes.
async fn accept_broker(broker: Arc<Broker>, socket: std::net::TcpListener, ctx: Context) {
    let listener = match socket
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(socket))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(listener = %ctx.listener, port = broker.port, error = %e, "broker port unusable");
            broker.stop.cancel();
            return;
        }
    };
    loop {
        let route = broker.route.load_full();
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.stop.cancelled() => break,
            _ = route.retired.cancelled() => {
                if Arc::ptr_eq(&broker.route.load(), &route) {
                    tracing::info!(listener = %ctx.listener, node_id = broker.node_id, port = broker.port,
                        cluster = %route.cluster.name, "broker port closed: its cluster was cut over");
                    break;
                }
                continue;
            }
        };
        let (client, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(listener = %ctx.listener, port = broker.port, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Both sockets, as a TCP connection is admitted.
        let Some(fd) = fds::reserve(2) else {
            tracing::warn!(listener = %ctx.listener, port = broker.port, "no fd for a broker connection: closing it");
            continue;
        };
        let (broker, ctx) = (broker.clone(), ctx.clone());
        ctx.tasks.clone().spawn(async move {
            let _fd = fd;
            let _ = client.set_nodelay(true);
            ctx.metrics.connections_total.inc();
            ctx.metrics.connections_active.inc();
            let target = broker.target.load_full();
            let route = broker.route.load_full();
            let result = match connect_broker(&target, &route.cluster).await {
                // Closed with the bootstrap connections when the cluster is cut over.
                Ok(upstream) => tokio::select! {
                    r = proxy(client, upstream, &ctx, &route) => r,
                    _ = route.retired.cancelled() => {
                        tracing::info!(listener = %ctx.listener, client = %peer, node_id = broker.node_id,
                            "closing broker connection: a reload moved the listener to another cluster");
                        Ok(())
                    }
                },
                Err(e) => {
                    tracing::warn!(listener = %ctx.listener, node_id = broker.node_id,
                        broker = %format!("{}:{}", target.host, target.port), error = %e,
                        "closing client: broker unreachable");
                    Ok(())
                }
            };
            if let Err(e) = result {
                tracing::debug!(listener = %ctx.listener, client = %peer, error = %e, "kafka broker connection ended");
            }
            ctx.metrics.connections_active.dec();
        });
    }
    broker.stop.cancel();
}

/// A connection to a broker's own address, with the cluster's TLS.
async fn connect_broker(target: &Advertised, cluster: &Cluster) -> io::Result<UpstreamStream> {
    let timeout = cluster.spec().connect_timeout;
    let attempt = async {
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for the broker"))?;
        let tcp = TcpStream::connect(addr).await?;
        let _ = tcp.set_nodelay(true);
        match &cluster.spec().tls {
            None => Ok(UpstreamStream::Plain(tcp)),
            Some(tls) => tls
                .handshake(tcp, Some(&target.host), addr.ip())
                .await
                .map(|s| UpstreamStream::Tls(Box::new(s))),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "broker connect timed out",
            ))
        })
}

/// Forwards one Kafka connection both ways, rewriting broker addresses.
async fn proxy<U>(
    mut client: TcpStream,
    upstream: U,
    ctx: &Context,
    route: &Arc<Route>,
) -> io::Result<()>
where
    U: AsyncRead + AsyncWrite + Unpin,
{
    let pending: Mutex<VecDeque<Pending>> = Mutex::default();
    let spawn = spawner(ctx);
    let (client_r, client_w) = client.split();
    let (server_r, server_w) = tokio::io::split(upstream);
    let activity = ctx.idle_timeout.map(|_| crate::tcp::Activity::new());
    let quiet = async {
        match (&activity, ctx.idle_timeout) {
            (Some(a), Some(t)) => a.idle_for(t).await,
            _ => std::future::pending().await,
        }
    };
    let both = async {
        tokio::try_join!(
            requests(client_r, server_w, &pending, ctx, activity.as_ref()),
            responses(
                server_r,
                client_w,
                &pending,
                ctx,
                route,
                &spawn,
                activity.as_ref()
            ),
        )
    };
    tokio::select! {
        r = both => r.map(|_| ()),
        () = quiet => {
            tracing::debug!(listener = %ctx.listener, "closing connection: idle_timeout");
            Ok(())
        }
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads a frame size; `None` at a clean end of stream.
async fn frame_size<R: AsyncRead + Unpin>(from: &mut R, least: i32) -> io::Result<Option<i32>> {
    let mut size = [0u8; 4];
    match from.read_exact(&mut size).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = i32::from_be_bytes(size);
    if !(least..=MAX_FRAME).contains(&n) {
        return Err(invalid(format!("invalid Kafka frame size {n}")));
    }
    Ok(Some(n))
}

/// Writes one frame: its size, then `body`.
async fn write_frame<W: AsyncWrite + Unpin>(to: &mut W, body: &[u8]) -> io::Result<()> {
    to.write_all(&(body.len() as i32).to_be_bytes()).await?;
    to.write_all(body).await
}

/// Copies exactly `n` bytes.
async fn copy_exact<R, W>(from: &mut R, to: &mut W, n: u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let copied = tokio::io::copy(&mut from.take(n), to).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn requests<R, W>(
    mut from: R,
    mut to: W,
    pending: &Mutex<VecDeque<Pending>>,
    ctx: &Context,
    activity: Option<&crate::tcp::Activity>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut head = [0u8; 12];
    loop {
        let Some(n) = frame_size(&mut from, 8).await? else {
            let _ = to.shutdown().await;
            return Ok(());
        };
        head[..4].copy_from_slice(&n.to_be_bytes());
        from.read_exact(&mut head[4..]).await?;
        let api_key = i16::from_be_bytes([head[4], head[5]]);
        let version = i16::from_be_bytes([head[6], head[7]]);
        let correlation_id = i32::from_be_bytes([head[8], head[9], head[10], head[11]]);
        let api = ApiKey::try_from(api_key).ok();
        ctx.kafka.requests(api).inc();
        {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() >= MAX_IN_FLIGHT {
                p.pop_front();
            }
            p.push_back(Pending {
                correlation_id,
                api,
                version,
                sent: Instant::now(),
            });
        }
        to.write_all(&head).await?;
        copy_exact(&mut from, &mut to, (n - 8) as u64).await?;
        ctx.metrics.bytes_upstream.inc_by(n as u64 + 4);
        if let Some(a) = activity {
            a.touch();
        }
    }
}

async fn responses<R, W>(
    mut from: R,
    mut to: W,
    pending: &Mutex<VecDeque<Pending>>,
    ctx: &Context,
    route: &Arc<Route>,
    spawn: &Spawn,
    activity: Option<&crate::tcp::Activity>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let Some(n) = frame_size(&mut from, 4).await? else {
            let _ = to.shutdown().await;
            return Ok(());
        };
        let mut correlation = [0u8; 4];
        from.read_exact(&mut correlation).await?;
        let correlation_id = i32::from_be_bytes(correlation);
        // Requests without a response (acks=0) are skipped over.
        let request = {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            let mut found = None;
            while let Some(r) = p.pop_front() {
                if r.correlation_id == correlation_id {
                    found = Some(r);
                    break;
                }
            }
            found
        };
        let rewritten = request
            .as_ref()
            .and_then(|r| r.api.map(|api| (api, r.version)))
            .filter(|(api, _)| rewrite::is_rewritten(*api));
        match rewritten {
            Some((api, version)) => {
                if n > MAX_REWRITE {
                    return Err(invalid(format!(
                        "{api:?} response of {n} bytes is over the {MAX_REWRITE} legate rewrites"
                    )));
                }
                let mut frame = vec![0u8; n as usize];
                frame[..4].copy_from_slice(&correlation);
                from.read_exact(&mut frame[4..]).await?;
                let frame = bytes::Bytes::from(frame);
                let mut mapper = Mapper {
                    ports: &ctx.ports,
                    route,
                    spawn,
                };
                match rewrite::rewrite(api, version, frame.clone(), &mut mapper) {
                    Ok(Some(out)) => write_frame(&mut to, &out).await?,
                    Ok(None) => write_frame(&mut to, &frame).await?,
                    Err(e) => {
                        // Never hand the client an address that bypasses legate.
                        tracing::warn!(listener = %ctx.listener, error = %e,
                            "closing the connection: a response naming brokers could not be rewritten");
                        return Err(invalid(e.to_string()));
                    }
                }
            }
            None => {
                to.write_all(&n.to_be_bytes()).await?;
                to.write_all(&correlation).await?;
                copy_exact(&mut from, &mut to, (n - 4) as u64).await?;
            }
        }
        ctx.metrics.bytes_downstream.inc_by(n as u64 + 4);
        if let Some(a) = activity {
            a.touch();
        }
        if let Some(r) = request {
            ctx.kafka
                .seconds(r.api)
                .observe(r.sent.elapsed().as_secs_f64());
        }
    }
}
