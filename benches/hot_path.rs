//! Micro-benchmarks of the per-request hot path: matching a request against
//! an HTTP route table, and loading the routing-table snapshot.
//!
//!   cargo bench --bench hot_path

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use legate::config::Config;
use legate::table::{self, ListenerKind, RoutingTable};

/// A listener with `n` routes of mixed kinds; the last one is the catch-all.
fn table(n: usize) -> RoutingTable {
    let mut routes = String::new();
    for i in 0..n - 1 {
        let m = match i % 4 {
            0 => format!("{{ host: \"svc{i}.example.com\" }}"),
            1 => format!("{{ path_prefix: /api/v{i}/ }}"),
            2 => format!("{{ method: POST, path: /submit/{i} }}"),
            _ => format!("{{ headers: {{ x-tenant: \"t{i}\" }} }}"),
        };
        routes.push_str(&format!("      - {{ match: {m}, cluster: c }}\n"));
    }
    routes.push_str("      - { cluster: c }\n");
    let yaml = format!(
        "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    protocol: http\n    routes:\n{routes}clusters:\n  - {{ name: c, endpoints: [ \"127.0.0.1:1\" ] }}\n"
    );
    let config = Config::from_sources([(PathBuf::from("bench.yaml"), Ok(yaml))]).expect("valid");
    table::compile(&config, &Default::default(), 1, None).expect("bench config compiles")
}

fn route_matching(c: &mut Criterion) {
    for n in [1, 16, 64] {
        let t = table(n);
        let ListenerKind::Http(http) = &t.listeners[0].kind else {
            unreachable!()
        };
        let req = http::Request::get("/users/42")
            .header("host", "shop.example.org")
            .header("x-tenant", "none")
            .body(())
            .unwrap();
        c.bench_function(
            &format!("route match, {n} routes, falls to the catch-all"),
            |b| b.iter(|| std::hint::black_box(http.route(std::hint::black_box(&req)).is_some())),
        );
    }
}

fn snapshot_load(c: &mut Criterion) {
    let tables = Arc::new(ArcSwap::from_pointee(table(16)));
    c.bench_function("snapshot load (guard, per HTTP request)", |b| {
        b.iter(|| std::hint::black_box(tables.load().generation))
    });
    c.bench_function("snapshot load_full (Arc, per TCP connection)", |b| {
        b.iter(|| std::hint::black_box(tables.load_full().generation))
    });
    c.bench_function("listener lookup by name", |b| {
        let t = tables.load_full();
        b.iter(|| std::hint::black_box(t.listener(std::hint::black_box("web")).is_some()))
    });
}

criterion_group!(benches, route_matching, snapshot_load);
criterion_main!(benches);
