use super::*;

fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
    let mut bytes = vec![flag];
    bytes.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    bytes.extend_from_slice(message);
    bytes
}

/// A request body delivered in the given chunks.
struct Chunks(std::collections::VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
    }
}

fn read(chunks: &[&[u8]], max: usize) -> Result<Bytes, Status> {
    read_within(chunks, max, &Buffered::new(1 << 20))
}

fn read_within(chunks: &[&[u8]], max: usize, buffered: &Buffered) -> Result<Bytes, Status> {
    let body = Chunks(chunks.iter().map(|chunk| Bytes::copy_from_slice(chunk)).collect());
    tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(read_message(body, max, buffered))
}

#[test]
fn reservations_stay_within_budget() {
    let buffered = Buffered::new(100);
    let message = framed(0, &[1; 60]);
    assert!(read_within(&[&message], 1000, &buffered).is_ok());
    assert_eq!(buffered.bytes.load(Ordering::Relaxed), 0, "a finished read gives its bytes back");

    // Another call still has 50 bytes reserved, so 65 more exceed the budget.
    let mut other = Reservation { buffered: &buffered, bytes: 0 };
    other.add(50).expect("within the budget");
    let status = read_within(&[&message[..30], &message[30..]], 1000, &buffered).expect_err("over the budget");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("budget is 100 bytes"), "{}", status.message());
    drop(other);
    assert_eq!(buffered.bytes.load(Ordering::Relaxed), 0, "a failed read gives its bytes back too");
}

#[test]
fn read_keeps_a_single_frame() {
    let bytes = framed(0, b"hello");
    assert_eq!(read(&[&bytes], 100).expect("message"), Bytes::from_static(b"hello"));
}

#[test]
fn read_joins_split_frames() {
    let bytes = framed(0, b"a message in pieces");
    for cut in 1..bytes.len() {
        for second in cut..bytes.len() {
            let parts = [&bytes[..cut], &bytes[cut..second], &bytes[second..]];
            assert_eq!(read(&parts, 100).expect("message"), Bytes::from_static(b"a message in pieces"), "{cut} {second}");
        }
    }
}

#[test]
fn read_accepts_an_empty_message() {
    assert_eq!(read(&[&framed(0, b"")], 100).expect("message"), Bytes::new());
}

#[test]
fn read_rejects_oversize_prefix() {
    // Only the prefix arrives: the length alone decides.
    let prefix = &framed(0, &[7; 101])[..5];
    let status = read(&[prefix], 100).expect_err("too large");
    assert_eq!(status.code(), tonic::Code::OutOfRange);
    assert!(status.message().contains("101 bytes, over the limit of 100 bytes"), "{}", status.message());
    assert!(read(&[&framed(0, &[7; 100])], 100).is_ok(), "the limit itself is allowed");
}

#[test]
fn read_rejects_compressed_flag() {
    let status = read(&[&framed(1, b"zz")], 100).expect_err("compressed");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(read(&[&framed(2, b"zz")], 100).expect_err("bad flag").code(), tonic::Code::InvalidArgument);
}

#[test]
fn missing_short_and_extra_bytes_are_invalid() {
    let cases: [(&str, Vec<u8>); 4] = [
        ("no message", Vec::new()),
        ("partial prefix", vec![0, 0, 0]),
        ("short message", framed(0, b"hello")[..7].to_vec()),
        ("two messages", [framed(0, b"a"), framed(0, b"b")].concat()),
    ];
    for (name, bytes) in cases {
        let status = read(&[&bytes], 100).expect_err(name);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
    }
}

#[test]
fn ok_response_frames_message_then_trailer() {
    let answer = crate::proto::envoy::service::ratelimit::v3::RateLimitResponse { overall_code: 2, ..Default::default() };
    let response = ok_response(answer.encoded_len(), |buffer| answer.encode_raw(buffer));
    assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
    let mut body = response.into_body();
    assert_eq!(body.size_hint().exact(), None, "no content-length to send");
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else { panic!("a data frame") };
    let data = frame.into_data().expect("data");
    assert_eq!(&data[..], &framed(0, &answer.encode_to_vec())[..]);
    assert!(!body.is_end_stream());
    let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else { panic!("trailers") };
    assert_eq!(frame.into_trailers().expect("trailers")["grpc-status"], "0");
    assert!(body.is_end_stream());
    assert!(matches!(Pin::new(&mut body).poll_frame(&mut cx), Poll::Ready(None)));
}

#[test]
fn error_response_is_trailers_only() {
    let response: http::Response<UnaryBody> = Status::out_of_range("too big").into_http();
    assert_eq!(response.headers()["grpc-status"], "11");
    assert!(response.body().is_end_stream());
}

/// Builds a service over a one-rule configuration on the in-memory store.
fn service() -> DecideService {
    let yaml = "domain: t\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: minute\n      requests_per_unit: 5\n";
    let domain = crate::config::parse(yaml, "t.yaml").expect("valid config");
    let limits = crate::config::Limits { domains: [(domain.name.clone(), std::sync::Arc::new(domain))].into_iter().collect() };
    let store = crate::store::Store::Memory(crate::store::MemoryStore::new(crate::clock::Clock::manual(1_000_000)));
    let limiter = crate::limiter::Limiter::new(limits, store, crate::limiter::LimiterSettings::default());
    DecideService::new(RateLimitHandler::new(limiter, crate::metrics::Metrics::new()), 1024)
}

fn check_bytes() -> Vec<u8> {
    use crate::proto::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry};
    let descriptor = RateLimitDescriptor {
        entries: vec![Entry { key: "k".into(), value: "v".into() }],
        ..Default::default()
    };
    let request = crate::proto::envoy::service::ratelimit::v3::RateLimitRequest {
        domain: "t".into(),
        descriptors: vec![descriptor],
        hits_addend: 0,
    };
    framed(0, &request.encode_to_vec())
}

/// A request body that never sends anything.
struct Stalled;

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

#[tokio::test]
async fn answer_decides_a_whole_call() {
    let body = Chunks([Bytes::from(check_bytes())].into_iter().collect());
    let response = service().answer(http::Request::new(body)).await;
    assert!(response.headers().get("grpc-status").is_none(), "{:?}", response.headers());
    let mut body = response.into_body();
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) else { panic!("a data frame") };
    let data = frame.into_data().expect("data");
    let answer = crate::proto::envoy::service::ratelimit::v3::RateLimitResponse::decode(&data[5..]).expect("a response");
    assert_eq!(answer.overall_code, 1, "OK");
    assert_eq!(answer.statuses[0].limit_remaining, 4);
}

#[tokio::test(start_paused = true)]
async fn answer_ends_stalled_body_at_deadline() {
    let mut request = http::Request::new(Stalled);
    request.headers_mut().insert("grpc-timeout", HeaderValue::from_static("50m"));
    let response = service().answer(request).await;
    assert_eq!(response.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");

    let started = tokio::time::Instant::now();
    let response = service().answer(http::Request::new(Stalled)).await;
    assert_eq!(response.headers()["grpc-status"], "4");
    assert_eq!(started.elapsed(), BODY_READ_LIMIT, "without a deadline the read limit applies");
}

#[tokio::test]
async fn answer_names_accepted_encoding() {
    let mut request = http::Request::new(Chunks([Bytes::from(check_bytes())].into_iter().collect()));
    request.headers_mut().insert("grpc-encoding", HeaderValue::from_static("gzip"));
    let response = service().answer(request).await;
    assert_eq!(response.headers()["grpc-status"], "12", "UNIMPLEMENTED");
    assert_eq!(response.headers()["grpc-accept-encoding"], "identity");

    let flagged = Chunks([Bytes::from(framed(1, b"zz"))].into_iter().collect());
    let response = service().answer(http::Request::new(flagged)).await;
    assert_eq!(response.headers()["grpc-status"], "12");
    assert_eq!(response.headers()["grpc-accept-encoding"], "identity");

    let mut identity = http::Request::new(Chunks([Bytes::from(check_bytes())].into_iter().collect()));
    identity.headers_mut().insert("grpc-encoding", HeaderValue::from_static("identity"));
    assert!(service().answer(identity).await.headers().get("grpc-status").is_none(), "identity is no compression");
}

/// A request body whose message arrives after one wait.
struct Late {
    waited: bool,
    message: Option<Bytes>,
}

impl Body for Late {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !std::mem::replace(&mut self.waited, true) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.message.take().map(|message| Ok(Frame::data(message))))
    }
}

#[tokio::test(start_paused = true)]
async fn answer_reads_late_body_in_time() {
    let mut request = http::Request::new(Late { waited: false, message: Some(Bytes::from(check_bytes())) });
    request.headers_mut().insert("grpc-timeout", HeaderValue::from_static("50m"));
    let response = service().answer(request).await;
    assert!(response.headers().get("grpc-status").is_none(), "{:?}", response.headers());
}
