//! Real tokio servers for legate to forward to. Each runs on its own runtime
//! thread, so tests can use blocking std clients, and counts what it accepts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running backend: its address and how many connections it accepted.
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl Backend {
    /// Echoes every byte back; when the client half-closes, finishes echoing
    /// and half-closes too.
    pub fn echo() -> Backend {
        Backend::serve(|mut s: TcpStream| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    }

    /// Sends `banner`, half-closes, then reads until EOF and reports how many
    /// bytes it received on `received` (an error if the stream ended in a reset).
    pub fn banner_then_read(
        banner: &'static [u8],
        received: std::sync::mpsc::Sender<std::io::Result<usize>>,
    ) -> Backend {
        Backend::serve(move |mut s: TcpStream| {
            let received = received.clone();
            async move {
                if s.write_all(banner).await.is_err() || s.shutdown().await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 64 * 1024];
                let mut total = 0;
                let ended = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break Ok(total),
                        Ok(n) => total += n,
                        // A reset, not a FIN: reported as such.
                        Err(e) => break Err(e),
                    }
                };
                let _ = received.send(ended);
            }
        })
    }

    /// Sends `name` and closes: tells a client which backend it reached.
    pub fn named(name: &'static str) -> Backend {
        Backend::serve(move |mut s: TcpStream| async move {
            let _ = s.write_all(name.as_bytes()).await;
            let _ = s.shutdown().await;
        })
    }

    /// Sends `name` and a newline, then echoes like [`Backend::echo`]: a client
    /// learns which backend it reached and can keep streaming.
    pub fn named_echo(name: &'static str) -> Backend {
        Backend::serve(move |mut s: TcpStream| async move {
            if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    }

    /// [`Backend::named_echo`] on a given address (a restart on the same port,
    /// or one of several loopback IPs).
    pub fn named_echo_at(addr: SocketAddr, name: &'static str) -> Backend {
        Backend::serve_on(addr, move |mut s: TcpStream| async move {
            if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    }

    /// A minimal HTTP/1.1 server answering every request with `status` (read
    /// at request time, so a test can flip it) and closing.
    pub fn http_status(status: Arc<std::sync::atomic::AtomicU16>) -> Backend {
        Backend::serve(move |mut s: TcpStream| {
            let status = status.clone();
            async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let code = status.load(Ordering::SeqCst);
                let resp =
                    format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        })
    }

    /// Serves each accepted connection with `handler`.
    pub fn serve<F, Fut>(handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Backend::serve_on("127.0.0.1:0".parse().unwrap(), handler)
    }

    /// Serves each connection accepted on `addr` with `handler`.
    pub fn serve_on<F, Fut>(addr: SocketAddr, handler: F) -> Backend
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("backend runtime");
        let listener = runtime
            .block_on(TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind backend {addr}: {e}"));
        let addr = listener.local_addr().expect("backend addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        runtime.spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handler(s));
            }
        });
        Backend {
            addr,
            accepted,
            _runtime: runtime,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Connects to `addr` (optionally from a given loopback source IP) and reads
/// the first line a named backend sends: (its name, the still-open stream).
pub fn reach_named(addr: SocketAddr, source: Option<[u8; 4]>) -> (String, std::net::TcpStream) {
    use std::io::BufRead;
    let s = match source {
        None => std::net::TcpStream::connect(addr).expect("connect"),
        Some(ip) => {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
            sock.connect(&addr.into()).expect("connect");
            sock.into()
        }
    };
    s.set_read_timeout(Some(super::DEADLINE)).unwrap();
    let mut name = String::new();
    std::io::BufReader::new(s.try_clone().unwrap())
        .read_line(&mut name)
        .expect("backend name");
    (name.trim().to_string(), s)
}
