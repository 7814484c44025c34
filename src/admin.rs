//! The admin server: `/healthz`, `/readyz`, `/metrics`, `/config`,
//! `POST /reload` and `POST /quitquitquit`, over HTTP/1.1 on a loopback address
//! by default.
//!
//! Reads the current routing table, the bound addresses, the reload status and
//! the readiness flag; its only writes are asking for a reload and starting
//! the shutdown. It keeps serving during the drain so
//! probes see `/readyz` turn 503, and ends with the process.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::listener::BoundAddrs;
use crate::metrics;
use crate::reload::{self, Outcome};
use crate::shutdown::Shutdown;
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
}

/// Serves admin requests on `socket` until the process exits.
pub async fn serve(socket: TcpListener, state: AdminState) {
    loop {
        let (stream, _) = match socket.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req).await) }
            });
            // A client that sends garbage or hangs up only ends its own connection.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let method = req.method();
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
            let table = state.tables.load();
            let bound = state.bound.lock().map(|b| b.clone()).unwrap_or_default();
            let mut config = table.describe(&bound);
            config["reload"] = reload_status(state);
            let body = serde_json::to_vec_pretty(&config).unwrap_or_default();
            with_type(
                Response::new(Full::new(Bytes::from(body))),
                "application/json",
            )
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
        ("/healthz" | "/readyz" | "/metrics" | "/config" | "/quitquitquit" | "/reload", _) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz /readyz /metrics /config, POST /reload or POST /quitquitquit\n",
        ),
    }
}

/// The reload history for `/config`: generation, last success, last error.
fn reload_status(state: &AdminState) -> serde_json::Value {
    let status = state
        .reloads
        .status
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let time = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    serde_json::json!({
        "generation": status.generation,
        "last_success": status.last_success.map(time),
        "last_error": status.last_error.map(|(message, at)| serde_json::json!({
            "message": message,
            "at": time(at),
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
