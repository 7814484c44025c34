//! TCP forwarding through the real binary: payloads, half-close, endpoint choice.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use support::backends::Backend;
use support::{DEADLINE, Legate, refused_addr, wait_until};

fn one_listener(endpoints: &[String]) -> String {
    support::tcp_config("127.0.0.1:0", endpoints)
}

/// Writes `payload` to listener `app` and half-closes, while reading the
/// echo to EOF on this thread (so neither side blocks the other).
fn echo_round_trip(legate: &Legate, payload: &[u8]) -> Vec<u8> {
    let mut client = connect(legate);
    let mut writer = client.try_clone().unwrap();
    let to_send = payload.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut echoed = Vec::with_capacity(payload.len());
    client.read_to_end(&mut echoed).unwrap();
    sender.join().unwrap();
    echoed
}

fn connect(legate: &Legate) -> TcpStream {
    let s = TcpStream::connect(legate.addr("app")).expect("connect to legate");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// 1. Echo backend behind legate.
/// 2. Write 8 MiB of random bytes while reading the echo on another thread.
/// 3. The echo equals the input byte for byte, and the byte counters saw it all.
#[test]
fn multi_mib_random_payload_round_trip() {
    let echo = Backend::echo();
    let legate = Legate::start(&one_listener(&[echo.addr.to_string()]));
    let payload: Vec<u8> = (0..8 * 1024 * 1024).map(|_| rand::random::<u8>()).collect();

    let echoed = echo_round_trip(&legate, &payload);

    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echoed bytes differ from the payload");
    let len = payload.len() as f64;
    wait_until("byte counters", || {
        legate.metric(r#"legate_bytes_total{direction="upstream",listener="app"}"#) == len
            && legate.metric(r#"legate_bytes_total{direction="downstream",listener="app"}"#) == len
    });
}

/// The same round trip and both half-closes on the user-space copy path
/// (`LEGATE_NO_SPLICE=1`), which TLS upstreams and non-Linux systems use; and
/// the default run says it uses splice.
#[test]
fn copy_path_and_splice_path_agree() {
    let echo = Backend::echo();
    let (tx, rx) = std::sync::mpsc::channel();
    let banner = Backend::banner_then_read(b"banner", tx);
    let config = format!(
        "listeners:\n  - {{ name: app, listen: 127.0.0.1:0, cluster: echo }}\n  - {{ name: banner, listen: 127.0.0.1:0, cluster: banner }}\nclusters:\n  - {{ name: echo, endpoints: [ \"{}\" ] }}\n  - {{ name: banner, endpoints: [ \"{}\" ] }}\n",
        echo.addr, banner.addr
    );
    for (env, path) in [(Some(("LEGATE_NO_SPLICE", "1")), "copy"), (None, "splice")] {
        let legate = Legate::start_with_env(&config, env.as_slice());
        let payload: Vec<u8> = (0..3 * 1024 * 1024).map(|_| rand::random::<u8>()).collect();
        let echoed = echo_round_trip(&legate, &payload);
        assert!(echoed == payload, "{path}: echo differs");

        let mut b = TcpStream::connect(legate.addr("banner")).unwrap();
        b.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut got = String::new();
        b.read_to_string(&mut got).unwrap();
        assert_eq!(got, "banner", "{path}");
        b.write_all(&[1u8; 100_000]).unwrap();
        b.shutdown(Shutdown::Write).unwrap();
        let received = rx.recv_timeout(DEADLINE).unwrap();
        assert_eq!(received.expect("a FIN, not a reset"), 100_000, "{path}");
        let uses_splice = legate.logs().iter().any(|l| l.contains("uses splice(2)"));
        assert_eq!(uses_splice, path == "splice", "{path}");
    }
}

/// 1. Echo backend behind legate.
/// 2. One message at a time, each echoed before the next goes: sizes from one
///    byte to 300 KB, on both sides of the 16 KiB up to which legate copies a
///    read instead of splicing it, so each direction switches both ways.
/// 3. Every echo equals its message, and the byte counters saw them all.
#[test]
fn small_and_large_messages_one_at_a_time() {
    let echo = Backend::echo();
    let legate = Legate::start(&one_listener(&[echo.addr.to_string()]));
    let mut client = connect(&legate);
    let sizes = [
        1, 100, 16_383, 16_384, 16_385, 7, 40_000, 2, 300_000, 512, 16_384, 3,
    ];
    let mut total = 0;
    for round in 0..20 {
        for (i, &size) in sizes.iter().enumerate() {
            let message: Vec<u8> = (0..size).map(|b| (b + i + round) as u8).collect();
            let mut writer = client.try_clone().unwrap();
            let to_send = message.clone();
            // Written on another thread: a 300 KB echo would fill both
            // directions' buffers before this thread starts reading.
            let sender = std::thread::spawn(move || writer.write_all(&to_send).unwrap());
            let mut echoed = vec![0u8; size];
            client.read_exact(&mut echoed).unwrap();
            sender.join().unwrap();
            assert!(echoed == message, "round {round}, message of {size} bytes");
            total += size;
        }
    }
    let total = total as f64;
    wait_until("byte counters", || {
        legate.metric(r#"legate_bytes_total{direction="upstream",listener="app"}"#) == total
            && legate.metric(r#"legate_bytes_total{direction="downstream",listener="app"}"#)
                == total
    });
}

/// 1. The backend sends 768 numbered 12 KiB messages, one per millisecond, so
///    legate reads them one by one (copied, not spliced).
/// 2. The client has a 4 KiB receive buffer and reads nothing until the
///    backend has sent half of them (4.5 MiB, more than a socket's send buffer
///    can grow to, 4 MiB here): legate's socket to the client fills, and what
///    legate read but could not send yet waits in its pipe.
/// 3. The client then gets all of them in order, and the backend's FIN.
#[test]
fn a_client_that_reads_late_gets_every_small_message_in_order() {
    const MESSAGES: usize = 768;
    const SIZE: usize = 12 * 1024;
    let (half_sent, halfway) = std::sync::mpsc::channel();
    let backend = Backend::serve(move |mut s: tokio::net::TcpStream| {
        let half_sent = half_sent.clone();
        async move {
            s.set_nodelay(true).unwrap();
            for i in 0..MESSAGES {
                if s.write_all(&[i as u8; SIZE]).await.is_err() {
                    return;
                }
                if i == MESSAGES / 2 {
                    let _ = half_sent.send(());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let _ = s.shutdown().await;
        }
    });
    let legate = Legate::start(&one_listener(&[backend.addr.to_string()]));
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&legate.addr("app").into()).unwrap();
    let mut client: TcpStream = socket.into();
    client.set_read_timeout(Some(DEADLINE)).unwrap();

    halfway
        .recv_timeout(DEADLINE)
        .expect("the backend sends half");
    let mut received = Vec::new();
    client.read_to_end(&mut received).unwrap();
    assert_eq!(received.len(), MESSAGES * SIZE);
    for (i, message) in received.chunks(SIZE).enumerate() {
        assert!(message.iter().all(|&b| b == i as u8), "message {i}");
    }
}

/// 1. Client sends a request and half-closes (SHUT_WR).
/// 2. The backend sees EOF, echoes what it got and half-closes.
/// 3. The client still reads the whole answer after its own FIN, and a clean EOF
///    (`read_to_string` fails on a reset).
#[test]
fn half_close_from_client_keeps_reverse_direction() {
    let echo = Backend::echo();
    let legate = Legate::start(&one_listener(&[echo.addr.to_string()]));
    let mut client = connect(&legate);
    client.write_all(b"request then FIN").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut answer = String::new();
    client.read_to_string(&mut answer).unwrap();
    assert_eq!(answer, "request then FIN");
}

/// 1. Backend sends a banner and half-closes first.
/// 2. The client reads the banner and EOF, then keeps sending 1 MiB and half-closes.
/// 3. The backend receives all of it and a clean EOF: the app→backend direction
///    outlived the backend's FIN, and the last FIN (which legate's close sends,
///    with no shutdown of its own) arrives as a FIN, not a reset.
#[test]
fn half_close_from_backend_keeps_forward_direction() {
    let (tx, rx) = std::sync::mpsc::channel();
    let backend = Backend::banner_then_read(b"hello from backend", tx);
    let legate = Legate::start(&one_listener(&[backend.addr.to_string()]));
    let mut client = connect(&legate);
    let mut banner = String::new();
    client.read_to_string(&mut banner).unwrap();
    assert_eq!(banner, "hello from backend");

    let data = vec![7u8; 1024 * 1024];
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let received = rx.recv_timeout(DEADLINE).expect("backend reports");
    assert_eq!(received.expect("a FIN, not a reset"), data.len());
}

/// 1. The client connects and closes without sending anything.
/// 2. The backend gets a connection that ends at once; the client reads EOF.
/// 3. Metrics count the connection, and the active gauge returns to 0.
#[test]
fn zero_byte_connection() {
    let echo = Backend::echo();
    let legate = Legate::start(&one_listener(&[echo.addr.to_string()]));
    let mut client = connect(&legate);
    client.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    drop(client);

    wait_until("backend accepted", || echo.accepted() == 1);
    wait_until("connection counted and closed", || {
        legate.metric(r#"legate_listener_connections_total{listener="app"}"#) == 1.0
            && legate.metric(r#"legate_listener_connections_active{listener="app"}"#) == 0.0
    });
    assert_eq!(
        legate.metric(r#"legate_bytes_total{direction="upstream",listener="app"}"#),
        0.0
    );
}

/// 1. The cluster lists a refusing endpoint first, then a live echo.
/// 2. Several connections in a row all get their echo: the dead one is skipped.
/// 3. The refusals are counted under result="refused".
#[test]
fn dead_first_endpoint_is_skipped() {
    let echo = Backend::echo();
    let dead = refused_addr();
    let legate = Legate::start(&one_listener(&[dead.to_string(), echo.addr.to_string()]));
    for i in 0..4 {
        let mut client = connect(&legate);
        let msg = format!("ping {i}");
        client.write_all(msg.as_bytes()).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, msg);
    }
    assert_eq!(echo.accepted(), 4);
    assert!(
        legate.metric(r#"legate_upstream_connects_total{cluster="backend",result="refused"}"#)
            >= 1.0
    );
    assert_eq!(
        legate.metric(r#"legate_upstream_connects_total{cluster="backend",result="ok"}"#),
        4.0
    );
}

/// 1. Every endpoint refuses.
/// 2. The client is closed promptly (EOF or reset, no hang).
/// 3. Counted as result="no_healthy_endpoint".
#[test]
fn all_endpoints_dead_closes_client() {
    let legate = Legate::start(&one_listener(&[
        refused_addr().to_string(),
        refused_addr().to_string(),
    ]));
    let mut client = connect(&legate);
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected {n} bytes"),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "client was left hanging"
        ),
    }
    wait_until("no_healthy_endpoint counted", || {
        legate.metric(
            r#"legate_upstream_connects_total{cluster="backend",result="no_healthy_endpoint"}"#,
        ) == 1.0
    });
}

/// 1. Two named backends in one cluster.
/// 2. Four connections alternate between them (round robin).
#[test]
fn round_robin_alternates_endpoints() {
    let a = Backend::named("a");
    let b = Backend::named("b");
    let legate = Legate::start(&one_listener(&[a.addr.to_string(), b.addr.to_string()]));
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut client = connect(&legate);
        let mut name = String::new();
        client.read_to_string(&mut name).unwrap();
        seen.push(name);
    }
    assert_eq!(seen, ["a", "b", "a", "b"]);
}

/// 1. A listener splits 1:3 between two clusters with a zero-weight third.
/// 2. Over 400 connections both weighted clusters get traffic near their share,
///    the zero-weight one none.
#[test]
fn split_spreads_connections_by_weight() {
    let a = Backend::named("a");
    let b = Backend::named("b");
    let c = Backend::named("c");
    let legate = Legate::start(&format!(
        r#"
listeners:
  - name: app
    listen: 127.0.0.1:0
    split:
      - {{ cluster: old, weight: 1 }}
      - {{ cluster: new, weight: 3 }}
      - {{ cluster: off, weight: 0 }}
clusters:
  - {{ name: old, endpoints: [ "{}" ] }}
  - {{ name: new, endpoints: [ "{}" ] }}
  - {{ name: off, endpoints: [ "{}" ] }}
"#,
        a.addr, b.addr, c.addr
    ));
    let mut to_a = 0;
    for _ in 0..400 {
        let mut client = connect(&legate);
        let mut name = String::new();
        client.read_to_string(&mut name).unwrap();
        if name == "a" {
            to_a += 1;
        }
    }
    assert_eq!(c.accepted(), 0);
    assert_eq!(a.accepted() + b.accepted(), 400);
    // Expected 100; the binomial standard deviation is ~8.7, so 60..140 is > 4.5 sigma.
    assert!((60..=140).contains(&to_a), "old got {to_a} of 400");
}
