//! gRPC through legate with a real gRPC server and client (grpcio, from the
//! venv `.ci/run` makes; `LEGATE_GRPC_PYTHON` names another interpreter):
//! deadlines, legate's own errors as gRPC statuses, and a server that ends
//! its connections with GOAWAY under load.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use support::{Legate, refused_addr};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/grpc_peer.py");

/// A grpcio server on loopback; killed on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(max_connection_age_ms: u64) -> Server {
        let mut child = Command::new(support::python())
            .args([PEER, "serve", &max_connection_age_ms.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run the gRPC peer (bash .ci/run makes its venv: pip install grpcio)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the gRPC server's port");
        let port: u16 = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "gRPC server did not start (is grpcio installed for {}?): {line:?}",
                support::python()
            )
        });
        Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the gRPC client: `args` after the mode; returns its JSON answer.
fn client(args: &[&str]) -> serde_json::Value {
    let out = Command::new(support::python())
        .arg(PEER)
        .args(args)
        .output()
        .expect("run the gRPC client");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "gRPC client said {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One listener per scenario, each a catch-all route to one cluster:
/// 1. `api` (route timeout 1 s): a 1.5 s call with a 5 s deadline is OK (the
///    call's own deadline replaces the route timeout); a 2 s call with a
///    0.5 s deadline is DEADLINE_EXCEEDED.
/// 2. `dead` (nothing listens): UNAVAILABLE with legate's message.
/// 3. `h1` (the same server, but no `http2: true`): UNAVAILABLE naming
///    `http2: true`.
/// 4. `aging`: a server that ends every connection with GOAWAY after 200 ms,
///    under 600 concurrent calls: every call is OK.
#[test]
fn grpc_calls_through_legate() {
    let api = Server::start(0);
    let aging = Server::start(200);
    let dead = refused_addr();
    let legate = Legate::start(&format!(
        r#"
listeners:
  - {{ name: api, listen: "127.0.0.1:0", protocol: http, routes: [ {{ cluster: api, timeout: 1s }} ] }}
  - {{ name: dead, listen: "127.0.0.1:0", protocol: http, cluster: dead }}
  - {{ name: h1, listen: "127.0.0.1:0", protocol: http, cluster: h1 }}
  - {{ name: aging, listen: "127.0.0.1:0", protocol: http, cluster: aging }}
clusters:
  - {{ name: api, endpoints: [ "{api}" ], http2: true }}
  - {{ name: dead, endpoints: [ "{dead}" ], http2: true, connect_timeout: 1s }}
  - {{ name: h1, endpoints: [ "{api}" ] }}
  - {{ name: aging, endpoints: [ "{aging}" ], http2: true }}
"#,
        api = api.addr,
        aging = aging.addr,
    ));
    let target = |name: &str| legate.addr(name).to_string();

    let long = client(&["call", &target("api"), "5", "1500"]);
    assert_eq!(long["code"], "OK", "{long}");
    let late = client(&["call", &target("api"), "0.5", "2000"]);
    assert_eq!(late["code"], "DEADLINE_EXCEEDED", "{late}");

    let down = client(&["call", &target("dead"), "5", "0"]);
    assert_eq!(down["code"], "UNAVAILABLE", "{down}");
    assert!(
        down["message"].as_str().unwrap_or("").contains("upstream"),
        "{down}"
    );
    let h1 = client(&["call", &target("h1"), "5", "0"]);
    assert_eq!(h1["code"], "UNAVAILABLE", "{h1}");
    assert!(
        h1["message"].as_str().unwrap_or("").contains("http2: true"),
        "{h1}"
    );

    let load = client(&["load", &target("aging"), "600", "16"]);
    assert_eq!(load["codes"], serde_json::json!({ "OK": 600 }), "{load}");
}
