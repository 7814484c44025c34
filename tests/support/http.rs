//! A real HTTP backend for the tests: hyper serving HTTP/1.1 and h2c on one
//! port, answering with what it received, so a test can see exactly what
//! legate sent. Behaviour by path:
//! - `/status/N`: answer status N;
//! - `/sleep/MS`: answer after MS milliseconds;
//! - `/upload`: read the body to the end and answer its length (streamed);
//! - `/ws`: answer 101 and echo raw bytes over the upgraded connection;
//! - anything else: 200 with a JSON description of the request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

pub struct HttpBackend {
    pub addr: SocketAddr,
    pub name: &'static str,
    /// Requests received, as JSON descriptions, in order.
    pub seen: Arc<Mutex<Vec<serde_json::Value>>>,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl HttpBackend {
    pub fn start(name: &'static str) -> HttpBackend {
        HttpBackend::start_at("127.0.0.1:0".parse().unwrap(), name)
    }

    pub fn start_at(addr: SocketAddr, name: &'static str) -> HttpBackend {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(TcpListener::bind(addr))
            .expect("bind HTTP backend");
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen2, requests2, connections2) =
            (seen.clone(), requests.clone(), connections.clone());
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                connections2.fetch_add(1, Ordering::SeqCst);
                let (seen, requests) = (seen2.clone(), requests2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (seen, requests) = (seen.clone(), requests.clone());
                        async move {
                            requests.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(answer(name, req, &seen).await)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpBackend {
            addr,
            name,
            seen,
            requests,
            connections,
            _runtime: runtime,
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn last(&self) -> serde_json::Value {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

async fn answer(
    name: &str,
    mut req: Request<Incoming>,
    seen: &Mutex<Vec<serde_json::Value>>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
        .collect();
    let description = serde_json::json!({
        "backend": name,
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "path": req.uri().path(),
        "version": format!("{:?}", req.version()),
        "headers": headers,
        "body_len": 0,
    });
    let describe = |body_len: usize| {
        let mut d = description.clone();
        d["body_len"] = body_len.into();
        d
    };
    if path == "/ws" {
        let on_upgrade = hyper::upgrade::on(&mut req);
        seen.lock().unwrap().push(describe(0));
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(full(""))
            .unwrap();
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => total += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => {
                    return Response::builder()
                        .status(500)
                        .body(full("body error"))
                        .unwrap();
                }
            }
        }
        seen.lock().unwrap().push(describe(total));
        return Response::new(full(total.to_string()));
    }
    if name == "broken" {
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        seen.lock().unwrap().push(describe(bytes.len()));
        return Response::builder()
            .status(503)
            .body(full("broken backend"))
            .unwrap();
    }
    let status = path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    if let Some(ms) = path.strip_prefix("/sleep/").and_then(|s| s.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let d = {
        let mut d = describe(bytes.len());
        d["body"] = String::from_utf8_lossy(&bytes).into();
        d
    };
    seen.lock().unwrap().push(d.clone());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-backend", name)
        .header("connection", "keep-alive")
        .header("x-remove-me", "secret")
        .body(full(d.to_string()))
        .unwrap()
}

/// A blocking HTTP/1.1 client on one keep-alive connection, for many
/// requests or exact control of what is sent.
pub struct Client {
    stream: std::io::BufReader<std::net::TcpStream>,
}

/// A response as the client read it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(super::DEADLINE)).unwrap();
        Client {
            stream: std::io::BufReader::new(s),
        }
    }

    /// Sends `method path` with `headers` and `body`; reads the response.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Reply> {
        use std::io::Write;
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            head.push_str("Host: test.local\r\n");
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        self.read_reply(method == "HEAD")
    }

    pub fn get(&mut self, path: &str) -> Reply {
        self.send("GET", path, &[], b"").expect("GET")
    }

    pub fn read_reply(&mut self, head_only: bool) -> std::io::Result<Reply> {
        use std::io::{BufRead, Read};
        let mut line = String::new();
        if self.stream.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut reply = Reply {
            status,
            headers,
            body: String::new(),
        };
        if head_only || status == 101 || status == 204 || status == 304 {
            return Ok(reply);
        }
        if let Some(len) = reply
            .header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
        {
            let mut body = vec![0u8; len];
            self.stream.read_exact(&mut body)?;
            reply.body = String::from_utf8_lossy(&body).into_owned();
        } else if reply
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let mut size = String::new();
                self.stream.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).map_err(std::io::Error::other)?;
                let mut chunk = vec![0u8; n + 2];
                self.stream.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            reply.body = String::from_utf8_lossy(&body).into_owned();
        } else {
            let mut body = String::new();
            self.stream.read_to_string(&mut body)?;
            reply.body = body;
        }
        Ok(reply)
    }

    /// The raw stream (for upgrades and malformed input).
    pub fn raw(&mut self) -> &mut std::io::BufReader<std::net::TcpStream> {
        &mut self.stream
    }
}

/// Runs curl with `args` against `url`: what it printed (headers and body)
/// and on stderr, whether or not it got an answer.
pub fn curl_output(args: &[&str], url: &str) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl (apt-get install curl)");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs curl with `args` against `url`: (status, headers+body as text).
pub fn curl(args: &[&str], url: &str) -> (u16, String) {
    let (text, stderr) = curl_output(args, url);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("curl: {text} {stderr}"));
    (status, text)
}
