//! Endpoint names resolved through a real DNS server (dnsmasq on loopback).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use support::backends::Backend;
use support::dns::Dnsmasq;
use support::{DEADLINE, Legate, wait_until};

/// Two backends on the same port of 127.0.0.10 and 127.0.0.11, named a and b.
fn two_backends() -> (Backend, Backend, u16) {
    let a = Backend::named_echo_at("127.0.0.10:0".parse().unwrap(), "a");
    let port = a.addr.port();
    let b = Backend::named_echo_at(SocketAddr::from(([127, 0, 0, 11], port)), "b");
    (a, b, port)
}

fn config(dns: &Dnsmasq, port: u16, lb_extra: &str) -> String {
    format!(
        r#"
resolver:
  nameservers: [ "{}" ]
  min_ttl: 1s
  max_ttl: 5s
listeners:
  - {{ name: app, listen: "127.0.0.1:0", cluster: db }}
clusters:
  - name: db
    endpoints: [ "db.test.:{port}" ]
    connect_timeout: 1s
    {lb_extra}
"#,
        dns.addr
    )
}

/// Opens a connection and returns (the backend's name, the open stream).
fn reach(addr: SocketAddr) -> (String, TcpStream) {
    support::backends::reach_named(addr, None)
}

/// 1. `db.test` resolves to 127.0.0.10 (TTL 1 s); connections reach a.
/// 2. The record moves to 127.0.0.11 (dnsmasq re-reads on SIGHUP).
/// 3. Within the TTL plus a refresh, new connections reach b; the connection
///    opened before keeps working (a DNS change never drops open connections).
#[test]
fn re_resolves_after_ttl_and_keeps_open_connections() {
    let (_a, _b, port) = two_backends();
    let dns = Dnsmasq::start(&[("db.test", "127.0.0.10")]);
    let legate = Legate::start(&config(&dns, port, ""));
    let addr = legate.addr("app");
    let (name, mut old) = reach(addr);
    assert_eq!(name, "a");

    dns.set(&[("db.test", "127.0.0.11")]);
    let changed = Instant::now();
    wait_until("new connections reach b", || reach(addr).0 == "b");
    eprintln!("DNS change to new endpoint: {:?}", changed.elapsed());

    old.write_all(b"still here\n").unwrap();
    let mut line = String::new();
    BufReader::new(old).read_line(&mut line).unwrap();
    assert_eq!(line, "still here\n");
    assert!(legate.metric(r#"legate_dns_resolutions_total{cluster="db",result="ok"}"#) >= 2.0);
}

/// A name with two A records gives two endpoints, used in turn.
#[test]
fn multi_record_name_gives_several_endpoints() {
    let (_a, _b, port) = two_backends();
    let dns = Dnsmasq::start(&[("db.test", "127.0.0.10"), ("db.test", "127.0.0.11")]);
    let legate = Legate::start(&config(&dns, port, ""));
    let mut seen: Vec<String> = (0..4).map(|_| reach(legate.addr("app")).0).collect();
    seen.sort();
    assert_eq!(seen, ["a", "a", "b", "b"]);
    let (_, body) = legate.get("/config");
    assert!(
        body.contains("127.0.0.10:") && body.contains("127.0.0.11:"),
        "{body}"
    );
    // The answer itself, for /config and the status page: addresses and TTL.
    let config: serde_json::Value = serde_json::from_str(&body).expect("json");
    let answer = &config["clusters"][0]["dns"][0];
    assert_eq!(answer["name"], "db.test.");
    assert_eq!(
        answer["addresses"],
        serde_json::json!(["127.0.0.10", "127.0.0.11"])
    );
    assert!(
        answer["ttl"].is_string() && answer["error"].is_null(),
        "{answer}"
    );
    let (_, page) = legate.get("/?refresh=0");
    assert!(page.contains("<td>db.test.:"), "{page}");
}

/// 1. The name resolves; then the DNS server dies.
/// 2. Resolution failures are counted, and connections keep using the last
///    good address (stale) instead of failing.
#[test]
fn keeps_stale_addresses_when_dns_fails() {
    let (_a, _b, port) = two_backends();
    let mut dns = Dnsmasq::start(&[("db.test", "127.0.0.10")]);
    let legate = Legate::start(&config(&dns, port, ""));
    assert_eq!(reach(legate.addr("app")).0, "a");

    dns.stop();
    wait_until("a failed resolution is counted", || {
        legate.metric(r#"legate_dns_resolutions_total{cluster="db",result="error"}"#) >= 1.0
    });
    for _ in 0..3 {
        assert_eq!(reach(legate.addr("app")).0, "a");
    }
    legate.wait_log(|l| l.contains("keeping the last good addresses"));
    let config: serde_json::Value = serde_json::from_str(&legate.get("/config").1).expect("json");
    let answer = &config["clusters"][0]["dns"][0];
    assert_eq!(
        answer["addresses"],
        serde_json::json!(["127.0.0.10"]),
        "stale, kept"
    );
    assert!(
        answer["error"].is_string(),
        "the failure is shown: {answer}"
    );
}

/// A name that never resolves: the connection is closed promptly and counted,
/// not left hanging.
#[test]
fn unresolvable_name_closes_promptly() {
    let dns = Dnsmasq::start(&[("other.test", "127.0.0.10")]);
    let legate = Legate::start(&config(&dns, 9, ""));
    let mut s = TcpStream::connect(legate.addr("app")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(began.elapsed() < DEADLINE);
    wait_until("counted", || {
        legate
            .metric(r#"legate_upstream_connects_total{cluster="db",result="no_healthy_endpoint"}"#)
            >= 1.0
    });
}
