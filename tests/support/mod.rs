//! Test harness: the real `legate` binary on ephemeral loopback ports.
//!
//! `Legate::start(yaml)` writes a config directory, spawns the binary with
//! `--admin 127.0.0.1:0`, reads its JSON log until the admin address appears,
//! waits for `/readyz` 200 and reads every listener's bound address from
//! `/config`. On drop the child is killed, and its log printed if the test failed.
#![allow(dead_code)]

pub mod backends;
pub mod configmap;
pub mod dns;
pub mod http;
pub mod nginx;
pub mod pg;
pub mod pki;
pub mod tls_server;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Legate {
    child: Child,
    /// The config directory, when the harness made it (not a ConfigMap the test owns).
    pub dir: Option<tempfile::TempDir>,
    pub admin: SocketAddr,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    listeners: HashMap<String, SocketAddr>,
}

impl Legate {
    /// Starts legate on `yaml` (written as `legate.yaml`) with the default test
    /// flags and waits until it is ready.
    pub fn start(yaml: &str) -> Legate {
        Legate::start_with(yaml, &[])
    }

    /// Like [`start`], with extra command-line arguments.
    pub fn start_with(yaml: &str, args: &[&str]) -> Legate {
        let mut legate = Legate::spawn(yaml, args);
        legate.wait_ready();
        legate
    }

    /// Like [`start`], with extra environment variables.
    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Legate {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("legate.yaml"), yaml).expect("write config");
        let path = dir.path().to_path_buf();
        let mut legate = Legate::spawn_full(&path, Some(dir), &[], env);
        legate.wait_ready();
        legate
    }

    /// Spawns legate and waits only for its admin server, not for readiness.
    pub fn spawn(yaml: &str, args: &[&str]) -> Legate {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("legate.yaml"), yaml).expect("write config");
        Legate::spawn_in(dir, args)
    }

    /// Starts legate on a ConfigMap volume and waits until it is ready.
    pub fn start_on(configmap: &configmap::ConfigMap, args: &[&str]) -> Legate {
        let mut legate = Legate::spawn_at(configmap.path(), None, args);
        legate.wait_ready();
        legate
    }

    /// Spawns legate on an existing config directory.
    pub fn spawn_in(dir: tempfile::TempDir, args: &[&str]) -> Legate {
        let path = dir.path().to_path_buf();
        Legate::spawn_at(&path, Some(dir), args)
    }

    fn spawn_at(config: &Path, dir: Option<tempfile::TempDir>, args: &[&str]) -> Legate {
        Legate::spawn_full(config, dir, args, &[])
    }

    /// Starts legate on `yaml` with its file descriptor limit (soft and hard)
    /// set to `nofile`, as `ulimit -n` would, and waits until it is ready.
    pub fn start_with_nofile(yaml: &str, nofile: u64) -> Legate {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("legate.yaml"), yaml).expect("write config");
        let path = dir.path().to_path_buf();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_legate"));
        let mut legate = Legate::spawn_cmd(cmd, &path, Some(dir), &[]);
        legate.wait_ready();
        legate
    }

    fn spawn_full(
        config: &Path,
        dir: Option<tempfile::TempDir>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Legate {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_legate"));
        cmd.envs(env.iter().copied());
        Legate::spawn_cmd(cmd, config, dir, args)
    }

    fn spawn_cmd(
        mut cmd: Command,
        config: &Path,
        dir: Option<tempfile::TempDir>,
        args: &[&str],
    ) -> Legate {
        // Tests want a prompt exit unless they are about the shutdown delay.
        if !args.contains(&"--shutdown-delay") {
            cmd.args(["--shutdown-delay", "0s"]);
        }
        if !args.contains(&"--log") {
            cmd.args(["--log", "debug"]);
        }
        cmd.arg("--config")
            .arg(config)
            .args(["--admin", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn legate");
        let log: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let (lines, cv) = &*log;
                    lines.lock().unwrap().push(line);
                    cv.notify_all();
                }
            });
        }
        let mut legate = Legate {
            child,
            dir,
            admin: "0.0.0.0:0".parse().unwrap(),
            log,
            listeners: HashMap::new(),
        };
        let line = legate.wait_log(|l| {
            l.contains(r#""message":"listening""#) && l.contains(r#""listener":"admin""#)
        });
        let event: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        legate.admin = event["address"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("admin address in the listening event");
        legate
    }

    /// Waits for `/readyz` 200, then learns every listener's bound address.
    pub fn wait_ready(&mut self) {
        wait_until("legate ready", || self.get("/readyz").0 == 200);
        self.refresh_listeners();
    }

    /// Reads the bound listener addresses from `/config`.
    pub fn refresh_listeners(&mut self) {
        let (status, body) = self.get("/config");
        assert_eq!(status, 200, "/config: {body}");
        let config: serde_json::Value = serde_json::from_str(&body).expect("/config is JSON");
        self.listeners = config["listeners"]
            .as_array()
            .expect("listeners array")
            .iter()
            .filter_map(|l| {
                Some((
                    l["name"].as_str()?.to_string(),
                    l["bound"].as_str()?.parse().ok()?,
                ))
            })
            .collect();
    }

    /// The address listener `name` bound.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no bound listener {name}: {:?}", self.listeners))
    }

    /// Waits until `legate_config_generation` reaches `generation`.
    pub fn wait_generation(&self, generation: u64) {
        wait_until(&format!("config generation {generation}"), || {
            self.metric("legate_config_generation") >= generation as f64
        });
        assert_eq!(self.metric("legate_config_generation"), generation as f64);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// GET `path` on the admin server: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http_request(self.admin, "GET", path)
    }

    /// POST `path` on the admin server: (status, body).
    pub fn post(&self, path: &str) -> (u16, String) {
        http_request(self.admin, "POST", path)
    }

    /// The value of the sample `name{labels}` exactly as exposed, or 0 when absent.
    /// `series` is e.g. `legate_listener_connections_total{listener="db"}`.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        metric_value(&body, series).unwrap_or(0.0)
    }

    /// Sends a signal by name (`TERM`, `INT`, `HUP`).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit, failing the test after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "legate did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for a log line matching `pred` and returns it.
    pub fn wait_log(&self, pred: impl Fn(&str) -> bool) -> String {
        let (lines, cv) = &*self.log;
        let deadline = Instant::now() + DEADLINE;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                let log = guard.join("\n");
                drop(guard);
                panic!("no matching log line within {DEADLINE:?}; log:\n{log}");
            }
            guard = cv.wait_timeout(guard, deadline - now).unwrap().0;
        }
    }

    /// Whether any log line so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.logs().iter().any(|l| l.contains(text))
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Legate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- legate log ---\n{}", self.logs().join("\n"));
        }
    }
}

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `legate check --config dir`: (exit success, stdout, stderr).
pub fn check(dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_legate"))
        .arg("check")
        .arg("--config")
        .arg(dir)
        .output()
        .expect("run legate check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config with one TCP listener `app` on `listen` sending to cluster
/// `backend` over `endpoints` (connect timeout 1 s).
pub fn tcp_config(listen: &str, endpoints: &[String]) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "listeners:\n  - {{ name: app, listen: \"{listen}\", cluster: backend }}\nclusters:\n  - {{ name: backend, endpoints: [ {} ], connect_timeout: 1s }}\n",
        endpoints.join(", ")
    )
}

/// A config directory with the given files (name, contents).
pub fn config_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write config file");
    }
    dir
}

/// A minimal HTTP/1.1 request with `Connection: close`: (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read admin response");
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of `series` in a Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// The Python of the venv `.ci/run` makes (grpcio, the Kafka broker and
/// clients); `LEGATE_GRPC_PYTHON` names another interpreter.
pub fn python() -> String {
    std::env::var("LEGATE_GRPC_PYTHON").unwrap_or_else(|_| "/tmp/legate-ci-venv/bin/python".into())
}

/// A loopback port that refuses connections (bound, then released).
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

pub fn path_buf(p: &Path) -> PathBuf {
    p.to_path_buf()
}
