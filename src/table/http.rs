//! Compiled HTTP routes: matching a request, and what to do with it.
//!
//! Built by `table::compile` from validated route configs: header names and
//! values are parsed once, host patterns lower-cased, metric handles resolved.
//! Matching borrows from the request and allocates nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use prometheus::{Histogram, IntCounter};

use super::Target;
use crate::upstream::Cluster;

/// An HTTP listener's routes, tried in order.
pub struct HttpListener {
    pub routes: Box<[HttpRoute]>,
    pub access_log: bool,
    /// `legate_http_requests_total{route="none",cluster="none",code="4xx"}`.
    pub no_route: IntCounter,
    pub limits: ConnLimits,
}

/// What one client connection may take, fixed when it is accepted.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A request head must be complete this long after its first byte.
    pub header_timeout: Duration,
    /// A connection with no request in flight closes after this.
    pub idle_timeout: Duration,
    /// Largest request head, bytes; past it 431.
    pub max_headers_size: usize,
    /// A request moving no byte either way this long is ended.
    pub stream_idle_timeout: Duration,
    /// What the client may speak.
    pub versions: HttpVersions,
}

/// The HTTP versions a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersions {
    /// Each connection's first bytes tell HTTP/2 prior knowledge from HTTP/1.x.
    Both,
    Http1,
    H2c,
}

impl HttpVersions {
    pub fn from_config(versions: &[crate::config::HttpVersion]) -> Self {
        use crate::config::HttpVersion;
        let http1 = versions.contains(&HttpVersion::Http1);
        let h2c = versions.contains(&HttpVersion::H2c);
        match (http1, h2c) {
            (true, false) => HttpVersions::Http1,
            (false, true) => HttpVersions::H2c,
            // Validation refuses an empty list.
            _ => HttpVersions::Both,
        }
    }

    pub fn describe(self) -> &'static [&'static str] {
        match self {
            HttpVersions::Both => &["http1", "h2c"],
            HttpVersions::Http1 => &["http1"],
            HttpVersions::H2c => &["h2c"],
        }
    }
}

/// One route.
pub struct HttpRoute {
    /// The `route` label: the configured name or the index.
    pub name: Arc<str>,
    pub matches: RouteMatch,
    pub target: Target,
    pub rewrite_host: Option<HeaderValue>,
    /// Replaces the prefix that `matches.path` (a `Prefix`) matched.
    pub rewrite_prefix: Option<Box<str>>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Until the response head arrives; `None`: no limit.
    pub timeout: Option<Duration>,
    /// Cap on a gRPC request's own `grpc-timeout`; `None`: taken as it is.
    pub max_grpc_timeout: Option<Duration>,
    pub retries: u32,
    pub budget: RetryBudget,
    pub mirror: Option<Mirror>,
    pub metrics: RouteMetrics,
}

/// Conditions on a request; all given ones must hold.
#[derive(Default)]
pub struct RouteMatch {
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    pub method: Option<Method>,
    /// Name, and `Some(value)` for an exact value or `None` for presence.
    pub headers: Box<[(HeaderName, Option<HeaderValue>)]>,
}

pub enum HostMatch {
    /// Lower-case host without port.
    Exact(Box<str>),
    /// `*.example.com` stored as `.example.com`.
    Suffix(Box<str>),
}

pub enum PathMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
}

/// Headers to remove, then headers to set.
#[derive(Default)]
pub struct HeaderOps {
    pub remove: Box<[HeaderName]>,
    pub add: Box<[(HeaderName, HeaderValue)]>,
}

/// A shadow cluster that gets a share of the route's requests.
pub struct Mirror {
    pub cluster: Arc<Cluster>,
    /// 0.0 to 1.0.
    pub fraction: f64,
}

/// Keeps retries under 20% of requests (plus a small reserve), so retries
/// cannot multiply the load on a failing backend. Counted in thousandths of
/// a retry: each request deposits 200, each retry withdraws 1000.
pub struct RetryBudget {
    balance: AtomicI64,
}

/// Metric handles of a route.
pub struct RouteMetrics {
    /// Per status class 1xx..5xx.
    pub seconds: [Histogram; 5],
    /// Per cluster the route may use (its targets and failovers): counters
    /// for 1xx..5xx.
    pub by_cluster: Box<[(Arc<str>, [IntCounter; 5])]>,
}

const DEPOSIT: i64 = 200;
const WITHDRAW: i64 = 1000;
/// Retries available before any request was made, and the most that can be saved up.
const RESERVE: i64 = 10 * WITHDRAW;
const CAP: i64 = 100 * WITHDRAW;

// === impl HttpListener ===

impl HttpListener {
    /// The first route matching `req`.
    pub fn route<B>(&self, req: &Request<B>) -> Option<&HttpRoute> {
        let host = request_host(req);
        self.routes.iter().find(|r| r.matches.matches(req, host))
    }
}

/// The request's host without port, from the Host header (HTTP/1.1) or the
/// URI authority (HTTP/2).
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    Some(strip_port(raw))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

// === impl RouteMatch ===

impl RouteMatch {
    pub fn matches<B>(&self, req: &Request<B>, host: Option<&str>) -> bool {
        if let Some(m) = &self.method
            && req.method() != m
        {
            return false;
        }
        if let Some(p) = &self.path {
            let path = req.uri().path();
            let ok = match p {
                PathMatch::Exact(e) => path == &**e,
                PathMatch::Prefix(prefix) => path.starts_with(&**prefix),
            };
            if !ok {
                return false;
            }
        }
        if let Some(h) = &self.host {
            let Some(host) = host else { return false };
            let ok = match h {
                HostMatch::Exact(e) => host.eq_ignore_ascii_case(e),
                HostMatch::Suffix(s) => {
                    host.len() > s.len()
                        && host.is_char_boundary(host.len() - s.len())
                        && host[host.len() - s.len()..].eq_ignore_ascii_case(s)
                }
            };
            if !ok {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| {
            let mut values = req.headers().get_all(name).iter();
            match want {
                None => values.next().is_some(),
                Some(v) => values.any(|got| got == v),
            }
        })
    }
}

// === impl HeaderOps ===

impl HeaderOps {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.add {
            headers.insert(name.clone(), value.clone());
        }
    }
}

// === impl HttpRoute ===

impl HttpRoute {
    /// The request path after `rewrite.path_prefix`, when the route rewrites it.
    pub fn rewritten_path(&self, path_and_query: &str) -> Option<String> {
        let new_prefix = self.rewrite_prefix.as_deref()?;
        let Some(PathMatch::Prefix(old)) = &self.matches.path else {
            return None;
        };
        replace_prefix(old, new_prefix, path_and_query)
    }

    /// Counts a finished request.
    pub fn count(&self, cluster: &str, status: u16, elapsed: Duration) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.metrics.seconds[class].observe(elapsed.as_secs_f64());
        if let Some((_, counters)) = self
            .metrics
            .by_cluster
            .iter()
            .find(|(c, _)| &**c == cluster)
        {
            counters[class].inc();
        }
    }
}

/// `path` with its `old` prefix replaced by `new`, keeping exactly one `/`
/// at the seam: `/v2/` → `/` on `/v2/users` gives `/users`.
fn replace_prefix(old: &str, new: &str, path: &str) -> Option<String> {
    let rest = path.strip_prefix(old)?;
    let mut out = String::with_capacity(new.len() + rest.len() + 1);
    out.push_str(new);
    match (new.ends_with('/'), rest.starts_with('/')) {
        (true, true) => out.push_str(&rest[1..]),
        (false, false) if !rest.is_empty() && !rest.starts_with('?') => {
            out.push('/');
            out.push_str(rest);
        }
        _ => out.push_str(rest),
    }
    Some(out)
}

// === impl RetryBudget ===

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            balance: AtomicI64::new(RESERVE),
        }
    }
}

impl RetryBudget {
    /// A request was made.
    pub fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + DEPOSIT).min(CAP))
            });
    }

    /// Whether a retry may be made now; takes it from the budget if so.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                (b >= WITHDRAW).then_some(b - WITHDRAW)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, host: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn matching() {
        let m = RouteMatch {
            host: Some(HostMatch::Suffix(".example.com".into())),
            path: Some(PathMatch::Prefix("/v2/".into())),
            method: Some(Method::GET),
            headers: vec![
                (
                    HeaderName::from_static("x-canary"),
                    Some(HeaderValue::from_static("1")),
                ),
                (HeaderName::from_static("x-debug"), None),
            ]
            .into(),
        };
        let ok = req(
            "GET",
            "/v2/users",
            "API.example.com:8080",
            &[("x-canary", "1"), ("x-debug", "")],
        );
        assert!(m.matches(&ok, request_host(&ok)));
        for bad in [
            req(
                "POST",
                "/v2/users",
                "api.example.com",
                &[("x-canary", "1"), ("x-debug", "")],
            ),
            req(
                "GET",
                "/v1/users",
                "api.example.com",
                &[("x-canary", "1"), ("x-debug", "")],
            ),
            req(
                "GET",
                "/v2/users",
                "example.com",
                &[("x-canary", "1"), ("x-debug", "")],
            ),
            req(
                "GET",
                "/v2/users",
                "api.example.org",
                &[("x-canary", "1"), ("x-debug", "")],
            ),
            req(
                "GET",
                "/v2/users",
                "api.example.com",
                &[("x-canary", "2"), ("x-debug", "")],
            ),
            req("GET", "/v2/users", "api.example.com", &[("x-canary", "1")]),
        ] {
            assert!(!m.matches(&bad, request_host(&bad)), "{bad:?}");
        }
        let exact = RouteMatch {
            host: Some(HostMatch::Exact("api.local".into())),
            path: Some(PathMatch::Exact("/health".into())),
            ..Default::default()
        };
        let r = req("GET", "/health?x=1", "api.local", &[]);
        assert!(exact.matches(&r, request_host(&r)));
        let r = req("GET", "/health/x", "api.local", &[]);
        assert!(!exact.matches(&r, request_host(&r)));
        assert!(
            RouteMatch::default().matches(&r, None),
            "no conditions: catch-all"
        );
    }

    #[test]
    fn hosts_without_ports() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("[::1]"), "::1");
    }

    #[test]
    fn prefix_rewrites() {
        let cases = [
            ("/v2/", "/", "/v2/users?id=1", "/users?id=1"),
            ("/v2/", "/api/v2/", "/v2/users", "/api/v2/users"),
            ("/v2", "/new", "/v2/users", "/new/users"),
            ("/v2", "/new", "/v2", "/new"),
            ("/old/", "/new", "/old/x", "/new/x"),
            ("/v2/", "/", "/v2/", "/"),
        ];
        for (prefix, new, path, want) in cases {
            assert_eq!(
                replace_prefix(prefix, new, path).as_deref(),
                Some(want),
                "{prefix} -> {new} on {path}"
            );
        }
        assert_eq!(replace_prefix("/v2/", "/", "/v3/x"), None);
    }

    #[test]
    fn retry_budget_allows_a_fifth_plus_reserve() {
        let b = RetryBudget::default();
        let mut allowed = 0;
        for _ in 0..1000 {
            b.deposit();
            if b.withdraw() {
                allowed += 1;
            }
        }
        assert!(
            (200..=211).contains(&allowed),
            "allowed {allowed} retries for 1000 requests"
        );
    }
}
