//! What a client can do to legate, and what holds: head and idle timeouts,
//! head size, connection limits, running out of file descriptors, memory
//! that comes back, resets passed on. Each test is a reproduction from the
//! issue that filed it, against the real binary.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::backends::Backend;
use support::http::HttpBackend;
use support::{DEADLINE, Legate, wait_until};

fn http_listener(backend: SocketAddr, extra: &str) -> String {
    format!(
        "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", protocol: http, cluster: api{extra} }}\nclusters:\n  - {{ name: api, endpoints: [ \"{backend}\" ] }}\n"
    )
}

fn tcp_listener(backend: SocketAddr, extra: &str) -> String {
    format!(
        "listeners:\n  - {{ name: app, listen: \"127.0.0.1:0\", cluster: backend{extra} }}\nclusters:\n  - {{ name: backend, endpoints: [ \"{backend}\" ], connect_timeout: 1s }}\n"
    )
}

/// Reads until EOF or error; returns how long that took and whether it was a clean EOF.
fn wait_closed(s: &mut TcpStream) -> (Duration, std::io::Result<()>) {
    let began = Instant::now();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (began.elapsed(), Ok(())),
            Ok(_) => continue,
            Err(e) => return (began.elapsed(), Err(e)),
        }
    }
}

fn echo_line(s: &mut TcpStream, line: &str) -> String {
    s.write_all(line.as_bytes()).unwrap();
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

/// 1. An HTTP listener with `header_timeout: 400ms`.
/// 2. A slowloris client sends a request head one byte every 100 ms, forever.
/// 3. legate closes it about 400 ms after its first byte, although bytes keep
///    coming (the idle timeout, 60 s by default, is not what closes it).
/// 4. A well-behaved client on the same listener is served.
#[test]
fn slowloris_is_closed_by_header_timeout() {
    let api = HttpBackend::start("api");
    let legate = Legate::start(&http_listener(api.addr, ", header_timeout: 400ms"));
    let addr = legate.addr("web");

    let mut slow = TcpStream::connect(addr).unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let began = Instant::now();
    let mut closed_after = None;
    for b in head.iter() {
        if slow.write_all(&[*b]).is_err() {
            closed_after = Some(began.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_after = closed_after.unwrap_or_else(|| wait_closed(&mut slow).0 + began.elapsed());
    assert!(
        closed_after >= Duration::from_millis(350) && closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );

    let (status, _) = support::http::curl(&[], &format!("http://{addr}/ok"));
    assert_eq!(status, 200);
}

/// 1. An HTTP listener with `idle_timeout: 500ms`.
/// 2. A keep-alive client makes one request, then sends nothing.
/// 3. legate closes the connection about 500 ms after the response, cleanly
///    (FIN: the client may reconnect), not before.
#[test]
fn idle_keep_alive_is_closed_by_idle_timeout() {
    let api = HttpBackend::start("api");
    let legate = Legate::start(&http_listener(api.addr, ", idle_timeout: 500ms"));
    let mut client = support::http::Client::connect(legate.addr("web"));
    assert_eq!(client.get("/one").status, 200);
    let (after, end) = wait_closed(client.raw().get_mut());
    end.expect("a clean close");
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
}

/// 1. An HTTP listener with the default head limit (64 KiB).
/// 2. A request with a 70 KiB header gets 431 (marked `server: legate` and
///    counted), not a 400 or a reset, and nothing reaches the backend.
#[test]
fn oversized_request_head_gets_431() {
    let api = HttpBackend::start("api");
    let legate = Legate::start(&http_listener(api.addr, ""));
    let mut s = TcpStream::connect(legate.addr("web")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let big = "a".repeat(70 * 1024);
    // The head may be refused before it is all sent: a write error is fine.
    let _ = write!(s, "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:.200}");
    assert!(reply.contains("server: legate"), "{reply:.200}");
    assert_eq!(api.requests(), 0);
    assert_eq!(
        legate.metric(
            r#"legate_http_requests_total{cluster="none",code="4xx",listener="web",route="none"}"#
        ),
        1.0
    );
}

/// 1. A TCP listener with `idle_timeout: 500ms` to an echo backend.
/// 2. A connection that echoes a line every 150 ms for 1.2 s stays open.
/// 3. Then it goes quiet: legate closes it about 500 ms later.
#[test]
fn tcp_idle_timeout_closes_only_quiet_connections() {
    let echo = Backend::echo();
    let legate = Legate::start(&tcp_listener(echo.addr, ", idle_timeout: 500ms"));
    let mut s = TcpStream::connect(legate.addr("app")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    for i in 0..8 {
        assert_eq!(
            echo_line(&mut s, &format!("ping {i}\n")),
            format!("ping {i}\n")
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    let (after, _) = wait_closed(&mut s);
    assert!(
        after >= Duration::from_millis(200) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
}

/// 1. A TCP listener with `max_connections: 2`.
/// 2. Two connections are served; a third one's connect succeeds (the kernel
///    backlog holds it) but legate does not accept it: the backend never sees
///    it and its line is not echoed.
/// 3. One of the first two closes: the third is accepted and served.
#[test]
fn max_connections_holds_at_its_limit() {
    let echo = Backend::echo();
    let legate = Legate::start(&tcp_listener(echo.addr, ", max_connections: 2"));
    let addr = legate.addr("app");
    let mut first = TcpStream::connect(addr).unwrap();
    let mut second = TcpStream::connect(addr).unwrap();
    assert_eq!(echo_line(&mut first, "1\n"), "1\n");
    assert_eq!(echo_line(&mut second, "2\n"), "2\n");

    let mut third = TcpStream::connect(addr).unwrap();
    third.write_all(b"3\n").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2];
    let waited = third.read(&mut buf);
    assert!(
        matches!(&waited, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "the third connection must wait: {waited:?}"
    );
    assert_eq!(echo.accepted(), 2);
    assert!(
        legate.metric(
            r#"legate_listener_accept_paused_total{listener="app",reason="max_connections"}"#
        ) >= 1.0
    );

    drop(first);
    third.set_read_timeout(Some(DEADLINE)).unwrap();
    third.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"3\n");
    assert_eq!(echo.accepted(), 3);
}

/// 1. legate runs with `ulimit -n 256`; its data path may use 192 fds.
/// 2. 150 app connections are opened and held through a TCP listener (each
///    costs up to six fds: two sockets and two splice pipes).
/// 3. While they are held: `/healthz` and `/metrics` answer, the endpoint is
///    still healthy, no connect was counted against it (`refused`, `error`),
///    and the listener reports that it paused for fds.
/// 4. The first connections close: the waiting ones are served.
#[test]
fn fd_exhaustion_blames_no_upstream_and_keeps_admin_answering() {
    let echo = Backend::echo();
    let legate = Legate::start_with_nofile(&tcp_listener(echo.addr, ""), 256);
    let addr = legate.addr("app");
    let mut held: Vec<TcpStream> = (0..150)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    for (i, s) in held.iter_mut().enumerate() {
        s.write_all(format!("{i:03}\n").as_bytes()).unwrap();
    }
    wait_until("the listener pauses for fds", || {
        legate.metric(r#"legate_listener_accept_paused_total{listener="app",reason="fds"}"#) >= 1.0
    });

    assert_eq!(legate.get("/healthz").0, 200);
    let (status, metrics) = legate.get("/metrics");
    assert_eq!(status, 200);
    let endpoint = format!(
        r#"legate_endpoint_healthy{{cluster="backend",endpoint="{}"}}"#,
        echo.addr
    );
    assert_eq!(
        support::metric_value(&metrics, &endpoint),
        Some(1.0),
        "{metrics}"
    );
    for result in ["refused", "error", "timeout"] {
        let series =
            format!(r#"legate_upstream_connects_total{{cluster="backend",result="{result}"}}"#);
        assert_eq!(
            support::metric_value(&metrics, &series),
            Some(0.0),
            "{series}"
        );
    }
    let served_while_full = echo.accepted();
    assert!(
        served_while_full < 150,
        "{served_while_full} served with 192 fds"
    );

    // Close the first half: every remaining connection gets its echo.
    let rest = held.split_off(75);
    drop(held);
    for (i, mut s) in rest.into_iter().enumerate() {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(buf, *format!("{:03}\n", i + 75).as_bytes());
    }
}

/// 1. A backend accepts, reads a line, and resets the connection (SO_LINGER 0).
/// 2. Through legate, the app sees a reset (ECONNRESET) too, as it would
///    directly, not a clean end of stream that reads as "done".
#[test]
fn an_upstream_reset_reaches_the_app_as_a_reset() {
    let resetter = Backend::serve(|mut s: tokio::net::TcpStream| async move {
        let mut buf = [0u8; 16];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    });
    let legate = Legate::start(&tcp_listener(resetter.addr, ""));
    let mut s = TcpStream::connect(legate.addr("app")).unwrap();
    s.write_all(b"hello\n").unwrap();
    let (_, end) = wait_closed(&mut s);
    let err = end.expect_err("a reset, not a clean EOF");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

/// 1. legate idles; its RSS is measured.
/// 2. 2,000 HTTP keep-alive connections are opened, each makes a request, and
///    all are closed.
/// 3. Within 30 s RSS is back within 2x of idle (allocator memory is returned).
#[test]
fn memory_comes_back_after_a_burst_of_connections() {
    let api = HttpBackend::start("api");
    let legate = Legate::start(&http_listener(api.addr, ""));
    let addr = legate.addr("web");
    // Warm up one connection so lazily built state is in the baseline.
    assert_eq!(
        support::http::Client::connect(addr).get("/warm").status,
        200
    );
    let idle = legate.rss_kib();

    let mut clients: Vec<support::http::Client> = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let mut c = support::http::Client::connect(addr);
        assert_eq!(c.get("/burst").status, 200);
        clients.push(c);
    }
    let peak = legate.rss_kib();
    drop(clients);

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut now = legate.rss_kib();
    while now > 2 * idle && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = legate.rss_kib();
    }
    eprintln!("RSS idle {idle} KiB, peak {peak} KiB, after {now} KiB");
    assert!(
        now <= 2 * idle,
        "RSS idle {idle} KiB, peak {peak} KiB, after 30 s {now} KiB"
    );
}

/// 1. An HTTP cluster with `pool_idle_timeout: 200ms`.
/// 2. Two requests in a row share one pooled upstream connection.
/// 3. After the connection sat unused past the timeout (plus the quarter of
///    it the expiry may lag), the next request needs a new connection: the
///    pooled one was closed instead of waiting for the upstream to close it
///    under a request.
#[test]
fn pooled_upstream_connections_expire_when_idle() {
    let api = HttpBackend::start("api");
    let legate = Legate::start(&format!(
        "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", protocol: http, cluster: api }}\nclusters:\n  - {{ name: api, endpoints: [ \"{}\" ], pool_idle_timeout: 200ms }}\n",
        api.addr
    ));
    let mut client = support::http::Client::connect(legate.addr("web"));
    assert_eq!(client.get("/1").status, 200);
    assert_eq!(client.get("/2").status, 200);
    assert_eq!(
        api.connections(),
        1,
        "the second request reused the pooled connection"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(client.get("/3").status, 200);
    assert_eq!(
        api.connections(),
        2,
        "the idle pooled connection was closed"
    );
}

/// A backend that runs `script` on each accepted connection (in its own
/// thread), after reading the request head.
fn scripted_backend(script: fn(TcpStream, Vec<u8>)) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                script(stream, head);
            });
        }
    });
    addr
}

fn stream_listener(backend: SocketAddr, route: &str) -> String {
    format!(
        "listeners:\n  - name: web\n    listen: \"127.0.0.1:0\"\n    protocol: http\n    stream_idle_timeout: 500ms\n    routes: [ {{ cluster: api{route} }} ]\nclusters:\n  - {{ name: api, endpoints: [ \"{backend}\" ] }}\n"
    )
}

fn read_all(s: &mut TcpStream) -> (Vec<u8>, Duration) {
    let began = Instant::now();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    (out, began.elapsed())
}

/// 1. An HTTP listener with `stream_idle_timeout: 500ms`; the backend sends
///    a response head and one chunk, then goes quiet (keeping the socket).
/// 2. The client gets the chunk, then the connection closes about 500 ms
///    later without the last chunk (the body is visibly incomplete).
/// 3. A backend that sends a chunk every 150 ms for 1.8 s is not cut.
#[test]
fn a_quiet_stream_is_ended_by_stream_idle_timeout_and_a_trickle_is_not() {
    let quiet = scripted_backend(|mut s, _| {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
        std::thread::sleep(Duration::from_secs(20));
    });
    let legate = Legate::start(&stream_listener(quiet, ""));
    let mut client = TcpStream::connect(legate.addr("web")).unwrap();
    client
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (got, took) = read_all(&mut client);
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 200") && got.contains("hello"),
        "{got}"
    );
    assert!(
        !got.ends_with("0\r\n\r\n"),
        "a cut stream must not look complete: {got}"
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "ended after {took:?}"
    );

    let trickle = scripted_backend(|mut s, _| {
        let _ = s.write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        );
        for _ in 0..12 {
            std::thread::sleep(Duration::from_millis(150));
            let _ = s.write_all(b"1\r\n.\r\n");
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let legate = Legate::start(&stream_listener(trickle, ""));
    let mut client = TcpStream::connect(legate.addr("web")).unwrap();
    client
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (got, _) = read_all(&mut client);
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.ends_with("0\r\n\r\n") && got.matches('.').count() >= 12,
        "{got}"
    );
}

/// 1. A route with `timeout: 0s` (none) and `stream_idle_timeout: 500ms`.
/// 2. A backend that never answers: the client gets legate's 504 after about
///    500 ms instead of waiting forever.
/// 3. A backend that answers only once it has read a request body the client
///    uploads over 1.5 s, in pieces 200 ms apart: the upload is activity, so
///    the request succeeds.
#[test]
fn a_route_without_timeout_waits_as_long_as_the_stream_moves() {
    let silent = scripted_backend(|_s, _| std::thread::sleep(Duration::from_secs(20)));
    let legate = Legate::start(&stream_listener(silent, ", timeout: 0s"));
    let began = Instant::now();
    let (status, body) = support::http_request(legate.addr("web"), "GET", "/slow");
    assert_eq!(status, 504, "{body}");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "504 after {took:?}"
    );

    let reader = scripted_backend(|mut s, _| {
        // Read the chunked body to its last chunk, then answer.
        let mut body = Vec::new();
        let mut buf = [0u8; 256];
        while !body.ends_with(b"0\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => body.extend_from_slice(&buf[..n]),
            }
        }
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
    });
    let legate = Legate::start(&stream_listener(reader, ", timeout: 0s"));
    let mut client = TcpStream::connect(legate.addr("web")).unwrap();
    client
        .write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .unwrap();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(200));
        client.write_all(b"2\r\nab\r\n").unwrap();
    }
    client.write_all(b"0\r\n\r\n").unwrap();
    let (got, _) = read_all(&mut client);
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// 1. `stream_idle_timeout: 500ms`; a backend sends a 64 MiB response.
/// 2. The client sends its request and then reads nothing for 2 s, so legate
///    can write nothing and its response body is never polled.
/// 3. legate closes the stalled connection: the client, reading at last, gets
///    what the socket buffers held and then the end, far short of 64 MiB.
#[test]
fn a_client_that_stops_reading_is_closed_after_stream_idle_timeout() {
    const SIZE: usize = 64 << 20;
    let big = scripted_backend(|mut s, _| {
        let _ =
            s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes());
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let legate = Legate::start(&stream_listener(big, ""));
    let mut client = TcpStream::connect(legate.addr("web")).unwrap();
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    loop {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(total > 0 && total < SIZE / 2, "read {total} bytes");
    legate.wait_log(|l| l.contains("the client took no response bytes for stream_idle_timeout"));
}
