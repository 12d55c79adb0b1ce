//! The answer builder on arbitrary decisions, including ones the limiter
//! never makes (remaining above capacity, reset times near u64::MAX, odd
//! owner names): it never panics, never answers UNKNOWN, describes the
//! tightest limit of each meter, formats reset times that read back to the
//! same milliseconds, and writes a JSON body exactly for denials.

#![no_main]

use std::sync::Arc;

use fikra_ratelimit::answer;
use fikra_ratelimit::config::{Limit, Meter, Unit};
use fikra_ratelimit::limiter::bucket::BucketParams;
use fikra_ratelimit::limiter::{Decision, Denial, DescriptorStatus, Outcome};
use fikra_ratelimit::rls;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

const UNITS: [Unit; 7] = [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day, Unit::Week, Unit::Month, Unit::Year];

fuzz_target!(|data: &[u8]| {
    let mut input = Unstructured::new(data);
    let Ok(decision) = decision(&mut input) else { return };
    check(&decision);
});

fn limit(input: &mut Unstructured) -> Result<Arc<Limit>> {
    let unit = *input.choose(&UNITS)?;
    let multiplier = input.int_in_range(1..=1000u32)?;
    let per_window = input.int_in_range(0..=1_000_000_000_000u64)?;
    let capacity = if input.arbitrary()? { per_window } else { input.int_in_range(0..=1_000_000_000_000u64)? };
    let window_ms = unit.ms() * u64::from(multiplier);
    let params = BucketParams::new(per_window, window_ms, capacity)
        .unwrap_or(BucketParams { capacity, scale: 1, refill_per_tick: 1, tick_ms: 1_000 });
    Ok(Arc::new(Limit { per_window, unit, multiplier, name: input.arbitrary()?, owner: input.arbitrary()?, params }))
}

fn meter(input: &mut Unstructured) -> Result<Meter> {
    Ok(if input.arbitrary()? { Meter::Requests } else { Meter::Tokens })
}

fn decision(input: &mut Unstructured) -> Result<Decision> {
    let count = input.int_in_range(0..=8usize)?;
    let mut decision = Decision::unknown_domain(count);
    decision.unknown_domain = input.arbitrary()?;
    for status in &mut decision.statuses {
        *status = descriptor_status(input, status.clone())?;
    }
    let denied: bool = input.arbitrary()?;
    decision.outcome = if denied { Outcome::Denied } else { Outcome::Allowed };
    decision.denial = match input.int_in_range(0..=3u8)? {
        0 => None,
        1 => Some(Denial::OverLimit { limit: limit(input)?, meter: meter(input)?, retry_ms: input.arbitrary()? }),
        2 => Some(Denial::TooLarge { limit: limit(input)?, meter: meter(input)?, cost: input.arbitrary()? }),
        _ => Some(Denial::ValueTooLong {
            index: input.arbitrary()?,
            entry: input.arbitrary()?,
            len: input.arbitrary()?,
            max: input.arbitrary()?,
        }),
    };
    Ok(decision)
}

fn descriptor_status(input: &mut Unstructured, mut status: DescriptorStatus) -> Result<DescriptorStatus> {
    status.outcome = if input.arbitrary()? { Outcome::Denied } else { Outcome::Allowed };
    status.limit = if input.arbitrary()? { Some(limit(input)?) } else { None };
    status.meter = meter(input)?;
    status.remaining = input.arbitrary()?;
    status.reset_ms = input.arbitrary()?;
    status.shadow_denied = input.arbitrary()?;
    Ok(status)
}

fn check(decision: &Decision) {
    let built = answer::build(decision);
    let header = |name: &str| built.headers.iter().find(|(key, _)| *key == name).map(|(_, value)| value.as_str());

    for (meter, suffix) in [(Meter::Requests, "requests"), (Meter::Tokens, "tokens")] {
        let tightest = decision.statuses.iter().filter(|s| s.meter == meter && s.limit.is_some()).map(|s| s.remaining).min();
        let remaining = header(&format!("x-ratelimit-remaining-{suffix}"));
        match tightest {
            None => assert!(remaining.is_none(), "{suffix} headers without a {suffix} limit"),
            Some(least) => {
                assert_eq!(remaining, Some(least.to_string().as_str()), "the headers describe the tightest limit");
                let reset = header(&format!("x-ratelimit-reset-{suffix}")).expect("reset header");
                let status = decision.statuses.iter().find(|s| s.meter == meter && s.limit.is_some() && s.remaining == least).expect("found");
                assert_eq!(parse_go_duration(reset), Some(status.reset_ms), "{reset:?} does not read back");
            }
        }
    }

    let denial = decision.denial.as_ref().filter(|_| decision.outcome == Outcome::Denied);
    match denial {
        None => {
            assert!(built.body.is_none(), "no body without a denial");
            assert!(header("content-type").is_none());
        }
        Some(denial) => {
            let body: serde_json::Value = serde_json::from_str(built.body.as_deref().expect("a denial has a body")).expect("the body is JSON");
            assert_eq!(body["error"]["status"], 429);
            assert_eq!(header("content-type"), Some("application/json"));
            match denial {
                Denial::OverLimit { retry_ms, .. } => {
                    let ms = (*retry_ms).max(1);
                    assert_eq!(header("retry-after-ms"), Some(ms.to_string().as_str()));
                    assert_eq!(header("retry-after"), Some(ms.div_ceil(1000).to_string().as_str()));
                }
                _ => assert_eq!(header("x-should-retry"), Some("false")),
            }
        }
    }

    let response = rls::respond(decision);
    let expected_code = if decision.outcome == Outcome::Allowed { 1 } else { 2 };
    assert_eq!(response.overall_code, expected_code, "never UNKNOWN");
    assert_eq!(response.statuses.len(), decision.statuses.len());
    for (sent, status) in response.statuses.iter().zip(&decision.statuses) {
        assert!(sent.code == 1 || sent.code == 2);
        if status.limit.is_some() {
            assert_eq!(u64::from(sent.limit_remaining), status.remaining.min(u64::from(u32::MAX)), "saturates, never wraps");
            let reset = sent.duration_until_reset.as_ref().expect("a limited status has a reset");
            assert!(reset.seconds >= 0, "{reset:?}");
            assert!((0..1_000_000_000).contains(&reset.nanos), "{reset:?}");
        }
    }
}

/// Reads Go's duration format back into milliseconds.
fn parse_go_duration(text: &str) -> Option<u64> {
    if text == "0s" {
        return Some(0);
    }
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse().ok().filter(|ms| *ms < 1000);
    }
    let mut rest = text.strip_suffix('s')?;
    let mut total: u128 = 0;
    if let Some((hours, after)) = rest.split_once('h') {
        total += hours.parse::<u128>().ok()? * 3_600_000;
        rest = after;
    }
    if let Some((minutes, after)) = rest.split_once('m') {
        total += minutes.parse::<u128>().ok()? * 60_000;
        rest = after;
    }
    let (seconds, fraction) = rest.split_once('.').unwrap_or((rest, ""));
    total += seconds.parse::<u128>().ok()? * 1000;
    if !fraction.is_empty() {
        if fraction.len() > 3 || fraction.ends_with('0') {
            return None;
        }
        total += format!("{fraction:0<3}").parse::<u128>().ok()?;
    }
    u64::try_from(total).ok()
}
