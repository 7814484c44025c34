//! Hot reload through the kubelet's atomic ConfigMap swap, SIGHUP and `POST /reload`.

mod support;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use support::backends::Backend;
use support::configmap::ConfigMap;
use support::{DEADLINE, Legate, refused_addr, wait_until};

fn routes(listen: &str, endpoint: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listeners:
  - name: app
    listen: {listen}
    cluster: db
clusters:
  - name: db
    endpoints: [ "{endpoint}" ]
    {extra}
"#
    )
}

/// A connection that has read the backend's name line and can keep echoing.
struct Conn {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    pub backend: String,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut backend = String::new();
        reader.read_line(&mut backend).expect("backend name");
        Conn {
            reader,
            stream,
            backend: backend.trim().to_string(),
        }
    }

    /// Sends a line and checks it comes back unchanged.
    fn echo(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let mut back = String::new();
        self.reader.read_line(&mut back)?;
        if back.strip_suffix('\n') != Some(line) {
            return Err(std::io::Error::other(format!(
                "wrong echo: sent {line:?}, got {back:?}"
            )));
        }
        Ok(())
    }

    /// Whether the proxy closed the connection (EOF or reset) within the deadline.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

/// 1. Listener → cluster at backend A; connection X open to A.
/// 2. The ConfigMap is swapped (kubelet style) to backend B.
/// 3. New connections reach B; X still echoes through A; the reload is counted.
#[test]
fn configmap_swap_reroutes_new_connections_and_old_ones_keep_working() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let mut cm = ConfigMap::new(&[("routes.yaml", &routes("127.0.0.1:0", a.addr, ""))]);
    let mut legate = Legate::start_on(&cm, &[]);
    let addr = legate.addr("app");
    let mut x = Conn::open(addr);
    assert_eq!(x.backend, "a");

    let swapped = Instant::now();
    cm.update(&[("routes.yaml", &routes("127.0.0.1:0", b.addr, ""))]);
    wait_until("new connections reach b", || {
        Conn::open(addr).backend == "b"
    });
    eprintln!(
        "reload latency (rename → new connection on b): {:?}",
        swapped.elapsed()
    );

    x.echo("still on a after the swap").unwrap();
    assert_eq!(legate.metric("legate_config_generation"), 2.0);
    assert_eq!(
        legate.metric(r#"legate_config_reloads_total{result="success"}"#),
        1.0
    );
    legate.refresh_listeners();
    assert_eq!(
        legate.addr("app"),
        addr,
        "an unchanged listener keeps its socket"
    );
}

/// 1. A swap to a broken file: rejected, counted, routing and `/readyz` unchanged,
///    and `/config` shows the error with file and line.
/// 2. A good swap after it applies.
#[test]
fn broken_swap_is_rejected_then_a_good_one_applies() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let mut cm = ConfigMap::new(&[("routes.yaml", &routes("127.0.0.1:0", a.addr, ""))]);
    let legate = Legate::start_on(&cm, &[]);
    let addr = legate.addr("app");

    cm.update(&[(
        "routes.yaml",
        &routes("127.0.0.1:0", b.addr, "conect_timeout: 1s"),
    )]);
    wait_until("reload error counted", || {
        legate.metric(r#"legate_config_reloads_total{result="error"}"#) == 1.0
    });
    assert_eq!(legate.metric("legate_config_generation"), 1.0);
    assert_eq!(legate.get("/readyz").0, 200);
    assert_eq!(Conn::open(addr).backend, "a");
    let (_, body) = legate.get("/config");
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let error = config["reload"]["last_error"]["message"].as_str().unwrap();
    assert!(error.contains("routes.yaml:9:5"), "{error}");
    assert!(error.contains("conect_timeout"), "{error}");
    legate.wait_log(|l| l.contains("configuration rejected") && l.contains("routes.yaml:9:5"));

    cm.update(&[("routes.yaml", &routes("127.0.0.1:0", b.addr, ""))]);
    legate.wait_generation(2);
    assert_eq!(Conn::open(addr).backend, "b");
    let (_, body) = legate.get("/config");
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(config["reload"]["last_error"].is_null());
    assert_eq!(config["reload"]["generation"], 2);
}

/// 1. Listener `one` with an open connection; a reload adds `two`: it binds and
///    serves, `one` keeps its socket and its connection.
/// 2. A reload moves `two` to another port: the old port refuses, the new serves.
/// 3. A reload removes `one`: its port refuses new connections while the open
///    connection keeps echoing until it ends.
#[test]
fn listeners_are_added_moved_and_removed() {
    let a = Backend::named_echo("a");
    let cluster = format!(
        "clusters:\n  - {{ name: db, endpoints: [ \"{}\" ] }}\n",
        a.addr
    );
    let one = "  - { name: one, listen: \"127.0.0.1:0\", cluster: db }\n";
    let two_at =
        |addr: SocketAddr| format!("  - {{ name: two, listen: \"{addr}\", cluster: db }}\n");
    let first_port = refused_addr();
    let second_port = refused_addr();

    let mut cm = ConfigMap::new(&[("routes.yaml", &format!("listeners:\n{one}{cluster}"))]);
    let mut legate = Legate::start_on(&cm, &[]);
    let one_addr = legate.addr("one");
    let mut kept = Conn::open(one_addr);

    // Added (in a second file, as a second ConfigMap key).
    cm.update(&[
        ("routes.yaml", &format!("listeners:\n{one}{cluster}")),
        ("more.yaml", &format!("listeners:\n{}", two_at(first_port))),
    ]);
    legate.wait_generation(2);
    wait_until("two bound", || TcpStream::connect(first_port).is_ok());
    assert_eq!(Conn::open(first_port).backend, "a");
    legate.refresh_listeners();
    assert_eq!(legate.addr("one"), one_addr);
    kept.echo("one survives the add").unwrap();

    // Moved.
    cm.update(&[
        ("routes.yaml", &format!("listeners:\n{one}{cluster}")),
        ("more.yaml", &format!("listeners:\n{}", two_at(second_port))),
    ]);
    legate.wait_generation(3);
    wait_until("two moved", || TcpStream::connect(second_port).is_ok());
    assert_eq!(Conn::open(second_port).backend, "a");
    assert_eq!(
        TcpStream::connect(first_port)
            .map(|_| ())
            .unwrap_err()
            .kind(),
        ErrorKind::ConnectionRefused
    );

    // Removed: `one` leaves, its open connection drains on its own.
    cm.update(&[
        ("routes.yaml", &cluster),
        ("more.yaml", &format!("listeners:\n{}", two_at(second_port))),
    ]);
    legate.wait_generation(4);
    wait_until("one closed", || TcpStream::connect(one_addr).is_err());
    kept.echo("one's connection outlives its listener").unwrap();
    assert_eq!(Conn::open(second_port).backend, "a");
}

/// 1. Listener `app` serves HTTP on a fixed port (its socket is deferred: the
///    kernel hands a connection over once the client wrote).
/// 2. A reload makes it a TCP listener on the same port, to a backend that
///    speaks first (its name line) while the app waits to read.
/// 3. The app reads the name at once: the socket was bound anew without the
///    deferral, which would hold a silent client for the kernel's wait (1 s
///    or more) before legate sees it. Back to HTTP, requests are served.
#[test]
fn a_listener_changed_between_http_and_tcp_serves_a_server_that_speaks_first() {
    let banner = Backend::named_echo("a");
    let web = support::http::HttpBackend::start("web");
    let port = refused_addr();
    let http = format!(
        "listeners:\n  - {{ name: app, listen: \"{port}\", protocol: http, cluster: web }}\nclusters:\n  - {{ name: web, endpoints: [ \"{}\" ] }}\n  - {{ name: db, endpoints: [ \"{}\" ] }}\n",
        web.addr, banner.addr
    );
    let tcp = http.replace("protocol: http, cluster: web", "cluster: db");
    let mut cm = ConfigMap::new(&[("routes.yaml", &http)]);
    let legate = Legate::start_on(&cm, &[]);
    assert_eq!(support::http_request(port, "GET", "/").0, 200);
    let binds = || {
        legate
            .logs()
            .iter()
            .filter(|l| l.contains("listening") && l.contains("app"))
            .count()
    };

    cm.update(&[("routes.yaml", &tcp)]);
    legate.wait_generation(2);
    wait_until("app bound again", || binds() >= 2);
    let mut app = TcpStream::connect(port).unwrap();
    // Well under the kernel's shortest deferral (1 s); the banner takes
    // about a millisecond.
    app.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    let mut name = [0u8; 2];
    app.read_exact(&mut name)
        .expect("the backend's name, without a deferred accept's wait");
    assert_eq!(&name, b"a\n");

    cm.update(&[("routes.yaml", &http)]);
    legate.wait_generation(3);
    wait_until("app bound as HTTP again", || binds() >= 3);
    assert_eq!(support::http_request(port, "GET", "/").0, 200);
}

/// 1. Cluster `db` with `drain_on_change: 1s`, cluster `cache` without; one
///    connection open through each.
/// 2. A reload changes both clusters' endpoints.
/// 3. Right after the reload both connections still echo (not before the grace);
///    after the grace the `db` connection is closed, and not before ~1s;
///    the `cache` connection lives on.
#[test]
fn drain_on_change_closes_old_target_after_grace() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let config = |db: SocketAddr, cache: SocketAddr| {
        format!(
            r#"
listeners:
  - {{ name: db, listen: "127.0.0.1:0", cluster: db }}
  - {{ name: cache, listen: "127.0.0.1:0", cluster: cache }}
clusters:
  - {{ name: db, endpoints: [ "{db}" ], drain_on_change: 1s }}
  - {{ name: cache, endpoints: [ "{cache}" ] }}
"#
        )
    };
    let mut cm = ConfigMap::new(&[("routes.yaml", &config(a.addr, a.addr))]);
    let legate = Legate::start_on(&cm, &[]);
    let mut db = Conn::open(legate.addr("db"));
    let mut cache = Conn::open(legate.addr("cache"));

    cm.update(&[("routes.yaml", &config(b.addr, b.addr))]);
    legate.wait_generation(2);
    let reloaded = Instant::now();
    db.echo("inside the grace").unwrap();
    cache.echo("inside the grace").unwrap();
    assert_eq!(Conn::open(legate.addr("db")).backend, "b");

    assert!(db.closed(), "db connection was not closed after the grace");
    let after = reloaded.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}, before the 1s grace"
    );
    cache.echo("no drain_on_change: still open").unwrap();
}

/// 1. `--no-watch --poll-interval 0`: only SIGHUP and `POST /reload` reload.
/// 2. A plain file edited in place + SIGHUP → generation 2.
/// 3. Another edit + `POST /reload` → 200 "reloaded: generation 3";
///    again with no change → "unchanged"; a broken edit → 422 with the error.
#[test]
fn sighup_and_post_reload() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let c = Backend::named_echo("c");
    let mut legate = Legate::start_with(
        &routes("127.0.0.1:0", a.addr, ""),
        &["--no-watch", "--poll-interval", "0"],
    );
    let file = legate.dir.as_ref().unwrap().path().join("legate.yaml");
    let addr = legate.addr("app");

    std::fs::write(&file, routes("127.0.0.1:0", b.addr, "")).unwrap();
    legate.signal("HUP");
    legate.wait_generation(2);
    assert_eq!(Conn::open(addr).backend, "b");

    std::fs::write(&file, routes("127.0.0.1:0", c.addr, "")).unwrap();
    assert_eq!(
        legate.post("/reload"),
        (200, "reloaded: generation 3\n".to_string())
    );
    assert_eq!(Conn::open(addr).backend, "c");
    assert_eq!(
        legate.post("/reload"),
        (200, "unchanged: generation 3\n".to_string())
    );

    std::fs::write(&file, "listeners: [\n").unwrap();
    let (status, body) = legate.post("/reload");
    assert_eq!(status, 422);
    assert!(body.contains("legate.yaml:1:"), "{body}");
    assert_eq!(Conn::open(addr).backend, "c");
    legate.refresh_listeners();
}

/// A plain directory (not a ConfigMap) whose file is rewritten in place reloads
/// through the directory watch, with polling off.
#[test]
fn plain_file_edited_in_place_reloads() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let legate = Legate::start_with(
        &routes("127.0.0.1:0", a.addr, ""),
        &["--poll-interval", "0"],
    );
    let file = legate.dir.as_ref().unwrap().path().join("legate.yaml");
    let addr = legate.addr("app");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&file)
        .unwrap();
    f.write_all(routes("127.0.0.1:0", b.addr, "").as_bytes())
        .unwrap();
    drop(f);
    legate.wait_generation(2);
    assert_eq!(Conn::open(addr).backend, "b");
}

/// Soak: 1,000 kubelet-style swaps under traffic, alternating valid versions
/// (cluster a, cluster b, a split), invalid YAML, an empty file and a volume
/// with no file at all, with the watcher racing `POST /reload` (1 ms debounce).
/// - After each swap `POST /reload` answers with the generation: it moves by
///   exactly one per valid version and never for an invalid or empty one.
/// - 4 clients keep opening connections and 2 long-lived connections keep
///   echoing: zero failed connections, zero wrong bytes, and the listener is
///   never closed (an empty table would close it).
/// - Every rejected version is counted once in `legate_config_reloads_total`.
#[test]
fn soak_1000_swaps_valid_invalid_and_empty_under_load() {
    const SWAPS: u64 = 1000;
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let listen = refused_addr();
    let valid = |i: u64| {
        let target = match (i / 4) % 3 {
            0 => "cluster: a".to_string(),
            1 => "cluster: b".to_string(),
            _ => "split: [ { cluster: a, weight: 1 }, { cluster: b, weight: 1 } ]".to_string(),
        };
        format!(
            "listeners:\n  - {{ name: app, listen: \"{listen}\", {target} }}\nclusters:\n  - {{ name: a, endpoints: [ \"{}\" ] }}\n  - {{ name: b, endpoints: [ \"{}\" ] }}\n",
            a.addr, b.addr
        )
    };
    let mut cm = ConfigMap::new(&[("routes.yaml", &valid(0))]);
    let legate = Legate::start_on(&cm, &["--reload-debounce", "1ms"]);
    let addr = legate.addr("app");

    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    let mut clients: Vec<_> = (0..4)
        .map(|client| {
            let (stop, connections) = (stop.clone(), connections.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut conn = Conn::open(addr);
                    if conn.backend != "a" && conn.backend != "b" {
                        return Err(format!("unknown backend {:?}", conn.backend));
                    }
                    for j in 0..5 {
                        let line =
                            format!("client {client} conn {n} line {j} {}", "x".repeat(j * 50));
                        conn.echo(&line)
                            .map_err(|e| format!("client {client} conn {n}: {e}"))?;
                    }
                    conn.stream
                        .shutdown(Shutdown::Write)
                        .map_err(|e| e.to_string())?;
                    if !conn.closed() {
                        return Err("connection not closed after FIN".into());
                    }
                    connections.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
                Ok(())
            })
        })
        .collect();
    clients.extend((0..2).map(|client| {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<(), String> {
            let mut conn = Conn::open(addr);
            let mut j = 0u64;
            while !stop.load(Ordering::Relaxed) {
                conn.echo(&format!("long-lived {client} line {j}"))
                    .map_err(|e| format!("long-lived {client} line {j}: {e}"))?;
                j += 1;
            }
            Ok(())
        })
    }));

    let (mut generation, mut rejected) = (1u64, 0u64);
    for i in 1..=SWAPS {
        let is_valid = i % 2 == 0;
        match i % 4 {
            0 | 2 => cm.update(&[("routes.yaml", &valid(i))]),
            1 if i % 8 == 1 => cm.update(&[("routes.yaml", "listeners: [ { name: app")]),
            1 => cm.update(&[("routes.yaml", "")]),
            _ => cm.update(&[]),
        }
        generation += u64::from(is_valid);
        rejected += u64::from(!is_valid);
        let (status, body) = legate.post("/reload");
        let reported: Option<u64> = body
            .split("generation ")
            .nth(1)
            .and_then(|g| g.trim().parse().ok());
        match (is_valid, status) {
            (true, 200) => assert_eq!(reported, Some(generation), "swap {i}: {body}"),
            (false, 422) => {}
            (false, 200) => assert_eq!(reported, Some(generation), "swap {i}: {body}"),
            _ => panic!("swap {i} (valid: {is_valid}): {status} {body}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .expect("client thread")
            .expect("client saw a failure");
    }
    let connections = connections.load(Ordering::Relaxed);
    eprintln!("soak: {SWAPS} swaps, {connections} connections, 0 failures");
    assert!(
        connections >= 100,
        "too little load: {connections} connections"
    );
    assert_eq!(legate.metric("legate_config_generation"), generation as f64);
    assert_eq!(
        legate.metric(r#"legate_config_reloads_total{result="error"}"#),
        rejected as f64
    );
    assert_eq!(
        legate.metric(r#"legate_config_reloads_total{result="success"}"#),
        (generation - 1) as f64
    );
}

/// 1. A running legate's ConfigMap is swapped to an empty file, then to a
///    volume with no file at all.
/// 2. Each is rejected like an invalid config: the generation stays 1, the
///    error is counted and shown in `/config`, `/readyz` stays 200 and the
///    listener keeps serving (before, an empty table closed every listener).
#[test]
fn an_empty_read_is_rejected_and_the_table_kept() {
    let a = Backend::named_echo("a");
    let mut cm = ConfigMap::new(&[("routes.yaml", &routes("\"127.0.0.1:0\"", a.addr, ""))]);
    let legate = Legate::start_on(&cm, &[]);
    let addr = legate.addr("app");

    for (n, files) in [(1.0, &[("routes.yaml", "")][..]), (2.0, &[][..])] {
        cm.update(files);
        wait_until("the empty read is rejected", || {
            legate.metric(r#"legate_config_reloads_total{result="error"}"#) >= n
        });
        assert_eq!(legate.metric("legate_config_generation"), 1.0);
        let (_, config) = legate.get("/config");
        let config: serde_json::Value = serde_json::from_str(&config).unwrap();
        let error = config["reload"]["last_error"]["message"]
            .as_str()
            .unwrap_or("");
        assert!(
            error.contains("file is empty") || error.contains("no *.yaml or *.yml file"),
            "{error}"
        );
        assert_eq!(legate.get("/readyz").0, 200);
        assert_eq!(Conn::open(addr).backend, "a");
    }
}

/// 1. Cluster `old` has active health checks (every 50 ms) and a connection
///    open through it, which keeps generation 1 alive.
/// 2. A reload removes `old` (the listener now uses `new`).
/// 3. `old`'s probes stop at once, although the open connection still uses
///    the old generation (and keeps echoing), and every metric series of
///    `old` is gone from `/metrics`.
#[test]
fn a_removed_cluster_stops_probing_and_its_series_go() {
    let old = Backend::named_echo("old");
    let new = Backend::named_echo("new");
    let config = |cluster: &str, extra: &str| {
        format!(
            "listeners:\n  - {{ name: app, listen: \"127.0.0.1:0\", cluster: {cluster} }}\nclusters:\n  - {{ name: new, endpoints: [ \"{}\" ] }}\n{extra}",
            new.addr
        )
    };
    let old_cluster = format!(
        "  - {{ name: old, endpoints: [ \"{}\" ], health: {{ interval: 50ms, timeout: 40ms }} }}\n",
        old.addr
    );
    let mut cm = ConfigMap::new(&[("routes.yaml", &config("old", &old_cluster))]);
    let legate = Legate::start_on(&cm, &[]);
    let mut held = Conn::open(legate.addr("app"));
    assert_eq!(held.backend, "old");
    wait_until("a few probes", || old.accepted() >= 4);

    cm.update(&[("routes.yaml", &config("new", ""))]);
    legate.wait_generation(2);
    let after_reload = old.accepted();
    // Ten probe intervals: a probe still running would be seen several times.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        old.accepted() <= after_reload + 1,
        "probes went on: {after_reload} -> {}",
        old.accepted()
    );
    held.echo("the old generation's connection lives on")
        .unwrap();
    let (_, metrics) = legate.get("/metrics");
    let leftovers: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains(r#"cluster="old""#))
        .collect();
    assert!(
        leftovers.is_empty(),
        "series of a removed cluster: {leftovers:?}"
    );
    assert!(metrics.contains(r#"legate_upstream_connects_total{cluster="new""#));
}

/// 1. Cluster `db` with `drain_on_change: 200ms` and endpoint A; connection X
///    open to A.
/// 2. A reload adds endpoint B (a scale-out): after well past the grace, X
///    still echoes (before, every connection of the cluster was closed).
/// 3. A reload removes A: X is closed after the grace.
#[test]
fn drain_on_change_closes_only_connections_whose_endpoint_left() {
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let config = |endpoints: &str| {
        format!(
            "listeners:\n  - {{ name: app, listen: \"127.0.0.1:0\", cluster: db }}\nclusters:\n  - {{ name: db, endpoints: [ {endpoints} ], drain_on_change: 200ms }}\n"
        )
    };
    let mut cm = ConfigMap::new(&[("routes.yaml", &config(&format!("\"{}\"", a.addr)))]);
    let legate = Legate::start_on(&cm, &[]);
    let mut x = Conn::open(legate.addr("app"));
    assert_eq!(x.backend, "a");

    cm.update(&[(
        "routes.yaml",
        &config(&format!("\"{}\", \"{}\"", a.addr, b.addr)),
    )]);
    legate.wait_generation(2);
    // Three graces: a drain would have closed it by now.
    std::thread::sleep(Duration::from_millis(600));
    x.echo("the scale-out left me alone").unwrap();

    cm.update(&[("routes.yaml", &config(&format!("\"{}\"", b.addr)))]);
    legate.wait_generation(3);
    assert!(
        x.closed(),
        "the connection to the removed endpoint stayed open"
    );
}
