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
        "clusters:\n  - name: db\n    endpoints: [ \"db.internal:5432\" ]\n    tls: { ca: /nonexistent/ca.pem }\nlisteners:\n  - { name: app, listen: 127.0.0.1:0, cluster: db }\n",
    )]);
    assert!(
        err.contains(r#"routes.yaml:4:10: cluster "db": tls: /nonexistent/ca.pem: cannot read"#),
        "{err}"
    );
}
