//! Limiter behaviour beyond the field reports: settlement by request id,
//! credits, shadow mode, overrides and tier handling.

#[path = "support/limiter.rs"]
mod support;

use fikra_ratelimit::limiter::Outcome;
use support::*;

fn tokens_check(key: &str, request_id: &str, estimate: u64) -> fikra_ratelimit::limiter::Descriptor {
    with_hits(desc(&[("api_key", key), ("kind", "tpm"), ("request_id", request_id)]), estimate)
}

fn tokens_report(key: &str, request_id: Option<&str>, used: u64) -> fikra_ratelimit::limiter::Descriptor {
    let mut entries = vec![("api_key", key), ("kind", "tpm"), ("phase", "report")];
    if let Some(id) = request_id {
        entries.push(("request_id", id));
    }
    with_hits(desc(&entries), used)
}

async fn tokens_left(limiter: &fikra_ratelimit::limiter::Limiter, key: &str) -> u64 {
    call(limiter, request("llm", vec![tpm(key, 0)])).await.number("x-ratelimit-remaining-tokens")
}

#[tokio::test]
async fn settlement_refunds_unused_estimate() {
    let (limiter, _clock) = llm();
    assert!(call(&limiter, request("llm", vec![rpm("K1", None), tokens_check("K1", "r1", 1_000)])).await.ok());
    call(&limiter, request("llm", vec![tokens_report("K1", Some("r1"), 300)])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 39_700);
}

#[tokio::test]
async fn settlement_charges_usage_above_estimate() {
    let (limiter, _clock) = llm();
    call(&limiter, request("llm", vec![tokens_check("K1", "r1", 1_000)])).await;
    call(&limiter, request("llm", vec![tokens_report("K1", Some("r1"), 3_000)])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 37_000);
}

#[tokio::test]
async fn second_report_for_a_request_changes_nothing() {
    let (limiter, _clock) = llm();
    call(&limiter, request("llm", vec![tokens_check("K1", "r1", 1_000)])).await;
    call(&limiter, request("llm", vec![tokens_report("K1", Some("r1"), 300)])).await;
    call(&limiter, request("llm", vec![tokens_report("K1", Some("r1"), 300)])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 39_700);
}

#[tokio::test]
async fn estimates_under_one_request_id_add_up() {
    let (limiter, _clock) = llm();
    call(&limiter, request("llm", vec![tokens_check("K1", "r1", 1_000)])).await;
    call(&limiter, request("llm", vec![tokens_check("K1", "r1", 500)])).await;
    call(&limiter, request("llm", vec![tokens_report("K1", Some("r1"), 100)])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 39_900);
}

#[tokio::test]
async fn denied_check_remembers_no_estimate() {
    let (limiter, _clock) = llm();
    for _ in 0..30 {
        call(&limiter, request("llm", vec![rpm("K1", None)])).await;
    }
    let denied = call(&limiter, request("llm", vec![rpm("K1", None), tokens_check("K1", "r1", 1_000)])).await;
    assert!(!denied.ok());
    assert_eq!(tokens_left(&limiter, "K1").await, 40_000, "the denied estimate was not charged");

    // Its report is for an unknown request: charged in full, no refund.
    call(&limiter, request("llm", vec![tokens_report("K1", Some("r1"), 300)])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 39_700);
}

#[tokio::test]
async fn report_without_request_id_charges_usage() {
    let (limiter, _clock) = llm();
    call(&limiter, request("llm", vec![tokens_report("K1", None, 1_234)])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 38_766);
}

#[tokio::test]
async fn report_without_own_cost_is_ignored() {
    let (limiter, _clock) = llm();
    let mut report = tokens_report("K1", Some("r1"), 0);
    report.hits = None;
    let mut call_request = request("llm", vec![report]);
    call_request.hits = 5;
    call(&limiter, call_request).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 40_000);
}

#[tokio::test]
async fn report_is_never_denied() {
    let (limiter, _clock) = llm();
    let report = call(&limiter, request("llm", vec![tokens_report("K1", None, 100_000)])).await;
    assert!(report.ok());
    assert_eq!(tokens_left(&limiter, "K1").await, 0);
}

#[tokio::test]
async fn negative_hits_credit_back() {
    let (limiter, _clock) = llm();
    call(&limiter, request("llm", vec![tpm("K1", 5_000)])).await;
    let mut credit = tpm("K1", 2_000);
    credit.negative = true;
    call(&limiter, request("llm", vec![credit])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 37_000);

    let mut big = tpm("K1", 1_000_000);
    big.negative = true;
    call(&limiter, request("llm", vec![big])).await;
    assert_eq!(tokens_left(&limiter, "K1").await, 40_000, "a credit never exceeds capacity");
}

#[tokio::test]
async fn all_or_nothing_across_buckets() {
    let (limiter, _clock) = llm();
    call(&limiter, request("llm", vec![tpm("K1", 39_990)])).await;
    let denied = call(&limiter, request("llm", vec![rpm("K1", None), tpm("K1", 100)])).await;
    assert!(!denied.ok());
    assert_eq!(denied.header("x-ratelimit-remaining-requests"), Some("30"), "the requests bucket was not charged");
    assert_eq!(denied.decision.statuses[0].outcome, Outcome::Allowed);
    assert_eq!(denied.decision.statuses[1].outcome, Outcome::Denied);
    let body = denied.answer.body.expect("denial body");
    assert!(body.contains(r#""param":"x-ratelimit-remaining-tokens""#), "{body}");
}

#[tokio::test]
async fn tier_entry_does_not_name_the_bucket() {
    let (limiter, _clock) = llm();
    for _ in 0..10 {
        call(&limiter, request("llm", vec![rpm("K1", Some("unverified"))])).await;
    }
    let promoted = call(&limiter, request("llm", vec![rpm("K1", Some("trusted"))])).await;
    assert_eq!(promoted.number("x-ratelimit-limit-requests"), 100);
    assert_eq!(promoted.number("x-ratelimit-remaining-requests"), 89);
}

#[tokio::test]
async fn unknown_tier_gets_the_default() {
    let (limiter, _clock) = llm();
    let gold = call(&limiter, request("llm", vec![rpm("K1", Some("gold"))])).await;
    assert_eq!(gold.number("x-ratelimit-limit-requests"), 30);
}

#[tokio::test]
async fn descriptor_without_entries_is_allowed_untouched() {
    let (limiter, _clock) = llm();
    let empty = call(&limiter, request("llm", vec![desc(&[])])).await;
    assert!(empty.ok());
    assert!(empty.decision.statuses[0].limit.is_none());
}

#[tokio::test]
async fn unusable_override_falls_back_to_config() {
    let (limiter, _clock) = llm();
    let unknown_unit = with_override(rpm("K1", None), 5, 0);
    let answer = call(&limiter, request("llm", vec![unknown_unit])).await;
    assert_eq!(answer.number("x-ratelimit-limit-requests"), 30);

    let mut zero_multiplier = with_override(rpm("K2", None), 5, 2);
    zero_multiplier.limit.as_mut().expect("override").multiplier = Some(0);
    let answer = call(&limiter, request("llm", vec![zero_multiplier])).await;
    assert_eq!(answer.number("x-ratelimit-limit-requests"), 30);
}

#[tokio::test]
async fn override_keyed_on_limit_keeps_usage() {
    let (limiter, _clock) = limiter("domain: llm\n");
    const MINUTE: i32 = 2;
    let with = |limit| request("llm", vec![with_override(desc(&[("api_key", "K1")]), limit, MINUTE)]);
    let oks: Vec<bool> = [call(&limiter, with(2)).await.ok(), call(&limiter, with(2)).await.ok(), call(&limiter, with(2)).await.ok()].into();
    assert_eq!(oks, [true, true, false]);
    let raised = call(&limiter, with(10)).await;
    assert!(raised.ok());
    assert_eq!(raised.decision.statuses[0].remaining, 7);
}

const SHADOW: &str = "
domain: llm
descriptors:
  - key: api_key
    descriptors:
      - key: kind
        value: shadowed
        shadow_mode: true
        rate_limit: {unit: minute, requests_per_unit: 2}
      - key: kind
        value: enforced
        rate_limit: {unit: minute, requests_per_unit: 1}
";

#[tokio::test]
async fn shadow_limit_never_denies_or_overcharges() {
    let (limiter, _clock) = limiter(SHADOW);
    let shadowed = || desc(&[("api_key", "K1"), ("kind", "shadowed")]);
    let mut would_deny = 0;
    for _ in 0..5 {
        let answer = call(&limiter, request("llm", vec![shadowed()])).await;
        assert!(answer.ok());
        would_deny += answer.decision.shadow_denials();
    }
    assert_eq!(would_deny, 3);
    let answer = call(&limiter, request("llm", vec![shadowed()])).await;
    assert_eq!(answer.decision.statuses[0].remaining, 0, "only the 2 that fitted were charged");

    let enforced = || desc(&[("api_key", "K1"), ("kind", "enforced")]);
    assert!(call(&limiter, request("llm", vec![shadowed(), enforced()])).await.ok());
    assert!(!call(&limiter, request("llm", vec![shadowed(), enforced()])).await.ok());
}

const PER_MODEL: &str = "
domain: llm
entry_roles: {tier: tier}
tiers:
  - {name: unverified, display_name: Unverified Tier, default: true}
  - {name: trusted, display_name: Trusted Tier}
descriptors:
  - key: api_key
    descriptors:
      - key: model
        value: large
        descriptors:
          - key: meter
            value: requests
            meter: requests
            tier_limits:
              unverified: {unit: minute, requests_per_unit: 5}
              trusted: {unit: minute, requests_per_unit: 20}
      - key: model
        descriptors:
          - key: meter
            value: requests
            meter: requests
            tier_limits:
              unverified: {unit: minute, requests_per_unit: 30}
              trusted: {unit: minute, requests_per_unit: 100}
";

#[tokio::test]
async fn per_model_limits_have_own_buckets() {
    let (limiter, _clock) = limiter(PER_MODEL);
    let model = |key: &str, model: &str, tier: &str| desc(&[("api_key", key), ("tier", tier), ("model", model), ("meter", "requests")]);

    let mut large = Vec::new();
    for _ in 0..6 {
        large.push(call(&limiter, request("llm", vec![model("K1", "large", "unverified")])).await.ok());
    }
    assert_eq!(large, [true, true, true, true, true, false]);

    let small = call(&limiter, request("llm", vec![model("K1", "small", "unverified")])).await;
    assert!(small.ok(), "another model has its own bucket");
    assert_eq!(small.number("x-ratelimit-limit-requests"), 30);
    assert_eq!(small.number("x-ratelimit-remaining-requests"), 29);

    let promoted = call(&limiter, request("llm", vec![model("K1", "large", "trusted")])).await;
    assert!(promoted.ok());
    assert_eq!(promoted.number("x-ratelimit-limit-requests"), 20);
    assert_eq!(promoted.number("x-ratelimit-remaining-requests"), 14, "the model's used amount is kept");

    let other_key = call(&limiter, request("llm", vec![model("K2", "large", "unverified")])).await;
    assert_eq!(other_key.number("x-ratelimit-remaining-requests"), 4, "each key has its own bucket per model");
}

#[tokio::test]
async fn one_bucket_with_two_overrides_reports_one_limit() {
    const MINUTE: i32 = 2;
    let (limiter, _clock) = limiter("domain: llm\n");
    let low = with_override(desc(&[("api_key", "K1")]), 2, MINUTE);
    let high = with_override(desc(&[("api_key", "K1")]), 100, MINUTE);
    let answer = call(&limiter, request("llm", vec![low, high])).await;

    let statuses = &answer.decision.statuses;
    let first = statuses[0].limit.as_ref().expect("limit");
    let second = statuses[1].limit.as_ref().expect("limit");
    assert_eq!(first, second, "both descriptors describe the bucket that was judged");
    for status in statuses {
        assert!(status.remaining <= status.limit.as_ref().expect("limit").params.capacity);
    }
}

/// A rule nested under an entry with the same key and value has a bucket
/// of its own, apart from the outer rule's.
#[tokio::test]
async fn repeated_entry_rule_has_own_bucket() {
    let (limiter, _clock) = limiter(
        "
domain: d
descriptors:
  - key: generic_key
    value: global
    rate_limit: {unit: hour, requests_per_unit: 2}
    descriptors:
      - key: generic_key
        value: global
        rate_limit: {unit: hour, requests_per_unit: 100}
",
    );
    for _ in 0..2 {
        assert!(call(&limiter, request("d", vec![desc(&[("generic_key", "global")])])).await.ok());
    }
    let nested = call(&limiter, request("d", vec![desc(&[("generic_key", "global"), ("generic_key", "global")])])).await;
    assert!(nested.ok());
    assert_eq!(nested.number("x-ratelimit-remaining-requests"), 99);
}
