//! The user-facing configuration: YAML files in a directory → a validated [`Config`].
//!
//! Owns reading the config directory (a mounted ConfigMap: every `*.yaml`/`*.yml`,
//! hidden `..data` entries skipped, symlinks followed), `${VAR}` interpolation,
//! strict parsing (unknown fields and duplicate keys are errors) and every
//! cross-file check (unique names, known cluster references, unique listen
//! addresses). Every problem becomes a [`Diagnostic`] naming the file, line,
//! column and field. A `Config` that exists is valid: `table::compile` turns it
//! into the runtime snapshot without checking anything again.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_saphyr::{Location, Spanned};

/// A complete, validated configuration, merged from every file of the directory.
#[derive(Debug)]
pub struct Config {
    pub resolver: ResolverConfig,
    pub listeners: Vec<ListenerConfig>,
    pub clusters: Vec<ClusterConfig>,
    /// The file each cluster was defined in (same order as `clusters`), for
    /// errors found after parsing, such as unreadable TLS files.
    pub cluster_files: Vec<PathBuf>,
}

/// The top-level `resolver:`: how endpoint names are resolved. At most one file sets it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// `IP:PORT` of name servers; empty means /etc/resolv.conf (search domains and ndots included).
    #[serde(default)]
    pub nameservers: Vec<NameServer>,
    /// Answers are re-resolved no sooner than this after they arrive. Default 1s.
    #[serde(default = "default_min_ttl")]
    pub min_ttl: HumanDuration,
    /// ... and no later than this, whatever their TTL. Default 300s.
    #[serde(default = "default_max_ttl")]
    pub max_ttl: HumanDuration,
}

/// A name server address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameServer(pub SocketAddr);

/// One `listeners[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique across all files; the `listener` label in metrics.
    pub name: Spanned<String>,
    /// `IP:PORT`; port 0 binds an ephemeral port (reported in logs and `/config`).
    pub listen: Spanned<ListenAddr>,
    /// Default `tcp`.
    #[serde(default)]
    pub protocol: Protocol,
    /// Every connection goes to this cluster. Exactly one of `cluster` and `split`.
    pub cluster: Option<Spanned<String>>,
    /// New connections are spread over clusters by weight.
    pub split: Option<Spanned<Vec<SplitConfig>>>,
    /// HTTP listeners: tried in order, first match wins. Instead of routes an
    /// HTTP listener may name a `cluster`/`split`, a catch-all.
    pub routes: Option<Spanned<Vec<Spanned<RouteConfig>>>>,
    /// HTTP listeners: one JSON line per request at info level. Default false.
    #[serde(default)]
    pub access_log: bool,
    /// Connections open at once; at the limit legate stops accepting and the
    /// kernel's backlog holds new ones. Default 10000.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// HTTP: the whole request head must arrive within this after its first
    /// byte, or the connection is closed. Default 10s.
    pub header_timeout: Option<HumanDuration>,
    /// HTTP: a keep-alive connection with no request in flight is closed after
    /// this (default 60s). TCP: a connection that moved no byte either way for
    /// this long is closed (default: never).
    pub idle_timeout: Option<HumanDuration>,
    /// HTTP: a request whose bodies moved no byte either way for this long
    /// is ended (default 5m, as Envoy's stream idle timeout).
    pub stream_idle_timeout: Option<HumanDuration>,
    /// HTTP: the largest request head in bytes; a bigger one gets 431. Default 65536.
    #[serde(default = "default_max_request_headers_size")]
    pub max_request_headers_size: u32,
    /// HTTP: what clients may speak, `[http1, h2c]` (default: both, told
    /// apart by each connection's first bytes). One version alone skips that.
    pub http_versions: Option<Spanned<Vec<HttpVersion>>>,
    /// Kafka: the local ports legate advertises for the cluster's brokers.
    pub broker_ports: Option<Spanned<PortRange>>,
}

/// One HTTP route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The `route` label in metrics; default: the route's index.
    pub name: Option<Spanned<String>>,
    /// All given conditions must hold; no `match` is a catch-all.
    #[serde(rename = "match", default)]
    pub matches: MatchConfig,
    pub cluster: Option<Spanned<String>>,
    /// Weighted choice per request.
    pub split: Option<Spanned<Vec<SplitConfig>>>,
    pub rewrite: Option<Spanned<RewriteConfig>>,
    #[serde(default)]
    pub request_headers: HeaderOpsConfig,
    #[serde(default)]
    pub response_headers: HeaderOpsConfig,
    /// Until the whole response head arrives; then 504 (DEADLINE_EXCEEDED
    /// for gRPC). Default 15s; `0s` means none.
    pub timeout: Option<HumanDuration>,
    /// gRPC requests: the most a `grpc-timeout` header may ask for. Unset:
    /// the header's deadline is taken as it is.
    pub max_grpc_timeout: Option<HumanDuration>,
    /// Retries on another endpoint: connect failures for any method, 502/503
    /// and resets for idempotent ones. Default 0.
    #[serde(default)]
    pub retries: u32,
    pub mirror: Option<Spanned<MirrorConfig>>,
}

impl RouteConfig {
    /// A route with no conditions and no target: what an HTTP listener's own
    /// `cluster`/`split` compiles into (the target is supplied separately).
    pub fn catch_all() -> Self {
        RouteConfig {
            name: None,
            matches: MatchConfig::default(),
            cluster: None,
            split: None,
            rewrite: None,
            request_headers: HeaderOpsConfig::default(),
            response_headers: HeaderOpsConfig::default(),
            timeout: None,
            max_grpc_timeout: None,
            retries: 0,
            mirror: None,
        }
    }
}

/// `match:` of a route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Exact host (port ignored, case-insensitive) or `*.suffix`.
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    /// Exact path (query ignored).
    pub path: Option<String>,
    pub method: Option<String>,
    /// Header name → exact value, or `true` for "present".
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, HeaderMatchConfig>,
}

/// A header condition: an exact value, or presence.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum HeaderMatchConfig {
    Present(bool),
    Exact(String),
}

/// `rewrite:` of a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteConfig {
    /// Replaces the Host header / `:authority`.
    pub host: Option<String>,
    /// Replaces the part of the path that `match.path_prefix` matched.
    pub path_prefix: Option<String>,
}

/// Headers to add (replacing) and remove.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsConfig {
    #[serde(default)]
    pub add: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `mirror:` of a route: copies of requests to a shadow cluster.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    pub cluster: String,
    /// Share of matching requests copied, 0-100.
    pub percent: f64,
}

/// One weighted target of a `split`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    pub cluster: Spanned<String>,
    /// Relative weight, 0 to 1,000,000; 0 takes the cluster out of rotation.
    pub weight: u32,
}

/// One `clusters[]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Unique across all files; the `cluster` label in metrics.
    pub name: Spanned<String>,
    /// `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT` (re-resolved by TTL; a name may
    /// stand for several addresses); at least one.
    pub endpoints: Spanned<Vec<Spanned<EndpointConfig>>>,
    /// Default `round_robin`.
    #[serde(default)]
    pub lb: LbPolicy,
    /// Clusters to send new connections to, in order, when no endpoint here is
    /// healthy or all connects failed.
    #[serde(default)]
    pub failover: Vec<Spanned<String>>,
    /// Active health checks; without it, only connect failures (passive) count.
    pub health: Option<Spanned<HealthConfig>>,
    /// Per attempt; a timed-out endpoint is skipped for the next. Default 5s.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// When a reload changes where this cluster's connections would go (its
    /// endpoints, or a listener now sending elsewhere), connections still on the
    /// old target are closed after this grace so the app reconnects to the new
    /// one. Unset: old connections live until they end.
    pub drain_on_change: Option<HumanDuration>,
    /// HTTP clusters: speak cleartext HTTP/2 (h2c) to the endpoints. Default false.
    #[serde(default)]
    pub http2: bool,
    /// HTTP clusters: a pooled connection unused this long is closed, before
    /// the upstream's own keep-alive timeout can race a request on it. Default 60s.
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout: HumanDuration,
    /// Originate TLS (or mTLS) to the endpoints.
    pub tls: Option<Spanned<TlsConfig>>,
    /// Postgres listeners: `open` (default) or `fenced`.
    #[serde(default)]
    pub cutover: Cutover,
}

/// `tls:` of a cluster. Files are PEM; they are watched and reloaded like the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server name to send and verify; default: the endpoint's DNS name. An IP
    /// endpoint needs it (or `verify: false`).
    pub sni: Option<String>,
    /// CA bundle; default: the system roots (or the bundled Mozilla roots when
    /// the system has none).
    pub ca: Option<PathBuf>,
    /// Client certificate chain, for mTLS; needs `key`.
    pub cert: Option<PathBuf>,
    /// Client key (PKCS#8, SEC1 or RSA), for mTLS; needs `cert`.
    pub key: Option<PathBuf>,
    /// ALPN protocols to offer, e.g. `[h2, http/1.1]`; an HTTP cluster that
    /// negotiates h2 speaks HTTP/2.
    #[serde(default)]
    pub alpn: Vec<String>,
    /// Lowest TLS version: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Verify the server's certificate and name. Only `verify: false`, written
    /// out, turns it off (and is logged as a warning at every load).
    #[serde(default = "default_true")]
    pub verify: bool,
    /// Postgres: TLS from the first byte (PostgreSQL 17 `sslnegotiation=direct`,
    /// ALPN `postgresql`) instead of an SSLRequest first. Default false.
    #[serde(default)]
    pub direct: bool,
}

/// A TLS protocol version floor.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

fn default_true() -> bool {
    true
}

/// `health:` of a cluster: a probe every `interval` (with jitter), `unhealthy`
/// consecutive failures mark an endpoint down, `healthy` consecutive successes up.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Default 5s.
    #[serde(default = "default_health_interval")]
    pub interval: HumanDuration,
    /// Per probe. Default 1s.
    #[serde(default = "default_health_timeout")]
    pub timeout: HumanDuration,
    /// Default 3.
    #[serde(default = "default_unhealthy")]
    pub unhealthy: u32,
    /// Default 2.
    #[serde(default = "default_healthy")]
    pub healthy: u32,
    /// When set, the probe is `GET <http_path>` expecting a 2xx; otherwise a TCP connect.
    pub http_path: Option<String>,
    /// `tcp` (default) or `postgres`.
    #[serde(default)]
    pub kind: HealthKind,
}

/// What an HTTP listener's clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpVersion {
    /// HTTP/1.0 and HTTP/1.1.
    Http1,
    /// Cleartext HTTP/2 with prior knowledge (RFC 9113 §3.3).
    H2c,
}

/// Listener protocols.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    /// HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on the same port.
    Http,
    /// TCP that understands PostgreSQL's startup (SSLRequest, so `tls:`
    /// works), routes cancel requests to their session's server, and closes
    /// sessions between transactions when they must move.
    Postgres,
    /// Kafka: the listen address is the bootstrap server; broker addresses in
    /// responses are rewritten to ports of `broker_ports` on the same IP.
    Kafka,
}

/// `broker_ports` of a Kafka listener: `"19100-19163"` or a single port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl std::fmt::Display for PortRange {
    /// As written in the config: `19100-19163`, or `19100` for one port.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// What happens to new sessions while old ones drain from a cluster a
/// reload moved a Postgres listener away from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cutover {
    /// New sessions go to the new target at once.
    #[default]
    Open,
    /// New sessions wait until every old session closed at an idle point (or
    /// the `drain_on_change` grace ran out): never two databases written at once.
    Fenced,
}

/// What an active health probe checks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthKind {
    /// A TCP connect (or `GET http_path` when that is set).
    #[default]
    Tcp,
    /// An SSLRequest answered `S` or `N`: a live postmaster, no credentials.
    Postgres,
}

/// Load-balancing policies.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// In turn.
    #[default]
    RoundRobin,
    /// Fewest active connections; ties broken at random.
    LeastConn,
    /// Power of two random choices, the one with fewer active connections.
    Random,
    /// Consistent (rendezvous) hashing on the client IP: a client sticks to an endpoint.
    Hash,
}

/// A listen address: an IP literal and a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

/// An upstream endpoint as written (`10.0.0.7:5432`, `db.prod.internal:5432`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    pub written: String,
    pub target: EndpointTarget,
}

/// What an endpoint stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointTarget {
    /// An IP literal (or `localhost`, which is 127.0.0.1).
    Addr(SocketAddr),
    /// A DNS name, resolved and re-resolved at run time. A trailing dot makes
    /// it absolute (no search domains).
    Name { host: String, port: u16 },
}

/// A duration written as `250ms`, `5s`, `1m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// Everything wrong with a config directory, one [`Diagnostic`] per problem.
#[derive(Debug)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

/// One problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is not tied to a line (an unreadable file).
    pub line: u64,
    pub column: u64,
    pub message: String,
}

/// The parsed content of one file, before the cross-file checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    resolver: Option<Spanned<ResolverConfig>>,
    #[serde(default)]
    listeners: Vec<ListenerConfig>,
    #[serde(default)]
    clusters: Vec<ClusterConfig>,
}

fn default_max_connections() -> u32 {
    10_000
}
fn default_max_request_headers_size() -> u32 {
    64 * 1024
}
fn default_pool_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_min_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_max_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_health_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_health_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_unhealthy() -> u32 {
    3
}
fn default_healthy() -> u32 {
    2
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            nameservers: Vec::new(),
            min_ttl: default_min_ttl(),
            max_ttl: default_max_ttl(),
        }
    }
}

// === impl Config ===

impl Config {
    /// Reads, interpolates, parses and validates every `*.yaml`/`*.yml` file in `dir`.
    pub fn load(dir: &Path) -> Result<Config, ConfigError> {
        Config::from_sources(read_sources(dir)?)
    }

    /// Parses and validates already-read sources (file name, contents), in order.
    pub fn from_sources(
        sources: impl IntoIterator<Item = (PathBuf, std::io::Result<String>)>,
    ) -> Result<Config, ConfigError> {
        let mut diagnostics = Vec::new();
        let mut parsed = Vec::new();
        for (path, text) in sources {
            let text = match text {
                Ok(text) => text,
                Err(e) => {
                    diagnostics.push(Diagnostic::new(&path, 0, 0, format!("cannot read: {e}")));
                    continue;
                }
            };
            match parse_file(&text, |name| std::env::var(name).ok()) {
                Ok(file) => parsed.push((path, file)),
                Err(mut d) => {
                    d.file = path;
                    diagnostics.push(d);
                }
            }
        }
        let config = merge(parsed, &mut diagnostics);
        if diagnostics.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { diagnostics })
        }
    }
}

/// The config files of `dir` and their contents, as one consistent snapshot.
///
/// In a ConfigMap volume the visible files are symlinks through `..data`, which
/// the kubelet swaps atomically. Reading each symlink separately could mix two
/// versions if a swap lands in between, so when `..data` exists the files are
/// read from the one directory it resolved to. Errors still name the visible path.
///
/// A read that races the kubelet (a file or `..data` vanishing between listing
/// and reading, or no file at all) is tried once more after a short pause
/// before it counts: the swap is a rename and finishes within microseconds. A
/// directory with no config file is an error, never an empty config.
pub fn read_sources(dir: &Path) -> Result<Vec<(PathBuf, std::io::Result<String>)>, ConfigError> {
    let raced = |sources: &[(PathBuf, std::io::Result<String>)]| {
        sources.is_empty()
            || sources.iter().any(|(_, r)| {
                r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            })
    };
    let mut sources = read_once(dir)?;
    if raced(&sources) {
        std::thread::sleep(RACE_RETRY);
        sources = read_once(dir)?;
    }
    if sources.is_empty() {
        return Err(ConfigError::single(
            dir,
            0,
            0,
            "no *.yaml or *.yml file in the config directory (an empty read is never a config)"
                .to_string(),
        ));
    }
    Ok(sources)
}

/// Pause before reading again a directory that looked mid-swap.
const RACE_RETRY: Duration = Duration::from_millis(20);

fn read_once(dir: &Path) -> Result<Vec<(PathBuf, std::io::Result<String>)>, ConfigError> {
    let files = config_files(dir).map_err(|e| ConfigError::single(dir, 0, 0, e))?;
    let data_dir = std::fs::canonicalize(dir.join("..data")).ok();
    Ok(files
        .into_iter()
        .map(|path| {
            let text = match (&data_dir, path.file_name()) {
                (Some(data), Some(name)) if data.join(name).is_file() => {
                    std::fs::read_to_string(data.join(name))
                }
                _ => std::fs::read_to_string(&path),
            };
            (path, text)
        })
        .collect())
}

/// The config files of `dir`, sorted by name so that merging is deterministic.
/// Hidden entries are skipped: in a ConfigMap volume they are the kubelet's
/// `..data` and timestamped directories, whose files also appear as visible symlinks.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read config directory: {e}"))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read config directory: {e}"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        // `metadata` follows symlinks, as the kubelet's visible files are. A
        // dangling link is kept: reading it fails, and that failure is reported.
        match std::fs::metadata(entry.path()) {
            Ok(m) if m.is_file() => files.push(entry.path()),
            Ok(_) => {}
            Err(_) => files.push(entry.path()),
        }
    }
    files.sort();
    Ok(files)
}

/// Interpolates and parses one file. The returned diagnostic has no file name yet.
fn parse_file(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<FileConfig, Diagnostic> {
    if text.trim().is_empty() {
        // A truncated or half-written read, or a key emptied by mistake: never
        // a config that would close every listener.
        return Err(Diagnostic::new(
            Path::new(""),
            0,
            0,
            "file is empty (an empty read is never a config)".to_string(),
        ));
    }
    let text = interpolate(text, env)?;
    if is_blank_yaml(&text) {
        // Only comments: a deliberate file that adds nothing.
        return Ok(FileConfig::default());
    }
    serde_saphyr::from_str::<FileConfig>(&text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let mut message = e.without_snippet().to_string();
        // Strip the parser's own "at line X column Y" suffix: the prefix says it.
        if let Some(at) = message.find(" at line ") {
            message.truncate(at);
        }
        if let Some(key) = message.strip_prefix("duplicate mapping key: ") {
            let key = key.split(',').next().unwrap_or(key).trim();
            message = format!("duplicate key \"{key}\" (each key may appear once per mapping)");
        }
        // A type or value error points at the value; name the key written on that line.
        // Missing/unknown-field and duplicate-key messages name their field already.
        let names_its_field = ["missing field", "unknown field", "duplicate key"]
            .iter()
            .any(|p| message.starts_with(p));
        if !names_its_field && let Some(key) = key_at_line(&text, line) {
            message = format!("field \"{key}\": {message}");
        }
        Diagnostic::new(Path::new(""), line, column, message)
    })
}

fn is_blank_yaml(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    })
}

/// The mapping key written on `line` (1-based), if that line has one: the field
/// a type error is about.
fn key_at_line(text: &str, line: u64) -> Option<&str> {
    let line = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let line = line.trim_start().trim_start_matches("- ").trim_start();
    let (key, _) = line.split_once(':')?;
    let valid = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    valid.then_some(key)
}

// === impl ConfigError ===

impl ConfigError {
    fn single(file: &Path, line: u64, column: u64, message: String) -> Self {
        ConfigError {
            diagnostics: vec![Diagnostic::new(file, line, column, message)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// === impl Diagnostic ===

impl Diagnostic {
    /// A problem at `loc` in `file`.
    pub fn at(file: &Path, loc: &Location, message: String) -> Self {
        Diagnostic::new(file, loc.line(), loc.column(), message)
    }

    fn new(file: &Path, line: u64, column: u64, message: String) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            message,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}: {}", self.file.display(), self.message),
            (line, 0) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            (line, column) => write!(
                f,
                "{}:{line}:{column}: {}",
                self.file.display(),
                self.message
            ),
        }
    }
}

mod interpolate;
mod validate;
mod values;

use interpolate::interpolate;
#[cfg(test)]
use validate::check_name;
use validate::merge;
#[cfg(test)]
use values::parse_endpoint;
pub use values::{parse_duration, show_duration};

#[cfg(test)]
mod tests;
