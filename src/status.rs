//! `GET /` on the admin port: what legate is doing, at a glance, as one
//! self-contained HTML page (inline CSS, no script, no external asset).
//!
//! It reads exactly what `/config` and `/metrics` serve (the table's
//! description with its reload status, and the gathered metric families), so
//! there is no second source of truth, and nothing is computed unless someone
//! loads it. Rates need two readings: each load keeps a snapshot of the
//! counters it read (at most [`MAX_SNAPSHOTS`], none older than
//! [`KEEP`]), so the next one shows rates since the previous load and HTTP
//! status classes over about the last minute. Auto-refresh is a `<meta>`
//! refresh (`?refresh=N`, `0` turns it off), which text browsers ignore.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::proto::MetricFamily;
use serde_json::Value;

use crate::table::described::{items, targets, text};

/// Snapshots older than this are dropped: the page's window is a minute.
const KEEP: Duration = Duration::from_secs(75);
/// Bound on snapshots kept, however often the page is loaded.
const MAX_SNAPSHOTS: usize = 128;
/// The window the HTTP status classes are shown for.
const WINDOW: Duration = Duration::from_secs(60);
/// A shorter window than this says too little: totals since start instead.
const MIN_WINDOW: Duration = Duration::from_secs(10);

/// Default and bounds of `?refresh=` (seconds; 0 turns auto-refresh off).
pub const DEFAULT_REFRESH: u32 = 5;
const MAX_REFRESH: u32 = 3600;

/// The counters of earlier loads of the page.
#[derive(Default)]
pub struct History {
    snapshots: Mutex<VecDeque<(Instant, Counters)>>,
}

/// The counters the page turns into rates.
#[derive(Clone, Default)]
struct Counters {
    /// Per listener: connections accepted, bytes both ways, HTTP requests.
    listeners: HashMap<String, [f64; 3]>,
    /// Per (listener, route): requests by status class 1xx..5xx.
    routes: HashMap<(String, String), [f64; 5]>,
}

impl History {
    /// Keeps `now` and returns the previous snapshot and the newest one at
    /// least [`WINDOW`] old (or, when none is, the oldest one at least
    /// [`MIN_WINDOW`] old), with their ages.
    fn record(&self, now: Instant, counters: &Counters) -> [Option<(Duration, Counters)>; 2] {
        let Ok(mut snapshots) = self.snapshots.lock() else {
            return [None, None];
        };
        while snapshots
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > KEEP)
            || snapshots.len() >= MAX_SNAPSHOTS
        {
            snapshots.pop_front();
        }
        let age = |(at, c): &(Instant, Counters)| (now.duration_since(*at), c.clone());
        let previous = snapshots.back().map(age);
        let window = snapshots
            .iter()
            .rev()
            .find(|(at, _)| now.duration_since(*at) >= WINDOW)
            .or(snapshots.front())
            .map(age)
            .filter(|(age, _)| *age >= MIN_WINDOW);
        snapshots.push_back((now, counters.clone()));
        [previous, window]
    }
}

/// `?refresh=N` of a request's query, bounded; the default without one.
pub fn refresh_of(query: Option<&str>) -> u32 {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("refresh="))
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(DEFAULT_REFRESH, |v| v.min(MAX_REFRESH))
}

/// What one page shows.
pub struct Page<'a> {
    /// `/config`'s answer: the table's description and `reload`.
    pub config: &'a Value,
    /// `/metrics`' families.
    pub metrics: &'a [MetricFamily],
    pub uptime: Duration,
    pub refresh: u32,
}

impl Page<'_> {
    pub fn render(&self, history: &History) -> String {
        let m = Metrics(self.metrics);
        let counters = m.counters();
        let [previous, minute] = history.record(Instant::now(), &counters);
        let mut out = String::with_capacity(16 * 1024);
        self.head(&mut out);
        self.header(&mut out, &m);
        self.listeners(&mut out, &m, &counters, previous.as_ref());
        self.routes(&mut out, &counters, minute.as_ref());
        self.protocols(&mut out, &m);
        self.clusters(&mut out, &m);
        out.push_str("</body>\n</html>\n");
        out
    }

    fn head(&self, out: &mut String) {
        out.push_str(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>legate status</title>\n",
        );
        if self.refresh > 0 {
            let _ = writeln!(
                out,
                "<meta http-equiv=\"refresh\" content=\"{}\">",
                self.refresh
            );
        }
        out.push_str(STYLE);
        out.push_str("</head>\n<body>\n");
    }

    fn header(&self, out: &mut String, m: &Metrics<'_>) {
        let reload = &self.config["reload"];
        let _ = writeln!(
            out,
            "<h1>legate {}</h1>\n<p id=\"summary\">up {} &middot; config generation <b>{}</b> &middot; \
             {} MB resident &middot; {} open fds</p>",
            env!("CARGO_PKG_VERSION"),
            esc(&short_duration(self.uptime)),
            esc(&text(&reload["generation"])),
            format_args!("{:.1}", m.sum("process_resident_memory_bytes", &[]) / 1e6),
            m.sum("process_open_fds", &[]),
        );
        let success = reload["last_success"].as_str();
        let error_at = reload["last_error"]["at"].as_str();
        let (ok, error) = (
            m.sum("legate_config_reloads_total", &[("result", "success")]),
            m.sum("legate_config_reloads_total", &[("result", "error")]),
        );
        let _ = write!(
            out,
            "<p id=\"reload\">last reload: {} &middot; reloads: {ok} applied, {error} rejected",
            match (success, error_at) {
                (_, Some(e)) if success.is_none_or(|s| e >= s) =>
                    format!("<span class=\"bad\">REJECTED</span> at {}", esc(e)),
                (Some(s), _) if ok == 0.0 => format!("none; config loaded at {}", esc(s)),
                (Some(s), _) => format!("<span class=\"good\">applied</span> at {}", esc(s)),
                _ => "none since start".to_string(),
            }
        );
        out.push_str("</p>\n");
        if let Some(message) = reload["last_error"]["message"].as_str() {
            let _ = writeln!(
                out,
                "<div class=\"error\" id=\"reload-error\"><b>Last rejected config</b> ({}); the \
                 table in use was kept:<br>\n<code>{}</code></div>",
                esc(error_at.unwrap_or("")),
                // Lines as breaks, not <pre>: a terminal browser wraps them.
                esc(message).replace('\n', "<br>\n")
            );
        }
        let _ = writeln!(
            out,
            "<p class=\"small\">{} &middot; <a href=\"/config\">/config</a> &middot; \
             <a href=\"/metrics\">/metrics</a></p>",
            if self.refresh > 0 {
                format!(
                    "refreshes every {} s (<a href=\"?refresh=0\">stop</a>)",
                    self.refresh
                )
            } else {
                format!(
                    "auto-refresh off (<a href=\"?refresh={DEFAULT_REFRESH}\">every {DEFAULT_REFRESH} s</a>)"
                )
            }
        );
    }

    fn listeners(
        &self,
        out: &mut String,
        m: &Metrics<'_>,
        now: &Counters,
        previous: Option<&(Duration, Counters)>,
    ) {
        out.push_str(
            "<h2>Listeners</h2>\n<table id=\"listeners\">\n<tr><th>listener</th><th>address</th>\
             <th>protocol</th><th>sends to</th><th>active</th><th>total</th><th>rate</th></tr>\n",
        );
        for l in items(&self.config["listeners"]) {
            let name = text(&l["name"]);
            let protocol = text(&l["protocol"]);
            let target = if protocol == "http" && l.get("routes").is_some() {
                let routes = items(&l["routes"]).count();
                format!("{routes} route{}", if routes == 1 { "" } else { "s" })
            } else {
                target(l)
            };
            let [conns, bytes, requests] = now.listeners.get(&name).copied().unwrap_or_default();
            let rate = match previous {
                Some((age, before)) if !age.is_zero() => {
                    let [c0, b0, r0] = before.listeners.get(&name).copied().unwrap_or_default();
                    let per_s = |now: f64, then: f64| (now - then).max(0.0) / age.as_secs_f64();
                    if protocol == "http" {
                        format!(
                            "{:.1} req/s, {:.1} conn/s",
                            per_s(requests, r0),
                            per_s(conns, c0)
                        )
                    } else {
                        format!(
                            "{:.1} conn/s, {}/s",
                            per_s(conns, c0),
                            bytes_text(per_s(bytes, b0))
                        )
                    }
                }
                _ => "(next refresh)".to_string(),
            };
            let address = l["bound"]
                .as_str()
                .unwrap_or_else(|| l["listen"].as_str().unwrap_or(""));
            let _ = writeln!(
                out,
                "<tr id=\"listener-{id}\"><td>{name}</td><td>{address}</td><td>{protocol}</td>\
                 <td>{target}</td><td class=\"num\">{active}</td><td class=\"num\">{conns}</td>\
                 <td>{rate}</td></tr>",
                id = esc(&name),
                name = esc(&name),
                address = esc(address),
                protocol = esc(&protocol),
                target = esc(&target),
                active = m.sum("legate_listener_connections_active", &[("listener", &name)]),
            );
        }
        out.push_str("</table>\n");
    }

    fn routes(&self, out: &mut String, now: &Counters, minute: Option<&(Duration, Counters)>) {
        let http: Vec<&Value> = items(&self.config["listeners"])
            .filter(|l| l["protocol"] == "http")
            .collect();
        if http.is_empty() {
            return;
        }
        // A process younger than the window: its totals are the last minute exactly.
        let minute = minute.filter(|_| self.uptime > WINDOW);
        let window = match minute {
            Some((age, _)) if *age >= WINDOW => "last minute".to_string(),
            Some((age, _)) => format!("last {}", short_duration(*age)),
            None => format!("{} since start", short_duration(self.uptime)),
        };
        let _ = writeln!(
            out,
            "<h2>HTTP routes</h2>\n<p class=\"small\">first match wins; responses by status class \
             over the {window}</p>"
        );
        for l in http {
            let listener = text(&l["name"]);
            let _ = writeln!(
                out,
                "<h3>{}</h3>\n<table class=\"routes\" id=\"routes-{}\">\n<tr><th>route</th>\
                 <th>match</th><th>sends to</th><th>timeout</th><th>2xx</th><th>3xx</th>\
                 <th>4xx</th><th>5xx</th></tr>",
                esc(&listener),
                esc(&listener)
            );
            let mut names: Vec<String> = items(&l["routes"]).map(|r| text(&r["name"])).collect();
            names.push("none".to_string());
            for (i, route) in names.iter().enumerate() {
                let key = (listener.clone(), route.clone());
                let counts = now.routes.get(&key).copied().unwrap_or_default();
                let before = minute
                    .and_then(|(_, c)| c.routes.get(&key).copied())
                    .unwrap_or_default();
                let delta: Vec<f64> = (0..5).map(|k| (counts[k] - before[k]).max(0.0)).collect();
                let (matches, target, timeout) = match items(&l["routes"]).nth(i) {
                    Some(r) => (match_text(&r["match"]), target(r), text(&r["timeout"])),
                    // Requests no route matched: answered 404 by legate.
                    None if delta.iter().any(|d| *d > 0.0) => (
                        "(no route matched)".to_string(),
                        "404".to_string(),
                        String::new(),
                    ),
                    None => continue,
                };
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
                    esc(route),
                    esc(&matches),
                    esc(&target),
                    esc(&timeout)
                );
                for (k, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                    let n = delta[k + 1];
                    let mark = if *class == "5xx" && n > 0.0 {
                        " bad"
                    } else {
                        ""
                    };
                    let _ = write!(out, "<td class=\"num{mark}\">{n}</td>");
                }
                out.push_str("</tr>\n");
            }
            out.push_str("</table>\n");
        }
    }

    /// Postgres and Kafka listeners' own counters.
    fn protocols(&self, out: &mut String, m: &Metrics<'_>) {
        let mut rows = String::new();
        for l in items(&self.config["listeners"]) {
            let name = text(&l["name"]);
            let (families, label): (&[(&str, &str)], &str) = match l["protocol"].as_str() {
                Some("postgres") => (
                    &[
                        ("legate_postgres_sessions_closed_total", "how"),
                        ("legate_postgres_cancels_total", "result"),
                        ("legate_postgres_held_sessions_total", ""),
                    ],
                    "postgres",
                ),
                Some("kafka") => (&[("legate_kafka_requests_total", "api")], "kafka"),
                _ => continue,
            };
            let mut parts = Vec::new();
            for (family, by) in families {
                let short = family
                    .trim_start_matches("legate_postgres_")
                    .trim_start_matches("legate_kafka_")
                    .trim_end_matches("_total");
                let values = m.by(family, &[("listener", &name)], by);
                if by.is_empty() {
                    let n: f64 = values.iter().map(|(_, v)| v).sum();
                    parts.push(format!("{short}: {n}"));
                } else if !values.is_empty() {
                    let each: Vec<String> =
                        values.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    parts.push(format!("{short}: {}", each.join(", ")));
                }
            }
            if let Some(ports) = l["broker_ports"].as_str() {
                parts.push(format!("broker ports {ports}"));
            }
            let _ = writeln!(
                rows,
                "<tr><td>{}</td><td>{label}</td><td>{}</td></tr>",
                esc(&name),
                esc(&if parts.is_empty() {
                    "no traffic yet".to_string()
                } else {
                    parts.join("; ")
                })
            );
        }
        if !rows.is_empty() {
            let _ = write!(
                out,
                "<h2>PostgreSQL and Kafka</h2>\n<table id=\"protocols\">\n<tr><th>listener</th>\
                 <th>protocol</th><th>counters since start</th></tr>\n{rows}</table>\n"
            );
        }
    }

    fn clusters(&self, out: &mut String, m: &Metrics<'_>) {
        out.push_str("<h2>Clusters</h2>\n");
        for c in items(&self.config["clusters"]) {
            let name = text(&c["name"]);
            let _ = writeln!(out, "<h3 id=\"cluster-{0}\">{0}</h3>", esc(&name));
            let mut facts = vec![
                format!("lb {}", text(&c["lb"])),
                format!("connect timeout {}", text(&c["connect_timeout"])),
            ];
            let failover: Vec<String> = items(&c["failover"]).map(text).collect();
            if !failover.is_empty() {
                facts.push(format!("fails over to {}", failover.join(" \u{2192} ")));
            }
            if let Some(g) = c["drain_on_change"].as_str() {
                facts.push(format!("drain_on_change {g}"));
            }
            if c["cutover"] == "fenced" {
                facts.push("cutover fenced".to_string());
            }
            if c["http2"] == true {
                facts.push("h2c".to_string());
            }
            if let Some(tls) = c["tls"].as_object() {
                let sni = tls
                    .get("sni")
                    .and_then(Value::as_str)
                    .unwrap_or("endpoint name");
                let verify = if tls.get("verify") == Some(&Value::Bool(false)) {
                    ", NOT verified"
                } else {
                    ""
                };
                let mtls = if tls.contains_key("client_cert_expiry") {
                    ", mTLS"
                } else {
                    ""
                };
                facts.push(format!("TLS to {sni}{verify}{mtls}"));
            }
            if let Some(h) = c["health"].as_object() {
                let what = match h.get("http_path").and_then(Value::as_str) {
                    Some(p) => format!("GET {p}"),
                    None => text(&h["kind"]),
                };
                facts.push(format!("health {what} every {}", text(&h["interval"])));
            }
            let connects = m.by(
                "legate_upstream_connects_total",
                &[("cluster", &name)],
                "result",
            );
            if connects.iter().any(|(_, n)| *n > 0.0) {
                let each: Vec<String> = connects
                    .iter()
                    .filter(|(_, n)| *n > 0.0)
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                facts.push(format!("connects: {}", each.join(", ")));
            }
            let failovers = m.by(
                "legate_cluster_failovers_total",
                &[("cluster", &name)],
                "to",
            );
            for (to, n) in failovers.iter().filter(|(_, n)| *n > 0.0) {
                facts.push(format!("failed over to {to} {n} times"));
            }
            let _ = writeln!(
                out,
                "<p class=\"small\">{}</p>",
                esc(&facts.join(" \u{b7} "))
            );

            let _ = writeln!(
                out,
                "<table class=\"endpoints\" id=\"endpoints-{}\">\n<tr><th>endpoint</th>\
                 <th>state</th><th>active</th><th>last error</th></tr>",
                esc(&name)
            );
            let resolved: Vec<&Value> = items(&c["resolved"]).collect();
            if resolved.is_empty() {
                out.push_str("<tr><td colspan=\"4\">no address yet (waiting for DNS)</td></tr>\n");
            }
            for e in resolved {
                let address = text(&e["address"]);
                let (class, state) = if e["up"] == false {
                    ("down", "DOWN (health check)".to_string())
                } else if let Some(left) = e["ejected_for"].as_str() {
                    let until = e["ejected_until"].as_str().unwrap_or("");
                    (
                        "ejected",
                        format!("EJECTED for {left}, until {until} (failed connects)"),
                    )
                } else {
                    ("up", "UP".to_string())
                };
                let error = match e["last_error"].as_object() {
                    Some(err) => format!(
                        "{} ({})",
                        err.get("message").map(text).unwrap_or_default(),
                        err.get("at").map(text).unwrap_or_default()
                    ),
                    None => String::new(),
                };
                let _ = writeln!(
                    out,
                    "<tr id=\"endpoint-{}-{}\" class=\"{class}\"><td>{}</td><td class=\"state\">{state}</td>\
                     <td class=\"num\">{}</td><td>{}</td></tr>",
                    esc(&name),
                    esc(&address),
                    esc(&address),
                    text(&e["active_connections"]),
                    esc(&error)
                );
            }
            out.push_str("</table>\n");

            let dns: Vec<&Value> = items(&c["dns"]).collect();
            if !dns.is_empty() {
                out.push_str(
                    "<table class=\"dns\">\n<tr><th>DNS name</th><th>addresses</th><th>TTL</th>\
                     <th>resolved at</th><th>last error</th></tr>\n",
                );
                for d in dns {
                    let addresses: Vec<String> = items(&d["addresses"]).map(text).collect();
                    let _ = writeln!(
                        out,
                        "<tr><td>{}:{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                        esc(&text(&d["name"])),
                        text(&d["port"]),
                        esc(&addresses.join(", ")),
                        esc(&text(&d["ttl"])),
                        esc(&text(&d["resolved_at"])),
                        if d["error"].is_string() { "bad" } else { "" },
                        esc(&text(&d["error"]))
                    );
                }
                out.push_str("</table>\n");
            }
        }
    }
}

const STYLE: &str = "<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1em auto;max-width:80em;padding:0 1em;color:#222}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .3em;border-bottom:1px solid #ccc}
h3{font-size:1em;margin:.8em 0 .2em}
table{border-collapse:collapse;margin:.3em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right}
.small{font-size:.9em;color:#555}
tr.down td.state,.bad{background:#fdd;color:#a00;font-weight:bold}
tr.ejected td.state{background:#ffe6b3;color:#7a4b00;font-weight:bold}
tr.up td.state,.good{color:#060;font-weight:bold}
.error{border:2px solid #c00;background:#fee;color:#700;padding:.4em .8em;margin:.5em 0}
.error code{display:block;margin:.3em 0;overflow-wrap:anywhere}
</style>
";

/// The gathered families, read by name and labels.
struct Metrics<'a>(&'a [MetricFamily]);

impl Metrics<'_> {
    /// Every sample of `family` whose labels include `filter`: (labels, value).
    fn samples<'a>(
        &'a self,
        family: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (Vec<(&'a str, &'a str)>, f64)> + 'a {
        self.0
            .iter()
            .filter(move |f| f.name() == family)
            .flat_map(|f| f.get_metric())
            .map(|m| {
                let labels: Vec<(&str, &str)> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                // A family is one type: counters and gauges hold their value in
                // their own field, the other left at 0.
                (labels, m.get_counter().value() + m.get_gauge().value())
            })
            .filter(move |(labels, _)| filter.iter().all(|kv| labels.contains(kv)))
    }

    fn sum(&self, family: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples(family, filter).map(|(_, v)| v).sum()
    }

    /// Sums of `family` under `filter`, per value of the label `by`, in label order.
    fn by(&self, family: &str, filter: &[(&str, &str)], by: &str) -> Vec<(String, f64)> {
        let mut sums: Vec<(String, f64)> = Vec::new();
        for (labels, v) in self.samples(family, filter) {
            let key = labels
                .iter()
                .find(|(k, _)| *k == by)
                .map_or("", |(_, v)| *v)
                .to_string();
            match sums.iter_mut().find(|(k, _)| *k == key) {
                Some((_, sum)) => *sum += v,
                None => sums.push((key, v)),
            }
        }
        sums.sort_by(|a, b| a.0.cmp(&b.0));
        sums
    }

    fn counters(&self) -> Counters {
        let mut c = Counters::default();
        for (labels, v) in self.samples("legate_listener_connections_total", &[]) {
            c.listeners.entry(label(&labels, "listener")).or_default()[0] += v;
        }
        for (labels, v) in self.samples("legate_bytes_total", &[]) {
            c.listeners.entry(label(&labels, "listener")).or_default()[1] += v;
        }
        for (labels, v) in self.samples("legate_http_requests_total", &[]) {
            let listener = label(&labels, "listener");
            c.listeners.entry(listener.clone()).or_default()[2] += v;
            let class = label(&labels, "code")
                .bytes()
                .next()
                .and_then(|b| (b'1'..=b'5').contains(&b).then(|| usize::from(b - b'1')));
            if let Some(class) = class {
                c.routes
                    .entry((listener, label(&labels, "route")))
                    .or_default()[class] += v;
            }
        }
        c
    }
}

fn label(labels: &[(&str, &str)], key: &str) -> String {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map_or(String::new(), |(_, v)| v.to_string())
}

/// Where a listener or route sends: a cluster, or a split with weights.
fn target(v: &Value) -> String {
    if let Some(c) = v["cluster"].as_str() {
        return c.to_string();
    }
    let parts: Vec<String> = targets(v)
        .into_iter()
        .map(|(cluster, weight)| format!("{cluster} {weight}"))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("split: {}", parts.join(" / "))
    }
}

fn match_text(m: &Value) -> String {
    let parts: Vec<String> = m
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", text(v)))
        .collect();
    if parts.is_empty() {
        "(any)".to_string()
    } else {
        parts.join(" ")
    }
}

fn bytes_text(per_s: f64) -> String {
    match per_s {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

/// `3d 4h`, `2h 5m`, `4m 10s`, `12s`: two units are enough at a glance.
fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// Escapes text for HTML element content and quoted attributes.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_bounded_and_can_be_turned_off() {
        assert_eq!(refresh_of(None), DEFAULT_REFRESH);
        assert_eq!(refresh_of(Some("refresh=0")), 0);
        assert_eq!(refresh_of(Some("a=1&refresh=30")), 30);
        assert_eq!(refresh_of(Some("refresh=99999999")), MAX_REFRESH);
        assert_eq!(refresh_of(Some("refresh=-1")), DEFAULT_REFRESH);
    }

    /// Every section from a hand-made `/config` and real metric families:
    /// an ejected endpoint, a DNS answer that failed, Postgres and Kafka
    /// counters, and names escaped.
    #[test]
    fn renders_every_section() {
        let registry = prometheus::Registry::new();
        let counter = |name: &str, labels: &[&str]| {
            let c = prometheus::IntCounterVec::new(prometheus::Opts::new(name, "h"), labels)
                .expect("counter");
            registry.register(Box::new(c.clone())).expect("register");
            c
        };
        counter(
            "legate_postgres_sessions_closed_total",
            &["listener", "how"],
        )
        .with_label_values(&["pg", "idle"])
        .inc_by(3);
        counter("legate_kafka_requests_total", &["listener", "api"])
            .with_label_values(&["kafka", "Metadata"])
            .inc_by(7);
        counter(
            "legate_http_requests_total",
            &["listener", "route", "cluster", "code"],
        )
        .with_label_values(&["web", "r<1>", "c", "5xx"])
        .inc_by(2);
        let config = serde_json::json!({
            "listeners": [
                { "name": "pg", "listen": "127.0.0.1:5432", "protocol": "postgres", "cluster": "db" },
                { "name": "kafka", "listen": "127.0.0.1:9092", "protocol": "kafka", "broker_ports": "19100-19163", "cluster": "k" },
                { "name": "web", "listen": "127.0.0.1:8080", "protocol": "http",
                  "routes": [ { "name": "r<1>", "match": { "path_prefix": "/a" }, "split": [ { "cluster": "c", "weight": 90 }, { "cluster": "d", "weight": 10 } ], "timeout": "5s" } ] }
            ],
            "clusters": [ {
                "name": "db", "lb": "round_robin", "connect_timeout": "2s",
                "tls": { "verify": false, "sni": "db.internal", "fingerprint": "00" },
                "resolved": [ { "address": "10.0.0.1:5432", "up": true, "active_connections": 2,
                                "ejected_for": "4s", "ejected_until": "2026-11-26T08:50:04Z",
                                "last_error": { "message": "connect: refused", "at": "2026-11-26T08:50:00Z" } } ],
                "dns": [ { "name": "db.internal.", "port": 5432, "addresses": ["10.0.0.1"], "ttl": "30s",
                           "resolved_at": "2026-11-26T08:49:00Z", "error": "timed out" } ]
            } ],
            "reload": { "generation": 3, "last_success": "2026-11-26T08:00:00Z", "last_error": null }
        });
        let page = Page {
            config: &config,
            metrics: &registry.gather(),
            uptime: Duration::from_secs(3 * 3600 + 120),
            refresh: 0,
        };
        let html = page.render(&History::default());
        for wanted in [
            "up 3h 2m",
            "EJECTED for 4s, until 2026-11-26T08:50:04Z",
            "connect: refused",
            "<td>db.internal.:5432</td><td>10.0.0.1</td><td>30s</td>",
            "class=\"bad\">timed out",
            "sessions_closed: idle 3",
            "requests: Metadata 7",
            "broker ports 19100-19163",
            "TLS to db.internal, NOT verified",
            "split: c 90 / d 10",
            "r&lt;1&gt;",
            "<td class=\"num bad\">2</td>",
        ] {
            assert!(html.contains(wanted), "{wanted} in:\n{html}");
        }
        assert!(!html.contains("r<1>"), "names are escaped");
        assert!(
            !html.contains("reload-error"),
            "no rejected config, no red box"
        );
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn history_gives_the_previous_load_and_a_minute_window() {
        let h = History::default();
        let t0 = Instant::now();
        assert!(
            h.record(t0, &Counters::default())
                .iter()
                .all(Option::is_none)
        );
        let [prev, minute] = h.record(t0 + Duration::from_secs(5), &Counters::default());
        assert_eq!(prev.map(|p| p.0), Some(Duration::from_secs(5)));
        assert_eq!(minute.map(|p| p.0), None, "5 s says too little");
        let [_, minute] = h.record(t0 + Duration::from_secs(10), &Counters::default());
        assert_eq!(minute.map(|p| p.0), Some(Duration::from_secs(10)));
        for s in (15..=70).step_by(5) {
            h.record(t0 + Duration::from_secs(s), &Counters::default());
        }
        let [prev, minute] = h.record(t0 + Duration::from_secs(75), &Counters::default());
        assert_eq!(prev.map(|p| p.0), Some(Duration::from_secs(5)));
        assert_eq!(minute.map(|p| p.0), Some(Duration::from_secs(60)));
        // Old snapshots are dropped, and the count is bounded.
        let later = t0 + Duration::from_secs(1000);
        let [prev, _] = h.record(later, &Counters::default());
        assert_eq!(prev.map(|p| p.0), None);
        for i in 0..1000 {
            h.record(later + Duration::from_millis(i), &Counters::default());
        }
        assert!(h.snapshots.lock().map(|s| s.len()).unwrap_or(0) <= MAX_SNAPSHOTS);
    }
}
