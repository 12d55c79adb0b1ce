//! The gRPC port: accepting connections, TLS, and HTTP/2 on hyper.
//!
//! Calls to `ShouldRateLimit` go to [`DecideService`]; every other path
//! (health, reflection, the other methods) to tonic's routes, which answer
//! an unknown path with UNIMPLEMENTED. Serving hyper directly, without
//! tonic's server stack, keeps per-call layers off the decision path.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tower_service::Service as _;
use tracing::{debug, warn};

use crate::rls::parse_grpc_timeout;
use crate::telemetry::Throttle;
use crate::unary::{DecideService, UnaryBody};

/// The maximum number of calls in flight on one connection; a stream past
/// it is refused (REFUSED_STREAM). Envoy multiplexes a cluster's calls over few
/// connections, so this is far above hyper's default of 200.
const MAX_STREAMS: u32 = 4096;

/// The maximum time a client may take to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keep-alive idle time on accepted connections, so a peer that
/// vanished without closing is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The pause after a failed accept (for example out of file descriptors),
/// so the loop does not spin while the cause lasts.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

type EdgeBody = Either<UnaryBody, tonic::body::Body>;

/// Routes one connection's calls.
#[derive(Clone)]
pub struct Edge {
    decide_path: Arc<str>,
    decide: Arc<DecideService>,
    routes: Routes,
}

impl Edge {
    /// Sends calls to `decide_path` to `decide`, and the others to `routes`.
    pub fn new(decide_path: &str, decide: DecideService, routes: Routes) -> Self {
        Self { decide_path: decide_path.into(), decide: Arc::new(decide), routes }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for Edge {
    type Response = http::Response<EdgeBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        if request.uri().path() == &*self.decide_path {
            let decide = Arc::clone(&self.decide);
            Box::pin(async move { Ok(decide.answer(request).await.map(Either::Left)) })
        } else {
            let mut routes = self.routes.clone();
            let timeout = request.headers().get("grpc-timeout").and_then(|value| value.to_str().ok()).and_then(parse_grpc_timeout);
            Box::pin(async move {
                let Some(timeout) = timeout else {
                    return Ok(routes.call(request).await?.map(Either::Right));
                };
                // The caller's deadline bounds the wait for the response
                // (not a stream's later messages, as for health's Watch).
                match tokio::time::timeout(timeout, routes.call(request)).await {
                    Ok(response) => Ok(response?.map(Either::Right)),
                    Err(_) => {
                        let status = tonic::Status::deadline_exceeded(format!("no response within the grpc-timeout of {timeout:?}"));
                        Ok(status.into_http::<UnaryBody>().map(Either::Left))
                    }
                }
            })
        }
    }
}

/// Serves `edge` on `listener` until `drain` completes, then stops
/// accepting, sends every connection GOAWAY and waits for their calls in
/// flight.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, edge: Edge, drain: impl Future<Output = ()>) {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // gRPC has no use for the Date header, which hyper adds by default.
    builder.timer(TokioTimer::new()).auto_date_header(false).max_concurrent_streams(MAX_STREAMS);
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    let accept_errors = Throttle::new();
    let mut drain = std::pin::pin!(drain);
    loop {
        tokio::select! {
            () = &mut drain => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    configure(&stream, peer);
                    let served = connection(stream, peer, tls.clone(), builder.clone(), edge.clone(), stopped.clone());
                    connections.spawn(served);
                }
                Err(error) => {
                    if let Some(suppressed) = accept_errors.allow() {
                        warn!(%error, suppressed, "Accepting a gRPC connection failed; retrying");
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
}

/// Turns Nagle's algorithm off (with it, a small answer waits for the
/// peer's delayed ACK, about 40 ms on Linux, twice Envoy's default 20 ms
/// deadline) and keep-alive on.
fn configure(stream: &TcpStream, peer: SocketAddr) {
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let result = stream.set_nodelay(true).and_then(|()| socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive));
    if let Err(error) = result {
        debug!(%error, peer.addr = %peer, "Could not set TCP options on a gRPC connection");
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    edge: Edge,
    stopped: watch::Receiver<bool>,
) {
    let Some(acceptor) = tls else {
        return http2(Unvectored(stream), peer, &builder, edge, stopped).await;
    };
    let mut stop = stopped.clone();
    // A handshake still under way at shutdown has no call to finish.
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => handshake,
        () = async { let _ = stop.wait_for(|stop| *stop).await; } => {
            debug!(peer.addr = %peer, "TLS handshake dropped at shutdown");
            return;
        }
    };
    match handshake {
        Ok(Ok(stream)) => http2(Unvectored(stream), peer, &builder, edge, stopped).await,
        Ok(Err(error)) => debug!(error = %chain(&error), peer.addr = %peer, "TLS handshake failed"),
        Err(_) => debug!(peer.addr = %peer, timeout = ?TLS_HANDSHAKE_TIMEOUT, "TLS handshake timed out"),
    }
}

async fn http2<S>(
    stream: Unvectored<S>,
    peer: SocketAddr,
    builder: &hyper::server::conn::http2::Builder<TokioExecutor>,
    edge: Edge,
    mut stopped: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut served = std::pin::pin!(builder.serve_connection(TokioIo::new(stream), edge));
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = async { let _ = stopped.wait_for(|stop| *stop).await; } => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(error) = result {
        // Clients that reset or drop a connection land here; it is theirs
        // to report.
        debug!(error = %chain(&error), peer.addr = %peer, "gRPC connection ended with an error");
    }
}

/// Returns an error with its causes, which hyper's own text leaves out.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A stream that reports to h2 that it has no vectored writes. h2 then copies a data
/// frame of up to 1 KiB into its write buffer instead of writing it on its
/// own, so the answers of many calls leave in one write: an answer is a few
/// hundred bytes, and with vectored writes each one over 256 bytes costs a
/// system call.
struct Unvectored<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for Unvectored<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Unvectored<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}
