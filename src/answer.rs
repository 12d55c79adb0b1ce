//! The client's view of a decision: the `x-ratelimit-*` headers, and on a
//! denial `retry-after` and the JSON body Envoy returns with the 429.


use serde::Serialize;

use crate::config::Meter;
use crate::limiter::{Decision, Denial, DescriptorStatus, Outcome};

/// Headers and body for one decision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Answer {
    pub headers: Vec<(&'static str, String)>,
    /// The denial body; `None` on an allowed answer.
    pub body: Option<String>,
}

const METERS: [(Meter, [&str; 3]); 2] = [
    (Meter::Requests, ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"]),
    (Meter::Tokens, ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]),
];

/// Builds the headers and body of `decision`.
pub fn build(decision: &Decision) -> Answer {
    let mut headers = Vec::with_capacity(10);
    for (meter, [limit_name, remaining_name, reset_name]) in METERS {
        // With several limits of one meter, the one with the fewest units left.
        let tightest = decision
            .statuses
            .iter()
            .filter(|status| status.meter == meter && status.limit.is_some())
            .min_by_key(|status| status.remaining);
        if let Some(status @ DescriptorStatus { limit: Some(limit), .. }) = tightest {
            headers.push((limit_name, decimal(limit.params.capacity)));
            headers.push((remaining_name, decimal(status.remaining)));
            headers.push((reset_name, go_duration(status.reset_ms)));
        }
    }

    let Some(denial) = decision.denial.as_ref().filter(|_| decision.outcome == Outcome::Denied) else {
        return Answer { headers, body: None };
    };
    match denial {
        Denial::OverLimit { retry_ms, .. } => {
            let retry_ms = (*retry_ms).max(1);
            headers.push(("retry-after", retry_ms.div_ceil(1000).to_string()));
            headers.push(("retry-after-ms", retry_ms.to_string()));
        }
        Denial::TooLarge { .. } | Denial::ValueTooLong { .. } => headers.push(("x-should-retry", "false".to_owned())),
    }
    headers.push(("content-type", "application/json".to_owned()));
    Answer { headers, body: Some(body(denial)) }
}

#[derive(Serialize)]
struct Body<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
    param: Option<&'a str>,
    status: u16,
    #[serde(rename = "type")]
    kind: &'a str,
}

fn remaining_header(meter: Meter) -> &'static str {
    match meter {
        Meter::Requests => "x-ratelimit-remaining-requests",
        Meter::Tokens => "x-ratelimit-remaining-tokens",
    }
}

/// Builds the JSON body of a denial.
pub fn body(denial: &Denial) -> String {
    let error = match denial {
        Denial::OverLimit { limit, meter, .. } => ErrorBody {
            code: "rate_limit_exceeded",
            message: format!(
                "You have exceeded your {} threshold of {} {} {}.",
                limit.owner,
                limit.per_window,
                meter.as_str(),
                limit.window_text()
            ),
            param: Some(remaining_header(*meter)),
            status: 429,
            kind: meter.as_str(),
        },
        Denial::TooLarge { limit, meter, cost } => ErrorBody {
            code: "rate_limit_exceeded",
            message: format!(
                "This request needs {cost} {meter}, more than the {} capacity of {capacity} {meter}, \
                 so it can never be admitted; lower its cost to at most {capacity} {meter}.",
                limit.owner,
                capacity = limit.params.capacity,
                meter = meter.as_str(),
            ),
            param: Some(remaining_header(*meter)),
            status: 429,
            kind: meter.as_str(),
        },
        Denial::ValueTooLong { index, entry, len, max } => ErrorBody {
            code: "invalid_request",
            message: format!(
                "descriptors[{index}].entries[{entry}].value is {len} bytes, more than the maximum of {max} bytes; send a shorter value."
            ),
            param: None,
            status: 429,
            kind: "invalid_request",
        },
    };
    serde_json::to_string(&Body { error }).unwrap_or_default()
}

/// Formats milliseconds as Go's `time.Duration` prints them: `0s`, `20ms`,
/// `1.5s`, `6m0s`, `1h0m0s`.
pub fn go_duration(ms: u64) -> String {
    let mut out = String::with_capacity(16);
    if ms == 0 {
        out.push_str("0s");
        return out;
    }
    if ms < 1000 {
        push_decimal(&mut out, ms);
        out.push_str("ms");
        return out;
    }
    let hours = ms / 3_600_000;
    let minutes = ms / 60_000 % 60;
    let seconds = ms / 1000 % 60;
    let millis = ms % 1000;

    if hours > 0 {
        push_decimal(&mut out, hours);
        out.push('h');
    }
    if hours > 0 || minutes > 0 {
        push_decimal(&mut out, minutes);
        out.push('m');
    }
    push_decimal(&mut out, seconds);
    if millis > 0 {
        // Three digits without the trailing zeros: 50 ms is `.05`.
        let digits = [millis / 100, millis / 10 % 10, millis % 10];
        let length = if digits[2] > 0 { 3 } else if digits[1] > 0 { 2 } else { 1 };
        out.push('.');
        for digit in &digits[..length] {
            out.push(char::from(b'0' + *digit as u8));
        }
    }
    out.push('s');
    out
}

/// Formats a count in decimal, as a header value.
fn decimal(value: u64) -> String {
    let mut out = String::with_capacity(20);
    push_decimal(&mut out, value);
    out
}

/// Appends `value` in decimal. Every call's headers contain several counts,
/// and this takes fewer instructions than `to_string` and its formatting.
fn push_decimal(out: &mut String, value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for digit in &digits[at..] {
        out.push(char::from(*digit));
    }
}

#[cfg(test)]
mod tests;
