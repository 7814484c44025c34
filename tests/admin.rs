//! The admin server: probes, metrics, config, and readiness gated on binding.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

use support::backends::Backend;
use support::{DEADLINE, Legate, wait_until};

fn echo_config(echo: &Backend, listen: &str) -> String {
    support::tcp_config(listen, &[echo.addr.to_string()])
}

fn ping(addr: std::net::SocketAddr, msg: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(msg.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// 1. The listener's port is held by another socket, so legate cannot bind it.
/// 2. `/healthz` is 200 but `/readyz` is 503 while it retries.
/// 3. The port is released: legate binds it, `/readyz` turns 200 and traffic flows.
#[test]
fn readyz_waits_for_every_listener_to_bind() {
    let echo = Backend::echo();
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port_addr = blocker.local_addr().unwrap();
    let mut legate = Legate::spawn(&echo_config(&echo, &port_addr.to_string()), &[]);

    legate.wait_log(|l| l.contains("cannot bind listener"));
    assert_eq!(legate.get("/healthz").0, 200);
    let (status, body) = legate.get("/readyz");
    assert_eq!(status, 503, "{body}");

    drop(blocker);
    legate.wait_ready();
    assert_eq!(legate.addr("app"), port_addr);
    assert_eq!(ping(port_addr, "after bind"), "after bind");
}

/// 1. Traffic through one listener.
/// 2. `/metrics` shows the connection, byte, connect and process families with
///    the contract's names and labels.
#[test]
fn metrics_count_connections_bytes_and_connects() {
    let echo = Backend::echo();
    let legate = Legate::start(&echo_config(&echo, "127.0.0.1:0"));
    for _ in 0..3 {
        assert_eq!(ping(legate.addr("app"), "12345"), "12345");
    }
    wait_until("gauge back to 0", || {
        legate.metric(r#"legate_listener_connections_active{listener="app"}"#) == 0.0
    });
    let (status, body) = legate.get("/metrics");
    assert_eq!(status, 200);
    let value = |series: &str| support::metric_value(&body, series);
    assert_eq!(
        value(r#"legate_listener_connections_total{listener="app"}"#),
        Some(3.0)
    );
    assert_eq!(
        value(r#"legate_bytes_total{direction="upstream",listener="app"}"#),
        Some(15.0)
    );
    assert_eq!(
        value(r#"legate_bytes_total{direction="downstream",listener="app"}"#),
        Some(15.0)
    );
    assert_eq!(
        value(r#"legate_upstream_connects_total{cluster="backend",result="ok"}"#),
        Some(3.0)
    );
    assert_eq!(
        value(r#"legate_upstream_connect_seconds_count{cluster="backend"}"#),
        Some(3.0)
    );
    assert!(
        value("process_resident_memory_bytes").is_some_and(|v| v > 0.0),
        "{body}"
    );
    assert!(value("process_open_fds").is_some_and(|v| v > 0.0), "{body}");
}

/// `/config` shows the effective table with bound addresses; unknown paths 404;
/// a GET on `/quitquitquit` is refused with 405 and does not shut down.
#[test]
fn config_and_unknown_paths() {
    let echo = Backend::echo();
    let legate = Legate::start(&echo_config(&echo, "127.0.0.1:0"));
    let (status, body) = legate.get("/config");
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(config["generation"], 1);
    assert_eq!(config["listeners"][0]["listen"], "127.0.0.1:0");
    assert_eq!(
        config["listeners"][0]["bound"],
        legate.addr("app").to_string()
    );
    assert_eq!(
        config["clusters"][0]["endpoints"][0]["endpoint"],
        echo.addr.to_string()
    );
    assert_eq!(legate.get("/nope").0, 404);
    assert_eq!(legate.get("/quitquitquit").0, 405);
    assert_eq!(legate.get("/readyz").0, 200);
}

/// A bad config at start: legate exits 1 and logs the file and line.
#[test]
fn invalid_config_at_start_exits_with_the_error() {
    let dir = support::config_dir(&[("bad.yaml", "listeners:\n  - name: x\n    lsten: 1\n")]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("--config")
        .arg(dir.path())
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("bad.yaml:3:5"), "{log}");
}

/// Sends a raw request to the admin server and returns the status.
fn admin_request(legate: &Legate, request: &str) -> u16 {
    let mut s = TcpStream::connect(legate.admin).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status")
}

/// 1. A browser page posts to `/quitquitquit` cross-origin with
///    `Content-Type: text/plain` (a "simple" request: no CORS preflight):
///    403, and legate keeps running and ready.
/// 2. A DNS-rebound request (`Host: rebind.example:9901`) to `/config` or
///    `/reload`: 403.
/// 3. The same POST from a local tool (no Origin, Host an IP): 200, shuts down.
#[test]
fn browsers_cannot_shut_down_or_read_the_admin() {
    let echo = Backend::echo();
    let mut legate = Legate::start(&echo_config(&echo, "127.0.0.1:0"));
    let cross_origin = "POST /quitquitquit HTTP/1.1\r\nHost: 127.0.0.1:9901\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
    assert_eq!(admin_request(&legate, cross_origin), 403);
    let rebound_config =
        "GET /config HTTP/1.1\r\nHost: rebind.example:9901\r\nConnection: close\r\n\r\n";
    assert_eq!(admin_request(&legate, rebound_config), 403);
    let rebound_reload = "POST /reload HTTP/1.1\r\nHost: rebind.example:9901\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert_eq!(admin_request(&legate, rebound_reload), 403);
    assert!(legate.is_running());
    assert_eq!(legate.get("/readyz").0, 200);

    assert_eq!(legate.post("/quitquitquit").0, 200);
    assert!(legate.wait_exit(DEADLINE).success());
}

/// A client that sends the admin port a 20 KiB head gets 431 instead of
/// legate buffering it (200 such heads once added 77 MB of RSS); probes are
/// still answered.
#[test]
fn admin_heads_are_bounded() {
    let echo = Backend::echo();
    let legate = Legate::start(&echo_config(&echo, "127.0.0.1:0"));
    let mut s = TcpStream::connect(legate.admin).unwrap();
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}",
        "a".repeat(20 * 1024)
    );
    let _ = s.write_all(big.as_bytes());
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.100}");
    assert_eq!(legate.get("/healthz").0, 200);
}
