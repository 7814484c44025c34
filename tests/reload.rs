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

/// Soak: 40 ConfigMap swaps alternating the cluster between two echo backends
/// (and a split between them), while 4 clients keep opening connections and
/// streaming lines through them. Zero failed connections, zero wrong bytes.
#[test]
fn soak_swaps_under_load() {
    const SWAPS: u64 = 40;
    let a = Backend::named_echo("a");
    let b = Backend::named_echo("b");
    let config = |i: u64| {
        let target = match i % 3 {
            0 => "cluster: a".to_string(),
            1 => "cluster: b".to_string(),
            _ => "split: [ { cluster: a, weight: 1 }, { cluster: b, weight: 1 } ]".to_string(),
        };
        format!(
            "listeners:\n  - {{ name: app, listen: \"127.0.0.1:0\", {target} }}\nclusters:\n  - {{ name: a, endpoints: [ \"{}\" ] }}\n  - {{ name: b, endpoints: [ \"{}\" ] }}\n",
            a.addr, b.addr
        )
    };
    let mut cm = ConfigMap::new(&[("routes.yaml", &config(0))]);
    let legate = Legate::start_on(&cm, &[]);
    let addr = legate.addr("app");

    let stop = Arc::new(AtomicBool::new(false));
    let connections = Arc::new(AtomicU64::new(0));
    let lines = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (stop, connections, lines) = (stop.clone(), connections.clone(), lines.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut conn = Conn::open(addr);
                    if conn.backend != "a" && conn.backend != "b" {
                        return Err(format!("unknown backend {:?}", conn.backend));
                    }
                    for j in 0..20 {
                        let line =
                            format!("client {client} conn {n} line {j} {}", "x".repeat(j * 50));
                        conn.echo(&line)
                            .map_err(|e| format!("client {client} conn {n}: {e}"))?;
                        lines.fetch_add(1, Ordering::Relaxed);
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

    for i in 1..=SWAPS {
        cm.update(&[("routes.yaml", &config(i))]);
        legate.wait_generation(i + 1);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .expect("client thread")
            .expect("client saw a failure");
    }
    let (connections, lines) = (
        connections.load(Ordering::Relaxed),
        lines.load(Ordering::Relaxed),
    );
    eprintln!("soak: {SWAPS} swaps, {connections} connections, {lines} echoed lines, 0 failures");
    assert!(
        connections >= 40,
        "too little load: {connections} connections"
    );
    assert_eq!(
        legate.metric(r#"legate_config_reloads_total{result="error"}"#),
        0.0
    );
}
