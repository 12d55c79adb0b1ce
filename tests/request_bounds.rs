//! Every request bound and malformed request shape, through the real gRPC
//! server in-process: gateway faults get INVALID_ARGUMENT naming the field,
//! its size and the bound; an oversized message gets OUT_OF_RANGE before
//! any work; values a client controls get a denial with
//! `x-should-retry: false` and a body naming the problem; odd but legal
//! values are answered normally.

#[path = "support/service.rs"]
mod service;

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::limiter::{LimiterSettings, RequestBounds};
use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use fikra_ratelimit::store::{MemoryStore, Store};
use service::{Service, descriptor, limits, rls_request};
use tonic::transport::Channel;

const CONFIG: &str = "
domain: edge
entry_roles: {phase: phase}
descriptors:
  - key: k
    reports: true
    rate_limit: {unit: minute, requests_per_unit: 10}
";

/// What a request must get.
#[derive(Debug)]
enum Expect {
    /// INVALID_ARGUMENT whose message contains the field and every other text.
    Invalid(&'static str, &'static [&'static str]),
    /// OUT_OF_RANGE from the gRPC layer.
    OutOfRange,
    /// OVER_LIMIT with `x-should-retry: false` and a JSON body containing every text.
    NeverFits(&'static [&'static str]),
    /// OVER_LIMIT with `retry-after`.
    OverLimit,
    Allowed,
}

struct Case {
    name: &'static str,
    request: RateLimitRequest,
    expect: Expect,
}

fn case(name: &'static str, request: RateLimitRequest, expect: Expect) -> Case {
    Case { name, request, expect }
}

fn with_limit(mut descriptor: RateLimitDescriptor, requests_per_unit: u32, unit: i32) -> RateLimitDescriptor {
    descriptor.limit = Some(RateLimitOverride { requests_per_unit, unit, unit_multiplier: None });
    descriptor
}

fn negative(mut descriptor: RateLimitDescriptor) -> RateLimitDescriptor {
    descriptor.is_negative_hits = true;
    descriptor
}

fn odd_value(len: usize) -> String {
    let mut value = String::from("spaces and\nnewlines\t{braces}:_ é 日本 🙂 \u{0}");
    while value.len() < len {
        value.push('v');
    }
    value
}

fn header<'a>(answer: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    answer.response_headers_to_add.iter().find(|h| h.key == name).map(|h| h.value.as_str())
}

async fn check_case(client: &mut RateLimitServiceClient<Channel>, case: Case) {
    let Case { name, request, expect } = case;
    let result = client.should_rate_limit(request).await.map(tonic::Response::into_inner);
    match (&expect, result) {
        (Expect::Invalid(field, texts), Err(status)) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{name}: {status:?}");
            assert!(status.message().starts_with(field), "{name}: {:?} does not name {field}", status.message());
            for text in *texts {
                assert!(status.message().contains(text), "{name}: {:?} lacks {text:?}", status.message());
            }
        }
        (Expect::OutOfRange, Err(status)) => {
            assert_eq!(status.code(), tonic::Code::OutOfRange, "{name}: {status:?}");
        }
        (Expect::NeverFits(texts), Ok(answer)) => {
            assert_eq!(answer.overall_code, Code::OverLimit as i32, "{name}");
            assert_eq!(header(&answer, "x-should-retry"), Some("false"), "{name}");
            assert_eq!(header(&answer, "retry-after"), None, "{name}");
            assert_eq!(header(&answer, "content-type"), Some("application/json"), "{name}");
            let body: serde_json::Value = serde_json::from_slice(&answer.raw_body).unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
            let message = body["error"]["message"].as_str().unwrap_or_else(|| panic!("{name}: no message in {body}"));
            for text in *texts {
                assert!(message.contains(text), "{name}: {message:?} lacks {text:?}");
            }
        }
        (Expect::OverLimit, Ok(answer)) => {
            assert_eq!(answer.overall_code, Code::OverLimit as i32, "{name}");
            assert!(header(&answer, "retry-after").is_some(), "{name}: no retry-after");
        }
        (Expect::Allowed, Ok(answer)) => {
            assert_eq!(answer.overall_code, Code::Ok as i32, "{name}");
            assert!(answer.raw_body.is_empty(), "{name}: an allowed answer has no body");
        }
        (expect, result) => panic!("{name}: expected {expect:?}, got {result:?}"),
    }
}

#[tokio::test]
async fn default_bounds_and_malformed_shapes() {
    let service = Service::start(limits(CONFIG), Store::Memory(MemoryStore::new(Clock::monotonic()))).await;
    let mut client = service.client().await.max_encoding_message_size(usize::MAX);
    let k = |value: &str| descriptor(&[("k", value)], None);
    let long_key = "x".repeat(257);
    let many_entries: Vec<(String, String)> = (0..33).map(|n| (format!("e{n}"), "v".to_owned())).collect();
    let many_entries: Vec<(&str, &str)> = many_entries.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let max_entries: Vec<(&str, &str)> = many_entries[..32].to_vec();

    let cases = vec![
        case("empty domain", rls_request("", vec![k("a")]), Expect::Invalid("domain", &["empty"])),
        case("domain over the bound", rls_request(&"d".repeat(257), vec![k("a")]), Expect::Invalid("domain", &["257 bytes", "maximum of 256", "--max-domain-bytes"])),
        case("domain at the bound", rls_request(&"d".repeat(256), vec![k("a")]), Expect::Allowed),
        case("no descriptors", rls_request("edge", vec![]), Expect::Invalid("descriptors", &["empty"])),
        case("descriptors over the bound", rls_request("edge", vec![k("a"); 65]), Expect::Invalid("descriptors", &["65 descriptors", "maximum of 64", "--max-descriptors"])),
        case("descriptors at the bound", rls_request("edge", vec![descriptor(&[("other", "x")], None); 64]), Expect::Allowed),
        case("entries over the bound", rls_request("edge", vec![k("a"), descriptor(&many_entries, None)]), Expect::Invalid("descriptors[1].entries", &["33 entries", "maximum of 32", "--max-entries"])),
        case("entries at the bound", rls_request("edge", vec![descriptor(&max_entries, None)]), Expect::Allowed),
        case("empty entry key", rls_request("edge", vec![k("a"), descriptor(&[("k", "a"), ("", "b")], None)]), Expect::Invalid("descriptors[1].entries[1].key", &["empty"])),
        case("entry key over the bound", rls_request("edge", vec![descriptor(&[(&long_key, "a")], None)]), Expect::Invalid("descriptors[0].entries[0].key", &["257 bytes", "maximum of 256", "--max-key-bytes"])),
        case("message over the size limit", rls_request("edge", vec![k(&"m".repeat(2 * 1024 * 1024))]), Expect::OutOfRange),
        case("value over the bound", rls_request("edge", vec![k("a"), k(&"v".repeat(16 * 1024 + 1))]), Expect::NeverFits(&["descriptors[1].entries[0].value", "16385 bytes", "16384"])),
        case("value at the bound", rls_request("edge", vec![k(&odd_value(16 * 1024))]), Expect::Allowed),
        case("odd 8 KiB value", rls_request("edge", vec![k(&odd_value(8 * 1024))]), Expect::Allowed),
        case("value over the bound in an unknown domain", rls_request("elsewhere", vec![k(&"v".repeat(20_000))]), Expect::Allowed),
        case("request cost u32::MAX", RateLimitRequest { hits_addend: u32::MAX, ..rls_request("edge", vec![k("a")]) }, Expect::NeverFits(&["4294967295", "capacity of 10"])),
        case("descriptor cost u64::MAX", rls_request("edge", vec![descriptor(&[("k", "a")], Some(u64::MAX))]), Expect::NeverFits(&["18446744073709551615"])),
        case("summed costs past u64::MAX", rls_request("edge", vec![descriptor(&[("k", "a")], Some(u64::MAX)); 2]), Expect::NeverFits(&["18446744073709551615"])),
        case("cost above the capacity", rls_request("edge", vec![descriptor(&[("k", "a")], Some(11))]), Expect::NeverFits(&["11 requests", "capacity of 10"])),
        case("credit u64::MAX", rls_request("edge", vec![negative(descriptor(&[("k", "a")], Some(u64::MAX)))]), Expect::Allowed),
        case("descriptor without entries", rls_request("edge", vec![descriptor(&[], None)]), Expect::Allowed),
        case("override with an unknown unit", rls_request("edge", vec![with_limit(k("b"), 1, 99)]), Expect::Allowed),
        case("override of u32::MAX per second", rls_request("edge", vec![with_limit(k("b"), u32::MAX, 1)]), Expect::Allowed),
        case("override of u32::MAX per year", rls_request("edge", vec![with_limit(k("b"), u32::MAX, 6)]), Expect::Allowed),
        case("override of 0 per minute", rls_request("edge", vec![with_limit(k("b"), 0, 2)]), Expect::NeverFits(&["capacity of 0"])),
    ];
    for case in cases {
        check_case(&mut client, case).await;
    }

    // The service keeps serving, and nothing above charged `k=a`.
    let answer = client.should_rate_limit(rls_request("edge", vec![k("a")])).await.expect("answer").into_inner();
    assert_eq!(answer.overall_code, Code::Ok as i32);
    assert_eq!(header(&answer, "x-ratelimit-remaining-requests"), Some("9"), "the denials charged nothing");
}

#[tokio::test]
async fn configured_bounds_are_enforced() {
    let bounds = RequestBounds {
        max_domain_len: 8,
        max_descriptors: 2,
        max_entries: 2,
        max_key_len: 4,
        max_value_len: 16,
        max_message_bytes: 4096,
    };
    let settings = LimiterSettings { bounds, ..LimiterSettings::default() };
    let service = Service::start_with(limits(CONFIG), Store::Memory(MemoryStore::new(Clock::monotonic())), settings).await;
    let mut client = service.client().await;
    let k = |value: &str| descriptor(&[("k", value)], None);

    let cases = vec![
        case("domain over 8", rls_request("edge-long", vec![k("a")]), Expect::Invalid("domain", &["9 bytes", "maximum of 8"])),
        case("3 descriptors", rls_request("edge", vec![k("a"); 3]), Expect::Invalid("descriptors", &["3 descriptors", "maximum of 2"])),
        case("3 entries", rls_request("edge", vec![descriptor(&[("k", "a"), ("b", "c"), ("d", "e")], None)]), Expect::Invalid("descriptors[0].entries", &["3 entries", "maximum of 2"])),
        case("5-byte key", rls_request("edge", vec![descriptor(&[("kkkkk", "a")], None)]), Expect::Invalid("descriptors[0].entries[0].key", &["5 bytes", "maximum of 4"])),
        case("17-byte value", rls_request("edge", vec![k(&"v".repeat(17))]), Expect::NeverFits(&["17 bytes", "maximum of 16"])),
        case("5000-byte message", rls_request("edge", vec![descriptor(&[("k", &"v".repeat(5_000))], None)]), Expect::OutOfRange),
        case("within every bound", rls_request("edge", vec![k(&"v".repeat(16)), k("b")]), Expect::Allowed),
    ];
    for case in cases {
        check_case(&mut client, case).await;
    }
}

/// A report is never denied, whatever its size: it charges what the debt
/// clamp allows and the next check waits for the refill.
#[tokio::test]
async fn oversized_report_makes_bounded_debt() {
    let service = Service::start(limits(CONFIG), Store::Memory(MemoryStore::new(Clock::monotonic()))).await;
    let mut client = service.client().await;
    let report = descriptor(&[("k", "r"), ("phase", "report")], Some(u64::MAX));
    for _ in 0..3 {
        let answer = client.should_rate_limit(rls_request("edge", vec![report.clone()])).await.expect("answer").into_inner();
        assert_eq!(answer.overall_code, Code::Ok as i32, "a report is never denied");
        assert_eq!(header(&answer, "x-ratelimit-remaining-requests"), Some("0"));
    }
    check_case(&mut client, case("check after the debt", rls_request("edge", vec![descriptor(&[("k", "r")], None)]), Expect::OverLimit)).await;
}

/// `RateLimitRequest` with bytes where the protocol has strings, to send
/// what a client built from the generated types cannot.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    descriptors: Vec<RawDescriptor>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawDescriptor {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<RawEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

async fn send_raw(channel: Channel, domain: &[u8], key: &[u8], value: &[u8]) -> Result<RateLimitResponse, tonic::Status> {
    let request = RawRequest {
        domain: domain.to_vec(),
        descriptors: vec![RawDescriptor { entries: vec![RawEntry { key: key.to_vec(), value: value.to_vec() }] }],
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("the channel is ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit");
    let codec = tonic_prost::ProstCodec::<RawRequest, RateLimitResponse>::default();
    grpc.unary(tonic::Request::new(request), path, codec).await.map(tonic::Response::into_inner)
}

/// A value that is not UTF-8 is counted like any other, because HTTP allows
/// bytes 0x80 to 0xFF in header values. A domain or key that is not UTF-8 is
/// the gateway's fault.
#[tokio::test]
async fn non_utf8_values_are_decided() {
    let service = Service::start(limits(CONFIG), Store::Memory(MemoryStore::new(Clock::monotonic()))).await;
    let channel = service.channel().await;

    let first = send_raw(channel.clone(), b"edge", b"k", b"caf\xe9").await.expect("an answer, not an error");
    assert_eq!(first.overall_code, Code::Ok as i32);
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), Some("9"));
    let second = send_raw(channel.clone(), b"edge", b"k", b"caf\xe9").await.expect("an answer");
    assert_eq!(header(&second, "x-ratelimit-remaining-requests"), Some("8"), "the same bytes name the same bucket");
    let other = send_raw(channel.clone(), b"edge", b"k", b"caf\xea").await.expect("an answer");
    assert_eq!(header(&other, "x-ratelimit-remaining-requests"), Some("9"), "other bytes name another bucket");
    let valid = send_raw(channel.clone(), b"edge", b"k", b"caf").await.expect("an answer");
    assert_eq!(header(&valid, "x-ratelimit-remaining-requests"), Some("9"), "the valid prefix is another bucket");

    let key = send_raw(channel.clone(), b"edge", b"k\xff", b"v").await.expect_err("a gateway fault");
    assert_eq!(key.code(), tonic::Code::InvalidArgument);
    assert!(key.message().starts_with("descriptors[0].entries[0].key"), "{}", key.message());
    let domain = send_raw(channel, b"ed\xffge", b"k", b"v").await.expect_err("a gateway fault");
    assert_eq!(domain.code(), tonic::Code::InvalidArgument);
    assert!(domain.message().starts_with("domain"), "{}", domain.message());
}
