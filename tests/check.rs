//! `legate check`: every kind of bad config is rejected with file, line and field.

mod support;

use support::{check, config_dir};

const CLUSTER: &str = r#"
clusters:
  - name: db
    endpoints: [ "127.0.0.1:5432" ]
"#;

const LISTENER: &str = r#"
listeners:
  - { name: app, listen: 127.0.0.1:0, cluster: db }
"#;

/// Runs `legate check` on `files` and returns stderr, asserting exit 1.
fn rejected(files: &[(&str, &str)]) -> String {
    let dir = config_dir(files);
    let (ok, _, stderr) = check(dir.path());
    assert!(!ok, "expected rejection of {files:?}");
    stderr
}

/// A good directory: exit 0, the compiled table printed as JSON.
#[test]
fn valid_config_prints_compiled_table() {
    let dir = config_dir(&[(
        "routes.yaml",
        r#"
listeners:
  - name: orders-db
    listen: 127.0.0.1:15432
    cluster: db
clusters:
  - name: db
    endpoints: [ "127.0.0.1:5432", "localhost:5433", "[::1]:5434" ]
    connect_timeout: 250ms
"#,
    )]);
    let (ok, stdout, stderr) = check(dir.path());
    assert!(ok, "{stderr}");
    let table: serde_json::Value = serde_json::from_str(&stdout).expect("JSON table");
    assert_eq!(table["listeners"][0]["name"], "orders-db");
    assert_eq!(table["listeners"][0]["cluster"], "db");
    assert_eq!(table["clusters"][0]["connect_timeout"], "250ms");
    assert_eq!(
        table["clusters"][0]["endpoints"][1]["address"],
        "127.0.0.1:5433"
    );
}

#[test]
fn unknown_field_names_file_line_and_field() {
    let err = rejected(&[(
        "routes.yaml",
        "clusters:\n  - name: db\n    endpoints: [ \"127.0.0.1:1\" ]\n    conect_timeout: 2s\n",
    )]);
    assert!(err.contains("routes.yaml:4:5:"), "{err}");
    assert!(err.contains("unknown field `conect_timeout`"), "{err}");
    assert!(
        err.contains("connect_timeout"),
        "lists what is expected: {err}"
    );
}

#[test]
fn duplicate_key_is_rejected() {
    let err = rejected(&[(
        "routes.yaml",
        "clusters:\n  - name: db\n    name: db2\n    endpoints: [ \"127.0.0.1:1\" ]\n",
    )]);
    assert!(err.contains("routes.yaml:3:"), "{err}");
    assert!(err.contains(r#"duplicate key "name""#), "{err}");
}

#[test]
fn unknown_cluster_reference_is_rejected() {
    let err = rejected(&[
        (
            "listeners.yaml",
            "listeners:\n  - name: app\n    listen: 127.0.0.1:0\n    cluster: dbb\n",
        ),
        ("clusters.yaml", CLUSTER),
    ]);
    assert!(err.contains("listeners.yaml:4:14:"), "{err}");
    assert!(
        err.contains(r#"field "cluster": unknown cluster "dbb""#),
        "{err}"
    );
    assert!(err.contains("defined clusters: db"), "{err}");
}

#[test]
fn unknown_cluster_in_split_is_rejected() {
    let err = rejected(&[(
        "routes.yaml",
        &format!(
            "listeners:\n  - name: app\n    listen: 127.0.0.1:0\n    split:\n      - {{ cluster: db, weight: 9 }}\n      - {{ cluster: nope, weight: 1 }}\n{CLUSTER}"
        ),
    )]);
    assert!(err.contains("routes.yaml:6:"), "{err}");
    assert!(err.contains(r#"unknown cluster "nope""#), "{err}");
}

#[test]
fn bad_duration_is_rejected() {
    for bad in ["5", "5x", "fast", "-1s"] {
        let err = rejected(&[(
            "routes.yaml",
            &format!(
                "clusters:\n  - name: db\n    endpoints: [ \"127.0.0.1:1\" ]\n    connect_timeout: {bad}\n"
            ),
        )]);
        assert!(err.contains("routes.yaml:4:"), "{bad}: {err}");
        assert!(err.contains(r#"field "connect_timeout""#), "{bad}: {err}");
        assert!(err.contains("250ms"), "says what is expected: {err}");
    }
}

#[test]
fn bad_listen_address_is_rejected() {
    for bad in ["localhost:5432", "127.0.0.1", "127.0.0.1:99999", "1.2.3:80"] {
        let err = rejected(&[(
            "routes.yaml",
            &format!("listeners:\n  - name: app\n    listen: {bad}\n    cluster: db\n{CLUSTER}"),
        )]);
        assert!(err.contains("routes.yaml:3:"), "{bad}: {err}");
        assert!(err.contains(r#"field "listen""#), "{bad}: {err}");
    }
}

#[test]
fn bad_endpoint_is_rejected() {
    for bad in [
        "db",
        "db example:5432",
        "1.2.3:80",
        "127.0.0.1:x",
        "::1:5432",
    ] {
        let err = rejected(&[(
            "routes.yaml",
            &format!("clusters:\n  - name: db\n    endpoints:\n      - \"{bad}\"\n"),
        )]);
        assert!(err.contains("routes.yaml:4:"), "{bad}: {err}");
        assert!(err.contains("invalid endpoint"), "{bad}: {err}");
    }
}

#[test]
fn duplicate_listen_address_is_rejected() {
    let err = rejected(&[
        (
            "a.yaml",
            "listeners:\n  - name: one\n    listen: 127.0.0.1:7000\n    cluster: db\n",
        ),
        (
            "b.yaml",
            &format!(
                "listeners:\n  - name: two\n    listen: 127.0.0.1:7000\n    cluster: db\n{CLUSTER}"
            ),
        ),
    ]);
    assert!(err.contains("b.yaml:3:"), "{err}");
    assert!(err.contains("127.0.0.1:7000 is already used"), "{err}");
    assert!(err.contains("a.yaml:3"), "points at the first use: {err}");
}

#[test]
fn duplicate_names_across_files_are_rejected() {
    let err = rejected(&[
        ("a.yaml", CLUSTER),
        ("b.yml", CLUSTER),
        (
            "c.yaml",
            "listeners:\n  - { name: app, listen: 127.0.0.1:0, cluster: db }\n  - { name: app, listen: 127.0.0.1:0, cluster: db }\n",
        ),
    ]);
    assert!(err.contains("b.yml:3:"), "{err}");
    assert!(err.contains(r#"duplicate cluster name "db""#), "{err}");
    assert!(err.contains("c.yaml:3:"), "{err}");
    assert!(err.contains(r#"duplicate listener name "app""#), "{err}");
}

#[test]
fn unset_variable_without_default_is_rejected() {
    let err = rejected(&[(
        "routes.yaml",
        "clusters:\n  - name: db\n    endpoints: [ \"${LEGATE_TEST_SURELY_UNSET}\" ]\n",
    )]);
    assert!(err.contains("routes.yaml:3:19:"), "{err}");
    assert!(
        err.contains(r#""LEGATE_TEST_SURELY_UNSET" is not set"#),
        "{err}"
    );
}

#[test]
fn variables_and_defaults_are_interpolated() {
    let dir = config_dir(&[(
        "routes.yaml",
        "listeners:\n  - { name: app, listen: 127.0.0.1:0, cluster: db }\nclusters:\n  - name: db\n    endpoints: [ \"${LEGATE_TEST_HOST:-127.0.0.9}:${LEGATE_TEST_PORT}\" ]\n",
    )]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["check", "--config"])
        .arg(dir.path())
        .env("LEGATE_TEST_PORT", "6543")
        .env_remove("LEGATE_TEST_HOST")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("127.0.0.9:6543"), "{stdout}");
}

#[test]
fn missing_target_and_both_targets_are_rejected() {
    let err = rejected(&[(
        "routes.yaml",
        &format!(
            "listeners:\n  - name: none\n    listen: 127.0.0.1:0\n  - name: both\n    listen: 127.0.0.1:0\n    cluster: db\n    split: [ {{ cluster: db, weight: 1 }} ]\n{CLUSTER}"
        ),
    )]);
    assert!(err.contains("routes.yaml:2:"), "{err}");
    assert!(err.contains(r#"missing field "cluster""#), "{err}");
    assert!(err.contains("routes.yaml:7:"), "{err}");
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn syntax_error_and_wrong_type_are_located() {
    let err = rejected(&[("a.yaml", "clusters: [\n"), ("b.yaml", "listeners: 5\n")]);
    assert!(err.contains("a.yaml:1:"), "{err}");
    assert!(err.contains("b.yaml:1:"), "{err}");
    assert!(err.contains(r#"field "listeners""#), "{err}");
}

#[test]
fn unknown_protocol_lists_the_known_ones() {
    let err = rejected(&[(
        "routes.yaml",
        &format!(
            "listeners:\n  - name: app\n    listen: 127.0.0.1:0\n    protocol: udp\n    cluster: db\n{CLUSTER}"
        ),
    )]);
    assert!(err.contains("routes.yaml:4:"), "{err}");
    assert!(err.contains("unknown variant `udp`"), "{err}");
}

#[test]
fn missing_directory_is_an_error_not_a_panic() {
    let (ok, _, stderr) = check(std::path::Path::new("/nonexistent/legate-config"));
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/legate-config: cannot read config directory"),
        "{stderr}"
    );
}

/// Only *.yaml / *.yml count; hidden kubelet entries and other files are ignored;
/// a file with only comments adds nothing.
#[test]
fn only_yaml_files_are_read() {
    let dir = config_dir(&[
        ("notes.txt", "this: is not yaml config ["),
        (".hidden.yaml", "garbage: ["),
        ("comments.yaml", "# nothing here yet\n"),
        ("routes.yml", CLUSTER),
        ("listeners.yaml", LISTENER),
    ]);
    let (ok, stdout, stderr) = check(dir.path());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"db\""), "{stdout}");
}

#[test]
fn http_route_errors_are_located() {
    let err = rejected(&[(
        "routes.yaml",
        &format!(
            r#"listeners:
  - name: web
    listen: 127.0.0.1:0
    protocol: http
    routes:
      - match: {{ path_prefix: v2 }}
        cluster: db
      - match: {{ method: "G ET", headers: {{ x-debug: false }} }}
        cluster: nope
      - rewrite: {{ path_prefix: / }}
        cluster: db
      - mirror: {{ cluster: db, percent: 150 }}
        cluster: db
      - cluster: db
        split: [ {{ cluster: db, weight: 1 }} ]
{CLUSTER}"#
        ),
    )]);
    assert!(
        err.contains(r#"routes.yaml:6:"#)
            && err.contains(r#"field "path_prefix": must start with '/'"#),
        "{err}"
    );
    assert!(err.contains(r#"invalid method "G ET""#), "{err}");
    assert!(
        err.contains(r#""x-debug: false" is not a condition"#),
        "{err}"
    );
    assert!(
        err.contains(r#"routes.yaml:9:18: field "cluster": unknown cluster "nope""#),
        "{err}"
    );
    assert!(err.contains("path_prefix needs match.path_prefix"), "{err}");
    assert!(
        err.contains(r#"field "percent": must be between 0 and 100"#),
        "{err}"
    );
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn routes_need_protocol_http() {
    let err = rejected(&[(
        "routes.yaml",
        &format!(
            "listeners:\n  - name: db\n    listen: 127.0.0.1:0\n    routes: [ {{ cluster: db }} ]\n{CLUSTER}"
        ),
    )]);
    assert!(
        err.contains(r#"listener "db": "routes" need protocol: http"#),
        "{err}"
    );
}

#[test]
fn tls_errors_name_the_cluster_and_file() {
    let err = rejected(&[
        (
            "a.yaml",
            "clusters:\n  - name: a\n    endpoints: [ \"127.0.0.1:1\" ]\n    tls: { cert: /x.crt }\n",
        ),
        (
            "b.yaml",
            "clusters:\n  - name: b\n    endpoints: [ \"127.0.0.1:1\" ]\n    tls: { min_version: \"1.1\" }\n",
        ),
    ]);
    assert!(
        err.contains("a.yaml:4:10:") && err.contains(r#""cert" and "key" go together"#),
        "{err}"
    );
    assert!(
        err.contains("an IP endpoint has no name to verify"),
        "{err}"
    );
    assert!(
        err.contains("b.yaml:4:") && err.contains("unknown variant `1.1`"),
        "{err}"
    );

    let err = rejected(&[(
        "routes.yaml",
        "clusters:\n  - name: db\n    endpoints: [ \"db.internal:443\" ]\n    tls: { ca: /nonexistent/ca.pem }\nlisteners:\n  - { name: app, listen: 127.0.0.1:0, cluster: db }\n",
    )]);
    assert!(
        err.contains(r#"routes.yaml:4:10: cluster "db": tls: /nonexistent/ca.pem: cannot read"#),
        "{err}"
    );
}

/// Values that passed `check` and then aborted the process (issue: configs
/// that pass `check` but abort) are now rejected, each at its line:
/// - split weights that wrapped a u32 sum to 0 (or to 1, misrouting);
/// - a health interval of 2^64 s (overflowed the jitter), or 1ns (a busy loop);
/// - timeouts, TTLs and counts outside what can be scheduled.
#[test]
fn values_that_could_abort_are_out_of_range() {
    let split = |a: u64, b: u64| {
        format!(
            "listeners:\n  - name: app\n    listen: 127.0.0.1:0\n    split: [ {{ cluster: a, weight: {a} }}, {{ cluster: b, weight: {b} }} ]\nclusters:\n  - {{ name: a, endpoints: [ \"127.0.0.1:1\" ] }}\n  - {{ name: b, endpoints: [ \"127.0.0.1:2\" ] }}\n"
        )
    };
    for (a, b) in [(4294967295, 1), (4294967295, 2)] {
        let err = rejected(&[("routes.yaml", &split(a, b))]);
        assert!(
            err.contains(
                "routes.yaml:4:25: field \"weight\": 4294967295 is out of range (0 to 1000000)"
            ),
            "{err}"
        );
    }
    let err = rejected(&[("routes.yaml", &split(0, 0))]);
    assert!(err.contains("at least one weight must be above 0"), "{err}");
    // The largest weights there are still sum without wrapping.
    let dir = config_dir(&[("routes.yaml", &split(1_000_000, 1_000_000))]);
    let (ok, _, stderr) = check(dir.path());
    assert!(ok, "{stderr}");

    let cluster = |extra: &str| {
        format!("{LISTENER}clusters:\n  - {{ name: db, endpoints: [ \"127.0.0.1:1\" ]{extra} }}\n")
    };
    for (extra, want) in [
        (
            ", health: { interval: 18446744073709551615s }",
            "field \"interval\": 18446744073709551615s is out of range (10ms to 1h)",
        ),
        (
            ", health: { interval: 1ns, timeout: 1ns }",
            "field \"interval\": 1ns is out of range (10ms to 1h)",
        ),
        (
            ", health: { unhealthy: 4000000000 }",
            "field \"unhealthy\": 4000000000 is out of range (1 to 1000)",
        ),
        (
            ", connect_timeout: 100000h",
            "field \"connect_timeout\": 100000h is out of range (1ms to 5m)",
        ),
        (
            ", drain_on_change: 1000d",
            "field \"drain_on_change\": 24000h is out of range (0s to 24h)",
        ),
    ] {
        let err = rejected(&[("routes.yaml", &cluster(extra))]);
        assert!(err.contains("routes.yaml:5:"), "{extra}: {err}");
        assert!(err.contains(want), "{extra}: {err}");
    }
    let err = rejected(&[(
        "routes.yaml",
        &format!("resolver: {{ min_ttl: 1ns }}\n{}", cluster("")),
    )]);
    assert!(
        err.contains("field \"min_ttl\": 1ns is out of range (100ms to 24h)"),
        "{err}"
    );
    let err = rejected(&[(
        "routes.yaml",
        "listeners:\n  - { name: web, listen: 127.0.0.1:0, protocol: http, cluster: db, header_timeout: 0s, max_request_headers_size: 10, max_connections: 0 }\nclusters:\n  - { name: db, endpoints: [ \"127.0.0.1:1\" ] }\n",
    )]);
    for want in [
        "field \"header_timeout\": 0s is out of range (10ms to 1h)",
        "field \"max_request_headers_size\": 10 is out of range (8192 to 1048576 bytes)",
        "field \"max_connections\": 0 is out of range (1 to 1000000)",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    let err = rejected(&[(
        "routes.yaml",
        "listeners:\n  - { name: web, listen: 127.0.0.1:0, protocol: http, cluster: db, http_versions: [] }\n  - { name: raw, listen: 127.0.0.1:0, cluster: db, http_versions: [http1] }\n  - { name: bad, listen: 127.0.0.1:0, protocol: http, cluster: db, http_versions: [http3] }\nclusters:\n  - { name: db, endpoints: [ \"127.0.0.1:1\" ] }\n",
    )]);
    assert!(err.contains("unknown variant `http3`"), "{err}");
    let err = rejected(&[(
        "routes.yaml",
        "listeners:\n  - { name: web, listen: 127.0.0.1:0, protocol: http, cluster: db, http_versions: [] }\n  - { name: raw, listen: 127.0.0.1:0, cluster: db, http_versions: [http1] }\nclusters:\n  - { name: db, endpoints: [ \"127.0.0.1:1\" ] }\n",
    )]);
    for want in [
        "routes.yaml:2:",
        "listener \"web\": field \"http_versions\": list at least one of http1, h2c",
        "routes.yaml:3:",
        "listener \"raw\": http_versions is for protocol: http",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
}

/// An empty read is never a config: a directory with no config file, an
/// empty file, a dangling link (a half-deleted `..data`), or files that
/// define no listener are each rejected with exit 1 and a reason.
#[test]
fn empty_reads_are_rejected() {
    let dir = config_dir(&[]);
    let (ok, _, stderr) = check(dir.path());
    assert!(!ok);
    assert!(stderr.contains("no *.yaml or *.yml file"), "{stderr}");

    let err = rejected(&[("routes.yaml", "")]);
    assert!(err.contains("routes.yaml: file is empty"), "{err}");
    let err = rejected(&[("routes.yaml", "  \n\n")]);
    assert!(err.contains("routes.yaml: file is empty"), "{err}");

    let err = rejected(&[("routes.yaml", "# just a comment\n")]);
    assert!(err.contains("no listener is defined"), "{err}");
    let err = rejected(&[("routes.yaml", CLUSTER)]);
    assert!(err.contains("no listener is defined"), "{err}");

    // A kubelet-style volume whose ..data points at a deleted directory.
    let dir = config_dir(&[]);
    std::os::unix::fs::symlink("..2026_11_25_gone", dir.path().join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/routes.yaml", dir.path().join("routes.yaml")).unwrap();
    let (ok, _, stderr) = check(dir.path());
    assert!(!ok);
    assert!(
        stderr.contains("routes.yaml: cannot read: No such file or directory"),
        "{stderr}"
    );
}

/// YAML bombs (billion laughs through aliases, 100,000 levels of nesting) are
/// refused at once, with an error and exit 1, not a crash or a hang.
#[test]
fn yaml_bombs_are_refused() {
    let mut laughs = String::from(
        "listeners:\n  - name: app\n    listen: 127.0.0.1:0\n    cluster: db\nclusters:\n  - name: db\n    endpoints: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    let mut prev = 'a';
    for (i, name) in ('b'..='i').enumerate() {
        let refs = vec![format!("*{prev}"); 9].join(",");
        laughs.push_str(&format!(
            "  - name: db{i}\n    endpoints: &{name} [{refs}]\n"
        ));
        prev = name;
    }
    let deep = format!(
        "listeners: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    for bomb in [laughs, deep] {
        let began = std::time::Instant::now();
        let err = rejected(&[("routes.yaml", &bomb)]);
        assert!(err.contains("routes.yaml:"), "{err}");
        assert!(
            began.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            began.elapsed()
        );
    }
}

/// Command-line durations have ranges too: `--poll-interval 1ns` (93% CPU)
/// and `--poll-interval 18446744073709551615s` (overflowed an Instant) are
/// refused before anything starts.
#[test]
fn out_of_range_flags_are_refused() {
    for (flag, value) in [
        ("--poll-interval", "1ns"),
        ("--poll-interval", "18446744073709551615s"),
        ("--drain-timeout", "100000h"),
        ("--reload-debounce", "0s"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_legate"))
            .args([flag, value, "--config", "/nonexistent"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains("is out of range"),
            "{flag} {value}: {stderr}"
        );
    }
}

/// The PostgreSQL rules: a Postgres listener's clusters agree on `tls:`; a
/// `tls:` cluster is not shared with a TCP listener; `cutover: fenced` needs
/// `drain_on_change`; a health probe is `postgres` or HTTP, not both. Each
/// error names the file and line.
#[test]
fn postgres_rules_are_checked() {
    let err = rejected(&[(
        "pg.yaml",
        "listeners:
  - { name: db, listen: 127.0.0.1:0, protocol: postgres, cluster: a }
  - { name: raw, listen: 127.0.0.1:0, cluster: b }
clusters:
  - { name: a, endpoints: [ \"127.0.0.1:5432\" ], failover: [ b ], cutover: fenced }
  - { name: b, endpoints: [ \"127.0.0.1:5433\" ], tls: { verify: false } }
  - { name: c, endpoints: [ \"127.0.0.1:5434\" ], health: { kind: postgres, http_path: /x } }
",
    )]);
    assert!(
        err.contains("pg.yaml:2:") && err.contains("its clusters must all have tls: or none"),
        "{err}"
    );
    assert!(
        err.contains("pg.yaml:6:")
            && err.contains("serves both a postgres listener and listener \"raw\""),
        "{err}"
    );
    assert!(
        err.contains("pg.yaml:5:") && err.contains("cutover: fenced needs drain_on_change"),
        "{err}"
    );
    assert!(
        err.contains("kind postgres and http_path do not go together"),
        "{err}"
    );

    let dir = config_dir(&[(
        "pg.yaml",
        "listeners:
  - { name: db, listen: 127.0.0.1:0, protocol: postgres, cluster: a }
clusters:
  - { name: a, endpoints: [ \"127.0.0.1:5432\" ], drain_on_change: 5s, cutover: fenced, health: { kind: postgres } }
  - { name: b, endpoints: [ \"127.0.0.1:5433\" ], drain_on_change: 5s, tls: { sni: db.internal, direct: true } }
",
    )]);
    let (ok, _, stderr) = check(dir.path());
    assert!(ok, "{stderr}");
}

/// Kafka listeners need `broker_ports` (and only they take it), a range of at
/// most 1024 ports clear of every other listener on the same IP.
#[test]
fn kafka_broker_ports_are_checked() {
    let err = rejected(&[(
        "k.yaml",
        "listeners:
  - { name: k1, listen: 127.0.0.1:9092, protocol: kafka, cluster: k }
  - { name: k2, listen: 127.0.0.1:9093, protocol: kafka, broker_ports: \"9000-9100\", cluster: k }
  - { name: k3, listen: 127.0.0.1:9094, protocol: kafka, broker_ports: \"20000-30000\", cluster: k }
  - { name: raw, listen: 127.0.0.1:9095, broker_ports: 19000, cluster: k }
clusters:
  - { name: k, endpoints: [ \"127.0.0.1:19092\" ] }
",
    )]);
    assert!(
        err.contains("k.yaml:2:") && err.contains("protocol: kafka needs broker_ports"),
        "{err}"
    );
    assert!(
        err.contains("k.yaml:3:") && err.contains("overlaps listener \"k1\""),
        "{err}"
    );
    assert!(err.contains("10001 ports is more than 1024"), "{err}");
    assert!(err.contains("broker_ports is for protocol: kafka"), "{err}");
    let err = rejected(&[(
        "k.yaml",
        "listeners:
  - { name: k, listen: 127.0.0.1:9096, protocol: kafka, broker_ports: \"9-x\", cluster: k }
clusters:
  - { name: k, endpoints: [ \"127.0.0.1:19092\" ] }
",
    )]);
    assert!(
        err.contains("k.yaml:2:") && err.contains("invalid port range \"9-x\""),
        "{err}"
    );
}
