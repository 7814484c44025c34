//! A real DNS server for the tests: dnsmasq (Debian `dnsmasq-base`) on a
//! loopback port, answering from a hosts file with a 1 s TTL. Editing the
//! records rewrites the file and sends SIGHUP, which makes dnsmasq re-read it.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    hosts: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Dnsmasq {
    /// Starts dnsmasq serving `records` (name, IP) and waits until it answers.
    /// The port is picked free for UDP and TCP both; if another test takes it
    /// first, dnsmasq exits and is started again on a new port.
    pub fn start(records: &[(&str, &str)]) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        write_hosts(&hosts, records);
        for _ in 0..5 {
            let port = free_udp_and_tcp_port();
            let child = Command::new(dnsmasq_path())
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--local-ttl=1",
                    "--user=root",
                    "--log-facility=-",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--addn-hosts={}", hosts.display()))
                .arg(format!("--pid-file={}", dir.path().join("pid").display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start dnsmasq (apt-get install dnsmasq-base)");
            let mut dns = Dnsmasq {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                hosts: hosts.clone(),
                _dir: None,
            };
            let mut exited = false;
            wait_until("dnsmasq answers or exits", || {
                exited = dns.child.try_wait().ok().flatten().is_some();
                exited || dns.answers()
            });
            if !exited {
                dns._dir = Some(dir);
                return dns;
            }
        }
        panic!("dnsmasq did not start on any of 5 ports");
    }

    /// Replaces the records and makes dnsmasq re-read them.
    pub fn set(&self, records: &[(&str, &str)]) {
        write_hosts(&self.hosts, records);
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "SIGHUP dnsmasq");
    }

    /// Stops the server: resolutions fail from now on.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether a query for a name gets any answer (even NXDOMAIN).
    fn answers(&self) -> bool {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Header: id 0x1234, RD, one question; "probe." type A class IN.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x05probe\x00\x00\x01\x00\x01");
        if s.send_to(&q, self.addr).is_err() {
            return false;
        }
        let mut buf = [0u8; 512];
        matches!(s.recv_from(&mut buf), Ok((n, _)) if n >= 12 && buf[0] == 0x12 && buf[1] == 0x34)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

fn write_hosts(path: &std::path::Path, records: &[(&str, &str)]) {
    let text: String = records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect();
    // Write then rename, so dnsmasq never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A port free right now for both UDP and TCP on 127.0.0.1.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn dnsmasq_path() -> &'static str {
    if std::path::Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    }
}
