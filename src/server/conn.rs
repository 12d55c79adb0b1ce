//! The gRPC port: accepting connections, TLS, and HTTP/2 on h2.
//!
//! Calls to `ShouldRateLimit` go to [`DecideService`] and run inside the
//! connection's own task. They get no task of their own, because the
//! decision takes a few microseconds and spawning and scheduling a task
//! costs a measurable share of it. Every other path
//! (health, reflection, the other methods) goes to tonic's routes in a task
//! of its own. The routes reply to an unknown path with UNIMPLEMENTED.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame};
use http_body_util::Either;
use prost::bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tonic::service::Routes;
use tower_service::Service as _;
use tracing::{debug, error, warn};

use crate::rls::parse_grpc_timeout;
use crate::telemetry::Throttle;
use crate::unary::{DecideService, GRPC_TIMEOUT, UnaryBody};

/// The maximum number of calls in flight on one connection; a stream past
/// it is refused (REFUSED_STREAM). Envoy multiplexes a cluster's calls over few
/// connections, so this is far above the usual default of 100 to 200.
const MAX_STREAMS: u32 = 4096;

/// The flow-control window of each stream and of the connection: what a
/// client may send before the server has read it.
const WINDOW_BYTES: u32 = 1 << 20;

/// The largest header block a client may send.
const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;

/// The maximum response bytes queued on one stream before its sender waits.
const MAX_SEND_BUFFER_BYTES: usize = 400 << 10;

/// The number of streams the server may reset for a client's protocol
/// errors before it closes the connection.
const MAX_ERROR_RESETS: usize = 1024;

/// The maximum wait for the response to a call to any path but
/// `ShouldRateLimit`, and the limit on a longer `grpc-timeout`. Those calls
/// get their response as soon as their request message has arrived, so this
/// bounds how long a client that never sends it keeps the stream open.
const ROUTE_RESPONSE_LIMIT: Duration = Duration::from_secs(10);

/// The maximum time a client may take to finish its TLS handshake, and
/// to send the HTTP/2 preface after it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Builds the response to a call to any path but `ShouldRateLimit`.
    async fn route(&self, request: http::Request<RecvBody>) -> http::Response<EdgeBody> {
        let mut routes = self.routes.clone();
        let timeout = request.headers().get(GRPC_TIMEOUT).and_then(|value| value.to_str().ok()).and_then(parse_grpc_timeout);
        // The caller's deadline bounds the wait for the response (not a
        // stream's later messages, as for health's Watch).
        let limit = timeout.map_or(ROUTE_RESPONSE_LIMIT, |timeout| timeout.min(ROUTE_RESPONSE_LIMIT));
        match tokio::time::timeout(limit, routes.call(request)).await {
            Ok(Ok(response)) => response.map(Either::Right),
            Err(_) => {
                let status = tonic::Status::deadline_exceeded(format!(
                    "no response within {limit:?}; send the whole request message within the grpc-timeout and at most {ROUTE_RESPONSE_LIMIT:?}"
                ));
                status.into_http::<UnaryBody>().map(Either::Left)
            }
        }
    }
}

/// Serves `edge` on `listener` until `drain` completes, then stops
/// accepting, sends every connection GOAWAY and waits for their calls in
/// flight.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, edge: Edge, drain: impl Future<Output = ()>) {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .max_header_list_size(MAX_HEADER_LIST_BYTES)
        .max_send_buffer_size(MAX_SEND_BUFFER_BYTES)
        .max_local_error_reset_streams(Some(MAX_ERROR_RESETS))
        .max_concurrent_streams(MAX_STREAMS);
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
    builder: h2::server::Builder,
    edge: Edge,
    stopped: watch::Receiver<bool>,
) {
    let Some(acceptor) = tls else {
        return http2(Unvectored(stream), peer, &builder, edge, stopped).await;
    };
    let mut stop = stopped.clone();
    // A handshake still under way at shutdown has no call to finish.
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => handshake,
        () = stopping(&mut stop) => {
            debug!(peer.addr = %peer, "TLS handshake dropped at shutdown");
            return;
        }
    };
    match handshake {
        Ok(Ok(stream)) => http2(Unvectored(stream), peer, &builder, edge, stopped).await,
        Ok(Err(error)) => debug!(error = %chain(&error), peer.addr = %peer, "TLS handshake failed"),
        Err(_) => debug!(peer.addr = %peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out"),
    }
}

/// Waits until the server stops.
async fn stopping(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Serves one connection's streams until the client closes it or, after
/// the server stops, until its calls in flight are done.
async fn http2<S>(stream: Unvectored<S>, peer: SocketAddr, builder: &h2::server::Builder, edge: Edge, mut stopped: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // A connection that has not sent the HTTP/2 preface has no call to
    // finish, so it does not delay shutdown and is closed after a timeout.
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, builder.handshake::<_, Bytes>(stream)) => handshake,
        () = stopping(&mut stopped) => {
            debug!(peer.addr = %peer, "HTTP/2 handshake dropped at shutdown");
            return;
        }
    };
    let mut connection = match handshake {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return debug!(error = %chain(&error), peer.addr = %peer, "HTTP/2 handshake failed"),
        Err(_) => return debug!(peer.addr = %peer, timeout = ?HANDSHAKE_TIMEOUT, "HTTP/2 handshake timed out"),
    };
    // The connection's ShouldRateLimit calls, polled by this task.
    let mut calls = FuturesUnordered::new();
    let mut stop = std::pin::pin!(stopping(&mut stopped));
    let mut draining = false;
    let served = std::future::poll_fn(|cx| {
        if !draining && stop.as_mut().poll(cx).is_ready() {
            draining = true;
            connection.graceful_shutdown();
        }
        loop {
            // Take every call that has arrived, then run them all, so that
            // their responses go out together in the connection's next write.
            loop {
                match connection.poll_accept(cx) {
                    Poll::Ready(Some(Ok((request, respond)))) => {
                        if request.uri().path() == &*edge.decide_path {
                            // A call that panics resets its own stream only.
                            // The call's future takes about 2 KB, so it is
                            // boxed once instead of moved into each wrapper.
                            let call = Box::pin(decide(Arc::clone(&edge.decide), request, respond));
                            calls.push(AssertUnwindSafe(call).catch_unwind());
                        } else {
                            tokio::spawn(route(edge.clone(), request, respond));
                        }
                    }
                    Poll::Ready(Some(Err(error))) => return Poll::Ready(Err(error)),
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => break,
                }
            }
            let mut answered = false;
            while let Poll::Ready(Some(result)) = calls.poll_next_unpin(cx) {
                if result.is_err() {
                    error!(peer.addr = %peer, "A ShouldRateLimit call panicked; its stream was reset");
                }
                answered = true;
            }
            if !answered {
                return Poll::Pending;
            }
        }
    });
    if let Err(error) = served.await {
        // Clients that reset or drop a connection land here; it is theirs
        // to report.
        debug!(error = %chain(&error), peer.addr = %peer, "gRPC connection ended with an error");
    }
    // Calls whose client has gone still finish their store work, so no
    // count is left half applied.
    while calls.next().await.is_some() {}
}

/// Reads and decides one `ShouldRateLimit` call, then sends its response.
async fn decide(service: Arc<DecideService>, request: http::Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let (parts, body) = request.into_parts();
    let response = service.answer(http::Request::from_parts(parts, RecvBody::new(body))).await;
    let (parts, body) = response.into_parts();
    let (message, trailers) = body.into_parts();
    let end = message.is_none() && trailers.is_none();
    // A client that reset its stream or closed the connection makes these
    // sends fail; the call is over either way.
    let Ok(mut send) = respond.send_response(http::Response::from_parts(parts, ()), end) else { return };
    if let Some(message) = message {
        if send.send_data(message, trailers.is_none()).is_err() {
            return;
        }
    }
    if let Some(trailers) = trailers {
        let _ = send.send_trailers(trailers);
    }
}

/// Sends a call to any other path to tonic's routes, and sends the
/// response body as it comes. A client that resets its stream ends the call.
async fn route(edge: Edge, request: http::Request<RecvStream>, mut respond: SendResponse<Bytes>) {
    let (parts, body) = request.into_parts();
    let call = edge.route(http::Request::from_parts(parts, RecvBody::new(body)));
    let mut call = std::pin::pin!(call);
    let response = std::future::poll_fn(|cx| {
        if let Poll::Ready(response) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(response));
        }
        respond.poll_reset(cx).map(|_| None)
    })
    .await;
    let Some(response) = response else { return };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    let Ok(mut send) = respond.send_response(http::Response::from_parts(parts, ()), end) else { return };
    if !end {
        send_body(body, &mut send).await;
    }
}

/// Sends a response body's data and trailers, waiting for the client's
/// flow-control window before each data frame.
async fn send_body<B>(body: B, send: &mut SendStream<Bytes>)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    loop {
        let frame = std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                return Poll::Ready(Some(frame));
            }
            send.poll_reset(cx).map(|_| None)
        })
        .await;
        let frame = match frame {
            None => return,
            Some(None) => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(error))) => {
                debug!(%error, "A gRPC response body failed; resetting its stream");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => {
                send.reserve_capacity(data.len());
                loop {
                    match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(_)) | None => return,
                    }
                }
                if send.send_data(data, false).is_err() {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = send.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// A request stream as a body: its data frames, then its trailers. Each
/// data frame read gives its bytes back to the flow-control window.
struct RecvBody {
    stream: RecvStream,
    data_done: bool,
}

impl RecvBody {
    fn new(stream: RecvStream) -> Self {
        Self { stream, data_done: false }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// Returns an error with its causes, which the error's own text may leave out.
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
