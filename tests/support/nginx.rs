//! A real nginx on a loopback port (Debian `nginx`), serving a fixed answer.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::wait_until;

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start() -> Nginx {
        Nginx::start_with(|port| {
            format!(
                "listen 127.0.0.1:{port};\n    keepalive_requests 100000;\n    location / {{ return 200 \"hello from nginx\\n\"; }}"
            )
        })
    }

    /// nginx with the `server { }` body `server(port)` returns.
    pub fn start_with(server: impl Fn(u16) -> String) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = dir.path().display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {p}/error.log;\npid {p}/nginx.pid;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {p}; proxy_temp_path {p}; fastcgi_temp_path {p}; uwsgi_temp_path {p}; scgi_temp_path {p};\n  server {{\n    {}\n  }}\n}}\n",
            server(port)
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(if std::path::Path::new("/usr/sbin/nginx").exists() {
            "/usr/sbin/nginx"
        } else {
            "nginx"
        })
        .args(["-p"])
        .arg(dir.path())
        .args(["-c"])
        .arg(dir.path().join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx (apt-get install nginx)");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_until("nginx listening", || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        Nginx {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
