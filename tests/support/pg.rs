//! Real PostgreSQL servers for the tests (initdb + pg_ctl as user postgres,
//! on loopback, stopped on drop), optionally TLS-only with certificate
//! authentication, and a minimal simple-query client that speaks the wire
//! protocol directly (so a test sees exactly what arrives, and when).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::pki::Issued;

pub struct Postgres {
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// How a test server takes connections.
pub enum Access {
    /// Plaintext, trust.
    Plain,
    /// TLS only (`hostssl`), and the client must present a certificate whose
    /// CN is the user (`cert` authentication), signed by `client_ca`.
    TlsCert { server: Issued, client_ca: PathBuf },
}

fn bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed (apt-get install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql/*/bin")
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

fn chown_postgres(path: &Path) {
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown {}", path.display());
}

impl Postgres {
    pub fn start(access: Access) -> Postgres {
        let bin = bin();
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        chown_postgres(dir.path());
        let data = dir.path().join("data");
        let out = as_postgres(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut options = format!(
            "-c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100 -k {}",
            dir.path().display()
        );
        if let Access::TlsCert { server, client_ca } = &access {
            for (from, to) in [
                (&server.cert, "server.crt"),
                (&server.key, "server.key"),
                (client_ca, "client-ca.crt"),
            ] {
                std::fs::copy(from, data.join(to)).unwrap();
                std::fs::set_permissions(
                    data.join(to),
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
            }
            chown_postgres(&data);
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
            )
            .unwrap();
            options += " -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key -c ssl_ca_file=client-ca.crt";
        }
        let port = super::refused_addr().port();
        options += &format!(" -p {port}");
        let out = as_postgres(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("log"))
            .args(["-w", "-t", "30", "start", "-o", &options])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {} {}",
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
        );
        Postgres {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            bin,
        }
    }

    /// Runs SQL over the Unix socket (no TLS, no legate); returns stdout.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-U", "postgres", "-h"])
            .arg(self.dir.path())
            .args([
                "-p",
                &self.addr.port().to_string(),
                "-qAtX",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A PostgreSQL connection speaking the simple query protocol, as user and
/// database `postgres` with trust authentication.
pub struct PgConn {
    s: TcpStream,
    /// BackendKeyData: process id and secret.
    pub key: Vec<u8>,
}

/// What a query came back with.
#[derive(Debug)]
pub enum Reply {
    /// The first column of each row.
    Rows(Vec<String>),
    /// An ErrorResponse: SQLSTATE and message.
    Error(String, String),
}

impl PgConn {
    pub fn connect(addr: SocketAddr) -> io::Result<PgConn> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = PgConn { s, key: Vec::new() };
        let params = b"user\0postgres\0database\0postgres\0\0";
        let mut packet = ((8 + params.len()) as u32).to_be_bytes().to_vec();
        packet.extend_from_slice(&196_608u32.to_be_bytes());
        packet.extend_from_slice(params);
        c.s.write_all(&packet)?;
        loop {
            let (kind, body) = c.read()?;
            match kind {
                b'R' if body[..4] != [0, 0, 0, 0] => {
                    return Err(io::Error::other(
                        "authentication other than trust requested",
                    ));
                }
                b'K' => c.key = body,
                b'E' => return Err(io::Error::other(error_text(&body).1)),
                b'Z' => return Ok(c),
                _ => {}
            }
        }
    }

    /// Sends one simple Query and reads until ReadyForQuery.
    pub fn query(&mut self, sql: &str) -> io::Result<Reply> {
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        self.s.write_all(&m)?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (kind, body) = self.read()?;
            match kind {
                b'D' => rows.push(first_column(&body)),
                b'E' => error = Some(error_text(&body)),
                b'Z' => {
                    return Ok(match error {
                        Some((code, message)) => Reply::Error(code, message),
                        None => Reply::Rows(rows),
                    });
                }
                _ => {}
            }
        }
    }

    /// Whether the other end closed (EOF) within `wait`, reading nothing else.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let _ = self.s.set_read_timeout(Some(wait));
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0))
    }

    fn read(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.s.read_exact(&mut body)?;
        Ok((head[0], body))
    }
}

/// Sends a CancelRequest for the session with `key` to `addr`.
pub fn cancel(addr: SocketAddr, key: &[u8]) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut packet = ((8 + key.len()) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&80_877_102u32.to_be_bytes());
    packet.extend_from_slice(key);
    s.write_all(&packet).unwrap();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.read(&mut [0u8; 1]);
}

fn first_column(body: &[u8]) -> String {
    if body.len() < 6 {
        return String::new();
    }
    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
    if len < 0 {
        return "NULL".to_string();
    }
    String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
}

fn error_text(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        match field.first() {
            Some(b'C') => code = String::from_utf8_lossy(&field[1..]).into_owned(),
            Some(b'M') => message = String::from_utf8_lossy(&field[1..]).into_owned(),
            _ => {}
        }
    }
    (code, message)
}
