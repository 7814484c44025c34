//! Layer-4 forwarding: bytes both ways between the app and the upstream until
//! both sides are done, with half-close kept.
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
