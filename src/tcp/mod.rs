//! Layer-4 forwarding: bytes both ways between the app and the upstream until
//! both sides are done, with half-close kept. Plain TCP on Linux goes through
//! [`splice`] (zero-copy); TLS upstreams, and kernels without splice, copy
//! through a user-space buffer.
//!
//! When one side sends FIN, the other side's write half is shut down and the
//! reverse direction keeps flowing, so clients that `shutdown(SHUT_WR)` and then
//! read their answer work. An error on either direction ends both. Bytes are
//! counted as they pass, so long-lived connections show up in the metrics.

use std::io;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::UpstreamStream;

#[cfg(target_os = "linux")]
mod splice;

/// Whether splice works here: probed once, on the first connection's socket
/// (a zero-length splice moves nothing). `LEGATE_NO_SPLICE=1` turns it off,
/// to compare the two paths.
#[cfg(target_os = "linux")]
static SPLICE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

#[cfg(target_os = "linux")]
fn splice_works(socket: &TcpStream) -> bool {
    *SPLICE.get_or_init(|| {
        if std::env::var_os("LEGATE_NO_SPLICE").is_some_and(|v| v == "1") {
            return false;
        }
        let works = splice::supported(socket);
        if works {
            tracing::info!("TCP forwarding uses splice(2): zero-copy");
        } else {
            tracing::warn!("splice(2) unavailable: TCP forwarding copies through user space");
        }
        works
    })
}

/// Per-direction buffer. Larger buffers buy little on loopback past this point
/// and every open connection pays for two.
const BUF_SIZE: usize = 32 * 1024;

/// Bytes moved by one connection.
#[derive(Debug, Default, Clone, Copy)]
pub struct Transferred {
    /// App → backend.
    pub upstream: u64,
    /// Backend → app.
    pub downstream: u64,
}

/// Forwards between `client` and `upstream` until both directions reach EOF.
pub async fn forward(
    client: &mut TcpStream,
    upstream: &mut UpstreamStream,
    up_bytes: &IntCounter,
    down_bytes: &IntCounter,
) -> io::Result<Transferred> {
    #[cfg(target_os = "linux")]
    if let UpstreamStream::Plain(upstream) = upstream
        && splice_works(client)
    {
        let (client, upstream) = (&*client, &*upstream);
        let (up, down) = tokio::try_join!(
            splice::pipe(client, upstream, up_bytes),
            splice::pipe(upstream, client, down_bytes),
        )?;
        return Ok(Transferred {
            upstream: up,
            downstream: down,
        });
    }
    let (mut client_r, mut client_w) = client.split();
    let (upstream, downstream) = match upstream {
        UpstreamStream::Plain(upstream) => {
            let (mut upstream_r, mut upstream_w) = upstream.split();
            tokio::try_join!(
                pipe(&mut client_r, &mut upstream_w, up_bytes),
                pipe(&mut upstream_r, &mut client_w, down_bytes),
            )?
        }
        UpstreamStream::Tls(tls) => {
            // A TLS stream is one state machine for both directions: split it
            // with tokio's lock-based halves.
            let (mut upstream_r, mut upstream_w) = tokio::io::split(tls.as_mut());
            tokio::try_join!(
                pipe(&mut client_r, &mut upstream_w, up_bytes),
                pipe(&mut upstream_r, &mut client_w, down_bytes),
            )?
        }
    };
    Ok(Transferred {
        upstream,
        downstream,
    })
}

/// Copies `from` to `to` until EOF, then shuts down `to`'s write side (sends FIN).
async fn pipe<R, W>(from: &mut R, to: &mut W, counter: &IntCounter) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            match to.shutdown().await {
                // The peer is already fully gone: nothing left to tell it.
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                other => other?,
            }
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
        counter.inc_by(n as u64);
    }
}
