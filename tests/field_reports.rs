//! Faults other rate-limit services shipped, each replayed against the
//! limiter on the in-memory store with a manual clock, so time-dependent
//! cases run in microseconds and give exact counts.

#[path = "support/limiter.rs"]
mod support;

use fikra_ratelimit::limiter::{InvalidRequest, LimiterError, Outcome};
use support::*;

const U_RPM: u64 = 30;

/// C01 part A: two bursts 0.2 s apart across a minute boundary admit 30,
/// not 60, and one more unit arrives 2 s after the first burst.
#[tokio::test]
async fn c01_no_window_boundary_burst() {
    let (limiter, clock) = llm();
    clock.advance_ms(59_900);
    let mut first = 0;
    for _ in 0..30 {
        first += u64::from(call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok());
    }
    clock.advance_ms(50);
    clock.advance_ms(150);
    let mut second = 0;
    for _ in 0..30 {
        second += u64::from(call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok());
    }
    assert_eq!(first, 30);
    assert_eq!(second, 0);

    clock.advance_ms(1_900);
    assert!(call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok(), "one unit refilled after 2.1 s");
    assert!(!call(&limiter, request("llm", vec![rpm("K1", None)])).await.ok());
}

/// C01 part B: a request every 100 ms for 120 s admits 89, 30 in every
/// 60 s span, and the remaining count never snaps back to full.
#[tokio::test]
async fn c01_steady_sender_gets_the_rate() {
    let (limiter, clock) = llm();
    let mut admitted_at = Vec::new();
    for step in 0..1200u64 {
        let answer = call(&limiter, request("llm", vec![rpm("K2", None)])).await;
        if answer.ok() {
            admitted_at.push(step * 100);
        }
        if step > 0 {
            assert!(answer.number("x-ratelimit-remaining-requests") < U_RPM, "remaining went back to full at step {step}");
        }
        clock.advance_ms(100);
    }
    assert!((88..=90).contains(&admitted_at.len()), "admitted {}", admitted_at.len());
    for start in (4_000..=60_000).step_by(100) {
        let in_span = admitted_at.iter().filter(|t| **t >= start && **t < start + 60_000).count();
        assert!((29..=31).contains(&in_span), "span from {start} ms admitted {in_span}");
    }
}

/// C02: denied attempts consume nothing, so a promotion helps at once.
#[tokio::test]
async fn c02_denials_consume_nothing() {
    let (limiter, clock) = llm();
    let mut first = 0;
    for _ in 0..50 {
        first += u64::from(call(&limiter, request("llm", vec![rpm("K1", Some("unverified"))])).await.ok());
        clock.advance_ms(10);
    }
    assert_eq!(first, 30);

    clock.advance_ms(500);
    let mut second = 0;
    for _ in 0..100 {
        second += u64::from(call(&limiter, request("llm", vec![rpm("K1", Some("trusted"))])).await.ok());
        clock.advance_ms(5);
    }
    assert!((70..=71).contains(&second), "second burst admitted {second}");
}

/// C04: per-descriptor costs are charged, and costs naming one bucket are
/// summed before judging.
#[tokio::test]
async fn c04_hits_addend_charged_and_summed() {
    let (limiter, _clock) = llm();
    let first = call(&limiter, request("llm", vec![tpm("K1", 15_000)])).await;
    let second = call(&limiter, request("llm", vec![tpm("K1", 15_000)])).await;
    let third = call(&limiter, request("llm", vec![tpm("K1", 15_000)])).await;
    assert_eq!(first.number("x-ratelimit-remaining-tokens"), 25_000);
    assert_eq!(second.number("x-ratelimit-remaining-tokens"), 10_000);
    assert!(!third.ok());
    assert_eq!(third.number("x-ratelimit-remaining-tokens"), 10_000, "a denial charges nothing");

    let split = call(&limiter, request("llm", vec![tpm("K2", 25_000), tpm("K2", 25_000)])).await;
    assert!(!split.ok(), "50,000 summed is more than 40,000");
    assert_eq!(split.header("x-should-retry"), Some("false"));
    assert_eq!(split.header("retry-after"), None);
    let after = call(&limiter, request("llm", vec![tpm("K2", 0)])).await;
    assert_eq!(after.number("x-ratelimit-remaining-tokens"), 40_000, "no part was charged");
}

/// C05: cost defaults, the per-descriptor override, and the check-only peek.
#[tokio::test]
async fn c05_hits_addend_defaults() {
    let (limiter, _clock) = llm();
    let rpm_plain = || rpm("K1", None);
    let tpm_plain = || desc(&[("api_key", "K1"), ("kind", "tpm")]);

    let one = call(&limiter, request("llm", vec![rpm_plain(), tpm("K1", 400)])).await;
    assert_eq!(one.number("x-ratelimit-remaining-requests"), 29);
    assert_eq!(one.number("x-ratelimit-remaining-tokens"), 39_600);

    let peek = call(&limiter, request("llm", vec![tpm("K1", 0)])).await;
    assert!(peek.ok());
    assert_eq!(peek.number("x-ratelimit-remaining-tokens"), 39_600);

    let mut zero = request("llm", vec![rpm_plain()]);
    zero.hits = 0;
    assert_eq!(call(&limiter, zero).await.number("x-ratelimit-remaining-requests"), 28);

    let mut seven = request("llm", vec![rpm_plain(), tpm_plain()]);
    seven.hits = 7;
    let seven = call(&limiter, seven).await;
    assert_eq!(seven.number("x-ratelimit-remaining-requests"), 21);
    assert_eq!(seven.number("x-ratelimit-remaining-tokens"), 39_593);

    let mut forty = request("llm", vec![rpm_plain()]);
    forty.hits = 40;
    let forty = call(&limiter, forty).await;
    assert!(!forty.ok(), "40 is more than the capacity of 30");
    assert_eq!(forty.header("x-should-retry"), Some("false"));
    assert_eq!(forty.number("x-ratelimit-remaining-requests"), 21);

    let all = call(&limiter, request("llm", vec![with_hits(rpm("K2", None), 30)])).await;
    assert!(all.ok());
    assert_eq!(all.number("x-ratelimit-remaining-requests"), 0);
    let peek = call(&limiter, request("llm", vec![with_hits(rpm("K2", None), 0)])).await;
    assert!(!peek.ok(), "a peek with less than one unit left is denied");
}

const NESTED: &str = "
domain: llm
descriptors:
  - key: A
    descriptors:
      - key: B
        descriptors:
          - key: C
            rate_limit: {unit: minute, requests_per_unit: 1}
";

/// C06: entries of separate descriptors never merge into one match.
#[tokio::test]
async fn c06_descriptors_never_merge() {
    let (limiter, _clock) = limiter(NESTED);
    for _ in 0..3 {
        let split = call(&limiter, request("llm", vec![desc(&[("C", "x")]), desc(&[("A", "y"), ("B", "z")])])).await;
        assert!(split.ok());
        assert!(split.decision.statuses.iter().all(|s| s.limit.is_none()));
    }
    assert_eq!(limiter_bucket_count(&limiter), 0, "no counter was created");

    let whole = || request("llm", vec![desc(&[("A", "y"), ("B", "z"), ("C", "x")])]);
    assert!(call(&limiter, whole()).await.ok());
    assert!(!call(&limiter, whole()).await.ok());
}

fn limiter_bucket_count(limiter: &fikra_ratelimit::limiter::Limiter) -> usize {
    match limiter.store() {
        fikra_ratelimit::store::Store::Memory(store) => store.bucket_count(),
        fikra_ratelimit::store::Store::Redis(_) => unreachable!("memory store"),
    }
}

const ORDERING: &str = "
domain: llm
descriptors:
  - key: remote_address
    value: IP1
    rate_limit: {unlimited: true}
  - key: path
    value: /v2/items
    descriptors:
      - key: remote_address
        rate_limit: {unit: second, requests_per_unit: 5}
  - key: key
    value: value
    rate_limit: {unit: minute, requests_per_unit: 300}
  - key: api_key
    value: VIP
    rate_limit: {unit: minute, requests_per_unit: 1000}
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 10}
";

/// C07: entries match in order, to full depth, exact before key-only.
#[tokio::test]
async fn c07_order_and_depth_matching() {
    let (limiter, _clock) = limiter(ORDERING);
    let nested = || request("llm", vec![desc(&[("path", "/v2/items"), ("remote_address", "IP1")])]);
    let mut oks = Vec::new();
    for _ in 0..6 {
        oks.push(call(&limiter, nested()).await.ok());
    }
    assert_eq!(oks, [true, true, true, true, true, false]);

    for _ in 0..100 {
        let unlimited = call(&limiter, request("llm", vec![desc(&[("remote_address", "IP1")])])).await;
        assert!(unlimited.ok());
        assert!(unlimited.decision.statuses[0].limit.is_none());
    }
    let reversed = call(&limiter, request("llm", vec![desc(&[("remote_address", "IP1"), ("path", "/v2/items")])])).await;
    assert!(reversed.ok());
    assert!(reversed.decision.statuses[0].limit.is_none());
    let deeper = call(&limiter, request("llm", vec![desc(&[("key", "value"), ("subkey", "s")])])).await;
    assert!(deeper.ok());
    assert!(deeper.decision.statuses[0].limit.is_none());

    for _ in 0..11 {
        assert!(call(&limiter, request("llm", vec![desc(&[("api_key", "VIP")])])).await.ok());
    }
    let mut k9 = Vec::new();
    for _ in 0..11 {
        k9.push(call(&limiter, request("llm", vec![desc(&[("api_key", "K9")])])).await.ok());
    }
    assert_eq!(k9.iter().filter(|ok| **ok).count(), 10);
    assert!(!k9[10]);
}

/// C09: an unknown domain is allowed untouched; an empty domain or an empty
/// descriptor list is the gateway's error, naming the field.
#[tokio::test]
async fn c09_unknown_and_empty_domain() {
    let (limiter, _clock) = llm();
    for _ in 0..50 {
        let typo = call(&limiter, request("llm-typo", vec![desc(&[("api_key", "K1")])])).await;
        assert!(typo.ok());
        assert!(typo.decision.unknown_domain);
        assert!(typo.decision.statuses[0].limit.is_none());
    }
    assert_eq!(limiter_bucket_count(&limiter), 0);

    let empty = try_call(&limiter, request("", vec![desc(&[("api_key", "K1")])])).await;
    assert!(matches!(empty, Err(LimiterError::Invalid(InvalidRequest::EmptyDomain))));
    let none = try_call(&limiter, request("llm", vec![])).await;
    let Err(LimiterError::Invalid(error)) = none else { panic!("expected an invalid request") };
    assert!(error.to_string().contains("descriptors"), "{error}");
}

/// C10, scaled down: every distinct value has its own bucket, and an
/// active key's state is never lost.
#[tokio::test]
async fn c10_distinct_values_keep_their_own_state() {
    let (limiter, _clock) = limiter("
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1}
");
    for n in 1..=2_000 {
        let key = format!("K{n}");
        assert!(call(&limiter, request("llm", vec![desc(&[("api_key", &key)])])).await.ok(), "{key}");
    }
    assert!(!call(&limiter, request("llm", vec![desc(&[("api_key", "K1")])])).await.ok());
    assert!(!call(&limiter, request("llm", vec![desc(&[("api_key", "K1777")])])).await.ok());
    assert!(call(&limiter, request("llm", vec![desc(&[("api_key", "K2001")])])).await.ok());
}

/// C11: long values with odd characters count on their own bucket.
#[tokio::test]
async fn c11_odd_long_values() {
    let (limiter, _clock) = llm();
    let mut value = String::from("key with spaces\n\t{}:_ é 日本 🙂 \u{0}");
    while value.len() < 8 * 1024 - 1 {
        value.push('x');
    }
    value.push('a');
    let mut other = value.clone();
    other.pop();
    other.push('b');

    let mut oks = 0;
    for _ in 0..31 {
        oks += u64::from(call(&limiter, request("llm", vec![rpm(&value, None)])).await.ok());
    }
    assert_eq!(oks, 30);
    assert!(call(&limiter, request("llm", vec![rpm(&other, None)])).await.ok());
}

/// C24: reset is the time until full, retry-after the time until this
/// request fits.
#[tokio::test]
async fn c24_reset_and_retry_after() {
    let (limiter, clock) = llm();
    let one = call(&limiter, request("llm", vec![rpm("K1", None)])).await;
    assert_eq!(one.header("x-ratelimit-reset-requests"), Some("2s"));

    for _ in 0..30 {
        call(&limiter, request("llm", vec![rpm("K2", None)])).await;
    }
    clock.advance_ms(100);
    let denied = call(&limiter, request("llm", vec![rpm("K2", None)])).await;
    assert!(!denied.ok());
    assert_eq!(denied.header("retry-after"), Some("2"));
    assert_eq!(denied.header("retry-after-ms"), Some("1900"));
    assert_eq!(denied.header("x-ratelimit-reset-requests"), Some("59.9s"));
    clock.advance_ms(1_950);
    assert!(call(&limiter, request("llm", vec![rpm("K2", None)])).await.ok());

    const DAY: i32 = 4;
    let daily = |hits| request("llm", vec![with_hits(with_override(desc(&[("api_key", "K3")]), 1_000, DAY), hits)]);
    assert!(call(&limiter, daily(1_000)).await.ok());
    let mut oks = 0;
    for _ in 0..50 {
        clock.advance_ms(100);
        oks += u64::from(call(&limiter, daily(1)).await.ok());
    }
    assert_eq!(oks, 0, "5 s refills 0.06 of a unit");
}

/// C27: a report always applies, leaving debt, and the debt shows as 0
/// remaining (never a wrapped number) until refill repays it.
#[tokio::test]
async fn c27_report_after_response_makes_debt() {
    let (limiter, clock) = llm();
    let report = with_hits(desc(&[("api_key", "K1"), ("kind", "tpm"), ("phase", "report")]), 45_000);

    assert!(call(&limiter, request("llm", vec![tpm("K1", 0)])).await.ok());
    call(&limiter, request("llm", vec![report])).await;

    clock.advance_ms(1_000);
    let in_debt = call(&limiter, request("llm", vec![tpm("K1", 0)])).await;
    assert!(!in_debt.ok());
    assert_eq!(in_debt.number("x-ratelimit-remaining-tokens"), 0);
    assert_eq!(in_debt.decision.statuses[0].remaining, 0);

    clock.advance_ms(7_000);
    let repaid = call(&limiter, request("llm", vec![tpm("K1", 0)])).await;
    assert!(repaid.ok());
    assert_eq!(repaid.number("x-ratelimit-remaining-tokens"), 333);
}

/// C28: degenerate limits neither crash nor stop limiting.
#[tokio::test]
async fn c28_degenerate_parameters() {
    const SECOND: i32 = 1;
    const MINUTE: i32 = 2;
    const DAY: i32 = 4;
    let (limiter, clock) = limiter("domain: llm\n");
    let with = |key: &str, limit: u32, unit: i32| request("llm", vec![with_override(desc(&[("api_key", key)]), limit, unit)]);

    for _ in 0..10 {
        let zero = call(&limiter, with("zero", 0, MINUTE)).await;
        assert_eq!(zero.decision.outcome, Outcome::Denied);
    }

    let mut oks = 0u64;
    for ms in 0..1_000 {
        for _ in 0..20 {
            oks += u64::from(call(&limiter, with("fast", 6_000, SECOND)).await.ok());
        }
        if ms < 999 {
            clock.advance_ms(1);
        }
    }
    let expected = 6_000 + 6 * 999;
    assert!(oks.abs_diff(expected) <= expected / 100, "admitted {oks}, expected about {expected}");

    let mut daily = 0;
    for _ in 0..12 {
        daily += u64::from(call(&limiter, with("daily", 1, DAY)).await.ok());
        clock.advance_ms(10_000);
    }
    assert_eq!(daily, 1);

    for _ in 0..1_000 {
        assert!(call(&limiter, with("max", u32::MAX, SECOND)).await.ok());
    }
}

/// C28: a unit left unset or a negative limit is refused at load, naming
/// the file and the key.
#[test]
fn c28_degenerate_config_refused() {
    let unset = fikra_ratelimit::config::parse(
        "domain: llm\ndescriptors:\n  - key: api_key\n    rate_limit: {requests_per_unit: 5}\n",
        "unset.yaml",
    )
    .expect_err("unit is required");
    assert_eq!(unset[0].file, "unset.yaml");
    assert_eq!(unset[0].path, "descriptors[0].rate_limit.unit");

    let negative = fikra_ratelimit::config::parse(
        "domain: llm\ndescriptors:\n  - key: api_key\n    rate_limit: {unit: minute, requests_per_unit: -5}\n",
        "negative.yaml",
    )
    .expect_err("negative limit");
    assert_eq!(negative[0].path, "descriptors[0].rate_limit.requests_per_unit");
    assert!(negative[0].message.contains("-5"), "{}", negative[0].message);
}
