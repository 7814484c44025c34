//! The HTTP ambassador through the real binary: curl and raw clients in front,
//! hyper backends (and a real nginx) behind.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::backends::Backend;
use support::http::{Client, HttpBackend, Reply, curl, curl_output};
use support::{DEADLINE, Legate, refused_addr, wait_until};

fn http_listener(routes: &str, clusters: &str) -> String {
    format!(
        "listeners:\n  - name: web\n    listen: \"127.0.0.1:0\"\n    protocol: http\n    access_log: true\n    routes:\n{routes}\nclusters:\n{clusters}\n"
    )
}

fn cluster(name: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "  - {{ name: {name}, endpoints: [ {} ]{extra} }}\n",
        eps.join(", ")
    )
}

/// Routing on header, host suffix + path prefix, and method + exact path,
/// with host and prefix rewrites and request/response header edits; a request
/// no route matches gets legate's own 404.
#[test]
fn routes_match_rewrite_and_edit_headers() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let legate = Legate::start(&http_listener(
        r#"      - name: canary
        match: { headers: { x-canary: "1" } }
        cluster: b
      - name: v2
        match: { host: "*.example.com", path_prefix: /v2/ }
        rewrite: { host: api.internal, path_prefix: / }
        request_headers: { add: { x-added: "yes" }, remove: [ x-drop ] }
        response_headers: { add: { x-resp: "yes" }, remove: [ x-remove-me ] }
        cluster: a
      - name: submit
        match: { method: POST, path: /submit }
        cluster: b"#,
        &(cluster("a", &[a.addr], "") + &cluster("b", &[b.addr], "")),
    ));
    let url = |p: &str| format!("http://{}{p}", legate.addr("web"));

    let (status, text) = curl(
        &["-H", "Host: shop.example.com:8080", "-H", "x-drop: 1"],
        &url("/v2/users?id=7"),
    );
    assert_eq!(status, 200, "{text}");
    let seen = a.last();
    assert_eq!(seen["uri"], "/users?id=7");
    assert_eq!(seen["headers"]["host"], "api.internal");
    assert_eq!(seen["headers"]["x-added"], "yes");
    assert!(seen["headers"]["x-drop"].is_null(), "{seen}");
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("x-resp: yes"), "{text}");
    assert!(!lower.contains("x-remove-me"), "{text}");

    let (status, _) = curl(&["-H", "x-canary: 1"], &url("/v2/users"));
    assert_eq!(status, 200);
    assert_eq!(b.last()["path"], "/v2/users");

    let (status, _) = curl(&["-X", "POST", "-d", "hello"], &url("/submit"));
    assert_eq!(status, 200);
    assert_eq!(b.last()["body"], "hello");

    for (args, path) in [
        (vec!["-X", "GET"], "/submit"),
        (vec!["-H", "Host: other.org"], "/v2/x"),
    ] {
        let (status, text) = curl(&args, &url(path));
        assert_eq!(status, 404, "{text}");
        assert!(text.contains("no route matched"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("server: legate"),
            "{text}"
        );
    }
    wait_until("metrics", || {
        legate.metric(r#"legate_http_requests_total{cluster="a",code="2xx",listener="web",route="v2"}"#) == 1.0
            && legate.metric(r#"legate_http_requests_total{cluster="none",code="4xx",listener="web",route="none"}"#) == 2.0
    });
    assert_eq!(
        legate.metric(
            r#"legate_http_request_seconds_count{code="2xx",listener="web",route="submit"}"#
        ),
        1.0
    );
    legate.wait_log(|l| {
        l.contains(r#""message":"request""#)
            && l.contains(r#""route":"v2""#)
            && l.contains(r#""status":200"#)
    });
}

/// curl with HTTP/2 prior knowledge is served on the same port; a cluster
/// with `http2: true` gets HTTP/2 with the right authority.
#[test]
fn h2c_downstream_and_upstream() {
    let a = HttpBackend::start("a");
    let legate = Legate::start(&http_listener(
        "      - cluster: a",
        &cluster("a", &[a.addr], ", http2: true"),
    ));
    let (status, text) = curl(
        &["--http2-prior-knowledge", "-H", "Host: api.local"],
        &format!("http://{}/h2", legate.addr("web")),
    );
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    let seen = a.last();
    assert_eq!(seen["version"], "HTTP/2.0");
    assert_eq!(seen["uri"], "http://api.local/h2");
    // A second request shares the one HTTP/2 connection to the endpoint.
    let (status, _) = curl(
        &["-H", "Host: api.local"],
        &format!("http://{}/again", legate.addr("web")),
    );
    assert_eq!(status, 200);
    assert_eq!(a.connections(), 1);
}

/// Keep-alive: 20 requests from one client connection reuse one pooled
/// upstream connection.
#[test]
fn upstream_connections_are_pooled() {
    let a = HttpBackend::start("a");
    let legate = Legate::start(&http_listener(
        "      - cluster: a",
        &cluster("a", &[a.addr], ""),
    ));
    let mut client = Client::connect(legate.addr("web"));
    for i in 0..20 {
        let reply = client.get(&format!("/n/{i}"));
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json()["path"], format!("/n/{i}"));
    }
    assert_eq!(a.requests(), 20);
    assert_eq!(a.connections(), 1);
}

/// A 80/20 split over 1000 requests lands near 80/20.
#[test]
fn split_ratio_over_1000_requests() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let legate = Legate::start(&http_listener(
        "      - split: [ { cluster: a, weight: 80 }, { cluster: b, weight: 20 } ]",
        &(cluster("a", &[a.addr], "") + &cluster("b", &[b.addr], "")),
    ));
    let mut client = Client::connect(legate.addr("web"));
    for _ in 0..1000 {
        assert_eq!(client.get("/").status, 200);
    }
    // Expected 200 to b; sd ≈ 12.6, so 150..250 is ~4 sigma.
    assert!(
        (150..=250).contains(&b.requests()),
        "b got {} of 1000",
        b.requests()
    );
    assert_eq!(a.requests() + b.requests(), 1000);
}

/// Retries: a dead endpoint is skipped; a 503 on an idempotent GET is retried
/// on another endpoint; a POST that was sent is never retried.
#[test]
fn retries_only_where_safe() {
    let good = HttpBackend::start("good");
    let broken = HttpBackend::start("broken");
    let dead = refused_addr();
    let legate = Legate::start(&http_listener(
        "      - retries: 2\n        cluster: pool",
        &cluster("pool", &[dead, broken.addr, good.addr], ""),
    ));
    let mut client = Client::connect(legate.addr("web"));
    for _ in 0..6 {
        let reply = client.get("/item");
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-backend"), Some("good"));
    }
    assert!(broken.requests() >= 1, "the 503 endpoint was never tried");

    let before = good.requests() + broken.requests();
    let mut saw_503 = 0;
    for _ in 0..6 {
        let reply = client.send("POST", "/order", &[], b"one order").unwrap();
        if reply.status == 503 {
            saw_503 += 1;
        }
    }
    assert_eq!(
        good.requests() + broken.requests() - before,
        6,
        "a POST was sent twice"
    );
    assert!(saw_503 >= 1, "no POST reached the broken endpoint");
}

/// Errors are honest: all endpoints refuse → 502, then (ejected) 503, each
/// marked as legate's own answer; a slow upstream → 504 at the route timeout.
#[test]
fn error_statuses_and_timeout() {
    let slow = HttpBackend::start("slow");
    let legate = Legate::start(&http_listener(
        "      - match: { path_prefix: /sleep/ }\n        timeout: 300ms\n        cluster: slow\n      - cluster: dead",
        &(cluster("slow", &[slow.addr], "") + &cluster("dead", &[refused_addr()], "")),
    ));
    let mut client = Client::connect(legate.addr("web"));
    let r = client.get("/x");
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("server"), Some("legate"));
    assert_eq!(r.header("via"), Some("1.1 legate"));
    let r = client.get("/x");
    assert_eq!(r.status, 503, "{r:?}");

    let began = Instant::now();
    let r = client.get("/sleep/3000");
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "took {:?}",
        began.elapsed()
    );
    wait_until("the 504 counted against its route's cluster", || {
        legate.metric(
            r#"legate_http_requests_total{cluster="slow",code="5xx",listener="web",route="0"}"#,
        ) == 1.0
    });
}

/// A malformed request gets 400.
#[test]
fn malformed_request_gets_400() {
    let a = HttpBackend::start("a");
    let legate = Legate::start(&http_listener(
        "      - cluster: a",
        &cluster("a", &[a.addr], ""),
    ));
    let mut client = Client::connect(legate.addr("web"));
    client
        .raw()
        .get_mut()
        .write_all(b"GET /\x01bad HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let reply = client.read_reply(false).expect("a response");
    assert_eq!(reply.status, 400);
    assert_eq!(a.requests(), 0);
}

/// Mirroring: every request (GET, and POST with its body) also reaches the
/// shadow cluster; the app's answer comes from the real one.
#[test]
fn mirror_sends_copies() {
    let main = HttpBackend::start("main");
    let shadow = HttpBackend::start("shadow");
    let legate = Legate::start(&http_listener(
        "      - mirror: { cluster: shadow, percent: 100 }\n        cluster: main",
        &(cluster("main", &[main.addr], "") + &cluster("shadow", &[shadow.addr], "")),
    ));
    let mut client = Client::connect(legate.addr("web"));
    for i in 0..5 {
        assert_eq!(
            client.get(&format!("/get/{i}")).header("x-backend"),
            Some("main")
        );
        let r = client
            .send("POST", "/post", &[], format!("body {i}").as_bytes())
            .unwrap();
        assert_eq!(r.json()["body"], format!("body {i}"));
    }
    wait_until("shadow got all copies", || {
        shadow.seen.lock().unwrap().len() == 10
    });
    let bodies: Vec<String> = shadow
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|d| d["method"] == "POST")
        .map(|d| d["body"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(bodies.len(), 5);
    assert!(bodies.contains(&"body 3".to_string()), "{bodies:?}");
}

/// WebSocket-style upgrade: 101 from the backend, then bytes both ways
/// through the tunnel.
#[test]
fn upgrade_is_tunneled() {
    let a = HttpBackend::start("a");
    let legate = Legate::start(&http_listener(
        "      - cluster: a",
        &cluster("a", &[a.addr], ""),
    ));
    let mut client = Client::connect(legate.addr("web"));
    client
        .raw()
        .get_mut()
        .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .unwrap();
    let reply = client.read_reply(false).unwrap();
    assert_eq!(reply.status, 101, "{reply:?}");
    assert_eq!(reply.header("upgrade"), Some("websocket"));
    for msg in ["hello over the tunnel", "second frame"] {
        client.raw().get_mut().write_all(msg.as_bytes()).unwrap();
        let mut buf = vec![0u8; msg.len()];
        client.raw().read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg.as_bytes());
    }
}

/// A 1 GiB upload streams through without growing legate's memory.
#[test]
fn gigabyte_upload_streams_with_flat_memory() {
    const SIZE: usize = 1 << 30;
    let a = HttpBackend::start("a");
    let legate = Legate::start(&http_listener(
        "      - timeout: 120s\n        cluster: a",
        &cluster("a", &[a.addr], ""),
    ));
    let rss = || legate.metric("process_resident_memory_bytes");
    let before = rss();
    let mut client = Client::connect(legate.addr("web"));
    let head = format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n");
    let stream = client.raw().get_mut();
    stream.write_all(head.as_bytes()).unwrap();
    let chunk = vec![0x61u8; 1 << 20];
    let mut peak = before;
    for i in 0..(SIZE / chunk.len()) {
        stream.write_all(&chunk).unwrap();
        if i % 128 == 0 {
            peak = peak.max(rss());
        }
    }
    let reply = client.read_reply(false).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, SIZE.to_string());
    peak = peak.max(rss());
    let growth = (peak - before) / (1024.0 * 1024.0);
    eprintln!(
        "1 GiB upload: RSS {:.1} MiB before, peak {:.1} MiB (+{growth:.1} MiB)",
        before / 1048576.0,
        peak / 1048576.0
    );
    assert!(
        growth < 32.0,
        "RSS grew by {growth:.1} MiB during a streamed upload"
    );
}

/// A reload applies to the next request on an existing keep-alive connection.
#[test]
fn reload_applies_to_the_next_request() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let clusters = cluster("a", &[a.addr], "") + &cluster("b", &[b.addr], "");
    let mut legate = Legate::start(&http_listener("      - cluster: a", &clusters));
    let mut client = Client::connect(legate.addr("web"));
    assert_eq!(client.get("/").header("x-backend"), Some("a"));
    let file = legate.dir.as_ref().unwrap().path().join("legate.yaml");
    std::fs::write(&file, http_listener("      - cluster: b", &clusters)).unwrap();
    assert_eq!(legate.post("/reload").0, 200);
    assert_eq!(client.get("/").header("x-backend"), Some("b"));
    legate.refresh_listeners();
}

/// SIGTERM: the in-flight request finishes, the keep-alive connection is
/// then closed, and legate exits 0.
#[test]
fn shutdown_finishes_in_flight_requests() {
    let a = HttpBackend::start("a");
    let mut legate = Legate::start(&http_listener(
        "      - cluster: a",
        &cluster("a", &[a.addr], ""),
    ));
    let mut client = Client::connect(legate.addr("web"));
    assert_eq!(client.get("/warm").status, 200);
    client
        .raw()
        .get_mut()
        .write_all(b"GET /sleep/500 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    wait_until("request in flight", || a.requests() == 2);
    legate.signal("TERM");
    let reply = client.read_reply(false).expect("in-flight response");
    assert_eq!(reply.status, 200);
    let mut rest = Vec::new();
    let _ = client.raw().read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(legate.wait_exit(DEADLINE).code(), Some(0));
}

/// A real nginx as the upstream, and h2load driving concurrent HTTP/2
/// requests through legate to it.
#[test]
fn nginx_upstream_and_h2load() {
    let nginx = support::nginx::Nginx::start();
    let legate = Legate::start(&http_listener(
        "      - cluster: nginx",
        &cluster("nginx", &[nginx.addr], ""),
    ));
    let (status, text) = curl(&[], &format!("http://{}/hello", legate.addr("web")));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("hello from nginx"), "{text}");

    let out = std::process::Command::new("h2load")
        .args(["-n", "2000", "-c", "10", "-m", "10"])
        .arg(format!("http://{}/hello", legate.addr("web")))
        .output()
        .expect("run h2load (apt-get install nghttp2-client)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("2000 total, 2000 started, 2000 done, 2000 succeeded"),
        "{report}"
    );
}

/// gRPC calls (curl with HTTP/2 prior knowledge and `content-type:
/// application/grpc`, as a gRPC client sends them):
/// 1. legate's own errors are trailers-only gRPC answers (HTTP 200 with
///    `grpc-status`): a dead cluster gives UNAVAILABLE (14); a cluster without
///    `http2: true` gives UNAVAILABLE naming `http2: true`; a route timeout
///    gives DEADLINE_EXCEEDED (4). A plain HTTP request still gets 503, and
///    the errors are counted as 5xx.
/// 2. `grpc-timeout` sets the call's deadline: 2S lets a 600 ms call through
///    a route whose own timeout is 200 ms; 100m cuts it; a route's
///    `max_grpc_timeout: 100ms` caps a 5S deadline.
/// 3. `timeout: 0s` is no route timeout at all.
#[test]
fn grpc_deadlines_and_errors() {
    let api = HttpBackend::start("api");
    let dead = support::refused_addr();
    let routes = "      - { match: { path_prefix: /dead/ }, cluster: dead }\n      - { match: { path_prefix: /h1/ }, cluster: h1 }\n      - { match: { path_prefix: /capped/ }, rewrite: { path_prefix: / }, cluster: api, timeout: 200ms, max_grpc_timeout: 100ms }\n      - { match: { path_prefix: /none/ }, rewrite: { path_prefix: / }, cluster: api, timeout: 0s }\n      - { cluster: api, timeout: 200ms }";
    let clusters = format!(
        "{}{}{}",
        cluster("api", &[api.addr], ", http2: true"),
        cluster("dead", &[dead], ", http2: true, connect_timeout: 1s"),
        cluster("h1", &[api.addr], "")
    );
    let legate = Legate::start(&http_listener(routes, &clusters));
    let url = |path: &str| format!("http://{}{path}", legate.addr("web"));
    let grpc = |path: &str, deadline: Option<&str>| {
        let mut args = vec![
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
        ];
        let header;
        if let Some(d) = deadline {
            header = format!("grpc-timeout: {d}");
            args.extend(["-H", &header]);
        }
        let (status, text) = curl(&args, &url(path));
        let lower = text.to_ascii_lowercase();
        let grpc_status = lower
            .lines()
            .find_map(|l| l.strip_prefix("grpc-status: "))
            .map(|s| s.trim().to_string());
        (status, grpc_status, lower)
    };

    let (status, code, text) = grpc("/dead/call", None);
    assert_eq!((status, code.as_deref()), (200, Some("14")), "{text}");
    let (status, code, text) = grpc("/h1/call", None);
    assert_eq!((status, code.as_deref()), (200, Some("14")), "{text}");
    assert!(
        text.contains(
            "grpc-message: cluster \"h1\" speaks http/1.1; grpc needs `http2: true` on it"
        ),
        "{text}"
    );
    assert_eq!(grpc("/h1/again", None).1.as_deref(), Some("14"));
    let (status, code, text) = grpc("/sleep/600", None);
    assert_eq!((status, code.as_deref()), (200, Some("4")), "{text}");
    let (status, _) = curl(&["--http2-prior-knowledge"], &url("/dead/plain"));
    assert_eq!(status, 503);

    let (status, code, text) = grpc("/sleep/600", Some("2S"));
    assert_eq!((status, code), (200, None), "the backend answered: {text}");
    let (_, code, text) = grpc("/sleep/600", Some("100m"));
    assert_eq!(code.as_deref(), Some("4"), "{text}");
    let (_, code, text) = grpc("/capped/sleep/600", Some("5S"));
    assert_eq!(code.as_deref(), Some("4"), "{text}");
    let (status, code, text) = grpc("/none/sleep/600", None);
    assert_eq!((status, code), (200, None), "{text}");

    assert!(
        legate.metric(
            r#"legate_http_requests_total{cluster="dead",code="5xx",listener="web",route="0"}"#
        ) >= 2.0
    );
    assert_eq!(
        legate
            .logs()
            .iter()
            .filter(|l| l.contains("gRPC request routed to a cluster that speaks HTTP/1.1"))
            .count(),
        1
    );
}

/// A real nginx speaking h2c that ends every connection with GOAWAY after 100
/// requests (`keepalive_requests 100`), under h2load through legate: the
/// streams nginx refused unprocessed go again on a new connection, so every
/// one of 5,000 GETs and 5,000 POSTs with a 4 KiB body succeeds (before:
/// hundreds of 502s; POSTs failed until their bodies were kept). h2load keeps
/// 64 streams open, half nginx's stream limit: a request that waits for a
/// slot when the GOAWAY comes is one hyper drops, and a POST dropped so gets
/// 502 (`h2_request_dropped_at_goaway_is_not_a_client_error`).
#[test]
fn h2_upstream_goaway_loses_no_request() {
    let nginx = support::nginx::Nginx::start_with(|port| {
        format!(
            "listen 127.0.0.1:{port} http2;\n    keepalive_requests 100;\n    http2_max_concurrent_streams 128;\n    location / {{ return 200 \"hello from nginx\\n\"; }}"
        )
    });
    let legate = Legate::start(&http_listener(
        "      - cluster: nginx",
        &cluster("nginx", &[nginx.addr], ", http2: true"),
    ));
    // GETs, then POSTs with a body (kept for a second attempt, see replay.rs).
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(body.path(), vec![b'p'; 4096]).unwrap();
    for data in [None, Some(body.path())] {
        let mut h2load = std::process::Command::new("h2load");
        h2load.args(["-n", "5000", "-c", "4", "-m", "16"]);
        if let Some(path) = data {
            h2load.arg("-d").arg(path);
        }
        let out = h2load
            .arg(format!("http://{}/hello", legate.addr("web")))
            .output()
            .expect("run h2load (apt-get install nghttp2-client)");
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("5000 total, 5000 started, 5000 done, 5000 succeeded")
                && report.contains("0 failed, 0 errored")
                && report.contains("status codes: 5000 2xx"),
            "body {data:?}: {report}"
        );
    }
}

/// An HTTP/2 upstream that allows one stream per connection. Its first
/// connection holds its one stream until `go` fires, then shuts down the way
/// hyper's, Go's and Envoy's servers do (GOAWAY with the last stream id at
/// its maximum and a PING, then the real last id) and answers the held
/// stream; later connections answer "fresh".
struct OneStreamUpstream {
    backend: Backend,
    held: std::sync::mpsc::Receiver<()>,
    go: Option<tokio::sync::oneshot::Sender<()>>,
}

impl OneStreamUpstream {
    fn start() -> OneStreamUpstream {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let (held_tx, held) = std::sync::mpsc::channel();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let go_rx = Arc::new(Mutex::new(Some(go_rx)));
        let first = Arc::new(AtomicBool::new(true));
        let backend = Backend::serve(move |socket| {
            let first = first.swap(false, Ordering::SeqCst);
            let held = held_tx.clone();
            let go = go_rx.lock().unwrap().take();
            async move {
                let answer = |stream: &mut h2::server::SendResponse<bytes::Bytes>, text: &str| {
                    let response = http::Response::new(());
                    let mut body = stream.send_response(response, false).expect("send head");
                    body.send_data(bytes::Bytes::from(text.to_string()), true)
                        .expect("send body");
                };
                let mut conn = h2::server::Builder::new()
                    .max_concurrent_streams(1)
                    .handshake::<_, bytes::Bytes>(socket)
                    .await
                    .expect("h2 handshake");
                if !first {
                    while let Some(Ok((_, mut stream))) = conn.accept().await {
                        answer(&mut stream, "fresh");
                    }
                    return;
                }
                let (_, mut stream) = conn.accept().await.expect("a stream").expect("stream");
                held.send(()).unwrap();
                tokio::select! {
                    _ = go.expect("the first connection's go") => {}
                    // Keeps reading the connection meanwhile; a second stream
                    // would break the one-stream setting.
                    next = conn.accept() => {
                        assert!(next.is_none(), "a second stream on a one-stream connection");
                        return;
                    }
                }
                // Both go out in one write, GOAWAY first: the client learns of
                // the shutdown, then that its one stream slot is free.
                conn.graceful_shutdown();
                answer(&mut stream, "held");
                while let Some(Ok((_, mut stream))) = conn.accept().await {
                    answer(&mut stream, "after goaway");
                }
            }
        });
        OneStreamUpstream {
            backend,
            held,
            go: Some(go),
        }
    }
}

/// A request waiting for a stream slot on a pooled HTTP/2 connection when the
/// upstream starts a graceful GOAWAY: h2 sends it once the slot frees, but
/// hyper's dispatch task has seen the GOAWAY and ends, dropping the request
/// with "dispatch task is gone", an error hyper files as the caller's. It was
/// answered 400 "malformed request body", blaming the client (seen in CI: 1
/// GET in 5,000 under `h2_upstream_goaway_loses_no_request`). The request
/// did reach the upstream, so only a method safe to repeat goes again (on a
/// new connection); a POST gets 502.
///
/// Two other endings race with that one. h2 may close the connection with
/// its own GOAWAY first, and the stream gets that as its error: the request
/// had left just the same, so a POST still gets 502 (it was sent again, as
/// if the upstream had refused it, until this test caught it). Or the
/// upstream's second GOAWAY (last stream 1, after the PING round trip)
/// reaches h2 first (seen in CI once): then the upstream has said the stream
/// was never processed, and any method goes again (200 "fresh"); so does a
/// stream that h2 fails with the first GOAWAY's error (the known race in
/// `unprocessed`, src/http/proxy.rs). Neither is what this test is for, so
/// such an attempt is checked and the scenario run again, up to five times.
#[test]
fn h2_request_dropped_at_goaway_is_not_a_client_error() {
    for (method, body, status, text) in [
        ("GET", &b""[..], 200, "fresh"),
        ("POST", &b"posted"[..], 502, "upstream connection failed\n"),
    ] {
        let mut dropped = false;
        for _ in 0..5 {
            let (second, legate) = request_behind_goaway(method, body);
            // It had left: h2 sent its head (before hyper dropped it, or
            // before the last GOAWAY refused it).
            legate.wait_log(|l| l.contains(r#""send","frame":"Headers { stream_id: StreamId(3)"#));
            // What legate made of the lost stream, logged before it answered.
            let verdict = legate.wait_log(|l| {
                l.contains("upstream refused the request unprocessed")
                    || l.contains("upstream connection ended holding the request")
                    || l.contains("upstream request failed")
                    || l.contains("malformed request body")
            });
            assert!(
                !verdict.contains("malformed request body"),
                "{method}: the client was blamed"
            );
            if !verdict.contains("refused the request unprocessed") {
                assert_eq!(
                    (second.status, second.body.as_str()),
                    (status, text),
                    "{method}: {verdict}"
                );
                dropped = true;
                break;
            }
            // Taken as refused, so sent again whatever the method: by the
            // upstream's last GOAWAY, or by the race in `unprocessed`'s
            // comment. Neither is the case under test.
            assert_eq!(
                (second.status, second.body.as_str()),
                (200, "fresh"),
                "{method}, refused"
            );
        }
        assert!(
            dropped,
            "{method}: the upstream refused the request in all five tries"
        );
    }
}

/// Sends a request while the upstream's one stream slot is held, then lets
/// the upstream answer the first and start a graceful GOAWAY; returns the
/// answer to the waiting request.
fn request_behind_goaway(method: &'static str, body: &'static [u8]) -> (Reply, Legate) {
    let mut upstream = OneStreamUpstream::start();
    // h2's trace shows when the second request's stream is queued to
    // wait for the slot.
    let legate = Legate::start_with(
        &http_listener(
            "      - cluster: one",
            &cluster("one", &[upstream.backend.addr], ", http2: true"),
        ),
        &["--log", "debug,h2=trace"],
    );
    let addr = legate.addr("web");
    let first = std::thread::spawn(move || Client::connect(addr).get("/held"));
    upstream
        .held
        .recv_timeout(DEADLINE)
        .expect("the upstream holds the first request");
    let second = std::thread::spawn(move || {
        Client::connect(addr)
            .send(method, "/second", &[], body)
            .expect("second request")
    });
    legate.wait_log(|l| l.contains("send_headers; frame=Headers { stream_id: StreamId(3)"));
    upstream.go.take().unwrap().send(()).unwrap();
    let second = second.join().unwrap();
    assert_eq!(first.join().unwrap().body, "held");
    (second, legate)
}

/// Sends raw bytes to `addr` and returns everything that comes back.
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(support::DEADLINE)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Requests that parse but must not be forwarded (RFC 9112 §3.2, RFC 9110
/// §7.6.1) get legate's own 400 (`server: legate`), are counted, and never
/// reach the backend: no Host on HTTP/1.1, two Host headers, `Connection:
/// host`, a 40-byte method, and heads that do not parse (a header line without
/// a colon, a control byte in the target, two Content-Lengths). An invalid chunk size in a request body is a 400
/// too, counted on the route, with no upstream error logged against the cluster.
#[test]
fn ambiguous_requests_get_400_from_legate() {
    let api = HttpBackend::start("api");
    let legate = Legate::start(&http_listener(
        "      - cluster: api",
        &cluster("api", &[api.addr], ""),
    ));
    let addr = legate.addr("web");
    for request in [
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close, host\r\n\r\n".to_string(),
        format!(
            "{} / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            "M".repeat(40)
        ),
        // Heads hyper itself cannot parse: its answer is marked and counted too.
        "GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n".to_string(),
        "GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n".to_string(),
        "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_string(),
    ] {
        let reply = raw_exchange(addr, request.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 400"), "{request:?}: {reply}");
        assert!(
            reply.to_ascii_lowercase().contains("server: legate"),
            "{reply}"
        );
    }
    assert_eq!(api.requests(), 0);
    assert_eq!(
        legate.metric(
            r#"legate_http_requests_total{cluster="none",code="4xx",listener="web",route="none"}"#
        ),
        7.0
    );

    let reply = raw_exchange(
        addr,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nZZZ\r\nbroken\r\n0\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    wait_until("the 400 is counted on the route", || {
        legate.metric(
            r#"legate_http_requests_total{cluster="api",code="4xx",listener="web",route="0"}"#,
        ) == 1.0
    });
    assert!(
        !legate.logged("upstream request failed"),
        "a client's broken body was blamed on the upstream"
    );
}

/// An upstream answers with both `Content-Length: 5` and a chunked body of 40
/// bytes: Transfer-Encoding wins (RFC 9112 §6.3), so the client gets all 40
/// bytes and no stale `content-length: 5` (before: 5 bytes, silently cut).
#[test]
fn transfer_encoding_wins_over_content_length() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Backend::serve(|mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let body = "x".repeat(40);
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n28\r\n{body}\r\n0\r\n\r\n"
        );
        let _ = s.write_all(reply.as_bytes()).await;
        let _ = s.shutdown().await;
    });
    let legate = Legate::start(&http_listener(
        "      - cluster: raw",
        &cluster("raw", &[upstream.addr], ""),
    ));
    let (status, text) = curl(&[], &format!("http://{}/", legate.addr("web")));
    assert_eq!(status, 200, "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("content-length: 5"),
        "{text}"
    );
    assert!(text.ends_with(&"x".repeat(40)), "{text}");
}

/// A request with both `Content-Length` and `Transfer-Encoding: chunked`:
/// the chunked framing wins (RFC 9112 §6.3), and what the backend receives is
/// the whole decoded body with no stale Content-Length.
#[test]
fn request_transfer_encoding_wins_over_content_length() {
    let api = HttpBackend::start("api");
    let legate = Legate::start(&http_listener(
        "      - cluster: api",
        &cluster("api", &[api.addr], ""),
    ));
    let reply = raw_exchange(
        legate.addr("web"),
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
    );
    if reply.starts_with("HTTP/1.1 400") {
        // Rejecting the ambiguous message outright is the other answer RFC 9112 allows.
        assert_eq!(api.requests(), 0, "{reply}");
        return;
    }
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let seen = api.last();
    assert_eq!(seen["body"], "hello world", "{seen}");
    assert!(seen["headers"]["content-length"].is_null(), "{seen}");
}

/// `http_versions` makes a listener speak one version only: HTTP/1.1 only
/// refuses HTTP/2 prior knowledge, h2c only refuses HTTP/1.1, and the default
/// tells them apart even when the first bytes come one at a time (a lone "P"
/// could begin the HTTP/2 preface or a POST).
#[test]
fn http_versions_restrict_what_a_listener_speaks() {
    let a = HttpBackend::start("a");
    let legate = Legate::start(&format!(
        "listeners:\n  - {{ name: h1, listen: \"127.0.0.1:0\", protocol: http, cluster: a, http_versions: [http1] }}\n  - {{ name: h2, listen: \"127.0.0.1:0\", protocol: http, cluster: a, http_versions: [h2c] }}\n  - {{ name: both, listen: \"127.0.0.1:0\", protocol: http, cluster: a }}\nclusters:\n{}",
        cluster("a", &[a.addr], "")
    ));
    let url = |l: &str| format!("http://{}/v", legate.addr(l));
    let h2 = ["--http2-prior-knowledge"];

    let (status, text) = curl(&[], &url("h1"));
    assert_eq!(status, 200, "{text}");
    let refused = |args: &[&str], url: &str| !curl_output(args, url).0.contains(" 200");
    assert!(refused(&h2, &url("h1")), "HTTP/2 on an http1-only listener");

    let (status, text) = curl(&h2, &url("h2"));
    assert_eq!(status, 200, "{text}");
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(refused(&[], &url("h2")), "HTTP/1.1 on an h2c-only listener");

    for args in [&[][..], &h2[..]] {
        let (status, text) = curl(args, &url("both"));
        assert_eq!(status, 200, "{args:?}: {text}");
    }
    let mut s = std::net::TcpStream::connect(legate.addr("both")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"P").unwrap();
    // Not a synchronisation: the answer is the same either way; the pause
    // only makes it likely that legate reads the "P" alone.
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"OST /v HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(a.last()["method"], "POST");
}
