//! Micro-benchmarks of the per-request hot path: matching a request against
//! an HTTP route table, loading the routing-table snapshot, and a whole
//! proxied request through an in-process legate, with the heap allocations
//! legate makes per keep-alive request and per accepted connection.
//!
//!   cargo bench --bench hot_path

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// Counts the allocations made on threads that opted in (legate's runtime
/// thread), so the client, the backend and criterion are left out.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if COUNTED.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to legate's own allocator (the
// one the binary uses).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { legate::memory::Allocator.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { legate::memory::Allocator.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { legate::memory::Allocator.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { legate::memory::Allocator.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    )
}

/// A keep-alive HTTP/1.1 backend answering every request with "ok".
fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the backend");
    let addr = listener.local_addr().expect("backend address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.set_nodelay(true);
                while read_head(&mut stream) {
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(answer).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one request head (the benchmark's requests have no body).
fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&byte[..n]),
        }
    }
    true
}

/// Starts legate in this process, on its own single-threaded runtime (as
/// `--threads 1` runs), forwarding an HTTP listener to `backend`.
fn legate(backend: SocketAddr) -> SocketAddr {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let dir = tempfile::tempdir().expect("config dir").keep();
    std::fs::write(
        dir.join("bench.yaml"),
        format!(
            "listeners:\n  - {{ name: web, listen: \"127.0.0.1:{port}\", protocol: http, cluster: b }}\nclusters:\n  - {{ name: b, endpoints: [ \"{backend}\" ] }}\n"
        ),
    )
    .expect("write the config");
    std::thread::spawn(move || {
        COUNTED.with(|c| c.set(true));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let opts = legate::Options {
            config_dir: dir,
            admin: "127.0.0.1:0".parse().expect("address"),
            timing: legate::shutdown::Timing {
                shutdown_delay: Duration::ZERO,
                drain_timeout: Duration::from_secs(1),
            },
            reload: legate::reload::Settings {
                watch: false,
                poll_interval: None,
                debounce: Duration::from_millis(100),
            },
        };
        runtime.block_on(legate::run(opts)).expect("legate runs");
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    for _ in 0..500 {
        if TcpStream::connect(addr).is_ok() {
            return addr;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("legate did not start listening on {addr}");
}

const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nhost: bench\r\nuser-agent: hot_path\r\n\r\n";

/// One request on `stream`, read to the end of its 2-byte body.
fn round_trip(stream: &mut TcpStream) {
    stream.write_all(REQUEST).expect("send the request");
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !got.ends_with(b"\r\n\r\nok") {
        let n = stream.read(&mut buf).expect("read the response");
        assert!(n > 0, "legate closed the connection");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200"), "unexpected answer");
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to legate");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

fn proxied(c: &mut Criterion) {
    let addr = legate(backend());
    let mut keepalive = connect(addr);
    // Warm up: pools, the route's metric series, the allocator's caches.
    for _ in 0..2_000 {
        round_trip(&mut keepalive);
    }
    for _ in 0..200 {
        round_trip(&mut connect(addr));
    }

    const N: u64 = 10_000;
    let (a0, b0) = counted();
    for _ in 0..N {
        round_trip(&mut keepalive);
    }
    let (a1, b1) = counted();
    let per_request = (a1 - a0) as f64 / N as f64;
    // A new connection per request; the client closes each after its answer
    // (legate's side of each is torn down while the next one is served).
    let (a2, b2) = counted();
    for _ in 0..N {
        round_trip(&mut connect(addr));
    }
    std::thread::sleep(Duration::from_millis(50));
    let (a3, b3) = counted();
    let per_connection = (a3 - a2) as f64 / N as f64;
    println!(
        "allocations per proxied keep-alive request: {per_request:.1} ({:.0} bytes)",
        (b1 - b0) as f64 / N as f64
    );
    println!(
        "allocations per accepted connection with one request: {per_connection:.1} ({:.0} bytes); the connection's own: {:.1}",
        (b3 - b2) as f64 / N as f64,
        per_connection - per_request
    );

    c.bench_function("proxied keep-alive request (loopback round trip)", |b| {
        b.iter(|| round_trip(&mut keepalive))
    });
    c.bench_function("proxied request on a new connection", |b| {
        b.iter(|| round_trip(&mut connect(addr)))
    });
}

criterion_group!(benches, route_matching, snapshot_load, proxied);
criterion_main!(benches);
