//! The HTTP side of a listener: serve HTTP/1.1 and cleartext HTTP/2 (prior
//! knowledge) on one accepted connection, and hand each request to [`proxy`].
//!
//! Each request reads the current routing table, so a reload applies to the
//! next request even on a long-lived keep-alive connection. When the listener
//! stops accepting (shutdown, or removal by a reload) the connection is shut
//! down gracefully: in-flight requests finish, HTTP/1.1 answers the next
//! response with `Connection: close`, HTTP/2 sends GOAWAY.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::table::RoutingTable;

pub mod proxy;

/// What every request of one connection shares.
pub struct Conn {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    pub tables: Arc<ArcSwap<RoutingTable>>,
}

/// Serves one accepted connection until it ends, or closes it gracefully once
/// `stop` is cancelled.
pub async fn serve(stream: TcpStream, conn: Conn, stop: CancellationToken) {
    let conn = Arc::new(conn);
    let service = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(proxy::handle(req, conn).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(served);
    tokio::select! {
        _ = served.as_mut() => {}
        _ = stop.cancelled() => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
    }
}
