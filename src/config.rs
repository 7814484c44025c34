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
    /// Until the whole response head arrives; then 504. Default 15s.
    pub timeout: Option<HumanDuration>,
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
    /// Relative weight; 0 takes the cluster out of rotation.
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
    /// Originate TLS (or mTLS) to the endpoints.
    pub tls: Option<Spanned<TlsConfig>>,
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
}

/// Listener protocols.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    /// HTTP/1.1 and cleartext HTTP/2 (prior knowledge) on the same port.
    Http,
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
pub fn read_sources(dir: &Path) -> Result<Vec<(PathBuf, std::io::Result<String>)>, ConfigError> {
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
        // `metadata` follows symlinks, as the kubelet's visible files are.
        if std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file()) {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Interpolates and parses one file. The returned diagnostic has no file name yet.
fn parse_file(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<FileConfig, Diagnostic> {
    let text = interpolate(text, env)?;
    if is_blank_yaml(&text) {
        // An empty ConfigMap key is a valid, empty file.
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

/// Replaces `${VAR}` and `${VAR:-default}` with values from `env`; `$${` is a literal `${`.
/// An unset variable without default is an error at its position. Comments
/// are left as written: documenting `${ENV}` in a comment must not require it.
fn interpolate(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<String, Diagnostic> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let (code, comment) = line.split_at(comment_start(line));
        out.push_str(&interpolate_text(code, &env, (i as u64 + 1, 1))?);
        out.push_str(comment);
    }
    Ok(out)
}

/// Byte index where a YAML comment starts on `line` (its length if none): a
/// `#` at the start or after whitespace, outside quotes.
fn comment_start(line: &str) -> usize {
    let (mut single, mut double, mut prev_space) = (false, false, true);
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return i,
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line.len()
}

/// Interpolates one piece of a line; `base` is its (line, column) for errors.
fn interpolate_text(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
    base: (u64, u64),
) -> Result<String, Diagnostic> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$${") {
            out.push_str("${");
            rest = after;
            continue;
        }
        if !tail.starts_with("${") {
            out.push('$');
            rest = &tail[1..];
            continue;
        }
        let offset = text.len() - tail.len();
        let (line, column) = (base.0, base.1 + text[..offset].chars().count() as u64);
        let Some(end) = tail.find('}') else {
            return Err(Diagnostic::new(
                Path::new(""),
                line,
                column,
                "unterminated \"${\": write ${VAR} or ${VAR:-default} (or $${ for a literal)"
                    .to_string(),
            ));
        };
        let expr = &tail[2..end];
        let (name, default) = match expr.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (expr, None),
        };
        let valid_name = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid_name {
            return Err(Diagnostic::new(
                Path::new(""),
                line,
                column,
                format!("invalid variable name \"{name}\" in \"${{{expr}}}\""),
            ));
        }
        match (env(name), default) {
            (Some(value), _) => out.push_str(&value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(Diagnostic::new(
                    Path::new(""),
                    line,
                    column,
                    format!(
                        "environment variable \"{name}\" is not set (write ${{{name}:-default}} to give a default)"
                    ),
                ));
            }
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Merges the files and runs every cross-file check, pushing what is wrong.
fn merge(files: Vec<(PathBuf, FileConfig)>, diagnostics: &mut Vec<Diagnostic>) -> Config {
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    let mut listener_files = Vec::new();
    let mut cluster_files = Vec::new();
    let mut resolver: Option<(PathBuf, Spanned<ResolverConfig>)> = None;
    for (path, file) in files {
        if let Some(r) = file.resolver {
            match &resolver {
                Some((first, at)) => diagnostics.push(Diagnostic::new(
                    &path,
                    r.referenced.line(),
                    r.referenced.column(),
                    format!(
                        "duplicate \"resolver\" section (first defined at {}:{})",
                        first.display(),
                        at.referenced.line()
                    ),
                )),
                None => resolver = Some((path.clone(), r)),
            }
        }
        for l in file.listeners {
            listener_files.push(path.clone());
            listeners.push(l);
        }
        for c in file.clusters {
            cluster_files.push(path.clone());
            clusters.push(c);
        }
    }

    let mut at = |file: &Path, loc: &Location, message: String| {
        diagnostics.push(Diagnostic::new(file, loc.line(), loc.column(), message));
    };

    let mut cluster_names: HashMap<&str, (&Path, &Location)> = HashMap::new();
    for (c, file) in clusters.iter().zip(&cluster_files) {
        let name = c.name.value.as_str();
        if let Err(why) = check_name(name) {
            at(file, &c.name.referenced, format!("field \"name\": {why}"));
        }
        if let Some((first_file, first)) = cluster_names.get(name) {
            at(
                file,
                &c.name.referenced,
                format!(
                    "field \"name\": duplicate cluster name \"{name}\" (first defined at {}:{})",
                    first_file.display(),
                    first.line()
                ),
            );
        } else {
            cluster_names.insert(name, (file, &c.name.referenced));
        }
        if c.endpoints.value.is_empty() {
            at(
                file,
                &c.endpoints.referenced,
                format!("field \"endpoints\": cluster \"{name}\" needs at least one endpoint"),
            );
        }
        if let Some(h) = &c.health {
            let loc = &h.referenced;
            let h = &h.value;
            if h.unhealthy == 0 || h.healthy == 0 {
                at(
                    file,
                    loc,
                    "field \"health\": unhealthy and healthy thresholds must be at least 1"
                        .to_string(),
                );
            }
            if h.interval.0.is_zero() || h.timeout.0.is_zero() {
                at(
                    file,
                    loc,
                    "field \"health\": interval and timeout must be above 0".to_string(),
                );
            } else if h.timeout.0 > h.interval.0 {
                at(
                    file,
                    loc,
                    "field \"health\": timeout must not exceed interval".to_string(),
                );
            }
            if h.http_path
                .as_ref()
                .is_some_and(|p| !p.starts_with('/') || p.contains(char::is_whitespace))
            {
                at(
                    file,
                    loc,
                    "field \"http_path\": must start with '/' and contain no spaces".to_string(),
                );
            }
        }
    }
    for (c, file) in clusters.iter().zip(&cluster_files) {
        if let Some(tls) = &c.tls {
            let (t, loc) = (&tls.value, &tls.referenced);
            if t.cert.is_some() != t.key.is_some() {
                at(
                    file,
                    loc,
                    "field \"tls\": \"cert\" and \"key\" go together (mTLS needs both)".to_string(),
                );
            }
            let has_ip_endpoint = c
                .endpoints
                .value
                .iter()
                .any(|e| matches!(e.value.target, EndpointTarget::Addr(_)));
            if t.verify && t.sni.is_none() && has_ip_endpoint {
                at(file, loc, "field \"tls\": an IP endpoint has no name to verify: set \"sni\" (or verify: false)".to_string());
            }
            if let Some(sni) = &t.sni
                && rustls_pki_types::ServerName::try_from(sni.as_str()).is_err()
            {
                at(
                    file,
                    loc,
                    format!("field \"sni\": invalid server name \"{sni}\""),
                );
            }
            if t.alpn.iter().any(|p| p.is_empty() || p.len() > 255) {
                at(
                    file,
                    loc,
                    "field \"alpn\": protocols must be 1 to 255 bytes".to_string(),
                );
            }
        }
        let mut seen = HashSet::new();
        for f in &c.failover {
            if f.value == c.name.value {
                at(
                    file,
                    &f.referenced,
                    format!(
                        "field \"failover\": cluster \"{}\" cannot fail over to itself",
                        f.value
                    ),
                );
            } else if !cluster_names.contains_key(f.value.as_str()) {
                at(
                    file,
                    &f.referenced,
                    unknown_cluster(&f.value, &cluster_names).replacen(
                        "field \"cluster\"",
                        "field \"failover\"",
                        1,
                    ),
                );
            } else if !seen.insert(f.value.as_str()) {
                at(
                    file,
                    &f.referenced,
                    format!(
                        "field \"failover\": cluster \"{}\" is listed twice",
                        f.value
                    ),
                );
            }
        }
    }
    if let Some((file, r)) = &resolver
        && r.value.min_ttl.0 > r.value.max_ttl.0
    {
        at(
            file,
            &r.referenced,
            "field \"resolver\": min_ttl must not exceed max_ttl".to_string(),
        );
    }

    let mut listener_names: HashMap<&str, (&Path, &Location)> = HashMap::new();
    let mut listen_addrs: HashMap<SocketAddr, (&Path, &Location)> = HashMap::new();
    for (l, file) in listeners.iter().zip(&listener_files) {
        let name = l.name.value.as_str();
        if let Err(why) = check_name(name) {
            at(file, &l.name.referenced, format!("field \"name\": {why}"));
        }
        if let Some((first_file, first)) = listener_names.get(name) {
            at(
                file,
                &l.name.referenced,
                format!(
                    "field \"name\": duplicate listener name \"{name}\" (first defined at {}:{})",
                    first_file.display(),
                    first.line()
                ),
            );
        } else {
            listener_names.insert(name, (file, &l.name.referenced));
        }
        let addr = l.listen.value.0;
        if addr.port() != 0 {
            if let Some((first_file, first)) = listen_addrs.get(&addr) {
                at(
                    file,
                    &l.listen.referenced,
                    format!(
                        "field \"listen\": address {addr} is already used by another listener (at {}:{})",
                        first_file.display(),
                        first.line()
                    ),
                );
            } else {
                listen_addrs.insert(addr, (file, &l.listen.referenced));
            }
        }
        let is_http = l.protocol == Protocol::Http;
        match (&l.routes, is_http) {
            (Some(routes), true) => {
                if l.cluster.is_some() || l.split.is_some() {
                    at(
                        file,
                        &routes.referenced,
                        format!(
                            "listener \"{name}\": give either \"routes\" or a listener-level \"cluster\"/\"split\", not both"
                        ),
                    );
                }
                if routes.value.is_empty() {
                    at(
                        file,
                        &routes.referenced,
                        "field \"routes\": needs at least one route".to_string(),
                    );
                }
                let mut route_names = HashSet::new();
                for (i, spanned) in routes.value.iter().enumerate() {
                    let (r, route_at) = (&spanned.value, &spanned.referenced);
                    let what = format!(
                        "route {}",
                        r.name
                            .as_ref()
                            .map_or_else(|| i.to_string(), |n| format!("\"{}\"", n.value))
                    );
                    if let Some(n) = &r.name {
                        if let Err(why) = check_name(&n.value) {
                            at(file, &n.referenced, format!("field \"name\": {why}"));
                        } else if !route_names.insert(n.value.as_str()) {
                            at(
                                file,
                                &n.referenced,
                                format!(
                                    "field \"name\": duplicate route name \"{}\" in listener \"{name}\"",
                                    n.value
                                ),
                            );
                        }
                    }
                    check_target(
                        &mut at,
                        file,
                        &what,
                        &r.cluster,
                        &r.split,
                        route_at,
                        &cluster_names,
                    );
                    check_route(&mut at, file, r, route_at, &cluster_names);
                }
            }
            (Some(routes), false) => at(
                file,
                &routes.referenced,
                format!("listener \"{name}\": \"routes\" need protocol: http"),
            ),
            (None, _) => {
                let what = format!("listener \"{name}\"");
                check_target(
                    &mut at,
                    file,
                    &what,
                    &l.cluster,
                    &l.split,
                    &l.name.referenced,
                    &cluster_names,
                );
            }
        }
        if l.access_log && !is_http {
            at(
                file,
                &l.name.referenced,
                format!("listener \"{name}\": access_log is for protocol: http"),
            );
        }
    }

    Config {
        resolver: resolver.map(|(_, r)| r.value).unwrap_or_default(),
        listeners,
        clusters,
        cluster_files,
    }
}

fn unknown_cluster(name: &str, known: &HashMap<&str, (&Path, &Location)>) -> String {
    let mut names: Vec<&str> = known.keys().copied().collect();
    names.sort_unstable();
    format!(
        "field \"cluster\": unknown cluster \"{name}\" (defined clusters: {})",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    )
}

/// Exactly one of `cluster` and `split`, each naming known clusters.
fn check_target(
    at: &mut impl FnMut(&Path, &Location, String),
    file: &Path,
    what: &str,
    cluster: &Option<Spanned<String>>,
    split: &Option<Spanned<Vec<SplitConfig>>>,
    owner: &Location,
    cluster_names: &HashMap<&str, (&Path, &Location)>,
) {
    match (cluster, split) {
        (Some(c), None) => {
            if !cluster_names.contains_key(c.value.as_str()) {
                at(
                    file,
                    &c.referenced,
                    unknown_cluster(&c.value, cluster_names),
                );
            }
        }
        (None, Some(split)) => {
            if split.value.is_empty() {
                at(
                    file,
                    &split.referenced,
                    "field \"split\": needs at least one { cluster, weight }".to_string(),
                );
            } else if split.value.iter().all(|s| s.weight == 0) {
                at(
                    file,
                    &split.referenced,
                    "field \"split\": at least one weight must be above 0".to_string(),
                );
            }
            let mut seen = HashSet::new();
            for s in &split.value {
                if !cluster_names.contains_key(s.cluster.value.as_str()) {
                    at(
                        file,
                        &s.cluster.referenced,
                        unknown_cluster(&s.cluster.value, cluster_names),
                    );
                } else if !seen.insert(s.cluster.value.as_str()) {
                    at(
                        file,
                        &s.cluster.referenced,
                        format!(
                            "field \"cluster\": cluster \"{}\" appears twice in this split",
                            s.cluster.value
                        ),
                    );
                }
            }
        }
        (Some(_), Some(split)) => at(
            file,
            &split.referenced,
            format!("{what}: set either \"cluster\" or \"split\", not both"),
        ),
        (None, None) => at(
            file,
            owner,
            format!("{what}: missing field \"cluster\" (or \"split\")"),
        ),
    }
}

/// The HTTP-specific parts of a route: match, rewrite, headers, mirror, timeout.
fn check_route(
    at: &mut impl FnMut(&Path, &Location, String),
    file: &Path,
    r: &RouteConfig,
    loc: &Location,
    cluster_names: &HashMap<&str, (&Path, &Location)>,
) {
    let m = &r.matches;
    if let Some(host) = &m.host {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        if bare.is_empty() || bare.contains(['*', '/', ' ']) {
            at(
                file,
                loc,
                format!(
                    "field \"host\": invalid host pattern \"{host}\": use an exact host or *.suffix"
                ),
            );
        }
    }
    for (field, path) in [("path_prefix", &m.path_prefix), ("path", &m.path)] {
        if path.as_ref().is_some_and(|p| !p.starts_with('/')) {
            at(file, loc, format!("field \"{field}\": must start with '/'"));
        }
    }
    if m.path.is_some() && m.path_prefix.is_some() {
        at(
            file,
            loc,
            "field \"match\": give \"path\" or \"path_prefix\", not both".to_string(),
        );
    }
    if let Some(method) = &m.method
        && http::Method::from_bytes(method.as_bytes()).is_err()
    {
        at(
            file,
            loc,
            format!("field \"method\": invalid method \"{method}\""),
        );
    }
    for name in m.headers.keys() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            at(
                file,
                loc,
                format!("field \"headers\": invalid header name \"{name}\""),
            );
        }
    }
    if let Some(rw) = &r.rewrite {
        if rw.value.path_prefix.is_some() && m.path_prefix.is_none() {
            at(
                file,
                &rw.referenced,
                "field \"rewrite\": path_prefix needs match.path_prefix (the part it replaces)"
                    .to_string(),
            );
        }
        if rw
            .value
            .path_prefix
            .as_ref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            at(
                file,
                &rw.referenced,
                "field \"path_prefix\": must start with '/'".to_string(),
            );
        }
        if rw
            .value
            .host
            .as_ref()
            .is_some_and(|h| http::HeaderValue::from_str(h).is_err() || h.is_empty())
        {
            at(
                file,
                &rw.referenced,
                "field \"host\": invalid host".to_string(),
            );
        }
    }
    for ops in [&r.request_headers, &r.response_headers] {
        for (name, value) in &ops.add {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || http::HeaderValue::from_str(value).is_err()
            {
                at(
                    file,
                    loc,
                    format!("field \"add\": invalid header \"{name}: {value}\""),
                );
            }
        }
        for name in &ops.remove {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                at(
                    file,
                    loc,
                    format!("field \"remove\": invalid header name \"{name}\""),
                );
            }
        }
    }
    if r.timeout.is_some_and(|t| t.0.is_zero()) {
        at(file, loc, "field \"timeout\": must be above 0".to_string());
    }
    if let Some(mirror) = &r.mirror {
        if !cluster_names.contains_key(mirror.value.cluster.as_str()) {
            at(
                file,
                &mirror.referenced,
                unknown_cluster(&mirror.value.cluster, cluster_names).replacen(
                    "field \"cluster\"",
                    "field \"mirror\"",
                    1,
                ),
            );
        }
        if !(0.0..=100.0).contains(&mirror.value.percent) {
            at(
                file,
                &mirror.referenced,
                "field \"percent\": must be between 0 and 100".to_string(),
            );
        }
    }
}

/// Names become metric label values and log fields: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("name must not be empty".to_string());
    }
    if name.len() > 128 {
        return Err("name must be at most 128 characters".to_string());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "invalid name \"{name}\": use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
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

// === impl ListenAddr ===

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>().map(ListenAddr).map_err(|_| {
            serde::de::Error::custom(format!(
                "invalid listen address \"{s}\": expected IP:PORT, e.g. 127.0.0.1:5432 or [::1]:5432"
            ))
        })
    }
}

// === impl EndpointConfig ===

impl<'de> Deserialize<'de> for EndpointConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let written = String::deserialize(d)?;
        parse_endpoint(&written)
            .map(|target| EndpointConfig {
                written: written.clone(),
                target,
            })
            .map_err(serde::de::Error::custom)
    }
}

fn parse_endpoint(s: &str) -> Result<EndpointTarget, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(EndpointTarget::Addr(addr));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("invalid endpoint \"{s}\": expected HOST:PORT"));
    };
    let port: u16 = port.parse().map_err(|_| {
        format!("invalid endpoint \"{s}\": port \"{port}\" is not a number 0-65535")
    })?;
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(EndpointTarget::Addr(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
        )));
    }
    if host.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!(
            "invalid endpoint \"{s}\": write IPv6 addresses in brackets, e.g. [{host}]:{port}"
        ));
    }
    if host.parse::<Ipv4Addr>().is_err() && is_dns_name(host) {
        return Ok(EndpointTarget::Name {
            host: host.to_string(),
            port,
        });
    }
    Err(format!(
        "invalid endpoint \"{s}\": \"{host}\" is neither an IP address nor a DNS name"
    ))
}

/// RFC 1123 host names: labels of letters, digits and '-', not starting or
/// ending with '-', at most 63 characters each; one trailing dot allowed.
fn is_dns_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    // An all-numeric last label is a mistyped IP (`1.2.3`), not a name.
    let numeric_tld = name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()));
    !name.is_empty()
        && !numeric_tld
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

// === impl NameServer ===

impl<'de> Deserialize<'de> for NameServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(NameServer(addr));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(NameServer(SocketAddr::new(ip, 53)));
        }
        Err(serde::de::Error::custom(format!(
            "invalid name server \"{s}\": expected IP or IP:PORT, e.g. 10.96.0.10:53"
        )))
    }
}

// === impl HumanDuration ===

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// `250ms`, `5s`, `1m`, `1h`, or combinations like `1m30s`. A bare number has no unit and is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let trimmed = s.trim();
    if trimmed.is_empty() || trimmed.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "invalid duration \"{s}\": give a unit, e.g. 250ms, 5s, 1m"
        ));
    }
    humantime::parse_duration(trimmed)
        .map_err(|e| format!("invalid duration \"{s}\": {e} (expected e.g. 250ms, 5s, 1m)"))
}

#[cfg(test)]
mod tests;
