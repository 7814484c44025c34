//! `legate diff OLD NEW`: what a reload would do, on the shipped route tables,
//! on invalid and empty directories, and against a running legate, with the
//! exit codes a pipeline gates on (0 same, 1 errors, 2 changes).

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::backends::Backend;
use support::{Legate, config_dir};

/// Runs `legate diff [--json] old new`: (exit code, stdout, stderr).
fn diff(old: &str, new: &str, json: bool) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
    cmd.arg("diff");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg(old).arg(new).output().expect("run legate diff");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn diff_json(old: &str, new: &str) -> (i32, Value) {
    let (code, stdout, stderr) = diff(old, new, true);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"));
    (code, report)
}

fn shipped(dir: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("routes")
        .join(dir)
        .display()
        .to_string()
}

fn path(dir: &tempfile::TempDir) -> String {
    dir.path().display().to_string()
}

/// The change for `object` `name` in a JSON report.
fn change<'a>(report: &'a Value, object: &str, name: &str) -> &'a Value {
    report["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["object"] == object && c["name"] == name)
        .unwrap_or_else(|| panic!("no {object} {name} in {report:#}"))
}

#[test]
fn same_table_exits_0() {
    let (code, stdout, _) = diff(&shipped("prod"), &shipped("prod"), false);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("no changes"), "{stdout}");
    let (code, report) = diff_json(&shipped("dev"), &shipped("dev"));
    assert_eq!(code, 0);
    assert_eq!(report["changes"], serde_json::json!([]));
}

/// dev -> prod: routes, a failover cluster, endpoints, lb and health.
#[test]
fn dev_to_prod_lists_every_change_and_exits_2() {
    let (code, report) = diff_json(&shipped("dev"), &shipped("prod"));
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(change(&report, "route", "api/payments")["change"], "added");
    assert_eq!(change(&report, "route", "api/0")["change"], "removed");
    assert_eq!(
        change(&report, "cluster", "orders-db-dr")["change"],
        "added"
    );
    let cache = change(&report, "cluster", "cache");
    let details = cache["details"].to_string();
    assert!(
        details.contains("lb: round_robin -> least_conn"),
        "{details}"
    );
    assert!(
        details.contains("endpoints added: redis-0.redis."),
        "{details}"
    );
    // No drain_on_change on cache: connections to the endpoint it drops stay.
    assert_eq!(cache["connections"][0]["fate"], "stay");
    assert_eq!(
        cache["connections"][0]["endpoint"],
        "redis.dev.svc.cluster.local.:6379"
    );
    let db = change(&report, "cluster", "orders-db")["details"].to_string();
    assert!(
        db.contains("failover: (none) -> [\\\"orders-db-dr\\\"]"),
        "{db}"
    );
    assert!(db.contains("\\\"kind\\\":\\\"postgres\\\""), "{db}");

    let (code, text, _) = diff(&shipped("dev"), &shipped("prod"), false);
    assert_eq!(code, 2);
    assert!(text.contains("+ route api/payments"), "{text}");
    assert!(text.contains("~ cluster cache"), "{text}");
    assert!(text.contains("7 changes"), "{text}");
}

/// The shipped database cut-over, from the table before the flip: the
/// Postgres listener moves, its sessions leave at transaction boundaries
/// within the old cluster's grace, and new ones wait (fenced).
#[test]
fn database_cutover_closes_at_transaction_boundaries() {
    let cutover =
        std::fs::read_to_string(Path::new(&shipped("migration")).join("database-cutover.yaml"))
            .expect("shipped table");
    let before = cutover.replace(
        "cluster: orders-db-new        # was: orders-db-old",
        "cluster: orders-db-old",
    );
    assert_ne!(before, cutover, "the shipped table names the flip");
    let old = config_dir(&[("database-cutover.yaml", &before)]);
    let new = config_dir(&[("database-cutover.yaml", &cutover)]);
    let (code, report) = diff_json(&path(&old), &path(&new));
    assert_eq!(code, 2, "{report:#}");
    assert_eq!(report["changes"].as_array().map(Vec::len), Some(1));
    let listener = change(&report, "listener", "orders-db");
    assert!(
        listener["details"][0]
            .as_str()
            .is_some_and(|d| d.contains("orders-db-old -> orders-db-new")),
        "{listener:#}"
    );
    let conns = &listener["connections"][0];
    assert_eq!(conns["cluster"], "orders-db-old");
    assert_eq!(conns["fate"], "fenced");
    assert_eq!(conns["grace"], "30s");
    assert!(
        conns.get("open_now").is_none(),
        "a directory has no live state"
    );

    // And back (the rollback): orders-db-new is not fenced.
    let (code, report) = diff_json(&path(&new), &path(&old));
    assert_eq!(code, 2);
    let conns = &change(&report, "listener", "orders-db")["connections"][0];
    assert_eq!(conns["fate"], "transaction_boundary");

    let (_, text, _) = diff(&path(&old), &path(&new), false);
    assert!(
        text.contains(
            "close at their next transaction boundary, at the latest after 30s; new sessions wait"
        ),
        "{text}"
    );
}

/// The broker split: a weight change moves no open connection; weight 0 on
/// the old cluster drains it after its grace.
#[test]
fn broker_split_weights_and_cutover() {
    let split = std::fs::read_to_string(Path::new(&shipped("migration")).join("broker-split.yaml"))
        .expect("shipped table");
    let weights = |old: u32, new: u32| {
        split
            .replace("weight: 90", &format!("weight: {old}"))
            .replace("weight: 10", &format!("weight: {new}"))
    };
    let at_90 = config_dir(&[("broker-split.yaml", &split)]);
    let at_50 = config_dir(&[("broker-split.yaml", &weights(50, 50))]);
    let at_0 = config_dir(&[("broker-split.yaml", &weights(0, 100))]);

    let (code, report) = diff_json(&path(&at_90), &path(&at_50));
    assert_eq!(code, 2);
    let broker = change(&report, "listener", "broker");
    assert!(broker.get("connections").is_none(), "{broker:#}");
    assert!(
        broker["details"][0]
            .as_str()
            .is_some_and(|d| d.contains("broker-old=90, broker-new=10] -> split [broker-old=50")),
        "{broker:#}"
    );

    let (code, report) = diff_json(&path(&at_50), &path(&at_0));
    assert_eq!(code, 2);
    let conns = &change(&report, "listener", "broker")["connections"][0];
    assert_eq!(conns["cluster"], "broker-old");
    assert_eq!(conns["fate"], "drain");
    assert_eq!(conns["grace"], "1m");
}

/// TLS and health are compared: a changed setting is named, a rotated CA
/// shows as a changed fingerprint, a new health check as added.
#[test]
fn tls_and_health_changes_are_named() {
    let (first, second) = (
        support::pki::Pki::new("first"),
        support::pki::Pki::new("second"),
    );
    let table = |ca: &Path, sni: &str, health: &str| {
        format!(
            "listeners:\n  - {{ name: app, listen: 127.0.0.1:0, cluster: db }}\n\
             clusters:\n  - name: db\n    endpoints: [ \"127.0.0.1:8443\" ]\n\
             \x20   tls: {{ ca: {}, sni: {sni} }}\n{health}",
            ca.display()
        )
    };
    let old = config_dir(&[("legate.yaml", &table(&first.ca(), "db.test", ""))]);
    let renamed = config_dir(&[(
        "legate.yaml",
        &table(&first.ca(), "db2.test", "    health: { interval: 2s }\n"),
    )]);
    let (code, report) = diff_json(&path(&old), &path(&renamed));
    assert_eq!(code, 2, "{report:#}");
    let details = change(&report, "cluster", "db")["details"].to_string();
    assert!(
        details.contains("tls: sni: db.test -> db2.test"),
        "{details}"
    );
    assert!(details.contains("health: (none) -> {"), "{details}");

    let rotated = config_dir(&[("legate.yaml", &table(&second.ca(), "db.test", ""))]);
    let (code, report) = diff_json(&path(&old), &path(&rotated));
    assert_eq!(code, 2, "{report:#}");
    let details = change(&report, "cluster", "db")["details"].to_string();
    assert!(details.contains("CA, certificate or key file"), "{details}");
}

/// A route whose header edits change is reported, though its target stays.
#[test]
fn route_header_edits_are_compared() {
    let http = std::fs::read_to_string(Path::new(&shipped("http")).join("legate.yaml"))
        .expect("shipped table");
    let edited = http.replace("x-forwarded-by: legate", "x-forwarded-by: legate-v2");
    assert_ne!(edited, http);
    let new = config_dir(&[("legate.yaml", &edited)]);
    let (code, report) = diff_json(&shipped("http"), &path(&new));
    assert_eq!(code, 2, "{report:#}");
    let details = change(&report, "route", "api/internal")["details"].to_string();
    assert!(
        details.contains("request_headers") && details.contains("legate-v2"),
        "{details}"
    );
}

/// NEW that a reload would reject: exit 1 with the error naming file and line;
/// an empty directory too.
#[test]
fn invalid_or_empty_new_exits_1_with_the_error() {
    let bad = config_dir(&[(
        "routes.yaml",
        "listeners:\n  - name: app\n    listen: 127.0.0.1:0\n    cluster: nowhere\n",
    )]);
    let (code, stdout, _) = diff(&shipped("prod"), &path(&bad), false);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("routes.yaml:4"), "{stdout}");
    assert!(stdout.contains("nowhere"), "{stdout}");
    assert!(stdout.contains("would be rejected"), "{stdout}");

    let empty = tempfile::tempdir().expect("temp dir");
    let (code, report) = diff_json(&shipped("prod"), &path(&empty));
    assert_eq!(code, 1);
    let error = report["errors"][0].as_str().expect("an error");
    assert!(error.contains("no *.yaml"), "{error}");

    // A broken OLD is an error too: there is nothing to compare against.
    let (code, _, _) = diff(&path(&bad), &shipped("prod"), false);
    assert_eq!(code, 1);
}

/// OLD is a running legate's /config: the report counts the connections the
/// reload would drain, and an unreachable admin address is an error.
#[test]
fn against_a_running_legate_counts_open_connections() {
    let old_backend = Backend::echo();
    let new_backend = Backend::echo();
    let table = |cluster: &str| {
        format!(
            "listeners:\n  - {{ name: app, listen: 127.0.0.1:0, cluster: {cluster} }}\n\
             clusters:\n  - {{ name: old, endpoints: [ \"{}\" ], drain_on_change: 5s }}\n\
             \x20 - {{ name: new, endpoints: [ \"{}\" ] }}\n",
            old_backend.addr, new_backend.addr
        )
    };
    let legate = Legate::start(&table("old"));
    let mut open = std::net::TcpStream::connect(legate.addr("app")).expect("connect");
    open.write_all(b"ping").expect("write");
    let mut echoed = [0u8; 4];
    open.read_exact(&mut echoed).expect("echo through legate");
    let live = format!("http://{}", legate.admin);

    let same = config_dir(&[("legate.yaml", &table("old"))]);
    let (code, report) = diff_json(&live, &path(&same));
    assert_eq!(code, 0, "{report:#}");

    let moved = config_dir(&[("legate.yaml", &table("new"))]);
    let (code, report) = diff_json(&live, &path(&moved));
    assert_eq!(code, 2, "{report:#}");
    let conns = &change(&report, "listener", "app")["connections"][0];
    assert_eq!(conns["fate"], "drain");
    assert_eq!(conns["grace"], "5s");
    assert_eq!(conns["open_now"], 1);

    drop(legate);
    let (code, report) = diff_json(&live, &path(&moved));
    assert_eq!(code, 1);
    assert!(
        report["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains(&live))
    );
    let (code, report) = diff_json(&live.replace("http:", "https:"), &path(&moved));
    assert_eq!(code, 1);
    let error = report["errors"][0].as_str().unwrap_or_default();
    assert!(error.contains("plain HTTP"), "{error}");
}
