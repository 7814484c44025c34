//! Property: whatever `check` accepts compiles and serves a connection
//! without panicking, and no input (however broken) makes parsing panic.
//!
//! Configs are generated with values drawn from the edges that once aborted
//! legate (u32::MAX weights, 2^64 s durations, 1ns intervals, zero counts)
//! mixed with ordinary ones. Runs in-process against the library, with a real
//! echo server on loopback as every endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use legate::config::Config;
use legate::table::{self, ListenerKind};
use legate::{fds, upstream};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Mostly ordinary durations, and one in nine from the edges.
fn duration() -> impl Strategy<Value = String> {
    let ordinary = prop::sample::select(vec!["10ms", "100ms", "250ms", "1s", "5s", "30s"])
        .prop_map(str::to_string);
    let edges = prop_oneof![
        Just("0s".to_string()),
        Just("1ns".to_string()),
        Just("1h".to_string()),
        Just("25h".to_string()),
        Just("18446744073709551615s".to_string()),
        (0u64..100_000).prop_map(|n| format!("{n}ms")),
    ];
    prop_oneof![8 => ordinary, 1 => edges]
}

/// Mostly ordinary numbers, and one in nine from the edges.
fn number() -> impl Strategy<Value = u64> {
    let edges = prop_oneof![
        Just(0u64),
        Just(1_000_000),
        Just(u32::MAX as u64),
        Just(u32::MAX as u64 + 1),
        0u64..2_000_000,
    ];
    prop_oneof![8 => 1u64..10, 1 => edges]
}

/// One config file: a TCP listener (cluster or split), an HTTP listener,
/// and three clusters with optional health, drain and TLS-free knobs.
fn config(echo: SocketAddr) -> impl Strategy<Value = String> {
    (
        (
            prop::collection::vec(number(), 1..4),
            any::<bool>(),
            prop::option::of(duration()),
            prop::option::of(number()),
        ),
        (
            prop::option::of(duration()),
            prop::option::of(duration()),
            prop::option::of(prop_oneof![4 => 8192u64..=1_048_576, 1 => number()]),
            prop::option::of(number()),
        ),
        prop::collection::vec(
            (
                prop::option::weighted(
                    0.3,
                    (duration(), prop_oneof![3 => Just("1ms".to_string()), 1 => duration()], number(), number()),
                ),
                prop::option::of(duration()),
                prop::option::of(duration()),
                prop::option::of(duration()),
            ),
            3,
        ),
        prop::option::of((
            prop_oneof![3 => Just("100ms".to_string()), 1 => duration()],
            prop_oneof![3 => Just("5m".to_string()), 1 => duration()],
        )),
    )
        .prop_map(move |(tcp, http, clusters, resolver)| {
            let (weights, split, tcp_idle, max_conns) = tcp;
            let mut y = String::new();
            if let Some((min, max)) = resolver {
                y += &format!("resolver: {{ min_ttl: {min}, max_ttl: {max} }}\n");
            }
            y += "listeners:\n  - name: tcp\n    listen: 127.0.0.1:0\n";
            if split {
                y += "    split:\n";
                for (i, w) in weights.iter().enumerate() {
                    y += &format!("      - {{ cluster: c{}, weight: {w} }}\n", i % 3);
                }
            } else {
                y += "    cluster: c0\n";
            }
            if let Some(t) = tcp_idle {
                y += &format!("    idle_timeout: {t}\n");
            }
            if let Some(n) = max_conns {
                y += &format!("    max_connections: {n}\n");
            }
            let (header, idle, size, retries) = http;
            y += "  - name: web\n    listen: 127.0.0.1:0\n    protocol: http\n";
            if let Some(t) = header {
                y += &format!("    header_timeout: {t}\n");
            }
            if let Some(t) = idle {
                y += &format!("    idle_timeout: {t}\n");
                // The same edge values test the per-request idle limit.
                y += &format!("    stream_idle_timeout: {t}\n");
            }
            if let Some(n) = size {
                y += &format!("    max_request_headers_size: {n}\n");
            }
            y += "    routes:\n      - cluster: c1\n";
            if let Some(n) = retries {
                y += &format!("        retries: {n}\n");
            }
            y += "clusters:\n";
            for (i, (health, connect, drain, pool)) in clusters.into_iter().enumerate() {
                y += &format!("  - name: c{i}\n    endpoints: [ \"{echo}\" ]\n");
                if i == 0 {
                    y += "    failover: [ c2 ]\n";
                }
                if let Some((interval, timeout, unhealthy, healthy)) = health {
                    y += &format!(
                        "    health: {{ interval: {interval}, timeout: {timeout}, unhealthy: {unhealthy}, healthy: {healthy} }}\n"
                    );
                }
                if let Some(t) = connect {
                    y += &format!("    connect_timeout: {t}\n");
                }
                if let Some(t) = drain {
                    y += &format!("    drain_on_change: {t}\n");
                }
                if let Some(t) = pool {
                    y += &format!("    pool_idle_timeout: {t}\n");
                }
            }
            y
        })
}

fn parse(yaml: &str) -> Result<Config, legate::config::ConfigError> {
    Config::from_sources([(PathBuf::from("gen.yaml"), Ok(yaml.to_string()))])
}

/// A runtime and an echo server shared by every case.
fn echo_server() -> (tokio::runtime::Runtime, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (rt, addr)
}

/// Serves one connection through the table's TCP listener, the way a
/// session does: pick a route, connect (with failover), echo a byte.
async fn serve_one(table: &table::RoutingTable) {
    let Some(l) = table.listener("tcp") else {
        panic!("the TCP listener compiled");
    };
    let ListenerKind::Tcp(tcp) = &l.kind else {
        panic!("tcp is TCP");
    };
    for _ in 0..8 {
        let route = tcp.target.pick().clone();
        let fd = fds::reserve(1).expect("an fd");
        let client = "127.0.0.1:1".parse().unwrap();
        let connected = upstream::connect(&route.cluster, &route.failover, client, fd)
            .await
            .expect("the echo server accepts");
        let upstream::UpstreamStream::Plain(mut s) = connected.stream else {
            panic!("no TLS configured");
        };
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
    }
    for c in &table.clusters {
        if let Some(h) = &c.spec().health {
            let _ = upstream::health::jittered(h.interval.0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever validates compiles, starts its background tasks, serves a
    /// connection, and is retired by a reload to itself, without a panic.
    #[test]
    fn accepted_configs_run(yaml in config("127.0.0.1:9".parse().unwrap())) {
        let (rt, echo) = ECHO.with(|e| (e.0.handle().clone(), e.1));
        let yaml = yaml.replace("127.0.0.1:9", &echo.to_string());
        if let Ok(config) = parse(&yaml) {
            let _guard = rt.enter();
            let table = table::compile(&config, &Default::default(), 1, None)
                .unwrap_or_else(|e| panic!("validated but did not compile: {e}\n{yaml}"));
            let table = Arc::new(table);
            table.start();
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), serve_one(&table)).await
                    .unwrap_or_else(|_| panic!("no connection served within 10 s\n{yaml}"));
            });
            let next = table::compile(&config, &Default::default(), 2, Some(&table))
                .expect("compiles again");
            table::retire(&table, &next);
        }
    }

    /// Garbage of any shape is an error, never a panic.
    #[test]
    fn garbage_never_panics(text in "(\\PC|\n|\t){0,400}") {
        let _ = parse(&text);
    }

    /// Config-shaped garbage: valid keys with wrong or extreme values.
    #[test]
    fn config_shaped_garbage_never_panics(
        keys in prop::collection::vec(
            prop::sample::select(vec![
                "listeners:", "clusters:", "  - name: a", "    listen: 127.0.0.1:0",
                "    cluster: a", "    split: [ { cluster: a, weight: 4294967295 } ]",
                "    endpoints: [ \"127.0.0.1:1\" ]", "    health: { interval: 1ns }",
                "    protocol: http", "    routes: []", "    failover: [ a ]", "resolver: {}",
                "    max_connections: 0", "    idle_timeout: 18446744073709551615s", "&x [*x]",
                "    endpoints: *x", "${UNSET}", "${EMPTY:-}", "- - - -", "{", "]",
            ]),
            0..30,
        )
    ) {
        let yaml = keys.join("\n");
        if let Ok(config) = parse(&yaml) {
            let _ = table::compile(&config, &Default::default(), 1, None)
                .unwrap_or_else(|e| panic!("validated but did not compile: {e}\n{yaml}"));
        }
    }
}

thread_local! {
    static ECHO: (tokio::runtime::Runtime, SocketAddr) = echo_server();
}

/// The property above is only as good as the share of generated configs that
/// validate: at least a fifth must, or it tests nothing.
#[test]
fn the_generator_reaches_accepted_configs() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = config("127.0.0.1:9".parse().unwrap());
    let mut accepted = 0;
    for _ in 0..200 {
        let yaml = strategy.new_tree(&mut runner).unwrap().current();
        match parse(&yaml) {
            Ok(_) => accepted += 1,
            Err(e) if std::env::var_os("SHOW").is_some() => eprintln!("{e}"),
            Err(_) => {}
        }
    }
    assert!(
        accepted >= 40,
        "only {accepted} of 200 generated configs validate"
    );
}
