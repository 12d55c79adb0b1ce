//! Protocol bytes to a decision and an answer, on the in-memory store with
//! a manual clock.
//!
//! An input is a sequence of steps: two bytes that move the clock (in units
//! of 7 ms), then one length-delimited `RateLimitRequest`, decoded as the
//! server decodes it (see `fikra_ratelimit::codec`), and by the common-shape
//! decoder, which must decline it or agree with prost. Each input starts
//! from an empty store with small bounds, so eviction runs too. Checked for
//! every step: bytes that do not decode get INVALID_ARGUMENT; the limiter
//! rejects exactly the requests that break the request bounds, and only with
//! INVALID_ARGUMENT; the memory store never
//! fails; every answer is OK or OVER_LIMIT, never UNKNOWN; no remaining
//! count exceeds its capacity; a denial has a JSON body and either a retry
//! time or `x-should-retry: false`; an allowed answer has neither.

#![no_main]

use std::sync::{Arc, OnceLock};

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::codec;
use fikra_ratelimit::config::{self, Limits};
use fikra_ratelimit::limiter::{Denial, Limiter, LimiterError, LimiterSettings, Outcome, RequestBounds};
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use fikra_ratelimit::rls;
use fikra_ratelimit::store::memory::{MemoryBounds, MemoryStore};
use fikra_ratelimit::store::Store;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use prost::bytes::Bytes;

const EDGE: &str = "
domain: edge
entry_roles: {tier: tier, phase: phase, request_id: request_id}
tiers:
  - {name: gold, display_name: Gold Tier, default: true}
  - {name: free}
descriptors:
  - key: k
    reports: true
    meter: tokens
    rate_limit: {unit: second, requests_per_unit: 5, burst: 8, name: k-limit}
    descriptors:
      - key: s
        shadow_mode: true
        rate_limit: {unit: minute, requests_per_unit: 2}
  - key: p
    value: pre*
    rate_limit: {unit: hour, requests_per_unit: 3, unit_multiplier: 2}
  - key: u
    value: open
    rate_limit: {unlimited: true}
  - key: t
    rate_limit: {unit: minute, requests_per_unit: 1}
    tier_limits:
      gold: {unit: day, requests_per_unit: 1000000000000}
      free: {unit: minute, requests_per_unit: 0}
";

/// Small bounds, so short inputs reach them.
const BOUNDS: RequestBounds = RequestBounds {
    max_domain_len: 16,
    max_descriptors: 8,
    max_entries: 6,
    max_key_len: 16,
    max_value_len: 64,
    max_message_bytes: 4096,
};

struct Fixture {
    runtime: tokio::runtime::Runtime,
    limits: Limits,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut domains = config::NameMap::default();
        for (name, text) in [("fikra.yaml", include_str!("../../deploy/config/fikra.yaml")), ("edge.yaml", EDGE)] {
            let domain = config::parse(text, name).unwrap_or_else(|problems| panic!("{name} is invalid: {problems:?}"));
            domains.insert(domain.name.clone(), Arc::new(domain));
        }
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime");
        Fixture { runtime, limits: Limits { domains } }
    })
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let clock = Clock::manual(1_000_000);
    let store = MemoryStore::with_bounds(clock.clone(), MemoryBounds { max_buckets: 4, max_estimates: 4 });
    let settings = LimiterSettings { bounds: BOUNDS, ..LimiterSettings::default() };
    let limiter = Limiter::new(Limits { domains: fixture.limits.domains.clone() }, Store::Memory(store.clone()), settings);

    let mut input = data;
    while input.len() >= 2 {
        clock.advance_ms(u64::from(u16::from_le_bytes([input[0], input[1]])) * 7);
        input = &input[2..];
        let Ok(length) = prost::decode_length_delimiter(&mut input) else { return };
        let Some((message, rest)) = input.split_at_checked(length) else { return };
        input = rest;
        // The common-shape decoder either declines or agrees with prost.
        if let Some(common) = codec::common::decode(message) {
            assert_eq!(Some(common), RateLimitRequest::decode(message).ok(), "the common decoder differs from prost");
        }
        match codec::decode_request(Bytes::copy_from_slice(message)) {
            Ok(message) => step(fixture, &limiter, message),
            Err(status) => assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}"),
        }
        let stats = store.stats();
        assert!(stats.buckets <= 4, "store over its bucket bound: {stats:?}");
        assert!(stats.estimates <= 4, "store over its estimate bound: {stats:?}");
    }
});

fn step(fixture: &Fixture, limiter: &Limiter, message: RateLimitRequest) {
    let request = rls::translate(message);
    let expected = request.validate(&BOUNDS);
    let decision = match fixture.runtime.block_on(limiter.decide(&request)) {
        Ok(decision) => {
            assert!(expected.is_ok(), "accepted a request that breaks a bound: {expected:?}");
            decision
        }
        Err(LimiterError::Invalid(invalid)) => {
            assert_eq!(Err(invalid), expected, "rejected for another reason than validation gives");
            return;
        }
        Err(other) => panic!("the memory store failed: {other}"),
    };

    assert_eq!(decision.statuses.len(), request.descriptors.len());
    for status in &decision.statuses {
        if let Some(limit) = &status.limit {
            assert!(status.remaining <= limit.params.capacity, "remaining {} above capacity {}", status.remaining, limit.params.capacity);
        }
    }
    match decision.outcome {
        Outcome::Allowed => {
            assert!(decision.denial.is_none());
            assert!(decision.statuses.iter().all(|s| s.outcome == Outcome::Allowed), "allowed with a denied descriptor");
        }
        Outcome::Denied => assert!(decision.denial.is_some(), "a denial without a reason"),
    }

    let answer = rls::respond(&decision);
    check_answer(&answer, decision.outcome, decision.denial.as_ref());
}

fn check_answer(answer: &RateLimitResponse, outcome: Outcome, denial: Option<&Denial>) {
    const OK: i32 = 1;
    const OVER_LIMIT: i32 = 2;
    let header = |name: &str| answer.response_headers_to_add.iter().find(|h| h.key == name).map(|h| h.value.as_str());

    for status in &answer.statuses {
        assert!(status.code == OK || status.code == OVER_LIMIT, "descriptor code {}", status.code);
    }
    for h in &answer.response_headers_to_add {
        assert!(h.value.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "header {} = {:?}", h.key, h.value);
    }
    match outcome {
        Outcome::Allowed => {
            assert_eq!(answer.overall_code, OK);
            assert!(answer.raw_body.is_empty(), "an allowed answer has no body");
            assert!(header("content-type").is_none());
            assert!(header("retry-after").is_none());
        }
        Outcome::Denied => {
            assert_eq!(answer.overall_code, OVER_LIMIT);
            let body: serde_json::Value = serde_json::from_slice(&answer.raw_body).expect("a denial body is JSON");
            assert_eq!(body["error"]["status"], 429);
            assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(header("content-type"), Some("application/json"));
            match denial.expect("checked above") {
                Denial::OverLimit { .. } => {
                    let seconds: u64 = header("retry-after").expect("retry-after").parse().expect("whole seconds");
                    let ms: u64 = header("retry-after-ms").expect("retry-after-ms").parse().expect("milliseconds");
                    assert!(ms >= 1, "retry-after-ms {ms}");
                    assert_eq!(seconds, ms.div_ceil(1000), "retry-after {seconds} s and {ms} ms");
                }
                _ => {
                    assert_eq!(header("x-should-retry"), Some("false"));
                    assert!(header("retry-after").is_none());
                }
            }
        }
    }
}
