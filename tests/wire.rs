//! The answer bytes written straight from a decision equal prost's encoding
//! of the built `RateLimitResponse`, over decisions of every shape.

#[path = "support/limiter.rs"]
mod support;

use fikra_ratelimit::limiter::{Decision, LimitOverride};
use fikra_ratelimit::{answer, rls};
use prost::Message;
use support::*;

fn assert_same_bytes(decision: &Decision, case: &str) {
    assert_eq!(decision.shadow_denials(), 0, "{case}: shadowed decisions take the prost path");
    let answer = answer::build(decision);
    let mut written = Vec::new();
    rls::wire::encode(decision, &answer, &mut written);
    let expected = rls::respond(decision).encode_to_vec();
    assert_eq!(written, expected, "{case}");
    assert_eq!(rls::wire::encoded_len(decision, &answer), expected.len(), "{case}");
}

#[tokio::test]
async fn written_answers_equal_prost_encoding() {
    let (limiter, clock) = llm();
    let mut cases = 0;
    let mut denials = 0;
    for round in 0..40u64 {
        let key = format!("K{}", round % 3);
        let descriptors = vec![rpm(&key, None), tpm(&key, round * 997)];
        let decision = limiter.decide(&request("llm", descriptors)).await.expect("decision");
        assert_same_bytes(&decision, &format!("round {round}"));
        let alone = limiter.decide(&request("llm", vec![tpm(&key, 50_000)])).await.expect("decision");
        assert_same_bytes(&alone, &format!("over the tokens, round {round}"));
        denials += usize::from(answer::build(&alone).body.is_some());
        cases += 2;
        clock.advance_ms(round * 137);
    }
    let unknown = limiter.decide(&request("nowhere", vec![rpm("K", None)])).await.expect("decision");
    assert_same_bytes(&unknown, "unknown domain");
    let unmatched = limiter.decide(&request("llm", vec![desc(&[("other", "x")])])).await.expect("decision");
    assert_same_bytes(&unmatched, "no rule");
    let mut multiplied = 0;
    for (unit, multiplier, per_unit) in [(1, None, 5), (2, Some(3), 100), (3, Some(1), u32::MAX), (4, Some(7), 1)] {
        let mut descriptor = desc(&[("api_key", "override"), ("kind", "other")]);
        descriptor.limit = Some(LimitOverride { requests_per_unit: per_unit, unit, multiplier });
        for _ in 0..3 {
            let decision = limiter.decide(&request("llm", vec![descriptor.clone()])).await.expect("decision");
            assert_same_bytes(&decision, &format!("override {per_unit} per unit {unit} x{multiplier:?}"));
            let applied = decision.statuses[0].limit.as_ref().map(|limit| limit.multiplier);
            multiplied += usize::from(applied.is_some_and(|value| value > 1));
        }
    }
    assert!(cases > 0);
    assert!(denials > 0, "some answers carry the 429 body");
    assert!(multiplied > 0, "some limits carry a unit multiplier");
}
