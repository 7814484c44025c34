//! The status page (`GET /` on the admin port): loaded in headless Chromium
//! with a few listeners and clusters, one endpoint down and one rejected
//! reload; and its plain-HTTP contract (refresh, rates, Host check).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use support::backends::Backend;
use support::http::{HttpBackend, curl};
use support::{DEADLINE, Legate, wait_until};

/// A loopback port with nothing listening on it.
fn dead_port() -> SocketAddr {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr")
}

fn config(up: SocketAddr, dead: SocketAddr, web: SocketAddr) -> String {
    format!(
        r#"
listeners:
  - {{ name: orders-db, listen: 127.0.0.1:0, cluster: db }}
  - name: api
    listen: 127.0.0.1:0
    protocol: http
    routes:
      - {{ name: v1, match: {{ path_prefix: /v1/ }}, cluster: web }}
      - {{ name: rest, cluster: web }}
clusters:
  - name: db
    endpoints: [ "{up}", "{dead}" ]
    failover: [ db-dr ]
    health: {{ interval: 100ms, timeout: 100ms, unhealthy: 1, healthy: 1 }}
  - {{ name: db-dr, endpoints: [ "{up}" ] }}
  - {{ name: web, endpoints: [ "{web}" ] }}
"#
    )
}

/// The `<tr>` whose id is `id`, up to its end.
fn row<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no row {id} in:\n{html}"));
    let row = &html[start..];
    &row[..row.find("</tr>").unwrap_or(row.len())]
}

/// The Chromium binary Debian installs (`chromium`), or another on PATH.
fn chromium() -> &'static str {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name;
        }
    }
    panic!("no chromium on PATH (`bash .ci/run` installs Debian's chromium package)");
}

/// Runs headless Chromium on `url` with `args`; returns its stdout.
fn headless(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new("timeout")
        .arg(DEADLINE.as_secs().max(60).to_string())
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts legate on the test config, puts traffic through both listeners,
/// waits until the dead endpoint is marked down and a reload was rejected.
/// Returns legate, the live TCP connection and the dead endpoint.
fn scene() -> (Legate, TcpStream, SocketAddr, Backend, HttpBackend) {
    let up = Backend::echo();
    let web = HttpBackend::start("web");
    let dead = dead_port();
    let legate = Legate::start(&config(up.addr, dead, web.addr));
    wait_until("the dead endpoint marked down", || {
        legate.metric(&format!(
            "legate_endpoint_healthy{{cluster=\"db\",endpoint=\"{dead}\"}}"
        )) == 0.0
    });
    let (code, _) = curl(&[], &format!("http://{}/v1/orders", legate.addr("api")));
    assert_eq!(code, 200);
    let mut db = TcpStream::connect(legate.addr("orders-db")).expect("connect");
    db.write_all(b"ping").expect("write");
    let mut echo = [0u8; 4];
    db.read_exact(&mut echo).expect("echo through legate");

    let dir = legate
        .dir
        .as_ref()
        .expect("config dir")
        .path()
        .to_path_buf();
    std::fs::write(
        dir.join("broken.yaml"),
        "listeners:\n  - name: extra\n    listen: 127.0.0.1:0\n    cluster: nowhere\n",
    )
    .expect("write broken.yaml");
    let (code, body) = legate.post("/reload");
    assert!(code == 422 || body.contains("unchanged"), "{code} {body}");
    wait_until("the rejected reload shown in /config", || {
        legate.get("/config").1.contains("broken.yaml:4")
    });
    (legate, db, dead, up, web)
}

/// The page in a real browser: the listeners by name, the dead endpoint
/// marked DOWN, the live one UP, the route's 2xx count, and the rejected
/// reload's error with file and line. A screenshot is kept for CI.
#[test]
fn chromium_renders_listeners_down_endpoint_and_rejected_reload() {
    let (legate, _db, dead, up, _web) = scene();
    let url = format!("http://127.0.0.1:{}/?refresh=0", legate.admin.port());
    let dom = headless(&["--dump-dom"], &url);

    let orders = row(&dom, "listener-orders-db");
    assert!(
        orders.contains("<td>tcp</td>") && orders.contains("<td>db</td>"),
        "{orders}"
    );
    assert!(row(&dom, "listener-api").contains("2 routes"), "{dom}");
    let down = row(&dom, &format!("endpoint-db-{dead}"));
    assert!(
        down.contains("class=\"down\"") && down.contains("DOWN"),
        "{down}"
    );
    assert!(
        down.contains("health check:"),
        "the last error is shown: {down}"
    );
    let live = row(&dom, &format!("endpoint-db-{}", up.addr));
    assert!(live.contains("UP") && !live.contains("DOWN"), "{live}");
    assert!(dom.contains("fails over to db-dr"), "{dom}");
    let v1 = &dom[dom.find("<td>v1</td>").expect("route v1")..];
    let v1 = &v1[..v1.find("</tr>").expect("row end")];
    assert!(
        v1.contains("<td class=\"num\">1</td>"),
        "one 2xx on v1: {v1}"
    );
    let error = row(&dom, "reload-error");
    assert!(error.contains("broken.yaml:4"), "{error}");
    assert!(dom.contains("REJECTED"), "{dom}");
    assert!(
        !dom.contains("http-equiv=\"refresh\""),
        "refresh=0 turns it off"
    );

    let shot: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    headless(
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1100,1000",
            "--hide-scrollbars",
        ],
        &url,
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    println!("status page screenshot: {}", shot.display());
}

/// Without a browser: HTML with a default refresh, rates from the second
/// load on, and the same Host check as /config (no DNS-rebound reads).
#[test]
fn page_is_plain_html_with_rates_and_the_host_check() {
    let (legate, mut db, _dead, _up, _web) = scene();
    let (code, first) = legate.get("/");
    assert_eq!(code, 200);
    assert!(first.starts_with("<!doctype html>"), "{first}");
    assert!(
        first.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
        "{first}"
    );
    assert!(row(&first, "listener-orders-db").contains("(next refresh)"));

    db.write_all(&[7u8; 4096]).expect("write");
    let mut back = [0u8; 4096];
    db.read_exact(&mut back).expect("echo");
    let (_, second) = legate.get("/?refresh=30");
    assert!(second.contains("content=\"30\""), "{second}");
    let orders = row(&second, "listener-orders-db");
    assert!(
        orders.contains("conn/s") && orders.contains("/s</td>"),
        "{orders}"
    );
    assert!(row(&second, "listener-api").contains("req/s"), "{second}");

    // A terminal browser, 80 columns: the states are words, the error is there.
    let mut w3m = Command::new("w3m")
        .args(["-dump", "-T", "text/html", "-cols", "80"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("w3m (`bash .ci/run` installs it)");
    w3m.stdin
        .take()
        .expect("stdin")
        .write_all(second.as_bytes())
        .expect("write page");
    let shown = String::from_utf8(w3m.wait_with_output().expect("w3m").stdout).expect("utf-8");
    for wanted in [
        "orders-db",
        "DOWN (health",
        "UP",
        "broken.yaml:4",
        "REJECTED",
    ] {
        assert!(shown.contains(wanted), "{wanted} in:\n{shown}");
    }
    assert!(shown.lines().all(|l| l.chars().count() <= 80), "{shown}");

    let mut s = TcpStream::connect(legate.admin).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: rebind.example:9901\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let (code, _) = legate.post("/");
    assert_eq!(code, 405);
}
