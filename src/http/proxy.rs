//! One HTTP request: route it, rewrite it, send it upstream (retrying where
//! that is safe), and stream the answer back.
//!
//! Bodies are never buffered: the app's body streams to the upstream and the
//! upstream's body streams back (only a request body sent to an HTTP/2
//! upstream keeps its first 64 KiB, see [`super::replay`]). A request is
//! retried only when that cannot repeat a side effect: after a failed connect
//! (nothing was sent), or, for an idempotent method without a body, after a
//! 502/503 or a reset; always on another endpoint, within the route timeout,
//! and within the retry budget. A request the upstream refused unprocessed
//! (HTTP/2 GOAWAY or REFUSED_STREAM, a stale pooled HTTP/1.1 connection) goes
//! again for any method, without spending a retry.
//! Errors legate makes itself are short text answers marked `server: legate`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;

use super::idle::{RequestBody, StreamIdle};
use super::replay::Replay;
use super::{Conn, grpc};
use crate::table::ListenerKind;
use crate::table::Route;
use crate::table::http::HttpRoute;
use crate::upstream::pool::{Checkin, ProxyBody, Sender};
use crate::upstream::{self, ConnectError, HttpConn};

/// The answer to one request, and which cluster gave it (for metrics and logs).
struct Answer {
    response: Response<ProxyBody>,
    cluster: Option<Arc<str>>,
    endpoint: Option<Arc<str>>,
}

/// Marks a response legate made itself, with the message a gRPC client gets.
#[derive(Clone)]
struct LegateError(Cow<'static, str>);

/// Serves one request. legate's own errors on a gRPC call become
/// trailers-only gRPC responses (counted by their HTTP status first).
pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<Conn>,
    idle: &StreamIdle,
) -> Response<ProxyBody> {
    let is_grpc = grpc::is_grpc(req.headers());
    let mut response = respond(req, &conn, is_grpc, idle).await;
    if is_grpc && let Some(LegateError(message)) = response.extensions_mut().remove() {
        let code = grpc::code_for(response.status());
        grpc::trailers_only(&mut response, code, &message);
    }
    response
}

async fn respond(
    mut req: Request<Incoming>,
    conn: &Conn,
    is_grpc: bool,
    idle: &StreamIdle,
) -> Response<ProxyBody> {
    let began = Instant::now();
    let table = conn.tables.load();
    let Some(listener) = table.listener(&conn.listener) else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "listener removed\n");
    };
    let ListenerKind::Http(http) = &listener.kind else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "listener is no longer HTTP\n",
        );
    };
    if let Some(why) = malformed(&req) {
        http.no_route.inc();
        return error(StatusCode::BAD_REQUEST, why);
    }
    let Some(route) = http.route(&req) else {
        http.no_route.inc();
        return error(StatusCode::NOT_FOUND, "no route matched\n");
    };
    route.budget.deposit();

    // Only the access log needs these after the request is gone.
    let logged = http
        .access_log
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    let client_upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
    let target = route.target.pick();
    // A gRPC call's own deadline (capped by the route) replaces the route timeout.
    let grpc_deadline = is_grpc.then(|| grpc::timeout(req.headers())).flatten();
    let deadline = match grpc_deadline {
        Some(d) => Some(route.max_grpc_timeout.map_or(d, |max| d.min(max))),
        None => route.timeout,
    };
    // Boxed once here: the deadline and idle wrappers below would otherwise
    // each copy kilobytes of future as they take it.
    let forwarded = Box::pin(forward(
        req,
        route,
        target,
        conn,
        client_upgrade,
        is_grpc,
        idle,
    ));
    let timed_out = || Answer {
        response: error(StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n"),
        cluster: Some(target.cluster.name.clone()),
        endpoint: None,
    };
    // The stream idle timeout bounds the wait too, where it is the shorter.
    let answer = match deadline {
        Some(d) if d <= idle.limit() => tokio::time::timeout(d, forwarded)
            .await
            .unwrap_or_else(|_| timed_out()),
        Some(d) => match tokio::time::timeout(d, idle.until_head(forwarded)).await {
            Ok(Ok(answer)) => answer,
            _ => timed_out(),
        },
        None => idle
            .until_head(forwarded)
            .await
            .unwrap_or_else(|_| timed_out()),
    };
    let Answer {
        mut response,
        cluster,
        endpoint,
    } = answer;
    route.response_headers.apply(response.headers_mut());

    let status = response.status().as_u16();
    let cluster_label = cluster.as_deref().unwrap_or(&target.cluster.name);
    route.count(cluster_label, status, began.elapsed());
    if let Some((method, path)) = logged {
        tracing::info!(
            target: "legate::access",
            listener = %conn.listener, route = %route.name, client = %conn.client,
            method = %method, path = %path, status,
            cluster = cluster.as_deref().unwrap_or("-"), endpoint = endpoint.as_deref().unwrap_or("-"),
            duration_ms = began.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
    response
}

/// Sends the request to the route's upstream, with retries where safe.
async fn forward(
    req: Request<Incoming>,
    route: &HttpRoute,
    target: &Route,
    conn: &Conn,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    is_grpc: bool,
    idle: &StreamIdle,
) -> Answer {
    if is_grpc && !target.cluster.may_speak_http2() {
        let cluster = &target.cluster.name;
        if target.cluster.first_grpc_over_http1() {
            tracing::warn!(cluster = %cluster,
                "gRPC request routed to a cluster that speaks HTTP/1.1: set `http2: true` on it (logged once)");
        }
        return Answer {
            response: error_owned(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cluster \"{cluster}\" speaks HTTP/1.1; gRPC needs `http2: true` on it"),
            ),
            cluster: Some(cluster.clone()),
            endpoint: None,
        };
    }
    let (mut parts, body) = req.into_parts();
    let upgrade = client_upgrade.is_some();
    clean_request_headers(&mut parts.headers, upgrade);
    if let Some(host) = &route.rewrite_host {
        parts.headers.insert(header::HOST, host.clone());
    }
    if let Some(pq) = parts.uri.path_and_query().map(|pq| pq.as_str())
        && let Some(rewritten) = route.rewritten_path(pq)
        && let Ok(uri) = rewritten.parse::<Uri>()
    {
        parts.uri = uri;
    }
    route.request_headers.apply(&mut parts.headers);
    // HTTP/2 clients send the host as :authority only; HTTP/1.1 upstreams need Host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }

    let replayable = body.is_end_stream();
    let idempotent = is_idempotent(&parts.method);
    let body = idle.request_body(body);
    let mut body = Some(mirror(route, conn, &parts, body));
    let mut retries_left = route.retries;
    // The request head is moved into the first attempt unless a later attempt
    // may need it again; cloning a header map per request is measurable.
    let keep_parts = route.retries > 0 && idempotent && replayable;
    let mut parts = Some(parts);
    // Requests an HTTP/2 upstream refused unprocessed (GOAWAY, REFUSED_STREAM)
    // go again on a fresh connection, without spending a retry, this often.
    let mut unprocessed_left = UNPROCESSED_RETRIES;
    // A request a stale pooled connection handed back unsent.
    let mut pending: Option<Request<ProxyBody>> = None;
    // The body of a request with one, sent to an HTTP/2 upstream: kept (up
    // to a limit) in case the upstream refuses it unprocessed.
    let mut replay: Option<Replay> = None;

    loop {
        let connected = upstream::connect_http(
            &target.cluster,
            &target.failover,
            conn.client,
            upgrade,
            &conn.drivers,
        )
        .await;
        let HttpConn {
            sender,
            cluster,
            endpoint,
            reused,
        } = match connected {
            Ok(c) => c,
            Err(ConnectError::Local(e)) => {
                tracing::warn!(cluster = %target.cluster.name, error = %e,
                    "no upstream connection: legate is out of a local resource");
                return Answer {
                    response: error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "proxy out of local resources\n",
                    ),
                    cluster: Some(target.cluster.name.clone()),
                    endpoint: None,
                };
            }
            Err(ConnectError::NoHealthyEndpoint { attempts, .. }) => {
                // Nothing was sent: any method may be retried.
                if retries_left > 0 && attempts > 0 && route.budget.withdraw() {
                    retries_left -= 1;
                    continue;
                }
                let (status, msg) = if attempts == 0 {
                    (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
                } else {
                    (StatusCode::BAD_GATEWAY, "upstream unreachable\n")
                };
                return Answer {
                    response: error(status, msg),
                    cluster: Some(target.cluster.name.clone()),
                    endpoint: None,
                };
            }
        };
        let labels = (Some(cluster.name.clone()), Some(endpoint.label.clone()));
        let request = match pending.take() {
            Some(request) => request,
            None => {
                // An HTTP/2 upstream may refuse a stream unprocessed: keep
                // the head (and the body) to send it again.
                let h2 = matches!(sender, Sender::H2(_));
                let this_body = match (body.take(), &replay) {
                    (Some(b), _) if h2 && !replayable => {
                        let kept = Replay::new(b);
                        let first = kept.attempt();
                        replay = Some(kept);
                        first
                    }
                    (Some(b), _) => Some(b),
                    (None, Some(kept)) => kept.attempt(),
                    // A retry of a request without a body.
                    (None, None) => Some(Empty::new().map_err(|e| match e {}).boxed_unsync()),
                };
                let Some(this_body) = this_body else {
                    return Answer {
                        response: error(StatusCode::BAD_GATEWAY, "request cannot be repeated\n"),
                        cluster: labels.0,
                        endpoint: labels.1,
                    };
                };
                let head = match (&parts, keep_parts || h2) {
                    (Some(p), true) => Some(p.clone()),
                    _ => parts.take(),
                };
                let Some(head) = head else {
                    // Unreachable: without `keep_parts` no path sends twice.
                    return Answer {
                        response: error(StatusCode::BAD_GATEWAY, "request cannot be repeated\n"),
                        cluster: labels.0,
                        endpoint: labels.1,
                    };
                };
                upstream_request(head, this_body, matches!(sender, Sender::H2(_)))
            }
        };
        let sent = send(sender, request, &endpoint).await;
        match sent {
            Outcome::Response(mut response) => {
                if let Some(kept) = &replay {
                    kept.settle();
                }
                let status = response.status();
                let retryable_status =
                    status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE;
                if retryable_status
                    && idempotent
                    && replayable
                    && retries_left > 0
                    && route.budget.withdraw()
                {
                    retries_left -= 1;
                    continue;
                }
                // The app talks to legate, whatever version the upstream spoke.
                *response.version_mut() = Version::HTTP_11;
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = client_upgrade {
                        tunnel(client, hyper::upgrade::on(&mut response), conn);
                    }
                } else {
                    clean_response_headers(response.headers_mut());
                }
                return Answer {
                    response,
                    cluster: labels.0,
                    endpoint: labels.1,
                };
            }
            Outcome::Unsent(request) => {
                // A pooled connection that closed under us: the request never
                // left, so it goes again on a fresh one without using a retry.
                pending = Some(request);
                if !reused {
                    return Answer {
                        response: error(
                            StatusCode::BAD_GATEWAY,
                            "upstream closed the connection\n",
                        ),
                        cluster: labels.0,
                        endpoint: labels.1,
                    };
                }
            }
            Outcome::Failed(e) if request_body_failed(&e) => {
                // The app's request body broke (say, an invalid chunk size):
                // the client's fault, not the upstream's.
                tracing::debug!(cluster = %cluster.name, error = %e, "malformed request body");
                return Answer {
                    response: error(StatusCode::BAD_REQUEST, "malformed request body\n"),
                    cluster: labels.0,
                    endpoint: labels.1,
                };
            }
            Outcome::Failed(e) => {
                let again = resend_unspent(&e, idempotent).filter(|_| {
                    parts.is_some()
                        && unprocessed_left > 0
                        && (replayable || replay.as_ref().is_some_and(Replay::can_repeat))
                });
                if let Some(why) = again {
                    // Never processed (RFC 9113 §8.7): safe to send again for
                    // any method, on a new connection; this one takes no new
                    // streams. Dropped by a closing connection, it may have
                    // left: only a method safe to repeat goes again (RFC 9110
                    // §9.2.2).
                    tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.label, error = %e, "{why}");
                    endpoint.pool.forget_h2();
                    unprocessed_left -= 1;
                    continue;
                }
                tracing::warn!(cluster = %cluster.name, endpoint = %endpoint.label, error = %e, "upstream request failed");
                if idempotent && replayable && retries_left > 0 && route.budget.withdraw() {
                    retries_left -= 1;
                    continue;
                }
                return Answer {
                    response: error(StatusCode::BAD_GATEWAY, "upstream connection failed\n"),
                    cluster: labels.0,
                    endpoint: labels.1,
                };
            }
        }
    }
}

/// How many times a request refused unprocessed is sent again.
const UNPROCESSED_RETRIES: u32 = 3;

/// Why a failed request may go again without spending a retry, if it may:
/// the upstream refused it unprocessed, or (for a method safe to repeat) the
/// connection ended holding it.
fn resend_unspent(e: &hyper::Error, idempotent: bool) -> Option<&'static str> {
    if unprocessed(e) {
        Some("upstream refused the request unprocessed; sending it again")
    } else if idempotent && dropped(e) {
        Some("upstream connection ended holding the request; sending it again (safe to repeat)")
    } else {
        None
    }
}

/// Whether an HTTP/2 upstream refused the stream before processing it: a
/// graceful GOAWAY (NO_ERROR) from the upstream reaching a stream means its
/// id was above the GOAWAY's last-stream-id; REFUSED_STREAM says so outright.
/// Only the upstream can say so: a GOAWAY h2 itself sent as legate's side of
/// the connection closed says nothing about what the upstream processed.
///
/// Known race: h2 keeps the last GOAWAY as the connection's error and
/// returns it to hyper while hyper waits for a queued stream to open, and
/// hyper fails that request with it, even when h2 then sends the stream. After
/// the first GOAWAY of a two-step shutdown (last stream id 2^31-1, as h2's,
/// Go's and Envoy's servers send) that stream may still be processed, yet
/// its error reads the same as a refusal, so a non-idempotent request that
/// waited for a slot at that moment can be sent twice. h2 offers nothing to
/// tell the two apart; treating every GOAWAY as "may have been processed"
/// would fail every POST that nginx's one-step GOAWAY refuses.
fn unprocessed(e: &hyper::Error) -> bool {
    h2_error(e).is_some_and(|h2| {
        h2.is_remote()
            && (h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR)))
    })
}

/// The h2 error behind a hyper error, if any.
fn h2_error(e: &hyper::Error) -> Option<&h2::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        source = err.source();
    }
    None
}

/// Whether the app's own request body broke (an invalid chunk size, a client
/// gone mid-body): hyper files that as a user error caused by the client
/// connection's error. Its other user errors are not the client's.
fn request_body_failed(e: &hyper::Error) -> bool {
    e.is_user() && std::error::Error::source(e).is_some_and(|cause| cause.is::<hyper::Error>())
}

/// Whether the upstream connection ended on legate's side holding the
/// request, without an answer for it. hyper's HTTP/2 client does this to a
/// stream that waited for a slot when a GOAWAY comes, even after sending it:
/// its dispatch task ends and drops the request ("dispatch task is gone", a
/// user error, with no predicate), or, a moment later, h2 closes the
/// connection with its own GOAWAY and the stream gets that as its error.
fn dropped(e: &hyper::Error) -> bool {
    (e.is_user() && e.to_string().starts_with("dispatch task is gone"))
        || h2_error(e).is_some_and(|h2| h2.is_go_away() && !h2.is_remote())
}

enum Outcome {
    Response(Response<ProxyBody>),
    /// The request did not leave (a stale pooled connection); here it is back.
    Unsent(Request<ProxyBody>),
    Failed(hyper::Error),
}

async fn send(
    sender: Sender,
    request: Request<ProxyBody>,
    endpoint: &Arc<upstream::Endpoint>,
) -> Outcome {
    match sender {
        Sender::H1(mut s) => match s.try_send_request(request).await {
            Ok(response) => {
                let endpoint = endpoint.clone();
                Outcome::Response(response.map(|body| {
                    Checkin::new(body, s, endpoint)
                        .map_err(Into::into)
                        .boxed_unsync()
                }))
            }
            Err(mut e) => match e.take_message() {
                Some(request) => Outcome::Unsent(request),
                None => Outcome::Failed(e.into_error()),
            },
        },
        Sender::H2(mut s) => {
            // Queued, and this clone of the sender let go before the wait.
            // A request queued just as the connection's dispatcher ends
            // (a GOAWAY, on another thread) can miss the queue's drain and
            // stay in it until the last sender is dropped; held across the
            // wait, this clone kept it there until the route's timeout.
            let response = s.try_send_request(request);
            drop(s);
            match response.await {
                Ok(response) => {
                    Outcome::Response(response.map(|b| b.map_err(Into::into).boxed_unsync()))
                }
                Err(mut e) => match e.take_message() {
                    Some(request) => Outcome::Unsent(request),
                    None => Outcome::Failed(e.into_error()),
                },
            }
        }
    }
}

/// The request as the upstream gets it: origin-form for HTTP/1.1, absolute
/// (with the host as `:authority`) for HTTP/2.
fn upstream_request(
    mut parts: http::request::Parts,
    body: ProxyBody,
    h2: bool,
) -> Request<ProxyBody> {
    parts.extensions = http::Extensions::new();
    if h2 {
        parts.version = Version::HTTP_2;
        let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        parts.uri = format!("http://{authority}{path_and_query}")
            .parse()
            .unwrap_or_else(|_| Uri::from_static("/"));
        parts.headers.remove(header::HOST);
    } else {
        parts.version = Version::HTTP_11;
        // HTTP/1.1 clients already send origin-form; HTTP/2 ones send absolute URIs.
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            parts.uri = path_and_query
                .parse()
                .unwrap_or_else(|_| Uri::from_static("/"));
        }
    }
    Request::from_parts(parts, body)
}

/// The app's body, teed to the route's mirror cluster for the chosen share of
/// requests. The copy never slows or fails the real request: if the mirror
/// falls behind, its copy is cut off.
fn mirror(
    route: &HttpRoute,
    conn: &Conn,
    parts: &http::request::Parts,
    body: RequestBody<Incoming>,
) -> ProxyBody {
    let Some(mirror) = &route.mirror else {
        return body.map_err(Into::into).boxed_unsync();
    };
    if rand::random::<f64>() >= mirror.fraction {
        return body.map_err(Into::into).boxed_unsync();
    }
    let (tx, copy) =
        http_body_util::channel::Channel::<Bytes, crate::upstream::pool::BoxError>::new(16);
    let empty = body.is_end_stream();
    let mut copy_parts = parts.clone();
    copy_parts.extensions = http::Extensions::new();
    let cluster = mirror.cluster.clone();
    let client = conn.client;
    // A mirror is bounded even when its route is not.
    let timeout = route.timeout.unwrap_or(MIRROR_TIMEOUT);
    let drivers = conn.drivers.clone();
    conn.tasks.spawn(async move {
        let copy_body = if empty {
            Empty::new().map_err(|e| match e {}).boxed_unsync()
        } else {
            copy.boxed_unsync()
        };
        let result = tokio::time::timeout(timeout, async {
            let c = upstream::connect_http(&cluster, &[], client, false, &drivers)
                .await
                .ok()?;
            let req = upstream_request(copy_parts, copy_body, matches!(c.sender, Sender::H2(_)));
            match send(c.sender, req, &c.endpoint).await {
                // Read the answer to the end so the connection can be reused.
                Outcome::Response(resp) => resp.into_body().collect().await.ok().map(|_| ()),
                _ => None,
            }
        })
        .await;
        if !matches!(result, Ok(Some(()))) {
            tracing::debug!(cluster = %cluster.name, "mirrored request failed (the real one is unaffected)");
        }
    });
    if empty {
        return body.map_err(Into::into).boxed_unsync();
    }
    Tee {
        inner: body,
        copy: Some(tx),
    }
    .boxed_unsync()
}

/// A body that passes its data on and offers a copy of each chunk to `copy`.
struct Tee {
    inner: RequestBody<Incoming>,
    copy: Option<http_body_util::channel::Sender<Bytes, crate::upstream::pool::BoxError>>,
}

impl Body for Tee {
    type Data = Bytes;
    type Error = crate::upstream::pool::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(tx) = &mut self.copy
            && tx.try_send(hyper::body::Frame::data(data.clone())).is_err()
        {
            // The mirror is slow or gone: stop copying; its request fails.
            if let Some(tx) = self.copy.take() {
                tx.abort(copy_aborted());
            }
        }
        match &polled {
            // Done: dropping the sender ends the copy cleanly.
            std::task::Poll::Ready(None) => self.copy = None,
            // Broken: the copy must not look complete.
            std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(tx) = self.copy.take() {
                    tx.abort(copy_aborted());
                }
            }
            _ => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The error a cut-off mirror copy ends with. hyper offers no public
/// constructor for its error type, so the channel carries our own.
fn copy_aborted() -> crate::upstream::pool::BoxError {
    "mirror copy cut off".into()
}

/// Joins the app's and the upstream's upgraded connections (WebSocket), on
/// the connection's tasks (the drain waits for it and its timeout ends it),
/// tracked by the connection too, which stays open (holding its slot and
/// fd) until the tunnel ends.
fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, conn: &Conn) {
    conn.tasks.spawn(conn.tunnels.track_future(async move {
        let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) else {
            return;
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    }));
}

/// Longest method legate forwards (the longest registered one has 17 bytes).
const MAX_METHOD_LEN: usize = 32;

/// Why a request whose head parsed is still not one to forward (RFC 9112
/// §3.2, RFC 9110 §7.6.1), if it is not.
fn malformed<B>(req: &Request<B>) -> Option<&'static str> {
    if req.method().as_str().len() > MAX_METHOD_LEN {
        return Some("method too long\n");
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first_host = hosts.next();
    if hosts.next().is_some() {
        return Some("more than one Host header\n");
    }
    if req.version() == Version::HTTP_11 && first_host.is_none() {
        return Some("HTTP/1.1 request without a Host header\n");
    }
    if connection_has(req.headers(), "host") {
        return Some("Connection header names Host\n");
    }
    None
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// RFC 9110 §7.6.1: hop-by-hop fields, and any field the Connection header
/// names, are for this hop only. An upgrade keeps `Connection: upgrade` and
/// `Upgrade`, which the upstream needs to accept it.
fn clean_request_headers(headers: &mut HeaderMap, upgrade: bool) {
    remove_hop_by_hop(headers, upgrade);
    // `TE: trailers` is the one TE value a proxy may forward (gRPC needs it).
    if let Some(te) = headers.get(header::TE)
        && !te.as_bytes().eq_ignore_ascii_case(b"trailers")
    {
        headers.remove(header::TE);
    }
}

fn clean_response_headers(headers: &mut HeaderMap) {
    remove_hop_by_hop(headers, false);
}

/// Hop-by-hop by common use, not by the RFC. Built at compile time: made at
/// run time, `from_static` parses the name again on every call.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop fields (RFC 9110 §7.6.1; `keep-alive` and
/// `proxy-connection` by common use), by their bit in `remove_hop_by_hop`.
fn hop_by_hop(name: &HeaderName) -> Option<u8> {
    // Standard names compare as an enum tag, and a standard name never
    // equals a custom one, so a typical head of a few fields costs a few
    // integer compares here.
    if name == header::CONNECTION {
        Some(0)
    } else if name == header::TRANSFER_ENCODING {
        Some(1)
    } else if name == header::TRAILER {
        Some(2)
    } else if name == header::UPGRADE {
        Some(3)
    } else if name == KEEP_ALIVE {
        Some(4)
    } else if name == PROXY_CONNECTION {
        Some(5)
    } else {
        None
    }
}

/// Removes the hop-by-hop fields. Runs on every request and response, so
/// the usual case (none, or `Connection: keep-alive|close`) is one pass over
/// the field names and no allocation.
fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(bit) = hop_by_hop(name) {
            present |= 1 << bit;
        }
    }
    if present == 0 && !upgrade {
        return;
    }
    // RFC 9112 §6.3: with both, Transfer-Encoding framed the message and
    // Content-Length is wrong; passed on, it would truncate the body.
    if present & (1 << 1) != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
    if present & 1 != 0 && names_other_fields(headers) {
        // Rare: the Connection header names fields of its own.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (bit, name) in [
        (1, header::TRANSFER_ENCODING),
        (2, header::TRAILER),
        (4, KEEP_ALIVE),
        (5, PROXY_CONNECTION),
    ] {
        if present & (1 << bit) != 0 {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        if present & 1 != 0 {
            headers.remove(header::CONNECTION);
        }
        if present & (1 << 3) != 0 {
            headers.remove(header::UPGRADE);
        }
    }
}

/// Whether a Connection header names a field beyond the ones removed anyway
/// (`close` and `keep-alive` are options, not fields, and `upgrade` is
/// handled by its own rule).
fn names_other_fields(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .map(|v| v.as_bytes())
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii())
        .any(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
                && !t.eq_ignore_ascii_case(b"upgrade")
        })
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// How long a mirrored request may take when its route has no timeout.
const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// An answer legate makes itself.
fn error(status: StatusCode, message: &'static str) -> Response<ProxyBody> {
    error_owned(status, Cow::Borrowed(message))
}

fn error_owned(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Response<ProxyBody> {
    let message = message.into();
    let body = match &message {
        Cow::Borrowed(m) => Bytes::from_static(m.as_bytes()),
        Cow::Owned(m) => Bytes::from(format!("{m}\n")),
    };
    let mut resp = Response::new(Full::new(body).map_err(|e| match e {}).boxed_unsync());
    resp.extensions_mut().insert(LegateError(message));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::SERVER, HeaderValue::from_static("legate"));
    h.insert(header::VIA, HeaderValue::from_static("1.1 legate"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
        v.sort();
        v
    }

    #[test]
    fn hop_by_hop_fields_are_removed() {
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("trailer", "x-sum"),
            ("upgrade", "websocket"),
            ("x-app", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host", "x-app"]);
    }

    #[test]
    fn fields_the_connection_header_names_are_removed() {
        let mut h = headers(&[
            ("connection", "close, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "s"),
            ("x-other", "o"),
            ("x-app", "1"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["x-app"]);
    }

    #[test]
    fn a_head_without_hop_by_hop_fields_is_untouched() {
        let mut h = headers(&[("host", "a"), ("content-length", "5"), ("x-app", "1")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["content-length", "host", "x-app"]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_says_so() {
        let mut h = headers(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
        ]);
        remove_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "upgrade"]);
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
