//! `legate diff OLD NEW`: what a reload from one configuration to another
//! would do, before anyone applies it.
//!
//! Both sides are the table as `GET /config` describes it: a config directory
//! is read and compiled exactly as `legate check` does, and a running legate
//! is asked for its `/config`. So the comparison has one input shape, and a
//! live side adds what only it knows (connections open right now).
//!
//! The verdicts on open connections follow the reload rules of
//! [`crate::table::carry_over`]: a TCP connection keeps the route it was
//! accepted on; when a reload sends its listener elsewhere, the old cluster's
//! `drain_on_change` decides whether it stays, closes after a grace or (behind
//! a Postgres listener) leaves at its next transaction boundary; Kafka
//! connections never stay; HTTP requests read the table one by one.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::table::described::{items, targets, text};

/// One side of the comparison, as given on the command line.
#[derive(Debug, Clone)]
pub enum Source {
    /// A config directory (a ConfigMap's files).
    Dir(PathBuf),
    /// A running legate's admin server: `http://HOST:PORT[/config]`.
    Admin(String),
}

impl Source {
    pub fn parse(arg: &str) -> Source {
        match arg.strip_prefix("http://") {
            Some(rest) => Source::Admin(rest.trim_end_matches('/').to_string()),
            None => Source::Dir(PathBuf::from(arg)),
        }
    }

    /// The table this side describes, or why there is none (for a directory:
    /// the errors a reload would reject it with, naming file and line).
    pub fn load(&self) -> Result<Value, String> {
        match self {
            Source::Dir(dir) if dir.starts_with("https:") => Err(format!(
                "{}: the admin server speaks plain HTTP (reach it with kubectl port-forward): use http://",
                dir.display()
            )),
            Source::Dir(dir) => crate::check(dir).map_err(|e| e.to_string()),
            Source::Admin(addr) => fetch_config(addr),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Dir(d) => write!(f, "{}", d.display()),
            Source::Admin(a) => write!(f, "http://{a}"),
        }
    }
}

/// Bounds of the `/config` fetch: the admin server answers at once or not at all.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// `GET /config` over HTTP/1.0 (the answer ends with the connection; no chunking).
fn fetch_config(target: &str) -> Result<Value, String> {
    let (authority, path) = match target.split_once('/') {
        Some((a, p)) => (a, format!("/{p}")),
        None => (target, "/config".to_string()),
    };
    let fail = |why: String| format!("http://{target}: {why}");
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("no address".to_string()))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, FETCH_TIMEOUT).map_err(|e| fail(e.to_string()))?;
    stream
        .set_read_timeout(Some(FETCH_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(FETCH_TIMEOUT)))
        .map_err(|e| fail(e.to_string()))?;
    // Host: localhost, since the admin server refuses /config to other DNS names.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| fail(e.to_string()))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_CONFIG_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| fail(e.to_string()))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fail("not an HTTP response".to_string()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(fail(format!("answered {status}")));
    }
    serde_json::from_slice(&raw[split + 4..]).map_err(|e| fail(format!("not a /config: {e}")))
}

/// What a reload from `old` to `new` would do.
#[derive(Debug, Serialize)]
pub struct Report {
    pub old: String,
    pub new: String,
    pub changes: Vec<Change>,
    /// Why a side could not be read; with any, the reload would be rejected
    /// (or there is nothing to compare against).
    pub errors: Vec<String>,
}

/// One listener, HTTP route or cluster that a reload adds, removes or changes.
#[derive(Debug, Serialize)]
pub struct Change {
    pub object: Object,
    /// `listener/route` for a route.
    pub name: String,
    pub change: Kind,
    /// What changes, one line each (`field: old -> new`).
    pub details: Vec<String>,
    /// What happens to the connections that are open when the reload lands.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub connections: Vec<Connections>,
}

impl Change {
    fn new(object: Object, name: impl Into<String>, change: Kind, details: Vec<String>) -> Change {
        Change {
            object,
            name: name.into(),
            change,
            details,
            connections: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Object {
    Listener,
    Route,
    Cluster,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Added,
    Removed,
    Changed,
}

/// The open connections on one cluster (or one endpoint of it) and their fate.
#[derive(Debug, Serialize)]
pub struct Connections {
    pub cluster: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub fate: Fate,
    /// The `drain_on_change` grace that bounds the fate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace: Option<String>,
    /// Open on that cluster when OLD was read (a running legate only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_now: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// They keep their route until they end (no `drain_on_change`).
    Stay,
    /// Closed after the grace; the app reconnects to the new target.
    Drain,
    /// Closed at once (Kafka without a grace: a client must not mix clusters).
    Close,
    /// Postgres: each session closes at its next transaction boundary, at the
    /// latest after the grace.
    TransactionBoundary,
    /// As `TransactionBoundary`, and new sessions wait until the old ones are
    /// gone (`cutover: fenced`).
    Fenced,
}

impl Report {
    /// Compares the two sides; a side that cannot be read is an error.
    pub fn of(old: &Source, new: &Source) -> Report {
        let mut report = Report {
            old: old.to_string(),
            new: new.to_string(),
            changes: Vec::new(),
            errors: Vec::new(),
        };
        let (o, n) = (old.load(), new.load());
        match (o, n) {
            (Ok(o), Ok(n)) => report.changes = compare(&o, &n),
            (o, n) => {
                if let Err(e) = o {
                    report.errors.push(format!("{old} (OLD): {e}"));
                }
                if let Err(e) = n {
                    report.errors.push(format!(
                        "{new} (NEW): {e}\n(a reload to it would be rejected; the running table would stay)"
                    ));
                }
            }
        }
        report
    }

    /// As `diff(1)`: 0 when nothing changes, 1 on errors, 2 when there are changes.
    pub fn exit_code(&self) -> u8 {
        if !self.errors.is_empty() {
            1
        } else if self.changes.is_empty() {
            0
        } else {
            2
        }
    }

    /// For people: one block per change, `+` added, `-` removed, `~` changed.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for e in &self.errors {
            out.push_str(&format!("error: {e}\n"));
        }
        for c in &self.changes {
            let sign = match c.change {
                Kind::Added => '+',
                Kind::Removed => '-',
                Kind::Changed => '~',
            };
            let object = match c.object {
                Object::Listener => "listener",
                Object::Route => "route",
                Object::Cluster => "cluster",
            };
            out.push_str(&format!("{sign} {object} {}\n", c.name));
            for d in &c.details {
                out.push_str(&format!("    {d}\n"));
            }
            for conn in &c.connections {
                out.push_str(&format!("    => {}\n", conn.sentence()));
            }
        }
        if self.errors.is_empty() {
            match self.changes.len() {
                0 => out.push_str(&format!(
                    "no changes: {} and {} describe the same table\n",
                    self.old, self.new
                )),
                n => out.push_str(&format!(
                    "{n} change{}: a reload from {} to {} would apply {}\n",
                    if n == 1 { "" } else { "s" },
                    self.old,
                    self.new,
                    if n == 1 { "it" } else { "them" }
                )),
            }
        }
        out
    }
}

impl Connections {
    fn sentence(&self) -> String {
        let grace = self.grace.as_deref().unwrap_or("0s");
        let whose = match &self.endpoint {
            Some(e) => format!("connections to {e} (cluster {})", self.cluster),
            None => format!("connections on {}", self.cluster),
        };
        let open = self
            .open_now
            .map(|n| format!(" ({n} open now)"))
            .unwrap_or_default();
        match self.fate {
            Fate::Stay => format!(
                "open {whose}{open} stay until they end (no drain_on_change on {})",
                self.cluster
            ),
            Fate::Drain => format!(
                "open {whose}{open} close after {grace}; the app reconnects to the new target"
            ),
            Fate::Close => format!(
                "open {whose}{open} close at once (a Kafka client must not mix two clusters)"
            ),
            Fate::TransactionBoundary => format!(
                "open sessions on {}{open} close at their next transaction boundary, at the latest after {grace}",
                self.cluster
            ),
            Fate::Fenced => format!(
                "open sessions on {}{open} close at their next transaction boundary, at the latest after {grace}; new sessions wait until they are gone (cutover: fenced)",
                self.cluster
            ),
        }
    }
}

/// Keys of `/config` that are state, not configuration.
const STATE: &[&str] = &["bound", "resolved", "dns", "reload", "generation"];

fn compare(old: &Value, new: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    let (old_listeners, new_listeners) = (named(old, "listeners"), named(new, "listeners"));
    for (name, n) in &new_listeners {
        match find(&old_listeners, name) {
            None => changes.push(Change::new(
                Object::Listener,
                name.clone(),
                Kind::Added,
                vec![format!(
                    "binds {} ({}), sends to {}",
                    text(&n["listen"]),
                    text(&n["protocol"]),
                    target_text(n)
                )],
            )),
            Some(o) => changes.extend(listener_changes(name, o, n, old)),
        }
    }
    for (name, o) in &old_listeners {
        if find(&new_listeners, name).is_none() {
            changes.push(Change::new(
                Object::Listener,
                name.clone(),
                Kind::Removed,
                vec![format!(
                    "stops accepting on {}; its open connections finish on their own",
                    text(&o["listen"])
                )],
            ));
        }
    }

    let (old_clusters, new_clusters) = (named(old, "clusters"), named(new, "clusters"));
    for (name, n) in &new_clusters {
        match find(&old_clusters, name) {
            None => changes.push(Change::new(
                Object::Cluster,
                name.clone(),
                Kind::Added,
                vec![format!("endpoints {}", endpoints(n).join(", "))],
            )),
            Some(o) => changes.extend(cluster_change(name, o, n)),
        }
    }
    for (name, _) in &old_clusters {
        if find(&new_clusters, name).is_none() {
            changes.push(Change::new(
                Object::Cluster,
                name.clone(),
                Kind::Removed,
                vec![
                    "stops resolving and health-checking at once; connections still on it are \
                     covered by their listener's entry"
                        .to_string(),
                ],
            ));
        }
    }
    changes
}

fn listener_changes(name: &str, o: &Value, n: &Value, old_table: &Value) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut details = Vec::new();
    let mut connections = Vec::new();
    let (op, np) = (text(&o["protocol"]), text(&n["protocol"]));
    if o["listen"] != n["listen"] {
        details.push(format!(
            "moves: {} -> {} (the new address is bound, the old one stops accepting; open \
             connections stay)",
            text(&o["listen"]),
            text(&n["listen"])
        ));
    }
    if op != np {
        details.push(format!(
            "protocol: {op} -> {np} (for new connections; open ones keep {op})"
        ));
    }
    details.extend(field_changes(
        o,
        n,
        &[
            "name", "listen", "protocol", "cluster", "split", "routes", "bound",
        ],
    ));

    // TCP-kind listeners (tcp, postgres, kafka) pin each connection to its
    // route; an HTTP listener routes request by request.
    let (old_tcp, new_tcp) = (op != "http", np != "http");
    if new_tcp && (!old_tcp || targets(o) != targets(n)) {
        details.push(format!(
            "target: {} -> {} (new connections)",
            if old_tcp {
                target_text(o)
            } else {
                "HTTP routes".to_string()
            },
            target_text(n)
        ));
    }
    if old_tcp {
        let staying = if new_tcp { targets(n) } else { Vec::new() };
        for (cluster, _) in targets(o) {
            if !staying.iter().any(|(c, _)| *c == cluster) {
                connections.push(leaving(&op, &cluster, old_table));
            }
        }
    }

    if !details.is_empty() || !connections.is_empty() {
        let mut change = Change::new(Object::Listener, name, Kind::Changed, details);
        change.connections = connections;
        changes.push(change);
    }
    if op == "http" && np == "http" {
        changes.extend(route_changes(name, o, n));
    }
    changes
}

/// The fate of a TCP-kind listener's connections on `cluster`, which the
/// reload no longer sends that listener to (as `table::carry_over` decides it).
fn leaving(protocol: &str, cluster: &str, old_table: &Value) -> Connections {
    let old_cluster = find(&named(old_table, "clusters"), cluster).unwrap_or(&Value::Null);
    let grace = old_cluster["drain_on_change"].as_str().map(str::to_string);
    let fenced = old_cluster["cutover"] == "fenced";
    let fate = match (protocol, &grace) {
        ("kafka", None) => Fate::Close,
        ("kafka", Some(_)) => Fate::Drain,
        (_, None) => Fate::Stay,
        ("postgres", Some(_)) if fenced => Fate::Fenced,
        ("postgres", Some(_)) => Fate::TransactionBoundary,
        (_, Some(_)) => Fate::Drain,
    };
    Connections {
        cluster: cluster.to_string(),
        endpoint: None,
        fate,
        grace,
        open_now: open_now(old_cluster, None),
    }
}

/// Connections open on a cluster (or one of its endpoints' addresses) per a
/// live `/config`; `None` for a directory, which has no such state.
fn open_now(cluster: &Value, address: Option<&str>) -> Option<u64> {
    let resolved = cluster["resolved"].as_array()?;
    Some(
        resolved
            .iter()
            .filter(|r| address.is_none_or(|a| r["address"] == a))
            .filter_map(|r| r["active_connections"].as_u64())
            .sum(),
    )
    .filter(|_| !resolved.is_empty())
}

fn route_changes(listener: &str, o: &Value, n: &Value) -> Vec<Change> {
    let (old_routes, new_routes) = (named(o, "routes"), named(n, "routes"));
    let mut changes = Vec::new();
    let full = |route: &str| format!("{listener}/{route}");
    for (i, (name, r)) in new_routes.iter().enumerate() {
        let Some(old) = find(&old_routes, name) else {
            let added = format!(
                "position {}, match {}, sends to {}",
                i + 1,
                r["match"],
                target_text(r)
            );
            changes.push(Change::new(
                Object::Route,
                full(name),
                Kind::Added,
                vec![added],
            ));
            continue;
        };
        let mut details = Vec::new();
        if targets(old) != targets(r) {
            details.push(format!(
                "target: {} -> {} (from the next request; HTTP has nothing to drain)",
                target_text(old),
                target_text(r)
            ));
        }
        let old_pos = old_routes.iter().position(|(n, _)| n == name);
        if old_pos != Some(i) {
            details.push(format!(
                "position: {} -> {} (first match wins)",
                old_pos.map_or(0, |p| p + 1),
                i + 1
            ));
        }
        details.extend(field_changes(old, r, &["name", "cluster", "split"]));
        if !details.is_empty() {
            changes.push(Change::new(
                Object::Route,
                full(name),
                Kind::Changed,
                details,
            ));
        }
    }
    for (name, _) in &old_routes {
        if find(&new_routes, name).is_none() {
            let why = "its requests fall through to the next matching route".to_string();
            changes.push(Change::new(
                Object::Route,
                full(name),
                Kind::Removed,
                vec![why],
            ));
        }
    }
    changes
}

fn cluster_change(name: &str, o: &Value, n: &Value) -> Option<Change> {
    let mut details = Vec::new();
    let mut connections = Vec::new();
    let (old_eps, new_eps) = (endpoints(o), endpoints(n));
    let added: Vec<&str> = new_eps
        .iter()
        .filter(|e| !old_eps.contains(e))
        .map(String::as_str)
        .collect();
    if !added.is_empty() {
        details.push(format!(
            "endpoints added: {} (takes new connections; closes nothing)",
            added.join(", ")
        ));
    }
    let grace = o["drain_on_change"].as_str().map(str::to_string);
    for gone in old_eps.iter().filter(|e| !new_eps.contains(e)) {
        details.push(format!("endpoint removed: {gone}"));
        let address = items(&o["endpoints"])
            .find(|e| e["endpoint"] == gone.as_str())
            .and_then(|e| e["address"].as_str());
        connections.push(Connections {
            cluster: name.to_string(),
            endpoint: Some(gone.clone()),
            fate: if grace.is_some() {
                Fate::Drain
            } else {
                Fate::Stay
            },
            grace: grace.clone(),
            open_now: address.and_then(|a| open_now(o, Some(a))),
        });
    }
    if o["tls"] != n["tls"] {
        let settings = field_changes(&o["tls"], &n["tls"], &["fingerprint"]);
        details.push(match (o["tls"].is_null(), n["tls"].is_null()) {
            (true, _) => "tls: added (new connections originate TLS)".to_string(),
            (_, true) => "tls: removed (new connections are plaintext)".to_string(),
            // Only the fingerprint: files or settings /config does not name.
            _ if settings.is_empty() => "tls: a CA, certificate or key file (its content or \
                 path) or another TLS setting changed (new connections use it; open ones keep \
                 their session)"
                .to_string(),
            _ => format!("tls: {} (new connections)", settings.join("; ")),
        });
    }
    details.extend(field_changes(o, n, &["name", "endpoints", "tls"]));
    (!details.is_empty()).then(|| {
        let mut change = Change::new(Object::Cluster, name, Kind::Changed, details);
        change.connections = connections;
        change
    })
}

/// `key: old -> new` for every key (other than `skip` and state) that differs.
fn field_changes(o: &Value, n: &Value, skip: &[&str]) -> Vec<String> {
    let empty = serde_json::Map::new();
    let (om, nm) = (
        o.as_object().unwrap_or(&empty),
        n.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = om.keys().chain(nm.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&Value>| match v.map(text) {
        Some(t) if !t.is_empty() => t,
        _ => "(none)".to_string(),
    };
    keys.into_iter()
        .filter(|k| !skip.contains(&k.as_str()) && !STATE.contains(&k.as_str()))
        .filter(|k| om.get(*k) != nm.get(*k))
        .map(|k| format!("{k}: {} -> {}", show(om.get(k)), show(nm.get(k))))
        .collect()
}

/// The `(name, object)` pairs of an array of named objects, in order.
fn named<'a>(v: &'a Value, key: &str) -> Vec<(String, &'a Value)> {
    items(&v[key]).map(|x| (text(&x["name"]), x)).collect()
}

fn find<'a>(list: &[(String, &'a Value)], name: &str) -> Option<&'a Value> {
    list.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

fn target_text(v: &Value) -> String {
    if let Some(c) = v["cluster"].as_str() {
        return c.to_string();
    }
    let parts: Vec<String> = targets(v)
        .into_iter()
        .map(|(c, w)| format!("{c}={w}"))
        .collect();
    format!("split [{}]", parts.join(", "))
}

fn endpoints(cluster: &Value) -> Vec<String> {
    items(&cluster["endpoints"])
        .map(|e| text(&e["endpoint"]))
        .collect()
}
