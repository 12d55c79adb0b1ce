use std::sync::Arc;

use super::*;
use crate::config::{Limit, Unit};
use crate::limiter::bucket::BucketParams;

fn limit(owner: &str, per_window: u64, unit: Unit, multiplier: u32) -> Arc<Limit> {
    let window_ms = unit.ms() * u64::from(multiplier);
    Arc::new(Limit {
        per_window,
        unit,
        multiplier,
        name: String::new(),
        owner: owner.to_owned(),
        params: BucketParams::new(per_window, window_ms, per_window).expect("exact"),
    })
}

fn status(limit: &Arc<Limit>, meter: Meter, remaining: u64, reset_ms: u64) -> DescriptorStatus {
    DescriptorStatus {
        outcome: Outcome::Allowed,
        limit: Some(limit.clone()),
        meter,
        remaining,
        reset_ms,
        shadow_denied: false,
        facts: Default::default(),
    }
}

#[test]
fn go_duration_matches_go_format() {
    let cases = [
        (0, "0s"),
        (20, "20ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (1050, "1.05s"),
        (60_000, "1m0s"),
        (360_000, "6m0s"),
        (172_800, "2m52.8s"),
        (3_600_000, "1h0m0s"),
        (3_661_001, "1h1m1.001s"),
        (1_100, "1.1s"),
        (59_990, "59.99s"),
        (86_400_000, "24h0m0s"),
        (u64::MAX, "5124095576030h25m51.615s"),
    ];
    for (ms, expected) in cases {
        assert_eq!(go_duration(ms), expected, "{ms} ms");
    }
}

#[test]
fn go_duration_matches_formatted_parts() {
    // The same parts written with format!, for many durations of 1 s or more.
    let reference = |ms: u64| {
        let (hours, minutes, seconds, millis) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
        let mut out = String::new();
        if hours > 0 {
            out += &format!("{hours}h");
        }
        if hours > 0 || minutes > 0 {
            out += &format!("{minutes}m");
        }
        out += &seconds.to_string();
        if millis > 0 {
            out += &format!(".{millis:03}").trim_end_matches('0').to_owned();
        }
        out + "s"
    };
    for ms in (1000..200_000).step_by(7).chain([3_600_000, 7_261_010, 90_061_500]) {
        assert_eq!(go_duration(ms), reference(ms), "{ms} ms");
    }
}

#[test]
fn decimal_matches_to_string() {
    for value in [0, 9, 10, 4_000, 160_000, u64::MAX] {
        assert_eq!(decimal(value), value.to_string());
    }
}

#[test]
fn denial_body_names_tier_limit_and_window() {
    let unverified = limit("Unverified Tier", 30, Unit::Minute, 1);
    let denial = Denial::OverLimit { limit: unverified, meter: Meter::Requests, retry_ms: 2000 };

    assert_eq!(
        body(&denial),
        r#"{"error":{"code":"rate_limit_exceeded","message":"You have exceeded your Unverified Tier threshold of 30 requests per minute.","param":"x-ratelimit-remaining-requests","status":429,"type":"requests"}}"#
    );
}

#[test]
fn window_text_covers_multipliers() {
    let tokens = limit("Trusted Tier", 160_000, Unit::Second, 30);
    let denial = Denial::OverLimit { limit: tokens, meter: Meter::Tokens, retry_ms: 1 };
    let text = body(&denial);

    assert!(text.contains("threshold of 160000 tokens per 30 seconds."), "{text}");
    assert!(text.contains(r#""param":"x-ratelimit-remaining-tokens""#), "{text}");
    assert!(text.contains(r#""type":"tokens""#), "{text}");
}

#[test]
fn allowed_answer_has_six_headers_and_no_content_type() {
    let requests = limit("Unverified Tier", 30, Unit::Minute, 1);
    let tokens = limit("Unverified Tier", 40_000, Unit::Minute, 1);
    let decision = Decision {
        outcome: Outcome::Allowed,
        statuses: vec![status(&requests, Meter::Requests, 29, 2000), status(&tokens, Meter::Tokens, 39_000, 1500)],
        denial: None,
        unknown_domain: false,
        store_elapsed: None,
    };
    let answer = build(&decision);

    let expected = [
        ("x-ratelimit-limit-requests", "30"),
        ("x-ratelimit-remaining-requests", "29"),
        ("x-ratelimit-reset-requests", "2s"),
        ("x-ratelimit-limit-tokens", "40000"),
        ("x-ratelimit-remaining-tokens", "39000"),
        ("x-ratelimit-reset-tokens", "1.5s"),
    ];
    let headers: Vec<(&str, &str)> = answer.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(headers, expected);
    assert_eq!(answer.body, None);
}

#[test]
fn headers_describe_tightest_limit_of_meter() {
    let wide = limit("A", 100, Unit::Minute, 1);
    let narrow = limit("B", 10, Unit::Second, 1);
    let decision = Decision {
        outcome: Outcome::Allowed,
        statuses: vec![status(&wide, Meter::Requests, 90, 6000), status(&narrow, Meter::Requests, 3, 700)],
        denial: None,
        unknown_domain: false,
        store_elapsed: None,
    };
    let answer = build(&decision);

    assert_eq!(answer.headers[0], ("x-ratelimit-limit-requests", "10".to_owned()));
    assert_eq!(answer.headers[1], ("x-ratelimit-remaining-requests", "3".to_owned()));
    assert_eq!(answer.headers[2], ("x-ratelimit-reset-requests", "700ms".to_owned()));
}

#[test]
fn over_limit_adds_retry_after_rounded_up() {
    let requests = limit("Unverified Tier", 30, Unit::Minute, 1);
    let denial = Denial::OverLimit { limit: requests.clone(), meter: Meter::Requests, retry_ms: 1901 };
    let decision = Decision {
        outcome: Outcome::Denied,
        statuses: vec![DescriptorStatus { outcome: Outcome::Denied, ..status(&requests, Meter::Requests, 0, 60_000) }],
        denial: Some(denial),
        unknown_domain: false,
        store_elapsed: None,
    };
    let answer = build(&decision);
    let header = |name: &str| answer.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());

    assert_eq!(header("retry-after"), Some("2"));
    assert_eq!(header("retry-after-ms"), Some("1901"));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(header("x-should-retry"), None);
    assert!(answer.body.is_some());
}

#[test]
fn too_large_says_never_retry() {
    let tokens = limit("Unverified Tier", 40_000, Unit::Minute, 1);
    let denial = Denial::TooLarge { limit: tokens.clone(), meter: Meter::Tokens, cost: 50_000 };
    let decision = Decision {
        outcome: Outcome::Denied,
        statuses: vec![DescriptorStatus { outcome: Outcome::Denied, ..status(&tokens, Meter::Tokens, 40_000, 0) }],
        denial: Some(denial),
        unknown_domain: false,
        store_elapsed: None,
    };
    let answer = build(&decision);
    let header = |name: &str| answer.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());

    assert_eq!(header("x-should-retry"), Some("false"));
    assert_eq!(header("retry-after"), None);
    assert_eq!(header("retry-after-ms"), None);
    let text = answer.body.expect("denial has a body");
    assert!(text.contains("needs 50000 tokens"), "{text}");
    assert!(text.contains("capacity of 40000 tokens"), "{text}");
}
