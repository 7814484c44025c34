//! `protocol: postgres` against real PostgreSQL servers: TLS originated the
//! way Postgres does it (SSLRequest first), cancels that reach the session's
//! server, and cut-overs that close sessions between transactions.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::configmap::ConfigMap;
use support::pg::{Access, PgConn, Postgres, Reply, cancel};
use support::pki::Pki;
use support::{Legate, wait_until};

/// A postgres listener `db` (with `extra` listener fields) to one server.
fn one_server(pg: &Postgres, extra: &str) -> String {
    format!(
        "listeners:\n  - {{ name: db, listen: \"127.0.0.1:0\", protocol: postgres, cluster: pg{extra} }}\nclusters:\n  - {{ name: pg, endpoints: [ \"{}\" ] }}\n",
        pg.addr
    )
}

fn psql(addr: SocketAddr, sslmode: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode} connect_timeout=5",
            addr.port()
        ))
        .args(["-qAtX", "-c", sql])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(if out.status.success() {
        &out.stdout
    } else {
        &out.stderr
    })
    .trim()
    .to_string();
    (out.status.success(), text)
}

/// 1. A TLS-only PostgreSQL (`hostssl` + `cert` authentication, test CA) and
///    a plaintext one.
/// 2. Through a postgres listener whose cluster has `tls:` (CA, client
///    certificate), psql with `sslmode=disable` and `sslmode=prefer` is
///    served, and the server sees a TLS session authenticated by legate's
///    client certificate.
/// 3. A cluster that trusts another CA, and one whose server has no TLS, fail
///    with the documented errors (`tls_error`; "answered N to SSLRequest").
/// 4. Without `tls:` on the cluster, the app's own SSLRequest goes to the
///    server: `sslmode=prefer` to the plaintext server works.
/// 5. `legate check` refuses `tls:` on a plain TCP listener on port 5432.
#[test]
fn tls_is_originated_the_postgres_way() {
    let pki = Pki::new("pg");
    let server = pki.issue("server", "localhost", &["localhost"], false);
    let client = pki.issue("client", "postgres", &[], false);
    let other = Pki::new("other");
    let tls_pg = Postgres::start(Access::TlsCert {
        server,
        client_ca: pki.ca(),
    });
    let plain_pg = Postgres::start(Access::Plain);
    let (ca, other_ca) = (pki.ca(), other.ca());
    let tls = |ca: &std::path::Path| {
        format!(
            "{{ sni: localhost, ca: \"{}\", cert: \"{}\", key: \"{}\" }}",
            ca.display(),
            client.cert.display(),
            client.key.display()
        )
    };
    let yaml = format!(
        "listeners:
  - {{ name: db, listen: \"127.0.0.1:0\", protocol: postgres, cluster: tls-db }}
  - {{ name: wrong-ca, listen: \"127.0.0.1:0\", protocol: postgres, cluster: wrong-ca }}
  - {{ name: no-tls, listen: \"127.0.0.1:0\", protocol: postgres, cluster: no-tls }}
  - {{ name: plain, listen: \"127.0.0.1:0\", protocol: postgres, cluster: plain }}
clusters:
  - {{ name: tls-db, endpoints: [ \"{tls}\" ], tls: {good} }}
  - {{ name: wrong-ca, endpoints: [ \"{tls}\" ], tls: {bad} }}
  - {{ name: no-tls, endpoints: [ \"{plain}\" ], tls: {good} }}
  - {{ name: plain, endpoints: [ \"{plain}\" ] }}
",
        tls = tls_pg.addr,
        plain = plain_pg.addr,
        good = tls(&ca),
        bad = tls(&other_ca),
    );
    let legate = Legate::start(&yaml);
    let sql = "select ssl::text || ' ' || coalesce(client_dn, '-') from pg_stat_ssl where pid = pg_backend_pid()";
    for sslmode in ["disable", "prefer"] {
        let (ok, out) = psql(legate.addr("db"), sslmode, sql);
        assert!(ok, "sslmode={sslmode}: {out}");
        assert_eq!(out, "true /CN=postgres", "sslmode={sslmode}");
    }
    // The server itself refuses plaintext: legate really did the TLS.
    let (ok, out) = psql(tls_pg.addr, "disable", "select 1");
    assert!(!ok, "{out}");

    let (ok, out) = psql(legate.addr("wrong-ca"), "disable", "select 1");
    assert!(!ok, "{out}");
    legate.wait_log(|l| {
        l.contains("TLS handshake with upstream failed") && l.contains("UnknownIssuer")
    });
    let (ok, out) = psql(legate.addr("no-tls"), "disable", "select 1");
    assert!(!ok, "{out}");
    legate.wait_log(|l| l.contains("answered N to SSLRequest"));
    assert!(
        legate.metric(r#"legate_upstream_connects_total{cluster="no-tls",result="tls_error"}"#)
            >= 1.0
    );

    let (ok, out) = psql(
        legate.addr("plain"),
        "prefer",
        "select 'plain ' || (select ssl::text from pg_stat_ssl where pid = pg_backend_pid())",
    );
    assert!(ok, "{out}");
    assert_eq!(out, "plain false");

    let dir = support::config_dir(&[(
        "db.yaml",
        &format!(
            "listeners:\n  - {{ name: db, listen: \"127.0.0.1:5432\", cluster: db }}\nclusters:\n  - {{ name: db, endpoints: [ \"{}\" ], tls: {} }}\n",
            tls_pg.addr,
            tls(&ca)
        ),
    )]);
    let (ok, _, stderr) = support::check(dir.path());
    assert!(!ok);
    assert!(stderr.contains("needs protocol: postgres"), "{stderr}");
}

/// 1. Two PostgreSQL servers behind one two-endpoint cluster.
/// 2. Four sessions (spread over both servers) each run `pg_sleep(30)`; a
///    CancelRequest sent to legate for each (a new connection, as libpq
///    does) ends each query within 1 s: legate sent it to the session's
///    server, not to whichever the balancer would pick.
/// 3. psql's own cancel (SIGINT) works the same way.
/// 4. After a reload moves the listener to a one-endpoint cluster, a session
///    still on the old target is cancelled on its own server.
/// 5. A key no session has is dropped quietly (counted `unknown`).
#[test]
fn cancels_reach_the_server_that_runs_the_query() {
    let a = Postgres::start(Access::Plain);
    let b = Postgres::start(Access::Plain);
    let routes = |cluster: &str| {
        format!(
            "listeners:\n  - {{ name: db, listen: \"127.0.0.1:0\", protocol: postgres, cluster: {cluster} }}\nclusters:\n  - {{ name: both, endpoints: [ \"{}\", \"{}\" ] }}\n  - {{ name: b-only, endpoints: [ \"{}\" ] }}\n",
            a.addr, b.addr, b.addr
        )
    };
    let mut cm = ConfigMap::new(&[("routes.yaml", &routes("both"))]);
    let legate = Legate::start_on(&cm, &[]);
    let addr = legate.addr("db");
    let sleeping = |n: usize| {
        let count = |pg: &Postgres| -> usize {
            pg.sql("select count(*) from pg_stat_activity where query like 'select pg_sleep(30)%' and state = 'active'")
                .parse()
                .unwrap()
        };
        wait_until("queries running", || count(&a) + count(&b) == n);
    };
    let run_and_cancel = |conns: Vec<PgConn>| {
        let n = conns.len();
        let keys: Vec<Vec<u8>> = conns.iter().map(|c| c.key.clone()).collect();
        let running: Vec<_> = conns
            .into_iter()
            .map(|mut c| std::thread::spawn(move || c.query("select pg_sleep(30)").unwrap()))
            .collect();
        sleeping(n);
        let began = Instant::now();
        for key in &keys {
            cancel(addr, key);
        }
        for t in running {
            match t.join().unwrap() {
                Reply::Error(code, _) => assert_eq!(code, "57014", "query_canceled"),
                other => panic!("not cancelled: {other:?}"),
            }
        }
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "{:?}",
            began.elapsed()
        );
    };
    let conns: Vec<PgConn> = (0..4).map(|_| PgConn::connect(addr).unwrap()).collect();
    for pg in [&a, &b] {
        let sessions: u32 = pg
            .sql("select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()")
            .parse()
            .unwrap();
        assert!(sessions >= 1, "the balancer used both servers");
    }
    run_and_cancel(conns);

    let psql = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable",
            addr.port()
        ))
        .args(["-qAtX", "-c", "select pg_sleep(30)"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sleeping(1);
    let began = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-INT", &psql.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = psql.wait_with_output_timeout();
    assert!(began.elapsed() < Duration::from_secs(1));
    assert!(
        out.contains("canceling statement due to user request"),
        "{out}"
    );

    // Sessions opened before the reload stay on their servers (no drain).
    let old: Vec<PgConn> = (0..2).map(|_| PgConn::connect(addr).unwrap()).collect();
    cm.update(&[("routes.yaml", &routes("b-only"))]);
    legate.wait_generation(2);
    run_and_cancel(old);

    cancel(addr, &[0, 0, 0, 1, 0, 0, 0, 2]);
    wait_until("unknown key counted", || {
        legate.metric(r#"legate_postgres_cancels_total{listener="db",result="unknown"}"#) == 1.0
    });
    assert_eq!(
        legate.metric(r#"legate_postgres_cancels_total{listener="db",result="routed"}"#),
        7.0
    );
}

trait WaitOutput {
    fn wait_with_output_timeout(self) -> String;
}

impl WaitOutput for std::process::Child {
    fn wait_with_output_timeout(mut self) -> String {
        let deadline = Instant::now() + support::DEADLINE;
        while Instant::now() < deadline {
            if self.try_wait().unwrap().is_some() {
                let out = self.wait_with_output().unwrap();
                return String::from_utf8_lossy(&out.stderr).into_owned();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.kill();
        panic!("psql did not end");
    }
}

/// What the app's workers saw.
#[derive(Default)]
struct Tally {
    committed: AtomicUsize,
    /// Errors after BEGIN and before COMMIT's answer: a transaction cut.
    aborted: AtomicUsize,
    /// Errors on COMMIT itself: its reply lost.
    lost: AtomicUsize,
    /// Connections found closed between transactions (a pool's check).
    reconnects: AtomicUsize,
}

/// One worker of an app with a reconnecting pool: transfer transactions of
/// five round trips each, until `stop`.
fn worker(id: usize, addr: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let mut conn: Option<PgConn> = None;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let c = match &mut conn {
            Some(c) => c,
            None => match PgConn::connect(addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
            },
        };
        n += 1;
        let from = (id + n) % 10;
        let to = (from + 1 + n % 9) % 10;
        // Rows locked in id order: transfers never deadlock each other.
        let (first, second) = if from < to {
            ((from, "-"), (to, "+"))
        } else {
            ((to, "+"), (from, "-"))
        };
        if c.query("begin").is_err() {
            tally.reconnects.fetch_add(1, Ordering::Relaxed);
            conn = None;
            continue;
        }
        let body = [
            format!(
                "update accounts set balance = balance {} 1 where id = {}",
                first.1, first.0
            ),
            format!(
                "update accounts set balance = balance {} 1 where id = {}",
                second.1, second.0
            ),
            format!("insert into ledger (worker, at) values ({id}, clock_timestamp())"),
        ];
        if body
            .iter()
            .any(|q| !matches!(c.query(q), Ok(Reply::Rows(_))))
        {
            tally.aborted.fetch_add(1, Ordering::Relaxed);
            conn = None;
            continue;
        }
        match c.query("commit") {
            Ok(Reply::Rows(_)) => {
                tally.committed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                tally.lost.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

/// 1. Two PostgreSQL servers A and B with the same accounts; the listener
///    sends to A, which has `drain_on_change: 10s` and `cutover: fenced`.
/// 2. Eight workers with persistent, reconnecting connections run transfer
///    transactions (BEGIN, two UPDATEs, an INSERT stamped with
///    clock_timestamp(), COMMIT: five round trips) while the ConfigMap is
///    flipped to B, kubelet style.
/// 3. No transaction is cut and no commit's reply is lost: every session on
///    A was closed at an idle point (counted `idle`, none `forced`); the rows
///    on A and B together are exactly the acknowledged commits; every row on
///    A is older than every row on B (the fence: never two writers); the
///    balances still sum to 1000 on each.
#[test]
fn a_cutover_closes_sessions_between_transactions_and_fences_the_new_target() {
    let a = Postgres::start(Access::Plain);
    let b = Postgres::start(Access::Plain);
    for pg in [&a, &b] {
        pg.sql("create table accounts (id int primary key, balance int not null); insert into accounts select g, 100 from generate_series(0, 9) g; create table ledger (id serial, worker int, at timestamptz)");
    }
    let routes = |cluster: &str| {
        format!(
            "listeners:\n  - {{ name: db, listen: \"127.0.0.1:0\", protocol: postgres, cluster: {cluster} }}\nclusters:\n  - {{ name: pg-a, endpoints: [ \"{}\" ], drain_on_change: 10s, cutover: fenced, health: {{ kind: postgres, interval: 1s }} }}\n  - {{ name: pg-b, endpoints: [ \"{}\" ], drain_on_change: 10s, health: {{ kind: postgres, interval: 1s }} }}\n",
            a.addr, b.addr
        )
    };
    let mut cm = ConfigMap::new(&[("routes.yaml", &routes("pg-a"))]);
    let legate = Legate::start_on(&cm, &[]);
    let addr = legate.addr("db");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let workers: Vec<_> = (0..8)
        .map(|id| {
            let (stop, tally) = (stop.clone(), tally.clone());
            std::thread::spawn(move || worker(id, addr, &stop, &tally))
        })
        .collect();
    wait_until("commits on A", || {
        tally.committed.load(Ordering::Relaxed) >= 200
    });
    cm.update(&[("routes.yaml", &routes("pg-b"))]);
    legate.wait_generation(2);
    wait_until("commits on B", || {
        b.sql("select count(*) from ledger")
            .parse::<usize>()
            .unwrap()
            >= 200
    });
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }

    let on = |pg: &Postgres| {
        pg.sql("select count(*) from ledger")
            .parse::<usize>()
            .unwrap()
    };
    let (on_a, on_b) = (on(&a), on(&b));
    let t = |name: &str| match name {
        "committed" => tally.committed.load(Ordering::Relaxed),
        "aborted" => tally.aborted.load(Ordering::Relaxed),
        "lost" => tally.lost.load(Ordering::Relaxed),
        _ => tally.reconnects.load(Ordering::Relaxed),
    };
    eprintln!(
        "committed {} (A {on_a}, B {on_b}), aborted {}, lost {}, reconnects {}",
        t("committed"),
        t("aborted"),
        t("lost"),
        t("reconnects")
    );
    assert_eq!(t("aborted"), 0, "transactions cut mid-flight");
    assert_eq!(t("lost"), 0, "commits whose reply was lost");
    assert_eq!(on_a + on_b, t("committed"), "rows = acknowledged commits");
    let last_a = a.sql("select max(at) from ledger");
    let first_b = b.sql("select min(at) from ledger");
    let later = a.sql(&format!(
        "select '{last_a}'::timestamptz < '{first_b}'::timestamptz"
    ));
    assert_eq!(
        later, "t",
        "a commit on A ({last_a}) after the first on B ({first_b})"
    );
    for pg in [&a, &b] {
        assert_eq!(pg.sql("select sum(balance) from accounts"), "1000");
    }
    let idle = legate.metric(r#"legate_postgres_sessions_closed_total{how="idle",listener="db"}"#);
    assert!((1.0..=8.0).contains(&idle), "closed at idle: {idle}");
    assert_eq!(
        legate.metric(r#"legate_postgres_sessions_closed_total{how="forced",listener="db"}"#),
        0.0
    );
    assert!(legate.metric(r#"legate_postgres_held_sessions_total{listener="db"}"#) >= 1.0);
}

/// 1. A session inside a transaction (BEGIN, an INSERT) and an idle one.
/// 2. legate gets SIGTERM: the idle session is closed between transactions
///    at once; the busy one is not cut: its COMMIT goes through and is
///    answered, and only then is it closed.
/// 3. legate exits once both are gone, well before its drain timeout, and
///    the row is on the server.
#[test]
fn sigterm_closes_sessions_between_transactions() {
    let pg = Postgres::start(Access::Plain);
    pg.sql("create table t (x int)");
    let mut legate = Legate::start_with(&one_server(&pg, ""), &["--drain-timeout", "20s"]);
    let addr = legate.addr("db");
    let mut idle = PgConn::connect(addr).unwrap();
    assert!(matches!(idle.query("select 1"), Ok(Reply::Rows(_))));
    let mut busy = PgConn::connect(addr).unwrap();
    assert!(matches!(busy.query("begin"), Ok(Reply::Rows(_))));
    assert!(matches!(
        busy.query("insert into t values (1)"),
        Ok(Reply::Rows(_))
    ));

    let began = Instant::now();
    legate.signal("TERM");
    assert!(
        idle.closed_within(Duration::from_secs(5)),
        "the idle session was not closed"
    );
    legate.wait_log(|l| l.contains("session must leave its server"));
    assert!(
        matches!(busy.query("commit"), Ok(Reply::Rows(_))),
        "the commit was cut"
    );
    assert!(
        busy.closed_within(Duration::from_secs(5)),
        "closed after the commit"
    );
    legate.wait_exit(Duration::from_secs(10));
    assert!(began.elapsed() < Duration::from_secs(10));
    assert_eq!(pg.sql("select count(*) from t"), "1");
}

/// 1. A postgres listener with `idle_timeout: 500ms`.
/// 2. A session that runs a query every 150 ms for 1.2 s stays open; one
///    that sends nothing is closed after about 500 ms.
#[test]
fn idle_timeout_closes_quiet_sessions_only() {
    let pg = Postgres::start(Access::Plain);
    let legate = Legate::start(&one_server(&pg, ", idle_timeout: 500ms"));
    let addr = legate.addr("db");
    let mut busy = PgConn::connect(addr).unwrap();
    let mut quiet = PgConn::connect(addr).unwrap();
    let began = Instant::now();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            matches!(busy.query("select 1"), Ok(Reply::Rows(_))),
            "a busy session was closed"
        );
    }
    assert!(
        quiet.closed_within(Duration::from_secs(3)),
        "the quiet session stayed open"
    );
    assert!(began.elapsed() < Duration::from_secs(4));
}
