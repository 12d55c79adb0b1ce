//! `ShouldRateLimit` read from and written to HTTP/2 directly.
//!
//! tonic serves any gRPC method through streaming decoders and encoders,
//! boxed bodies and per-call buffers. The decision path is one unary method
//! called on every request of every customer, so it is served here on its
//! own: the request body is read into its single length-prefixed message,
//! [`RateLimitHandler::decide`] decides it, and the response goes out as one
//! data frame and the `grpc-status` trailer. The statuses are tonic's: an
//! error is a trailers-only response built by [`Status::into_http`].
//!
//! The wire format (gRPC over HTTP/2): each message is a 1-byte compressed
//! flag, a 4-byte big-endian length and the protobuf bytes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame};
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::Status;

use crate::answer;
use crate::codec;
use crate::rls::{self, RateLimitHandler, Reply, wire};

/// The bytes before each message: the compressed flag and the length.
const PREFIX_BYTES: usize = 5;

const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
/// The caller's deadline. A name given as text is parsed on every lookup.
pub(crate) const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The maximum wait for a request's message, and the limit on a longer
/// `grpc-timeout`.
const BODY_READ_LIMIT: Duration = Duration::from_secs(10);

const COMPRESSED: &str = "this server takes uncompressed messages only; turn compression off in the client";

/// The handler of `ShouldRateLimit` calls, for the server's route of that
/// method's path.
pub struct DecideService {
    handler: RateLimitHandler,
    max_message_bytes: usize,
    buffered: Buffered,
}

impl DecideService {
    /// Serves `handler`, rejecting request messages over `max_message_bytes`
    /// with OUT_OF_RANGE before they are read in full.
    pub fn new(handler: RateLimitHandler, max_message_bytes: usize) -> Self {
        let budget = BUFFERED_MIN_BYTES.max(max_message_bytes.saturating_mul(4));
        Self { handler, max_message_bytes, buffered: Buffered::new(budget) }
    }

    /// Decides one call and builds its response.
    pub async fn answer<B>(&self, request: http::Request<B>) -> http::Response<UnaryBody>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let headers = request.headers();
        if let Some(encoding) = headers.get(GRPC_ENCODING).filter(|encoding| *encoding != "identity") {
            let encoding = String::from_utf8_lossy(encoding.as_bytes());
            return error_response(Status::unimplemented(format!("the request's grpc-encoding is {encoding:?}; {COMPRESSED}")));
        }
        let mut timeout = headers.get(GRPC_TIMEOUT).and_then(|value| value.to_str().ok()).and_then(rls::parse_grpc_timeout);
        // The body of a check is a few hundred bytes: a client that stops
        // sending it must not hold the stream and its buffer. Nearly every
        // body has arrived with its headers, so the timer is only set when
        // the first read has to wait, and then the wait counts against the
        // caller's deadline.
        let read_limit = timeout.map_or(BODY_READ_LIMIT, |timeout| timeout.min(BODY_READ_LIMIT));
        let mut read = std::pin::pin!(read_message(request.into_body(), self.max_message_bytes, &self.buffered));
        let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        let read = match first {
            Poll::Ready(read) => Ok(read),
            Poll::Pending => {
                let started = Instant::now();
                let read = tokio::time::timeout(read_limit, read).await;
                timeout = timeout.map(|timeout| timeout.saturating_sub(started.elapsed()));
                read
            }
        };
        let message = match read {
            Ok(Ok(message)) => message,
            Ok(Err(status)) => return error_response(status),
            Err(_) => {
                let message = format!("the request message did not arrive within {read_limit:?}");
                return Status::deadline_exceeded(message).into_http();
            }
        };
        let request = match codec::decode_request(message) {
            Ok(request) => request,
            Err(status) => return status.into_http(),
        };
        match self.handler.decide(timeout, request).await {
            Ok(Reply::Decided(decision)) if decision.shadow_denials() == 0 => {
                let answer = answer::build(&decision);
                ok_response(wire::encoded_len(&decision, &answer), |buffer| wire::encode(&decision, &answer, buffer))
            }
            Ok(reply) => {
                let message = reply.into_message();
                ok_response(message.encoded_len(), |buffer| message.encode_raw(buffer))
            }
            Err(status) => status.into_http(),
        }
    }
}

/// Reads a unary call's body: exactly one uncompressed message of at most
/// `max` bytes, which is checked as soon as its length arrives.
async fn read_message<B>(body: B, max: usize, buffered: &Buffered) -> Result<Bytes, Status>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    let mut body = std::pin::pin!(body);
    // Nearly every call arrives in one data frame, which is kept as it is;
    // only a message split over frames is copied together.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut expected: Option<usize> = None;
    let mut reservation = Reservation { buffered, bytes: 0 };
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|error| Status::cancelled(format!("the request body failed: {error}")))?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        reservation.add(data.len())?;
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (Some(start), None) => {
                let mut buffer = BytesMut::with_capacity(start.len() + data.len());
                buffer.extend_from_slice(start);
                buffer.extend_from_slice(&data);
                first = None;
                joined = Some(buffer);
            }
            (_, Some(buffer)) => buffer.extend_from_slice(&data),
        }
        let received = first.as_ref().map_or_else(|| joined.as_ref().map_or(0, BytesMut::len), Bytes::len);
        if expected.is_none() && received >= PREFIX_BYTES {
            let head = first.as_deref().or(joined.as_deref()).unwrap_or_default();
            expected = Some(check_prefix(head, max)?);
        }
        if let Some(length) = expected {
            if received > PREFIX_BYTES + length {
                return Err(Status::invalid_argument(format!(
                    "ShouldRateLimit takes one message, but the request carried {} more bytes after its {length}-byte message",
                    received - PREFIX_BYTES - length
                )));
            }
        }
    }
    let mut bytes = match (first, joined) {
        (Some(bytes), _) => bytes,
        (None, Some(buffer)) => buffer.freeze(),
        (None, None) => return Err(Status::invalid_argument("the request has no message; send one RateLimitRequest")),
    };
    let Some(length) = expected else {
        return Err(Status::invalid_argument(format!(
            "the request ended after {} bytes, inside the 5-byte message prefix",
            bytes.len()
        )));
    };
    if bytes.len() < PREFIX_BYTES + length {
        return Err(Status::invalid_argument(format!(
            "the request ended after {} of its message's {length} bytes",
            bytes.len() - PREFIX_BYTES
        )));
    }
    bytes.advance(PREFIX_BYTES);
    Ok(bytes)
}

/// Builds the trailers-only response of a failed read. An UNIMPLEMENTED
/// one rejects compression, so it names the one encoding taken
/// (`grpc-accept-encoding`), as gRPC requires.
fn error_response(status: Status) -> http::Response<UnaryBody> {
    let compressed = status.code() == tonic::Code::Unimplemented;
    let mut response: http::Response<UnaryBody> = status.into_http();
    if compressed {
        response.headers_mut().insert(GRPC_ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    }
    response
}

/// The minimum budget for request bytes kept while their messages arrive.
const BUFFERED_MIN_BYTES: usize = 64 << 20;

/// The bytes of request bodies that calls still reading them keep in
/// memory, and their budget. Each call may send up to the message bound, and a
/// connection carries thousands of calls, so without a budget slow clients
/// could make the service hold gigabytes.
#[derive(Clone)]
struct Buffered {
    bytes: Arc<AtomicUsize>,
    budget: usize,
}

impl Buffered {
    fn new(budget: usize) -> Self {
        Self { bytes: Arc::default(), budget }
    }
}

/// One call's share of [`Buffered`], given back when the read ends.
struct Reservation<'a> {
    buffered: &'a Buffered,
    bytes: usize,
}

impl Reservation<'_> {
    /// Counts `bytes` more, or fails with RESOURCE_EXHAUSTED when the
    /// budget is spent.
    fn add(&mut self, bytes: usize) -> Result<(), Status> {
        let before = self.buffered.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.bytes += bytes;
        if before + bytes > self.buffered.budget {
            return Err(Status::resource_exhausted(format!(
                "the server already keeps {before} bytes of requests still arriving, and its budget is {} bytes; \
                 send each request whole, or retry later",
                self.buffered.budget
            )));
        }
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.buffered.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Checks a message prefix and returns the message length.
fn check_prefix(head: &[u8], max: usize) -> Result<usize, Status> {
    match head[0] {
        0 => {}
        1 => return Err(Status::unimplemented(format!("the request message has the compressed flag set; {COMPRESSED}"))),
        flag => {
            return Err(Status::invalid_argument(format!(
                "the message prefix has compressed flag {flag}; gRPC allows 0 or 1"
            )));
        }
    }
    let length = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if length > max {
        return Err(Status::out_of_range(format!(
            "the request message is {length} bytes, over the limit of {max} bytes; \
             send fewer or shorter descriptors, or raise --max-message-bytes"
        )));
    }
    Ok(length)
}

/// Builds an answer of one message: HTTP 200, the message of `length`
/// bytes that `write` writes, then `grpc-status: 0`.
fn ok_response(length: usize, write: impl FnOnce(&mut BytesMut)) -> http::Response<UnaryBody> {
    let mut buffer = BytesMut::with_capacity(PREFIX_BYTES + length);
    buffer.put_u8(0);
    buffer.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    write(&mut buffer);
    debug_assert_eq!(buffer.len(), PREFIX_BYTES + length, "the message length was computed wrong");
    let mut response = http::Response::new(UnaryBody { message: Some(buffer.freeze()), trailers: true });
    response.headers_mut().insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    response
}

/// The body of a unary answer: the message, then the OK trailer. Empty (the
/// default) for a trailers-only error answer, whose status is in the headers.
#[derive(Debug, Default)]
pub struct UnaryBody {
    message: Option<Bytes>,
    trailers: bool,
}

impl UnaryBody {
    /// Returns the message and the trailers still to be sent.
    pub fn into_parts(self) -> (Option<Bytes>, Option<HeaderMap>) {
        (self.message, self.trailers.then(ok_trailers))
    }
}

fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS, HeaderValue::from_static("0"));
    trailers
}

impl Body for UnaryBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(message) = self.message.take() {
            return Poll::Ready(Some(Ok(Frame::data(message))));
        }
        if std::mem::take(&mut self.trailers) {
            return Poll::Ready(Some(Ok(Frame::trailers(ok_trailers()))));
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.message.is_none() && !self.trailers
    }

    // No exact `size_hint`, so no layer turns it into a `content-length`:
    // gRPC does not use one, and it would cost a literal header per call.
}

#[cfg(test)]
mod tests;
