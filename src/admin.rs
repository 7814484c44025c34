//! The admin server: `/` (the status page), `/healthz`, `/readyz`, `/metrics`, `/config`,
//! `POST /reload` and `POST /quitquitquit`, over HTTP/1.1 on a loopback address
//! by default.
//!
//! Reads the current routing table, the bound addresses, the reload status and
//! the readiness flag; its only writes are asking for a reload and starting
//! the shutdown, which answer only to loopback clients (see
//! [`refuse_mutation`]). It keeps serving during the drain so probes see
//! `/readyz` turn 503, and ends with the process. It takes no fds from the
//! data path's budget: `/healthz` answers while the data path is out of fds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue, ORIGIN};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::listener::BoundAddrs;
use crate::metrics;
use crate::reload::{self, Outcome};
use crate::shutdown::Shutdown;
use crate::status;
use crate::table::RoutingTable;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub tables: Arc<ArcSwap<RoutingTable>>,
    pub bound: BoundAddrs,
    /// Set once every listener is bound; never cleared (shutdown is its own flag).
    pub ready: Arc<AtomicBool>,
    pub shutdown: Shutdown,
    pub reloads: reload::Handle,
    /// When the process started serving, for the status page's uptime.
    pub started: std::time::Instant,
    /// The counters of earlier status page loads, for its rates.
    pub history: Arc<status::History>,
}

/// Admin connections open at once; more wait in the backlog. Probes and a
/// scraper need a handful; the cap keeps a flood from costing memory.
const MAX_CONNECTIONS: usize = 64;
/// The whole request head must arrive within this; an idle keep-alive
/// connection is closed after it too.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin requests are a line and a few headers; hyper's floor is 8 KiB.
const MAX_HEAD: usize = 8 * 1024;

/// Serves admin requests on `socket` until the process exits.
pub async fn serve(socket: TcpListener, state: AdminState) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        // Owned like the admin server itself: ended after the drain.
        state.shutdown.background_tasks().spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req, peer).await) }
            });
            // A client that sends garbage, hangs or hangs up only ends its own connection.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Why a request may not change legate's state, if it may not.
///
/// The admin port is served on the Pod IP (probes, scraping), so the
/// endpoints that act (`/reload`, `/quitquitquit`) answer only to a loopback
/// peer: a process in the Pod, or `kubectl port-forward`. A browser is kept
/// out twice: a cross-site request carries `Origin` (even the "simple" ones
/// that skip the CORS preflight), and a DNS-rebound one carries a `Host` that
/// is a name, not localhost or an IP.
fn refuse_mutation<B>(req: &Request<B>, peer: SocketAddr) -> Option<&'static str> {
    if !peer.ip().is_loopback() {
        return Some("forbidden: only loopback clients may change legate's state\n");
    }
    if req.headers().contains_key(ORIGIN) {
        return Some("forbidden: cross-origin (browser) requests may not change legate's state\n");
    }
    refuse_host(req)
}

/// A `Host` that is a DNS name other than localhost means a browser was sent
/// here by DNS rebinding: no answer, not even read-only ones with config in them.
fn refuse_host<B>(req: &Request<B>) -> Option<&'static str> {
    let host = req.headers().get(HOST)?.to_str().unwrap_or("");
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let local = name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok();
    (!local).then_some("forbidden: Host must be localhost or an IP address\n")
}

async fn route(
    state: &AdminState,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
    let refused = match (path, method) {
        ("/quitquitquit" | "/reload", &Method::POST) => refuse_mutation(req, peer),
        ("/config" | "/", _) => refuse_host(req),
        _ => None,
    };
    if let Some(why) = refused {
        tracing::warn!(client = %peer, path, "admin request refused: {}", why.trim_end());
        return text(StatusCode::FORBIDDEN, why);
    }
    match (path, method) {
        ("/healthz", &Method::GET | &Method::HEAD) => text(StatusCode::OK, "ok\n"),
        ("/readyz", &Method::GET | &Method::HEAD) => {
            if state.shutdown.begun.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: listeners not bound yet\n",
                )
            }
        }
        ("/metrics", &Method::GET) => with_type(
            Response::new(Full::new(Bytes::from(metrics::get().encode()))),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ("/config", &Method::GET) => {
            let body = serde_json::to_vec_pretty(&config(state)).unwrap_or_default();
            with_type(
                Response::new(Full::new(Bytes::from(body))),
                "application/json",
            )
        }
        ("/", &Method::GET) => {
            let page = status::Page {
                config: &config(state),
                metrics: &metrics::get().gather(),
                uptime: state.started.elapsed(),
                refresh: status::refresh_of(req.uri().query()),
            };
            let mut resp = with_type(
                Response::new(Full::new(Bytes::from(page.render(&state.history)))),
                "text/html; charset=utf-8",
            );
            resp.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            resp
        }
        ("/quitquitquit", &Method::POST) => {
            tracing::info!("shutdown requested by POST /quitquitquit");
            state.shutdown.begun.cancel();
            text(StatusCode::OK, "shutting down\n")
        }
        ("/reload", &Method::POST) => match state.reloads.reload().await {
            Outcome::Applied { generation } => text_owned(
                StatusCode::OK,
                format!("reloaded: generation {generation}\n"),
            ),
            Outcome::Unchanged { generation } => text_owned(
                StatusCode::OK,
                format!("unchanged: generation {generation}\n"),
            ),
            Outcome::Rejected { error } => text_owned(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("rejected, the table in use is kept:\n{error}\n"),
            ),
        },
        (
            "/" | "/healthz" | "/readyz" | "/metrics" | "/config" | "/quitquitquit" | "/reload",
            _,
        ) => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try / (status page), /healthz /readyz /metrics /config, POST /reload or POST /quitquitquit\n",
        ),
    }
}

/// `/config`'s answer: the table in use, where its listeners are bound, and
/// the reload status. The status page shows the same.
fn config(state: &AdminState) -> serde_json::Value {
    let table = state.tables.load();
    let bound = state.bound.lock().map(|b| b.clone()).unwrap_or_default();
    let mut config = table.describe(&bound);
    config["reload"] = reload_status(state);
    config
}

/// The reload history for `/config`: generation, last success, last error.
fn reload_status(state: &AdminState) -> serde_json::Value {
    let status = state
        .reloads
        .status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    serde_json::json!({
        "generation": status.generation,
        "last_success": status.last_success.map(crate::table::rfc3339),
        "last_error": status.last_error.map(|(message, at)| serde_json::json!({
            "message": message,
            "at": crate::table::rfc3339(at),
        })),
    })
}

fn text_owned(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = with_type(
        Response::new(Full::new(Bytes::from(body))),
        "text/plain; charset=utf-8",
    );
    *resp.status_mut() = status;
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = with_type(
        Response::new(Full::new(Bytes::from_static(body.as_bytes()))),
        "text/plain; charset=utf-8",
    );
    *resp.status_mut() = status;
    resp
}

fn with_type(mut resp: Response<Full<Bytes>>, content_type: &'static str) -> Response<Full<Bytes>> {
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::post("/quitquitquit");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.body(()).expect("request")
    }

    #[test]
    fn only_local_non_browser_clients_may_act() {
        let local: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let pod_network: SocketAddr = "10.1.2.3:5000".parse().expect("addr");
        assert_eq!(
            refuse_mutation(&post(&[("host", "127.0.0.1:9901")]), local),
            None
        );
        assert_eq!(
            refuse_mutation(&post(&[("host", "localhost:9901")]), local),
            None
        );
        assert_eq!(
            refuse_mutation(&post(&[("host", "[::1]:9901")]), local),
            None
        );
        assert_eq!(refuse_mutation(&post(&[]), local), None);
        assert!(refuse_mutation(&post(&[("host", "10.1.2.9:9901")]), pod_network).is_some());
        assert!(
            refuse_mutation(&post(&[("origin", "https://evil.example")]), local).is_some(),
            "a cross-site form post"
        );
        assert!(
            refuse_mutation(&post(&[("host", "rebind.evil.example:9901")]), local).is_some(),
            "DNS rebinding"
        );
    }
}
