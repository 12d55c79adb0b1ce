//! Inputs the fuzz targets (see fuzz/README.md) found crashing or
//! miscounting, kept as tests so they stay fixed.

#[path = "support/limiter.rs"]
mod support;
#[path = "support/redis.rs"]
mod redis;

use std::sync::Arc;

use fikra_ratelimit::config;
use fikra_ratelimit::limiter::{Limiter, LimiterSettings, Outcome};
use fikra_ratelimit::store::{RedisStore, Store};
use support::*;

const EDGE: &str = "
domain: edge
entry_roles: {phase: phase, request_id: request_id}
descriptors:
  - key: k
    reports: true
    meter: tokens
    rate_limit: {unit: second, requests_per_unit: 5, burst: 8}
";

/// `unit: year` with `unit_multiplier: 4294967295` overflowed the window in
/// milliseconds (a panic in debug builds, a wrong window in release).
#[test]
fn config_window_overflow_is_a_problem() {
    let text = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: year, requests_per_unit: 1, unit_multiplier: 4294967295}\n";
    let problems = config::parse(text, "year.yaml").expect_err("the window cannot be counted");
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, "descriptors[0].rate_limit.unit_multiplier");
    assert!(problems[0].message.contains("4294967295 years"), "{}", problems[0].message);

    let longest = "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, unit_multiplier: 4294967295}\n";
    assert!(config::parse(longest, "seconds.yaml").is_ok(), "u32::MAX seconds fits");
}

/// The same window in Envoy's per-request override is ignored like an
/// unknown unit, and the configured limit applies.
#[tokio::test]
async fn override_window_overflow_is_ignored() {
    let (limiter, _clock) = limiter(EDGE);
    let mut descriptor = desc(&[("k", "a")]);
    descriptor.limit = Some(fikra_ratelimit::limiter::LimitOverride { requests_per_unit: u32::MAX, unit: 6, multiplier: Some(u32::MAX) });

    let answer = call(&limiter, request("edge", vec![descriptor])).await;
    assert!(answer.ok());
    let status = &answer.decision.statuses[0];
    assert!(status.facts.ignored_override, "the override is counted as ignored");
    assert_eq!(status.limit.as_ref().expect("the configured limit").params.capacity, 8);
    assert_eq!(answer.number("x-ratelimit-remaining-tokens"), 7);
}

fn huge_reports() -> fikra_ratelimit::limiter::CheckRequest {
    request(
        "edge",
        vec![
            with_hits(desc(&[("k", "a"), ("phase", "report")]), u64::MAX),
            with_hits(desc(&[("k", "a"), ("phase", "report"), ("request_id", "r")]), u64::MAX),
        ],
    )
}

/// Two reports of `u64::MAX` on one bucket overflowed the forgiven count.
/// Both are charged up to the debt clamp, and the forgiven count saturates.
#[tokio::test]
async fn huge_reports_saturate_forgiven_units() {
    let (limiter, _clock) = limiter(EDGE);
    let answer = call(&limiter, huge_reports()).await;
    assert!(answer.ok(), "reports are never denied");
    assert_eq!(answer.decision.statuses[0].facts.forgiven, u64::MAX);
    assert_eq!(answer.number("x-ratelimit-remaining-tokens"), 0);

    let check = call(&limiter, request("edge", vec![desc(&[("k", "a")])])).await;
    assert!(!check.ok(), "the bucket carries one capacity of debt");
}

/// The same reports on Redis, whose script counts in doubles, get a
/// decision and leave one capacity of debt.
#[tokio::test]
async fn huge_reports_on_redis_are_clamped() {
    let server = redis::RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&server.url()).await.expect("connect to the test redis"));
    let domain = config::parse(EDGE, "edge.yaml").expect("valid");
    let limits = config::Limits { domains: [(domain.name.clone(), Arc::new(domain))].into_iter().collect() };
    let limiter = Limiter::new(limits, store, LimiterSettings::default());

    let answer = call(&limiter, huge_reports()).await;
    assert!(answer.ok(), "reports are never denied");
    assert_eq!(answer.number("x-ratelimit-remaining-tokens"), 0);
    let check = call(&limiter, request("edge", vec![desc(&[("k", "a")])])).await;
    assert_eq!(check.decision.outcome, Outcome::Denied, "the bucket carries one capacity of debt");
    assert!(check.header("retry-after").is_some());
}
