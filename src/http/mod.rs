//! The HTTP side of a listener: serve HTTP/1.1 and cleartext HTTP/2 (prior
//! knowledge) on one accepted connection, and hand each request to [`proxy`].
//!
//! Each request reads the current routing table, so a reload applies to the
//! next request even on a long-lived keep-alive connection. When the listener
//! stops accepting (shutdown, or removal by a reload) the connection is shut
//! down gracefully: in-flight requests finish, HTTP/1.1 answers the next
//! response with `Connection: close`, HTTP/2 sends GOAWAY.
//!
//! The connection owns its timeouts ([`ConnLimits`]): a request head must
//! arrive within `header_timeout` of its first byte (slowloris), and a
//! connection with no request in flight is closed after `idle_timeout`, one
//! with requests in flight whose client took none of legate's writes for
//! `stream_idle_timeout` too (it stopped reading). One watchdog per
//! connection reads atomics that the connection's reads, writes and requests
//! keep current, and wakes every half timeout (or at the nearest deadline),
//! so a connection pays a few relaxed stores per request and no timer per
//! request. Each request's own bodies are watched by [`idle`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::now_ms;
use crate::shutdown::Tasks;
use crate::table::RoutingTable;
use crate::table::http::{ConnLimits, HttpVersions};
use crate::upstream::pool::ProxyBody;
use crate::wake::OnWake;
use idle::{ResponseIdle, StreamIdle};

pub mod grpc;
mod idle;
pub mod proxy;
mod replay;

/// What every request of one connection shares.
pub struct Conn {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub tables: Arc<ArcSwap<RoutingTable>>,
    /// Where this connection's own tasks run (tunnels, mirrors, HTTP/2
    /// streams): the drain waits for them.
    pub tasks: Tasks,
    /// Where upstream connection drivers run: pooled beyond this connection.
    pub drivers: Tasks,
    /// This connection's upgrade tunnels: it ends only after them, so its
    /// connection slot, fd and gauge count a WebSocket for its whole life.
    pub tunnels: TaskTracker,
    /// Counts the requests rejected before routing (the listener's
    /// `route="none"` 4xx series), including heads hyper could not parse.
    pub rejected: prometheus::IntCounter,
}

/// Serves one accepted connection until it ends, its head or idle timeout
/// passes, or `stop` is cancelled (then it closes gracefully).
pub async fn serve(stream: TcpStream, conn: Conn, limits: ConnLimits, stop: &CancellationToken) {
    let activity = Arc::new(Activity::new());
    let mut io = Watched {
        inner: stream,
        activity: activity.clone(),
        rejected: conn.rejected.clone(),
        rewrite: None,
        first: None,
    };
    let http2 = match limits.versions {
        HttpVersions::Http1 => false,
        HttpVersions::H2c => {
            activity.protocol(true);
            true
        }
        HttpVersions::Both => {
            let sniff = io.sniff();
            tokio::pin!(sniff);
            // A client that wrote with its connect (the usual case) is read
            // at once: no timer armed and cancelled, no wait on `stop`.
            let sniffed = match poll_once(sniff.as_mut()).await {
                Poll::Ready(sniffed) => sniffed,
                Poll::Pending => tokio::select! {
                    sniffed = sniff => sniffed,
                    expired = activity.expired(limits) => {
                        tracing::debug!(?expired, "closing connection before its first request");
                        return;
                    }
                    _ = stop.cancelled() => return,
                },
            };
            match sniffed {
                Ok(Some(http2)) => http2,
                // Closed before a byte, or broken: nothing to answer.
                _ => return,
            }
        }
    };
    let tunnels = conn.tunnels.clone();
    let tasks = conn.tasks.clone();
    let conn = Arc::new(conn);
    let requests = activity.clone();
    let stream_idle = limits.stream_idle_timeout;
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let conn = conn.clone();
        let in_flight = InFlight::start(requests.clone());
        let idle = StreamIdle::new(stream_idle, !req.body().is_end_stream());
        async move {
            let response = proxy::handle(req, conn, &idle).await;
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                in_flight.0.upgraded.store(true, Ordering::Relaxed);
            }
            Ok::<_, Infallible>(response.map(|body| Tracked {
                body,
                idle: idle.response(),
                _in_flight: in_flight,
            }))
        }
    });
    let io = TokioIo::new(io);
    let done = if http2 {
        let mut builder = http2::Builder::new(tasks);
        builder.max_header_list_size(u32::try_from(limits.max_headers_size).unwrap_or(u32::MAX));
        let served = builder.serve_connection(io, service);
        watch(served, |c| c.graceful_shutdown(), &activity, limits, stop).await
    } else {
        let mut builder = http1::Builder::new();
        // hyper answers a head past this with 431 (it cannot go below 8 KiB).
        builder.max_buf_size(limits.max_headers_size.max(8192));
        let served = builder.serve_connection(io, service).with_upgrades();
        watch(served, |c| c.graceful_shutdown(), &activity, limits, stop).await
    };
    if done {
        // Done, or upgraded: then a tunnel owns the socket, and the
        // connection lasts as long as it does (the drain still ends it).
        tunnels.close();
        tunnels.wait().await;
    }
}

/// Polls `fut` once, in the calling task's context (its waker is kept).
async fn poll_once<F: Future + Unpin>(mut fut: F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut fut).poll(cx))).await
}

/// Drives hyper's connection future until it is done (`true`), a deadline
/// of the watchdog passes, or `stop` is cancelled; then closes it gracefully
/// (in-flight requests finish within the idle timeout) or at once.
async fn watch<C: Future>(
    served: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    activity: &Activity,
    limits: ConnLimits,
    stop: &CancellationToken,
) -> bool {
    tokio::pin!(served);
    // Polled only when the watchdog's timer or the token woke the task, not
    // on each of the connection's own wake-ups.
    let side = OnWake::new(async {
        tokio::select! {
            expired = activity.expired(limits) => Some(expired),
            _ = stop.cancelled() => None,
        }
    });
    // `biased`: the connection first, and no random pick of a first branch
    // at each wake-up.
    tokio::select! {
        biased;
        _ = served.as_mut() => return true,
        expired = side => match expired {
            // A head that never completes: nothing to be graceful about.
            Some(Expired::Head) => {
                tracing::debug!("closing connection: request head not received within header_timeout");
                return false;
            }
            // A client that stopped reading: graceful would wait forever.
            Some(Expired::Stalled) => {
                tracing::debug!("closing connection: the client took no response bytes for stream_idle_timeout");
                return false;
            }
            Some(Expired::Idle) => tracing::debug!("closing connection: idle_timeout"),
            None => {}
        },
    }
    graceful_shutdown(served.as_mut());
    // Idle or closing: what is in flight finishes, within the idle timeout.
    let _ = tokio::time::timeout(limits.idle_timeout, served).await;
    false
}

/// What one connection's watchdog reads.
struct Activity {
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
    /// [`now_ms`] when the last request finished (or the connection opened).
    idle_since: AtomicU64,
    /// [`now_ms`] of the first byte of a request head still being read; 0: none.
    /// Only tracked for HTTP/1.x: an idle HTTP/2 connection still receives
    /// pings and settings, which are not requests.
    head_since: AtomicU64,
    /// [`now_ms`] since when the client has not taken what legate writes; 0:
    /// writes go through.
    write_blocked_since: AtomicU64,
    /// The connection speaks HTTP/2 (set once its protocol is known).
    http2: std::sync::atomic::AtomicBool,
    /// A response switched protocols: the socket now carries a tunnel.
    upgraded: std::sync::atomic::AtomicBool,
}

/// Which deadline passed.
#[derive(Debug, PartialEq, Eq)]
enum Expired {
    Head,
    Idle,
    Stalled,
}

impl Activity {
    fn new() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now_ms()),
            head_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
            http2: false.into(),
            upgraded: false.into(),
        }
    }

    /// The connection's protocol is known: HTTP/2 has no heads to time
    /// between requests.
    fn protocol(&self, http2: bool) {
        self.http2.store(http2, Ordering::Relaxed);
        if http2 {
            self.head_since.store(0, Ordering::Relaxed);
        }
    }

    /// Bytes arrived: when no request is in flight they begin the next head.
    fn read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && !self.http2.load(Ordering::Relaxed)
        {
            // max(1): 0 means "no head".
            self.head_since.store(now_ms().max(1), Ordering::Relaxed);
        }
    }

    /// A write went through, or found the socket full.
    fn write_polled(&self, blocked: bool) {
        let since = self.write_blocked_since.load(Ordering::Relaxed);
        if blocked && since == 0 {
            self.write_blocked_since
                .store(now_ms().max(1), Ordering::Relaxed);
        } else if !blocked && since != 0 {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        }
    }

    /// Returns when a deadline passes: a head incomplete for
    /// `header_timeout`, no request in flight for `idle_timeout`, or a client
    /// that took none of legate's writes for `stream_idle_timeout`.
    async fn expired(&self, limits: ConnLimits) -> Expired {
        let (head_ms, idle_ms, stream_ms) = (
            limits.header_timeout.as_millis() as u64,
            limits.idle_timeout.as_millis() as u64,
            limits.stream_idle_timeout.as_millis() as u64,
        );
        // Nothing wakes the watchdog when a head begins or a request ends
        // (that would cost a wake-up per request), so it looks at least this
        // often: a deadline is acted on within half a timeout of passing.
        let look_every = (head_ms.min(idle_ms).min(stream_ms) / 2).max(1);
        loop {
            let now = now_ms();
            let wait = if self.in_flight.load(Ordering::Relaxed) > 0 {
                // Busy: the route timeout and the streams' own idle limits
                // govern (a response body is not even polled while its
                // writes are blocked), so this only catches a client that
                // stopped reading.
                match self.write_blocked_since.load(Ordering::Relaxed) {
                    0 => look_every,
                    since if now >= since + stream_ms => return Expired::Stalled,
                    since => (since + stream_ms).saturating_sub(now),
                }
            } else {
                let head = self.head_since.load(Ordering::Relaxed);
                if head != 0 {
                    let deadline = head + head_ms;
                    if now >= deadline {
                        return Expired::Head;
                    }
                    deadline - now
                } else {
                    let deadline = self.idle_since.load(Ordering::Relaxed) + idle_ms;
                    if now >= deadline {
                        return Expired::Idle;
                    }
                    deadline - now
                }
            };
            tokio::time::sleep(Duration::from_millis(wait.clamp(1, look_every))).await;
        }
    }
}

/// Counts one request as in flight from its head until its response body is
/// done (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.head_since.store(0, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle_since.store(now_ms(), Ordering::Relaxed);
        }
    }
}

/// A response body that keeps its request in flight until it is done, and
/// ends it when it goes quiet for the stream idle timeout.
struct Tracked {
    body: ProxyBody,
    idle: ResponseIdle,
    /// Dropped with the body: the request is done.
    _in_flight: InFlight,
}

impl Body for Tracked {
    type Data = bytes::Bytes;
    type Error = crate::upstream::pool::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                self.idle.moved();
                Poll::Ready(frame)
            }
            Poll::Pending => match self.idle.poll_expired(cx) {
                Poll::Ready(expired) => {
                    tracing::debug!("ending a response: stream_idle_timeout");
                    Poll::Ready(Some(Err(expired.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The client socket, telling the watchdog when bytes arrive and whether
/// writes go through. It also marks the one answer hyper writes by itself:
/// the 400 (or 431, 505) for a head it could not parse, which gets
/// `server: legate` like every answer legate makes, and is counted.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    rejected: prometheus::IntCounter,
    /// hyper's error answer with our header added, and how much of it went.
    rewrite: Option<Rewrite>,
    /// The bytes read to tell the protocol, handed to hyper before the socket's.
    first: Option<Bytes>,
}

/// What an HTTP/2 connection with prior knowledge starts with (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// hyper's own first read is this large too.
const FIRST_READ: usize = 8192;

thread_local! {
    /// Where a connection's first read lands (one per worker thread).
    static FIRST: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; FIRST_READ].into_boxed_slice());
}

struct Rewrite {
    bytes: Vec<u8>,
    sent: usize,
    /// What hyper asked to write: reported written once all of `bytes` is.
    asked: usize,
}

impl Watched {
    /// Reads the first bytes and tells HTTP/2 prior knowledge from HTTP/1.x:
    /// `Some(true)` for HTTP/2, `None` if the client closed first. The bytes
    /// are kept for hyper, so telling costs no read of its own (one read
    /// syscall carries a whole first request, as without sniffing).
    async fn sniff(&mut self) -> std::io::Result<Option<bool>> {
        // Only a preface split across reads needs more than one.
        let mut seen = bytes::BytesMut::new();
        loop {
            let chunk = std::future::poll_fn(|cx| self.poll_first(cx)).await?;
            if chunk.is_empty() {
                return Ok(None);
            }
            // A head has begun (if this turns out HTTP/2, it is forgotten).
            self.activity.read();
            let first = if seen.is_empty() {
                chunk
            } else {
                seen.extend_from_slice(&chunk);
                seen.split().freeze()
            };
            // Still a strict prefix of the preface: not decided yet.
            if first.len() < PREFACE.len() && PREFACE.starts_with(&first) {
                seen.extend_from_slice(&first);
                continue;
            }
            let http2 = first.starts_with(PREFACE);
            self.activity.protocol(http2);
            self.first = Some(first);
            return Ok(Some(http2));
        }
    }

    /// One read into the worker's first-read buffer, copied out at its size:
    /// no 8 KiB allocation per connection. Through `poll_read`, so a short
    /// read clears the socket's readiness and hyper's next read waits for
    /// epoll instead of making a wasted recv.
    fn poll_first(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Bytes>> {
        FIRST.with(|buf| {
            let mut buf = buf.borrow_mut();
            let mut read = ReadBuf::new(&mut buf[..]);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
            Poll::Ready(Ok(Bytes::copy_from_slice(read.filled())))
        })
    }

    /// Whether `buf` is hyper answering a head it could not parse: an error
    /// status while a head was being read and no request is in flight (our
    /// own answers always belong to a request).
    fn is_parse_error_answer(&self, buf: &[u8]) -> bool {
        let a = &self.activity;
        buf.len() > 12
            && buf.starts_with(b"HTTP/1.1 ")
            && matches!(buf[9], b'4' | b'5')
            && !a.http2.load(Ordering::Relaxed)
            && a.in_flight.load(Ordering::Relaxed) == 0
            && a.head_since.load(Ordering::Relaxed) != 0
    }

    /// Writes the marked answer; `Ready` once all of it went.
    fn poll_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let Some(r) = &mut self.rewrite else {
            return Poll::Ready(Ok(0));
        };
        while r.sent < r.bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &r.bytes[r.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            r.sent += n;
        }
        let asked = r.asked;
        self.rewrite = None;
        Poll::Ready(Ok(asked))
    }

    fn start_rewrite(&mut self, buf: &[u8]) {
        let line_end = buf
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(buf.len(), |i| i + 2);
        let mut bytes = Vec::with_capacity(buf.len() + 40);
        bytes.extend_from_slice(&buf[..line_end]);
        bytes.extend_from_slice(b"server: legate\r\nvia: 1.1 legate\r\n");
        bytes.extend_from_slice(&buf[line_end..]);
        self.rejected.inc();
        self.rewrite = Some(Rewrite {
            bytes,
            sent: 0,
            asked: buf.len(),
        });
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(first) = &mut self.first {
            let n = first.len().min(buf.remaining());
            buf.put_slice(&first.split_to(n));
            if first.is_empty() {
                self.first = None;
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            self.activity.read();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.rewrite.is_none() && self.is_parse_error_answer(buf) {
            self.start_rewrite(buf);
        }
        if self.rewrite.is_some() {
            return self.poll_rewrite(cx);
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_polled(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        // hyper writes its error answer as one head, without a body.
        if let Some(first) = bufs.iter().find(|b| !b.is_empty())
            && (self.rewrite.is_some() || self.is_parse_error_answer(first))
        {
            let first: &[u8] = first;
            return self.poll_write(cx, first);
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_polled(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // hyper shuts the socket down just before it drops it, and the close
        // sends the same FIN: a syscall per connection saved. A tunnel (an
        // upgraded connection) needs its half-close, so it gets the real one.
        if !self.activity.upgraded.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_millis(50),
            idle_timeout: Duration::from_millis(200),
            max_headers_size: 65536,
            stream_idle_timeout: Duration::from_millis(300),
            versions: HttpVersions::Both,
        }
    }

    #[tokio::test]
    async fn an_incomplete_head_expires_before_the_idle_timeout() {
        let a = Activity::new();
        a.read();
        assert_eq!(a.expired(limits()).await, Expired::Head);
    }

    #[tokio::test]
    async fn a_quiet_connection_expires_idle() {
        let a = Activity::new();
        let began = std::time::Instant::now();
        assert_eq!(a.expired(limits()).await, Expired::Idle);
        assert!(began.elapsed() >= Duration::from_millis(190));
    }

    #[tokio::test]
    async fn http2_frames_between_requests_are_not_a_head() {
        let a = Arc::new(Activity::new());
        a.protocol(true);
        drop(InFlight::start(a.clone()));
        a.read(); // say, a PING frame
        assert_eq!(a.expired(limits()).await, Expired::Idle);
    }

    #[tokio::test]
    async fn nothing_expires_while_a_request_is_in_flight() {
        let a = Arc::new(Activity::new());
        let busy = InFlight::start(a.clone());
        let waited = tokio::time::timeout(Duration::from_millis(400), a.expired(limits())).await;
        assert!(waited.is_err(), "a request in flight keeps the connection");
        drop(busy);
        assert_eq!(a.expired(limits()).await, Expired::Idle);
    }

    #[tokio::test]
    async fn a_client_that_takes_no_writes_stalls() {
        let a = Arc::new(Activity::new());
        let _busy = InFlight::start(a.clone());
        a.write_polled(true);
        let began = std::time::Instant::now();
        assert_eq!(a.expired(limits()).await, Expired::Stalled);
        assert!(began.elapsed() >= Duration::from_millis(290));
    }
}
