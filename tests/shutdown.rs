//! Sidecar-style shutdown: SIGTERM, SIGINT and `POST /quitquitquit`.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use support::backends::Backend;
use support::{DEADLINE, Legate, wait_until};

fn echo_config(echo: &Backend) -> String {
    support::tcp_config("127.0.0.1:0", &[echo.addr.to_string()])
}

fn open(legate: &Legate) -> TcpStream {
    let s = TcpStream::connect(legate.addr("app")).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Writes `msg` on an open connection and reads the echo.
fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

/// 1. Connection A is open and echoing.
/// 2. SIGTERM: `/readyz` turns 503, and during the shutdown delay a new
///    connection B is still accepted and served.
/// 3. After the delay the listener closes: new connections are refused, A still echoes.
/// 4. legate waits for A; when A closes, it exits 0.
#[test]
fn sigterm_keeps_accepting_during_delay_then_drains() {
    let echo = Backend::echo();
    let mut legate = Legate::start_with(&echo_config(&echo), &["--shutdown-delay", "2s"]);
    let addr = legate.addr("app");
    let mut a = open(&legate);
    roundtrip(&mut a, b"before");

    legate.signal("TERM");
    wait_until("readyz 503", || legate.get("/readyz").0 == 503);
    let mut b = open(&legate);
    roundtrip(&mut b, b"accepted during the delay");
    drop(b);

    legate.wait_log(|l| l.contains("listener closed"));
    let refused = TcpStream::connect(addr);
    assert_eq!(
        refused.map(|_| ()).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    roundtrip(&mut a, b"still working while draining");
    assert!(legate.is_running(), "exited with a connection open");

    a.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    a.read_to_end(&mut rest).unwrap();
    drop(a);
    let status = legate.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0));
}

/// 1. A connection stays open past `--drain-timeout 1s` after SIGINT.
/// 2. legate closes it and exits 0.
#[test]
fn drain_timeout_closes_the_rest_and_exits_zero() {
    let echo = Backend::echo();
    let mut legate = Legate::start_with(&echo_config(&echo), &["--drain-timeout", "1s"]);
    let mut a = open(&legate);
    roundtrip(&mut a, b"hi");

    legate.signal("INT");
    legate.wait_log(|l| l.contains("drain timeout passed"));
    let status = legate.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0));
    let mut buf = [0u8; 8];
    match a.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("connection not closed: {other:?}"),
    }
}

/// 1. A connection keeps legate draining (drain timeout 60s).
/// 2. A second SIGTERM exits at once, with a non-zero code.
#[test]
fn second_signal_exits_at_once() {
    let echo = Backend::echo();
    let mut legate = Legate::start_with(&echo_config(&echo), &["--drain-timeout", "60s"]);
    let mut a = open(&legate);
    roundtrip(&mut a, b"hi");

    legate.signal("TERM");
    legate.wait_log(|l| l.contains("listeners closed, draining"));
    legate.signal("TERM");
    let status = legate.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(1));
}

/// 1. `POST /quitquitquit` answers 200.
/// 2. `/readyz` turns 503 while the shutdown delay runs.
/// 3. With no connections open, legate exits 0.
#[test]
fn quitquitquit_shuts_down_like_sigterm() {
    let echo = Backend::echo();
    let mut legate = Legate::start_with(&echo_config(&echo), &["--shutdown-delay", "1s"]);
    let (status, _) = legate.post("/quitquitquit");
    assert_eq!(status, 200);
    assert_eq!(legate.get("/readyz").0, 503);
    let status = legate.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0));
}

/// 1. A WebSocket tunnel is open through an HTTP listener (101, then bytes).
/// 2. SIGTERM with `--drain-timeout 1s`: legate does not exit while the
///    tunnel is open (the tunnel belongs to the drain), the tunnel still
///    carries bytes, and `legate_listener_connections_active` still counts it.
/// 3. At the drain timeout the tunnel is closed and legate exits 0.
#[test]
fn drain_waits_for_a_websocket_tunnel_then_its_timeout_ends_it() {
    let api = support::http::HttpBackend::start("api");
    let mut legate = Legate::start_with(
        &format!(
            "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", protocol: http, cluster: api }}\nclusters:\n  - {{ name: api, endpoints: [ \"{}\" ] }}\n",
            api.addr
        ),
        &["--drain-timeout", "1s"],
    );
    let mut client = support::http::Client::connect(legate.addr("web"));
    client
        .raw()
        .get_mut()
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .unwrap();
    assert_eq!(client.read_reply(false).unwrap().status, 101);
    let mut tunnel_echo = |msg: &[u8]| {
        client.raw().get_mut().write_all(msg).unwrap();
        let mut buf = vec![0u8; msg.len()];
        client.raw().read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    };
    tunnel_echo(b"before");
    assert_eq!(
        legate.metric(r#"legate_listener_connections_active{listener="web"}"#),
        1.0
    );

    legate.signal("TERM");
    legate.wait_log(|l| l.contains("listeners closed, draining"));
    assert!(legate.is_running(), "exited with a tunnel open");
    tunnel_echo(b"while draining");

    legate.wait_log(|l| l.contains("drain timeout passed"));
    assert_eq!(legate.wait_exit(DEADLINE).code(), Some(0));
    let mut buf = [0u8; 8];
    match client.raw().read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("tunnel not closed: {other:?}"),
    }
}
