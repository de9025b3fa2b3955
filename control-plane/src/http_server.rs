//! The HTTP/1.1 accept loop, with the limits `axum::serve` does not offer: a cap on open
//! connections and a header-read timeout (which hyper also applies to an idle keep-alive
//! connection waiting for its next request). Slowloris needs no login, so both hold before
//! any authentication.
//!
//! A connection's permit lives inside its IO, so a connection upgraded to a WebSocket keeps
//! counting against the cap until it closes. Once upgraded, hyper no longer reads the
//! connection, so the header-read timeout never applies to agent sessions (their own
//! heartbeat timeout does); a streaming response (SSE) is not reading headers either.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Default for `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default for `--header-read-timeout-secs`.
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Time a client has to send a request's complete header, counted from the first
    /// read of a new connection or from the end of the previous response.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_SECS),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve<L>(
    mut listener: L,
    router: axum::Router,
    limits: Limits,
    shutdown: CancellationToken,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    let mut at_cap_logged = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !at_cap_logged {
                    tracing::warn!(
                        max = limits.max_connections,
                        "connection cap reached; new connections wait"
                    );
                    at_cap_logged = true;
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        if permits.available_permits() > 0 {
            at_cap_logged = false;
        }
        let (io, peer) = tokio::select! {
            x = listener.accept() => x,
            _ = shutdown.cancelled() => break,
        };
        let service = router.clone().map_request(
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                // What `into_make_service_with_connect_info` would attach (audit, limiter).
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        );
        let io = TokioIo::new(Counted {
            io,
            _permit: permit,
        });
        let stop = shutdown.clone();
        conns.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            let conn = builder
                .serve_connection(io, TowerToHyperService::new(service))
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    return;
                }
                _ = stop.cancelled() => {}
            }
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// A connection's IO holding its slot under the cap.
struct Counted<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
