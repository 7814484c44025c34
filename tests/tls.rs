//! TLS and mTLS origination against real TLS servers: tokio-rustls in the
//! test, `openssl s_server`, and nginx with `ssl_verify_client on`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use support::pki::{Pki, replace};
use support::tls_server::TlsServer;
use support::{DEADLINE, Legate, wait_until};

fn tcp_tls(server: SocketAddr, tls: &str) -> String {
    format!(
        "listeners:\n  - {{ name: app, listen: \"127.0.0.1:0\", cluster: secure }}\nclusters:\n  - name: secure\n    endpoints: [ \"{server}\" ]\n    connect_timeout: 2s\n    tls: {tls}\n"
    )
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Sends a line through legate and returns what comes back (empty when the
/// connection was closed instead).
fn echo(addr: SocketAddr, line: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    if s.write_all(line.as_bytes()).is_err() {
        return String::new();
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn tls_errors(legate: &Legate) -> f64 {
    legate.metric(r#"legate_upstream_connects_total{cluster="secure",result="tls_error"}"#)
}

/// The app speaks plaintext; legate speaks verified TLS to the server.
#[test]
fn originates_verified_tls() {
    let pki = Pki::new("ca");
    let srv = pki.issue("server", "server", &["localhost", "127.0.0.1"], false);
    let server = TlsServer::echo(&srv.cert, &srv.key, None);
    let legate = Legate::start(&tcp_tls(
        server.addr,
        &format!("{{ ca: \"{}\", sni: localhost }}", p(&pki.ca())),
    ));
    assert_eq!(echo(legate.addr("app"), "over tls\n"), "over tls\n");
    assert_eq!(server.handshakes(), vec![None]);
    assert_eq!(tls_errors(&legate), 0.0);
}

/// mTLS: the server requires a client certificate; legate presents the
/// configured one, and its expiry is exported.
#[test]
fn mutual_tls_presents_the_client_certificate() {
    let pki = Pki::new("ca");
    let srv = pki.issue("server", "server", &["localhost"], false);
    let client = pki.issue("client", "orders-app", &["orders-app"], false);
    let server = TlsServer::echo(&srv.cert, &srv.key, Some(&pki.ca()));
    let legate = Legate::start(&tcp_tls(
        server.addr,
        &format!(
            "{{ ca: \"{}\", sni: localhost, cert: \"{}\", key: \"{}\" }}",
            p(&pki.ca()),
            p(&client.cert),
            p(&client.key)
        ),
    ));
    assert_eq!(echo(legate.addr("app"), "mtls\n"), "mtls\n");
    assert_eq!(server.handshakes(), vec![Some("orders-app".to_string())]);
    let expiry = legate.metric(r#"legate_tls_cert_expiry_timestamp_seconds{cluster="secure"}"#);
    assert!(
        expiry > 4_000_000_000.0,
        "rcgen's default notAfter is far away: {expiry}"
    );
}

/// Each verification failure closes the app's connection, is counted as
/// `tls_error` and logged with its reason.
#[test]
fn verification_failures_are_refused() {
    let pki = Pki::new("ca");
    let other = Pki::new("other");
    let good = pki.issue("good", "good", &["localhost"], false);
    let expired = pki.issue("expired", "expired", &["localhost"], true);
    let wrong = pki.issue("wrong", "wrong", &["other.example"], false);
    let cases = [
        ("unknown CA", &good, other.ca(), "UnknownIssuer"),
        ("expired", &expired, pki.ca(), "certificate expired"),
        ("name mismatch", &wrong, pki.ca(), "not valid for name"),
    ];
    for (case, cert, ca, reason) in cases {
        let server = TlsServer::echo(&cert.cert, &cert.key, None);
        let legate = Legate::start(&tcp_tls(
            server.addr,
            &format!("{{ ca: \"{}\", sni: localhost }}", p(&ca)),
        ));
        assert_eq!(
            echo(legate.addr("app"), "secret\n"),
            "",
            "{case}: data went through"
        );
        wait_until(case, || tls_errors(&legate) >= 1.0);
        legate.wait_log(|l| l.contains("TLS handshake with upstream failed") && l.contains(reason));
        assert!(
            server.handshakes().is_empty(),
            "{case}: the server completed a handshake"
        );
    }
}

/// `verify: false` connects to a server no CA vouches for, with a warning.
#[test]
fn verify_false_is_explicit_and_warned() {
    let other = Pki::new("other");
    let srv = other.issue("server", "server", &["whatever.example"], false);
    let server = TlsServer::echo(&srv.cert, &srv.key, None);
    let legate = Legate::start(&tcp_tls(server.addr, "{ verify: false }"));
    assert_eq!(echo(legate.addr("app"), "unverified\n"), "unverified\n");
    legate.wait_log(|l| l.contains("WARN") && l.contains("verify: false"));
}

/// ALPN: an HTTP cluster offering `[h2, http/1.1]` to a server that picks h2
/// speaks HTTP/2 to it; one offering only http/1.1 speaks HTTP/1.1.
#[test]
fn alpn_h2_selects_http2() {
    let pki = Pki::new("ca");
    let srv = pki.issue("server", "server", &["localhost"], false);
    let server = TlsServer::http(&srv.cert, &srv.key, &["h2", "http/1.1"]);
    let config = |alpn: &str| {
        format!(
            "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", protocol: http, cluster: secure }}\nclusters:\n  - name: secure\n    endpoints: [ \"{}\" ]\n    tls: {{ ca: \"{}\", sni: localhost, alpn: [ {alpn} ] }}\n",
            server.addr,
            p(&pki.ca())
        )
    };
    let legate = Legate::start(&config("h2, http/1.1"));
    let (status, text) = support::http::curl(&[], &format!("http://{}/", legate.addr("web")));
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("HTTP/2.0"), "{text}");

    let legate = Legate::start(&config("http/1.1"));
    let (_, text) = support::http::curl(&[], &format!("http://{}/", legate.addr("web")));
    assert!(text.ends_with("HTTP/1.1"), "{text}");
}

/// Rotation without restart: the client certificate files are replaced, and
/// new connections present the new certificate while an open one keeps going;
/// then a half-written pair (new cert, old key) is rejected and the last good
/// pair stays in use.
#[test]
fn client_certificate_rotation_and_mismatched_pair() {
    let pki = Pki::new("ca");
    let srv = pki.issue("server", "server", &["localhost"], false);
    let v1 = pki.issue("v1", "client-v1", &["client"], false);
    let v2 = pki.issue("v2", "client-v2", &["client"], false);
    let v3 = pki.issue("v3", "client-v3", &["client"], false);
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("tls.crt"), live.path().join("tls.key"));
    replace(&v1.cert, &cert);
    replace(&v1.key, &key);
    let server = TlsServer::echo(&srv.cert, &srv.key, Some(&pki.ca()));
    let legate = Legate::start(&tcp_tls(
        server.addr,
        &format!(
            "{{ ca: \"{}\", sni: localhost, cert: \"{}\", key: \"{}\" }}",
            p(&pki.ca()),
            p(&cert),
            p(&key)
        ),
    ));
    let mut open = TcpStream::connect(legate.addr("app")).unwrap();
    open.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut roundtrip = |msg: &str| {
        open.write_all(msg.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert_eq!(line, msg);
    };
    roundtrip("first\n");

    replace(&v2.key, &key);
    replace(&v2.cert, &cert);
    legate.wait_generation(2);
    assert_eq!(echo(legate.addr("app"), "new\n"), "new\n");
    roundtrip("old connection still up\n");
    let seen = server.handshakes();
    assert_eq!(
        seen.first().cloned().flatten().as_deref(),
        Some("client-v1")
    );
    assert_eq!(seen.last().cloned().flatten().as_deref(), Some("client-v2"));

    // Half a rotation: the v3 certificate lands before its key.
    replace(&v3.cert, &cert);
    wait_until("mismatched pair rejected", || {
        legate.metric(r#"legate_config_reloads_total{result="error"}"#) >= 1.0
    });
    legate.wait_log(|l| l.contains("the key does not match the certificate"));
    assert_eq!(echo(legate.addr("app"), "still v2\n"), "still v2\n");
    assert_eq!(
        server.handshakes().last().cloned().flatten().as_deref(),
        Some("client-v2")
    );
    // The key arrives: the pair matches again and is applied.
    replace(&v3.key, &key);
    legate.wait_generation(3);
    assert_eq!(echo(legate.addr("app"), "v3\n"), "v3\n");
    assert_eq!(
        server.handshakes().last().cloned().flatten().as_deref(),
        Some("client-v3")
    );
}

/// Rotating the CA bundle: a server re-issued by a new CA is refused until the
/// bundle names that CA, then accepted, without a restart.
#[test]
fn ca_bundle_rotation() {
    let old = Pki::new("old");
    let new = Pki::new("new");
    let srv = new.issue("server", "server", &["localhost"], false);
    let server = TlsServer::echo(&srv.cert, &srv.key, None);
    let bundle = tempfile::tempdir().unwrap();
    let ca = bundle.path().join("ca.pem");
    replace(&old.ca(), &ca);
    let legate = Legate::start(&tcp_tls(
        server.addr,
        &format!("{{ ca: \"{}\", sni: localhost }}", p(&ca)),
    ));
    assert_eq!(echo(legate.addr("app"), "x\n"), "");
    replace(&new.ca(), &ca);
    legate.wait_generation(2);
    assert_eq!(echo(legate.addr("app"), "trusted now\n"), "trusted now\n");
}

/// A real `openssl s_server` as the TLS upstream (`-rev` answers each line reversed).
#[test]
fn openssl_s_server_upstream() {
    let pki = Pki::new("ca");
    let srv = pki.issue("server", "server", &["localhost"], false);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-rev", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(&srv.cert)
        .arg("-key")
        .arg(&srv.key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run openssl s_server");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until("s_server listening", || TcpStream::connect(addr).is_ok());
    let legate = Legate::start(&tcp_tls(
        addr,
        &format!("{{ ca: \"{}\", sni: localhost }}", p(&pki.ca())),
    ));
    let mut s = TcpStream::connect(legate.addr("app")).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"legate\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line.trim_end(), "etagel");
}

/// nginx with `ssl_verify_client on`: legate's client certificate is accepted
/// (nginx reports its subject); without one nginx refuses the request.
#[test]
fn nginx_requires_and_accepts_the_client_certificate() {
    let pki = Pki::new("ca");
    let srv = pki.issue("server", "server", &["localhost"], false);
    let client = pki.issue("client", "billing-app", &["billing"], false);
    let (ca, cert, key) = (p(&pki.ca()), p(&srv.cert), p(&srv.key));
    let nginx = support::nginx::Nginx::start_with(|port| {
        format!(
            "listen 127.0.0.1:{port} ssl;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_client_certificate {ca};\n    ssl_verify_client on;\n    location / {{ return 200 \"client=$ssl_client_s_dn\\n\"; }}"
        )
    });
    let config = |client_auth: &str| {
        format!(
            "listeners:\n  - {{ name: web, listen: \"127.0.0.1:0\", protocol: http, cluster: secure }}\nclusters:\n  - name: secure\n    endpoints: [ \"{}\" ]\n    tls: {{ ca: \"{ca}\", sni: localhost{client_auth} }}\n",
            nginx.addr
        )
    };
    let legate = Legate::start(&config(&format!(
        ", cert: \"{}\", key: \"{}\"",
        p(&client.cert),
        p(&client.key)
    )));
    let (status, text) = support::http::curl(&[], &format!("http://{}/", legate.addr("web")));
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("CN=billing-app"), "{text}");

    let legate = Legate::start(&config(""));
    let (status, text) = support::http::curl(&[], &format!("http://{}/", legate.addr("web")));
    assert_eq!(status, 400, "{text}");
}
