//! The gRPC port over raw HTTP/2. Calls whose body never arrives end at the
//! caller's deadline on every path. A response carries the headers gRPC needs
//! and no others, and it respects the client's flow-control window. A
//! connection with no call does not delay shutdown.

#[path = "support/ops.rs"]
mod ops;
#[path = "support/service.rs"]
mod service;

use std::time::{Duration, Instant};

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::store::{MemoryStore, Store};
use http::{HeaderMap, Request};
use ops::InProcess;
use service::limits;

const CONFIG: &str = "
domain: edge
descriptors:
  - key: k
    rate_limit: {unit: minute, requests_per_unit: 5}
";

const DECIDE: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
const HEALTH: &str = "/grpc.health.v1.Health/Check";

async fn server() -> InProcess {
    InProcess::start(limits(CONFIG), Store::Memory(MemoryStore::new(Clock::monotonic()))).await
}

/// Opens an HTTP/2 connection to `server`.
async fn connect(server: &InProcess) -> h2::client::SendRequest<prost::bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    client
}

/// Builds the headers of a gRPC call to `path`, with `grpc-timeout` when given.
fn grpc_request(server: &InProcess, path: &str, timeout: Option<&str>) -> Request<()> {
    let mut request = Request::post(format!("http://{}{path}", server.grpc))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        request = request.header("grpc-timeout", timeout);
    }
    request.body(()).expect("request")
}

/// Sends the headers of a call to `path` and no body. Returns the response
/// headers, where a trailers-only response has its status, and how long
/// they took.
async fn stalled_call(server: &InProcess, path: &str, timeout: &str) -> (HeaderMap, Duration) {
    let mut client = connect(server).await;
    let started = Instant::now();
    let (response, _body) = client.send_request(grpc_request(server, path, Some(timeout)), false).expect("stream opens");
    let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("an answer within 5 s").expect("response");
    (response.headers().clone(), started.elapsed())
}

#[tokio::test]
async fn stalled_calls_end_at_their_deadline() {
    let server = server().await;
    for path in [DECIDE, HEALTH] {
        let (headers, elapsed) = stalled_call(&server, path, "200m").await;
        assert_eq!(headers.get("grpc-status").map(|value| value.as_bytes()), Some(&b"4"[..]), "{path}: {headers:?}");
        assert!(elapsed >= Duration::from_millis(190), "{path}: answered after {elapsed:?}, before the deadline");
        assert!(elapsed < Duration::from_secs(2), "{path}: answered after {elapsed:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn answers_carry_only_grpc_headers() {
    use prost::Message;

    let server = server().await;
    let mut client = connect(&server).await;
    let (response, mut body) = client.send_request(grpc_request(&server, DECIDE, None), false).expect("stream opens");
    let message = service::rls_request("edge", vec![service::descriptor(&[("k", "v")], None)]).encode_to_vec();
    body.send_data(framed(&message), true).expect("body sent");

    let response = response.await.expect("response");
    let names: Vec<&str> = response.headers().keys().map(http::HeaderName::as_str).collect();
    assert_eq!(names, ["content-type"], "{:?}", response.headers());
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut received = response.into_body();
    let data = received.data().await.expect("a message").expect("data");
    assert_eq!(overall_code(&data), 1, "OK");
    let trailers = received.trailers().await.expect("trailers").expect("present");
    assert_eq!(trailers["grpc-status"], "0");
    server.stop().await;
}

/// Returns the overall code of a framed `RateLimitResponse`.
fn overall_code(framed: &[u8]) -> i32 {
    use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitResponse;
    use prost::Message;

    RateLimitResponse::decode(&framed[5..]).expect("a response message").overall_code
}

/// Frames one gRPC message.
fn framed(message: &[u8]) -> prost::bytes::Bytes {
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(message);
    framed.into()
}

#[tokio::test]
async fn responses_complete_through_one_byte_window() {
    use prost::Message;

    let server = server().await;
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.expect("connect");
    let (mut client, connection) =
        h2::client::Builder::new().initial_window_size(1).handshake(tcp).await.expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let check = service::rls_request("edge", vec![service::descriptor(&[("k", "v")], None)]).encode_to_vec();
    // An empty HealthCheckRequest requests the whole server's status.
    for (path, message) in [(DECIDE, check), (HEALTH, Vec::new())] {
        let (response, mut body) = client.send_request(grpc_request(&server, path, None), false).expect("stream opens");
        body.send_data(framed(&message), true).expect("body sent");
        let response = tokio::time::timeout(Duration::from_secs(5), response).await.expect("headers within 5 s").expect("response");
        let mut received = response.into_body();
        let mut data = Vec::new();
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), received.data()).await.expect("data within 5 s") {
            let chunk = chunk.expect("data");
            received.flow_control().release_capacity(chunk.len()).expect("window given back");
            data.extend_from_slice(&chunk);
        }
        let trailers = received.trailers().await.expect("trailers").expect("present");
        assert_eq!(trailers["grpc-status"], "0", "{path}");
        assert!(data.len() > 5, "{path}: {} bytes", data.len());
        let length = u32::from_be_bytes(data[1..5].try_into().expect("4 bytes")) as usize;
        assert_eq!(data.len(), 5 + length, "{path}: the whole message arrived");
        if path == DECIDE {
            assert_eq!(overall_code(&data), 1, "OK");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_skips_connections_without_calls() {
    let server = server().await;
    let _silent = tokio::net::TcpStream::connect(server.grpc).await.expect("connect");
    // An open HTTP/2 connection with no call in flight closes at once too.
    let _idle = connect(&server).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(2), "shutdown took {:?}", started.elapsed());
}

#[tokio::test]
async fn stalled_health_check_ends_after_ten_seconds() {
    let server = server().await;
    let mut client = connect(&server).await;
    let started = Instant::now();
    let (response, _body) = client.send_request(grpc_request(&server, HEALTH, None), false).expect("stream opens");
    let response = tokio::time::timeout(Duration::from_secs(15), response).await.expect("an answer within 15 s").expect("response");
    let elapsed = started.elapsed();
    assert_eq!(response.headers().get("grpc-status").map(|value| value.as_bytes()), Some(&b"4"[..]), "{:?}", response.headers());
    assert!(elapsed >= Duration::from_secs(9), "answered after {elapsed:?}");
    server.stop().await;
}
