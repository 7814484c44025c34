//! Load balancing, health checks and failover between clusters, with real
//! backends that die and come back.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::backends::Backend;
use support::{DEADLINE, Legate, refused_addr, wait_until};

use support::backends::reach_named as reach_from;

fn reach(addr: SocketAddr) -> String {
    reach_from(addr, None).0
}

/// Opens a short connection and closes it completely: the backend's name.
/// Waits until legate has finished it too, so active-connection counts are
/// settled before the next pick.
fn reach_and_close(legate: &Legate, open_after: f64) -> String {
    let (name, s) = reach_from(legate.addr("app"), None);
    drop(s);
    wait_until("connection finished in legate", || {
        legate.metric(r#"legate_listener_connections_active{listener="app"}"#) == open_after
    });
    name
}

fn one_cluster(endpoints: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "listeners:\n  - {{ name: app, listen: \"127.0.0.1:0\", cluster: db }}\nclusters:\n  - name: db\n    endpoints: [ {} ]\n    connect_timeout: 1s\n    {extra}\n",
        eps.join(", ")
    )
}

fn healthy(legate: &Legate, cluster: &str, endpoint: SocketAddr) -> f64 {
    legate.metric(&format!(
        r#"legate_endpoint_healthy{{cluster="{cluster}",endpoint="{endpoint}"}}"#
    ))
}

/// `least_conn`: while one connection is held on one endpoint, every new
/// short connection goes to the other (it has fewer active connections).
#[test]
fn least_conn_prefers_the_idle_endpoint() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let legate = Legate::start(&one_cluster(&[a.addr, b.addr], "lb: least_conn"));
    let (held_on, _held) = reach_from(legate.addr("app"), None);
    let other = if held_on == "a" { "b" } else { "a" };
    for _ in 0..10 {
        assert_eq!(reach_and_close(&legate, 1.0), other);
    }
}

/// `random` (power of two choices): with one endpoint busy, new connections
/// go to the idle one; with none busy, both endpoints get traffic.
#[test]
fn random_is_power_of_two_choices() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let legate = Legate::start(&one_cluster(&[a.addr, b.addr], "lb: random"));
    let mut to_a = 0;
    for _ in 0..60 {
        if reach(legate.addr("app")) == "a" {
            to_a += 1;
        }
    }
    assert!((1..60).contains(&to_a), "a got {to_a} of 60: not spread");
    wait_until("all closed", || {
        legate.metric(r#"legate_listener_connections_active{listener="app"}"#) == 0.0
    });
    let (held_on, _held) = reach_from(legate.addr("app"), None);
    let other = if held_on == "a" { "b" } else { "a" };
    for _ in 0..10 {
        assert_eq!(reach_and_close(&legate, 1.0), other);
    }
}

/// `hash`: each client IP sticks to one endpoint across connections, and
/// different client IPs spread over both endpoints.
#[test]
fn hash_sticks_each_client_to_one_endpoint() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let legate = Legate::start(&one_cluster(&[a.addr, b.addr], "lb: hash"));
    let mut used = std::collections::HashSet::new();
    for last in 2..22u8 {
        let ip = [127, 0, 0, last];
        let first = reach_from(legate.addr("app"), Some(ip)).0;
        for _ in 0..3 {
            assert_eq!(
                reach_from(legate.addr("app"), Some(ip)).0,
                first,
                "client {ip:?} moved"
            );
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 2, "20 clients all hashed to one endpoint");
}

/// Passive ejection: the first connect to a dead endpoint is refused (and the
/// client still served by the live one); the dead endpoint is then ejected, so
/// the next connections do not try it again.
#[test]
fn passive_ejection_skips_a_refusing_endpoint() {
    let a = Backend::named_echo("a");
    let dead = refused_addr();
    let legate = Legate::start(&one_cluster(&[dead, a.addr], ""));
    for _ in 0..10 {
        assert_eq!(reach(legate.addr("app")), "a");
    }
    assert_eq!(
        legate.metric(r#"legate_upstream_connects_total{cluster="db",result="refused"}"#),
        1.0,
        "the ejected endpoint was tried again"
    );
    assert_eq!(healthy(&legate, "db", dead), 0.0);
    assert_eq!(healthy(&legate, "db", a.addr), 1.0);
}

/// Active TCP checks: an endpoint that stops listening goes unhealthy after
/// `unhealthy` failed probes (no traffic needed); when it listens again it
/// comes back after `healthy` good probes.
#[test]
fn active_tcp_check_marks_down_and_up() {
    let a = Backend::named_echo("a");
    let b_addr = Backend::named_echo("b").addr; // bound, then dropped: refuses
    let legate = Legate::start(&one_cluster(
        &[a.addr, b_addr],
        "health: { interval: 100ms, timeout: 100ms, unhealthy: 2, healthy: 2 }",
    ));
    wait_until("b marked down by probes", || {
        healthy(&legate, "db", b_addr) == 0.0
    });
    let refused_before =
        legate.metric(r#"legate_upstream_connects_total{cluster="db",result="refused"}"#);
    for _ in 0..6 {
        assert_eq!(reach(legate.addr("app")), "a");
    }
    assert_eq!(
        legate.metric(r#"legate_upstream_connects_total{cluster="db",result="refused"}"#),
        refused_before,
        "a connection tried the endpoint that probes marked down"
    );

    let _b = Backend::named_echo_at(b_addr, "b");
    wait_until("b back up", || healthy(&legate, "db", b_addr) == 1.0);
    let seen: std::collections::HashSet<String> =
        (0..6).map(|_| reach(legate.addr("app"))).collect();
    assert!(seen.contains("b"), "b never used after recovery");
}

/// Active HTTP checks (`http_path`): a 503 marks the endpoint down, a 200 up.
#[test]
fn active_http_check_follows_the_status() {
    let status = Arc::new(AtomicU16::new(200));
    let web = Backend::http_status(status.clone());
    let legate = Legate::start(&one_cluster(
        &[web.addr],
        "health: { interval: 100ms, timeout: 100ms, unhealthy: 2, healthy: 1, http_path: /healthz }",
    ));
    wait_until("probes reach the backend", || web.accepted() >= 2);
    assert_eq!(healthy(&legate, "db", web.addr), 1.0);
    status.store(503, Ordering::SeqCst);
    wait_until("503 marks it down", || {
        healthy(&legate, "db", web.addr) == 0.0
    });
    status.store(200, Ordering::SeqCst);
    wait_until("200 marks it up", || {
        healthy(&legate, "db", web.addr) == 1.0
    });
}

fn primary_secondary(primary: SocketAddr, secondary: SocketAddr) -> String {
    format!(
        r#"
listeners:
  - {{ name: app, listen: "127.0.0.1:0", cluster: primary }}
clusters:
  - name: primary
    endpoints: [ "{primary}" ]
    failover: [ secondary ]
    connect_timeout: 1s
    health: {{ interval: 200ms, timeout: 200ms, unhealthy: 2, healthy: 2 }}
  - name: secondary
    endpoints: [ "{secondary}" ]
    connect_timeout: 1s
"#
    )
}

/// 1. Four clients keep connecting and echoing through the primary.
/// 2. The primary dies: every connection opened after that reaches the
///    secondary and works (zero failed client connections; only connections
///    already on the primary when it died may be cut), counted in
///    `legate_cluster_failovers_total`.
/// 3. The primary comes back: after its `healthy` threshold new connections
///    return to it (failback).
#[test]
fn fails_over_on_primary_death_and_fails_back() {
    let primary = Backend::named_echo("primary");
    let primary_addr = primary.addr;
    let secondary = Backend::named_echo("secondary");
    let legate = Legate::start(&primary_secondary(primary_addr, secondary.addr));
    let addr = legate.addr("app");
    assert_eq!(reach(addr), "primary");

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicU64::new(0));
    let died_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served, cut, died_at) =
                (stop.clone(), served.clone(), cut.clone(), died_at.clone());
            std::thread::spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::Relaxed) {
                    let began = Instant::now();
                    match one_exchange(addr) {
                        Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                        Err(e) => match *died_at.lock().unwrap() {
                            Some(t) if began >= t => {
                                return Err(format!(
                                    "connection opened after the death failed: {e}"
                                ));
                            }
                            _ => cut.fetch_add(1, Ordering::Relaxed),
                        },
                    };
                }
                Ok(())
            })
        })
        .collect();

    wait_until("load running", || served.load(Ordering::Relaxed) > 20);
    drop(primary);
    *died_at.lock().unwrap() = Some(Instant::now());
    let died = Instant::now();
    wait_until("a new connection reaches the secondary", || {
        reach(addr) == "secondary"
    });
    let failover_time = died.elapsed();
    wait_until("failovers counted", || {
        legate.metric(r#"legate_cluster_failovers_total{cluster="primary",to="secondary"}"#) >= 1.0
    });
    legate.wait_log(|l| {
        l.contains("active health check changed state") && l.contains(r#""healthy":false"#)
    });
    assert_eq!(healthy(&legate, "primary", primary_addr), 0.0);
    let after_death = served.load(Ordering::Relaxed);
    wait_until("load continues on the secondary", || {
        served.load(Ordering::Relaxed) > after_death + 20
    });

    let _primary = Backend::named_echo_at(primary_addr, "primary");
    let back = Instant::now();
    wait_until("new connections fail back to the primary", || {
        reach(addr) == "primary"
    });
    let failback_time = back.elapsed();

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap().expect("a client saw a failure");
    }
    let cut = cut.load(Ordering::Relaxed);
    assert!(
        cut <= 4,
        "{cut} connections cut: more than were in flight at the death"
    );
    eprintln!(
        "primary death → failover: {failover_time:?}; recovery → failback: {failback_time:?}; {} client connections, 0 failed after the death, {cut} in flight cut by it",
        served.load(Ordering::Relaxed)
    );
}

/// One client connection: learn the backend, echo a line, close.
fn one_exchange(addr: SocketAddr) -> Result<(), String> {
    let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut name = String::new();
    reader.read_line(&mut name).map_err(|e| e.to_string())?;
    if name != "primary\n" && name != "secondary\n" {
        return Err(format!("unexpected backend line {name:?}"));
    }
    (&s).write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if line != "ping\n" {
        return Err(format!("bad echo {line:?} from {}", name.trim()));
    }
    Ok(())
}

/// Every cluster of the route is down: the client is closed promptly (no
/// hang) and it is counted as `no_healthy_endpoint` on the primary.
#[test]
fn all_down_closes_promptly() {
    let legate = Legate::start(&primary_secondary(refused_addr(), refused_addr()));
    for _ in 0..3 {
        let mut s = TcpStream::connect(legate.addr("app")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let began = Instant::now();
        let mut buf = [0u8; 1];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("not closed: {other:?}"),
        }
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "closing took {:?}",
            began.elapsed()
        );
    }
    wait_until("counted", || {
        legate.metric(
            r#"legate_upstream_connects_total{cluster="primary",result="no_healthy_endpoint"}"#,
        ) == 3.0
    });
}
