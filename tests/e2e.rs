//! End to end: a client talks HTTP to a real Envoy 1.40, which calls the real
//! `fikra-ratelimit` binary (buckets in a real `redis-server`) before it
//! forwards to the stand-in LLM API, and reports the tokens used after the
//! response.
//!
//! Every test starts its own Redis, service, upstream and Envoy on loopback,
//! so tests share no state. Buckets refill continuously, so every count a
//! test reads after some time has passed is checked against a range that
//! allows for the refill in the measured elapsed time:
//! - unverified requests: 30 per minute, one unit per 2 s;
//! - trusted requests: 100 per minute, one unit per 600 ms;
//! - unverified tokens: 40,000 per minute, 2 tokens per 3 ms.
//!
//! The gateway estimates a request's tokens as ceil(prompt characters / 4) +
//! max_tokens. These tests send no prompt, so `{"max_tokens":N}` has the
//! estimate N, and `{"max_tokens":0}` has the estimate 0, which the gateway
//! sends as a tokens cost of 0: a check-only read of the tokens bucket.

#[path = "support/envoy.rs"]
mod envoy;
#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/service_process.rs"]
mod service_process;

use std::time::{Duration, Instant};

use envoy::{Envoy, EnvoyOptions, HttpResponse, Upstream};
use fikra_ratelimit::limiter::keys;
use redis_server::RedisServer;
use serde_json::Value;
use service_process::ServiceProcess;

const PATH: &str = "/v1/chat/completions";

/// A body whose token estimate is 0, so the tokens check only reads the bucket.
const CHECK_ONLY_BODY: &str = r#"{"max_tokens":0}"#;

/// Rate-limit calls Envoy completed: checks before forwarding and reports
/// after the response.
const RATE_LIMIT_CALLS: &str = "cluster.fikra_ratelimit.upstream_rq_completed";

/// Maximum wait for the report call after a response.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

const UNVERIFIED_REQUESTS: u64 = 30;
const UNVERIFIED_TOKENS: u64 = 40_000;
const TRUSTED_REQUESTS: u64 = 100;
const TRUSTED_TOKENS: u64 = 160_000;

/// Milliseconds in which an unverified key's requests bucket refills one request.
const UNVERIFIED_REQUEST_MS: u64 = 60_000 / UNVERIFIED_REQUESTS;
/// Milliseconds in which a trusted key's requests bucket refills one request.
const TRUSTED_REQUEST_MS: u64 = 60_000 / TRUSTED_REQUESTS;
/// An upper bound on the tokens an unverified key's bucket refills per second
/// (the exact rate is 666.7).
const UNVERIFIED_TOKENS_PER_SECOND: u64 = 700;

const RATE_LIMIT_HEADERS: [&str; 6] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

// === Request limits ===

#[tokio::test]
async fn unverified_key_gets_30_requests() {
    let gateway = Gateway::start().await;
    let key = "e2e-unverified-burst";

    let started = Instant::now();
    let (allowed, denied) = gateway.exhaust_requests(key, UNVERIFIED_REQUESTS).await;
    let elapsed_ms = millis(started.elapsed());

    // Exactly 30, unless the burst took long enough for the bucket to refill.
    let refilled = elapsed_ms / UNVERIFIED_REQUEST_MS;
    assert!(
        (UNVERIFIED_REQUESTS..=UNVERIFIED_REQUESTS + refilled).contains(&allowed),
        "{allowed} requests allowed in {elapsed_ms} ms, expected 30 plus at most {refilled} refilled"
    );

    assert_eq!(denied.status, 429, "{}", denied.text());
    assert_eq!(
        denied.text(),
        r#"{"error":{"code":"rate_limit_exceeded","message":"You have exceeded your Unverified Tier threshold of 30 requests per minute.","param":"x-ratelimit-remaining-requests","status":429,"type":"requests"}}"#
    );
    assert_eq!(denied.header_values("content-type"), ["application/json"]);
    assert_eq!(single_u64(&denied, "x-ratelimit-limit-requests"), UNVERIFIED_REQUESTS);
    assert_eq!(single_u64(&denied, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(single_u64(&denied, "x-ratelimit-limit-tokens"), UNVERIFIED_TOKENS);
    // Every request read the tokens bucket without charging it.
    assert_eq!(single_u64(&denied, "x-ratelimit-remaining-tokens"), UNVERIFIED_TOKENS);
    assert_eq!(single(&denied, "x-ratelimit-reset-tokens"), "0s");

    // The bucket is short of less than one request, so the wait is at most 2 s.
    // Without a refill during the burst it is 2 s minus the time since the
    // first request.
    let retry_ms = single_u64(&denied, "retry-after-ms");
    assert!((1..=UNVERIFIED_REQUEST_MS).contains(&retry_ms), "retry-after-ms {retry_ms}");
    if allowed == UNVERIFIED_REQUESTS {
        assert!(
            retry_ms >= UNVERIFIED_REQUEST_MS.saturating_sub(elapsed_ms),
            "retry-after-ms {retry_ms} after a burst of {elapsed_ms} ms"
        );
    }
    assert_eq!(single_u64(&denied, "retry-after"), retry_ms.div_ceil(1000));
    if elapsed_ms < 1000 {
        assert_eq!(single_u64(&denied, "retry-after"), 2);
    }

    // The bucket is full again once the 29 whole requests and the part of
    // the 30th that the retry wait covers have refilled.
    let reset = parse_go_duration(single(&denied, "x-ratelimit-reset-requests"));
    assert_eq!(reset, Duration::from_millis(retry_ms + (UNVERIFIED_REQUESTS - 1) * UNVERIFIED_REQUEST_MS));
    assert!(reset > Duration::from_secs(58), "x-ratelimit-reset-requests {reset:?}");
    assert!(reset <= Duration::from_secs(60), "x-ratelimit-reset-requests {reset:?}");
}

#[tokio::test]
async fn trusted_key_gets_100_requests() {
    let gateway = Gateway::start().await;
    let key = "trusted-e2e-burst";

    let started = Instant::now();
    let (allowed, denied) = gateway.exhaust_requests(key, TRUSTED_REQUESTS).await;
    let elapsed_ms = millis(started.elapsed());

    let refilled = elapsed_ms / TRUSTED_REQUEST_MS;
    assert!(
        (TRUSTED_REQUESTS..=TRUSTED_REQUESTS + refilled).contains(&allowed),
        "{allowed} requests allowed in {elapsed_ms} ms, expected 100 plus at most {refilled} refilled"
    );

    assert_eq!(denied.status, 429, "{}", denied.text());
    let error = error_body(&denied);
    assert_eq!(
        error["message"],
        "You have exceeded your Trusted Tier threshold of 100 requests per minute."
    );
    assert_eq!(error["param"], "x-ratelimit-remaining-requests");
    assert_eq!(error["type"], "requests");
    assert_eq!(single_u64(&denied, "x-ratelimit-limit-requests"), TRUSTED_REQUESTS);
    assert_eq!(single_u64(&denied, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(single_u64(&denied, "x-ratelimit-limit-tokens"), TRUSTED_TOKENS);
    assert_eq!(single_u64(&denied, "x-ratelimit-remaining-tokens"), TRUSTED_TOKENS);

    let retry_ms = single_u64(&denied, "retry-after-ms");
    assert!((1..=TRUSTED_REQUEST_MS).contains(&retry_ms), "retry-after-ms {retry_ms}");
    assert_eq!(single_u64(&denied, "retry-after"), 1);
    let reset = parse_go_duration(single(&denied, "x-ratelimit-reset-requests"));
    assert_eq!(reset, Duration::from_millis(retry_ms + (TRUSTED_REQUESTS - 1) * TRUSTED_REQUEST_MS));
}

#[tokio::test]
async fn missing_api_key_never_reaches_upstream() {
    let gateway = Gateway::start().await;
    let served_before = gateway.upstream.served_count().await;

    let response = gateway.envoy.request("POST", PATH, &[], CHECK_ONLY_BODY.as_bytes()).await;

    assert_eq!(response.status, 401, "{}", response.text());
    assert_eq!(error_body(&response)["code"], "missing_api_key");
    assert_eq!(gateway.upstream.served_count().await, served_before, "the request reached the upstream");
    assert_eq!(
        gateway.envoy.stat(RATE_LIMIT_CALLS).await.unwrap_or(0),
        0,
        "the request reached the rate-limit service"
    );
}

// === Token usage and settlement ===

#[tokio::test]
async fn reported_tokens_lower_remaining_tokens() {
    let gateway = Gateway::start().await;
    let key = "e2e-token-usage";

    // Check-only requests charge no estimate, so each report charges its usage in full.
    // The clock starts before the first request, so it has run at least as long as
    // the refill since the first report.
    let started = Instant::now();
    let first = gateway.send_and_wait_for_report(key, CHECK_ONLY_BODY, "5000").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(single_u64(&first, "x-ratelimit-remaining-tokens"), UNVERIFIED_TOKENS);
    assert_eq!(single(&first, "x-ratelimit-reset-tokens"), "0s");

    let second = gateway.send_and_wait_for_report(key, CHECK_ONLY_BODY, "40000").await;
    assert_eq!(second.status, 200, "{}", second.text());
    let remaining = single_u64(&second, "x-ratelimit-remaining-tokens");
    let refill = refill_allowance(started);
    assert!(
        (35_000..=35_000 + refill).contains(&remaining),
        "remaining tokens {remaining} after a report of 5000, expected 35000 plus at most {refill} refilled"
    );

    // 45,000 tokens used: the bucket is 5,000 in debt, so even a check-only
    // request is denied.
    let denied = gateway.send(key, CHECK_ONLY_BODY, "none").await;
    let elapsed_ms = millis(started.elapsed());
    assert_eq!(denied.status, 429, "{}", denied.text());
    assert_eq!(
        denied.text(),
        r#"{"error":{"code":"rate_limit_exceeded","message":"You have exceeded your Unverified Tier threshold of 40000 tokens per minute.","param":"x-ratelimit-remaining-tokens","status":429,"type":"tokens"}}"#
    );
    assert_eq!(denied.header_values("content-type"), ["application/json"]);
    assert_eq!(single_u64(&denied, "x-ratelimit-limit-tokens"), UNVERIFIED_TOKENS);
    assert_eq!(single_u64(&denied, "x-ratelimit-remaining-tokens"), 0);

    // One whole token is available once the debt and one more token have
    // refilled: 5,001 tokens at 2 tokens per 3 ms is 7,501.5 ms, less what has
    // refilled since the first report.
    let retry_ms = single_u64(&denied, "retry-after-ms");
    assert!(
        (7_501_u64.saturating_sub(elapsed_ms)..=7_502).contains(&retry_ms),
        "retry-after-ms {retry_ms}, {elapsed_ms} ms after the first report"
    );
    assert_eq!(single_u64(&denied, "retry-after"), retry_ms.div_ceil(1000));
    // Full again after 45,000 tokens have refilled: 67.5 s.
    let reset = parse_go_duration(single(&denied, "x-ratelimit-reset-tokens"));
    let reset_ms = millis(reset);
    assert!(
        (67_500_u64.saturating_sub(elapsed_ms)..=67_500).contains(&reset_ms),
        "x-ratelimit-reset-tokens {reset:?}, {elapsed_ms} ms after the first report"
    );

    // The denial took nothing from the requests bucket: two requests were charged.
    let remaining_requests = single_u64(&denied, "x-ratelimit-remaining-requests");
    let refilled = elapsed_ms / UNVERIFIED_REQUEST_MS + 1;
    assert!(
        (28..=28 + refilled).contains(&remaining_requests),
        "remaining requests {remaining_requests}"
    );
}

/// A response that used 300 of an estimated 1,000 tokens gets 700 refunded.
/// The remaining tokens are read by a following check-only request (token
/// estimate 0), which charges nothing.
#[tokio::test]
async fn settlement_refunds_unused_estimate() {
    let gateway = Gateway::start().await;

    let remaining = gateway.settle_and_read("e2e-settle-300", 1000, 300).await;

    assert!(
        (39_700..=39_700 + remaining.refill).contains(&remaining.after),
        "remaining tokens {} after using 300 of an estimate of 1000, expected 39700 plus at most {} refilled",
        remaining.after,
        remaining.refill
    );
}

/// A response that used 3,000 of an estimated 1,000 tokens is charged 2,000
/// more. The remaining tokens are read as in `settlement_refunds_unused_estimate`.
#[tokio::test]
async fn settlement_charges_usage_over_estimate() {
    let gateway = Gateway::start().await;

    let remaining = gateway.settle_and_read("e2e-settle-3000", 1000, 3000).await;

    assert!(
        (37_000..=37_000 + remaining.refill).contains(&remaining.after),
        "remaining tokens {} after using 3000 of an estimate of 1000, expected 37000 plus at most {} refilled",
        remaining.after,
        remaining.refill
    );
}

#[tokio::test]
async fn denied_check_charges_and_remembers_nothing() {
    let gateway = Gateway::start().await;
    let key = "e2e-denied-check";

    let responses = gateway.burst(key, UNVERIFIED_REQUESTS).await;
    assert!(responses.iter().all(|response| response.status == 200), "statuses {:?}", statuses(&responses));
    let served_before = gateway.upstream.served_count().await;
    let calls_before = gateway.envoy.stat(RATE_LIMIT_CALLS).await.unwrap_or(0);

    // The tokens check of this request fits, but the requests check does not,
    // so nothing is charged. The upstream would report 5,000 tokens, but the
    // request never reaches it.
    let denied = gateway.send(key, &estimate_body(5000), "5000").await;

    assert_eq!(denied.status, 429, "{}", denied.text());
    assert_eq!(error_body(&denied)["param"], "x-ratelimit-remaining-requests");
    assert_eq!(single_u64(&denied, "x-ratelimit-remaining-tokens"), UNVERIFIED_TOKENS);
    assert_eq!(gateway.upstream.served_count().await, served_before, "a denied request reached the upstream");

    // Envoy drops the report descriptor after a local reply, whose response
    // has no usage header, so it sends no report call.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gateway.envoy.stat(RATE_LIMIT_CALLS).await.unwrap_or(0), calls_before + 1);

    // A check-only read, allowed or denied, shows the tokens bucket still full.
    let after = gateway.send(key, CHECK_ONLY_BODY, "none").await;
    assert_eq!(single_u64(&after, "x-ratelimit-remaining-tokens"), UNVERIFIED_TOKENS, "{}", after.text());

    // A full bucket is not stored, and a denied check stores no estimate for
    // its request id. All keys of one API key share its hash tag.
    let tokens_bucket = keys::bucket_key("fikra", &[("api_key", key), ("meter", "tokens")], true);
    let (hash, field) = keys::redis_location(&tokens_bucket);
    assert_eq!(gateway.redis.cli(&["HEXISTS", hash, field]), "0", "the tokens bucket was written");
    let tag_end = tokens_bucket.find("}:").expect("bucket keys carry a hash tag") + 1;
    let estimate_pattern = format!("{}:e:*", &tokens_bucket[..tag_end]);
    assert_eq!(gateway.redis.keys(&estimate_pattern), Vec::<String>::new(), "estimate records were stored");
}

// === Allowed responses ===

#[tokio::test]
async fn allowed_response_carries_headers_once() {
    let gateway = Gateway::start().await;

    let response = gateway.send("e2e-allowed-headers", &estimate_body(100), "100").await;

    assert_eq!(response.status, 200, "{}", response.text());
    for name in RATE_LIMIT_HEADERS {
        assert_eq!(response.header_values(name).len(), 1, "{name}: {:?}", response.header_values(name));
    }
    // A new bucket charged at once: 1 request refills in 2 s, 100 tokens in 150 ms.
    assert_eq!(single_u64(&response, "x-ratelimit-limit-requests"), UNVERIFIED_REQUESTS);
    assert_eq!(single_u64(&response, "x-ratelimit-remaining-requests"), UNVERIFIED_REQUESTS - 1);
    assert_eq!(single(&response, "x-ratelimit-reset-requests"), "2s");
    assert_eq!(single_u64(&response, "x-ratelimit-limit-tokens"), UNVERIFIED_TOKENS);
    assert_eq!(single_u64(&response, "x-ratelimit-remaining-tokens"), UNVERIFIED_TOKENS - 100);
    assert_eq!(single(&response, "x-ratelimit-reset-tokens"), "150ms");

    // Envoy appends the service's headers to the upstream's, so the service
    // must not send its own content-type when it allows a request.
    assert_eq!(response.header_values("content-type"), ["application/json"]);
    assert_eq!(response.header_values("x-fikra-usage-tokens"), ["100"]);
    for name in ["retry-after", "retry-after-ms", "x-envoy-ratelimited", "x-should-retry"] {
        assert_eq!(response.header(name), None, "{name} on an allowed response");
    }
    let completion: Value = serde_json::from_slice(&response.body).expect("the upstream's body is JSON");
    assert_eq!(completion["object"], "chat.completion");
}

// === Helpers ===

/// Redis, the service, the stand-in upstream and Envoy, all on loopback.
/// Fields drop in order, so Envoy stops first and Redis last.
struct Gateway {
    envoy: Envoy,
    upstream: Upstream,
    /// Runs until the gateway is dropped. Tests reach it only through Envoy.
    _service: ServiceProcess,
    redis: RedisServer,
}

/// Remaining tokens read after a settlement.
struct SettledTokens {
    /// `x-ratelimit-remaining-tokens` of the check-only request after the report.
    after: u64,
    /// The maximum tokens the bucket can have refilled since it was charged.
    refill: u64,
}

impl Gateway {
    async fn start() -> Gateway {
        let redis = tokio::task::spawn_blocking(RedisServer::start).await.expect("start redis-server");
        let redis_url = redis.url();
        let (upstream, service) = tokio::join!(Upstream::start(), ServiceProcess::start(&redis_url));
        let envoy = Envoy::start(EnvoyOptions::new(upstream.port(), service.port())).await;
        Gateway { envoy, upstream, _service: service, redis }
    }

    /// Sends one request with `x-api-key: key`, telling the upstream to report
    /// `usage` tokens ("none" sends no usage header, so Envoy makes no report).
    async fn send(&self, key: &str, body: &str, usage: &str) -> HttpResponse {
        let headers = [("x-api-key", key), ("x-test-usage-tokens", usage), ("content-type", "application/json")];
        self.envoy.request("POST", PATH, &headers, body.as_bytes()).await
    }

    /// Sends one request to which the upstream responds with `usage` tokens, and
    /// waits until Envoy has made both the check call and the report call.
    async fn send_and_wait_for_report(&self, key: &str, body: &str, usage: &str) -> HttpResponse {
        let calls = self.envoy.stat(RATE_LIMIT_CALLS).await.unwrap_or(0);
        let response = self.send(key, body, usage).await;
        assert_eq!(response.status, 200, "{}", response.text());
        self.envoy.wait_for_stat(RATE_LIMIT_CALLS, calls + 2, REPORT_TIMEOUT).await;
        response
    }

    /// Sends `count` check-only requests at once and returns the responses.
    async fn burst(&self, key: &str, count: u64) -> Vec<HttpResponse> {
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..count {
            let port = self.envoy.port();
            let key = key.to_owned();
            requests.spawn(async move {
                let headers = [("x-api-key", key.as_str()), ("x-test-usage-tokens", "none")];
                envoy::http_request(port, "POST", PATH, &headers, CHECK_ONLY_BODY.as_bytes()).await
            });
        }
        requests.join_all().await
    }

    /// Sends a burst of `capacity` check-only requests, then one at a time
    /// until one is denied. Returns the number allowed and the denial.
    async fn exhaust_requests(&self, key: &str, capacity: u64) -> (u64, HttpResponse) {
        let responses = self.burst(key, capacity).await;
        assert!(responses.iter().all(|response| response.status == 200), "statuses {:?}", statuses(&responses));

        let mut allowed = capacity;
        // Each extra allowed request is one the bucket refilled meanwhile.
        for _ in 0..capacity {
            let response = self.send(key, CHECK_ONLY_BODY, "none").await;
            if response.status != 200 {
                return (allowed, response);
            }
            allowed += 1;
        }
        panic!("{allowed} requests allowed and none denied");
    }

    /// Sends a request with a token estimate whose response used `used` tokens,
    /// waits for its report, and reads the remaining tokens with a check-only
    /// request.
    async fn settle_and_read(&self, key: &str, estimate: u64, used: u64) -> SettledTokens {
        let started = Instant::now();
        let charged = self.send_and_wait_for_report(key, &estimate_body(estimate), &used.to_string()).await;

        assert_eq!(forwarded_header(&charged, "x-fikra-token-estimate"), estimate.to_string());
        // A new bucket charged at once shows exactly the capacity minus the estimate.
        assert_eq!(single_u64(&charged, "x-ratelimit-remaining-tokens"), UNVERIFIED_TOKENS - estimate);

        let read = self.send(key, CHECK_ONLY_BODY, "none").await;
        assert_eq!(read.status, 200, "{}", read.text());
        assert_eq!(forwarded_header(&read, "x-fikra-token-estimate"), "0");
        SettledTokens { after: single_u64(&read, "x-ratelimit-remaining-tokens"), refill: refill_allowance(started) }
    }
}

/// Returns a request body whose token estimate is `tokens`.
fn estimate_body(tokens: u64) -> String {
    format!(r#"{{"max_tokens":{tokens}}}"#)
}

/// Returns the maximum tokens an unverified key's bucket can refill in the
/// time since `since`.
fn refill_allowance(since: Instant) -> u64 {
    millis(since.elapsed()) * UNVERIFIED_TOKENS_PER_SECOND / 1000 + 1
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn statuses(responses: &[HttpResponse]) -> Vec<u16> {
    responses.iter().map(|response| response.status).collect()
}

/// Returns the only value of a response header, panicking when it is missing
/// or repeated.
fn single<'a>(response: &'a HttpResponse, name: &str) -> &'a str {
    match response.header_values(name).as_slice() {
        [value] => value,
        values => panic!("expected one {name} header, got {values:?} (status {})", response.status),
    }
}

/// Returns the only value of a response header as an integer.
fn single_u64(response: &HttpResponse, name: &str) -> u64 {
    let value = single(response, name);
    value.parse().unwrap_or_else(|_| panic!("{name} is {value:?}, expected an integer"))
}

/// Returns the `error` object of a JSON error body.
fn error_body(response: &HttpResponse) -> Value {
    let body: Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|error| panic!("the body is not JSON ({error}): {}", response.text()));
    body["error"].clone()
}

/// Returns the one value of a request header that reached the upstream, from
/// the upstream's echo in the response body.
fn forwarded_header(response: &HttpResponse, name: &str) -> String {
    let completion: Value = serde_json::from_slice(&response.body).expect("the upstream's body is JSON");
    match completion["received"]["headers"][name].as_array().map(Vec::as_slice) {
        Some([Value::String(value)]) => value.clone(),
        other => panic!("expected one {name} header at the upstream, got {other:?}"),
    }
}

/// Parses a duration in Go's format, such as `0s`, `150ms`, `1.5s`, `59.9s`,
/// `1m7.5s` or `1h0m0s`, to the millisecond.
fn parse_go_duration(text: &str) -> Duration {
    let invalid = || -> ! { panic!("{text:?} is not a Go duration") };
    let mut rest = text;
    let mut total_ms = 0.0_f64;
    if rest.is_empty() {
        invalid();
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or_else(|| invalid());
        let number: f64 = rest[..number_len].parse().unwrap_or_else(|_| invalid());
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit_ms = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            _ => invalid(),
        };
        rest = &rest[unit_len..];
        total_ms += number * unit_ms;
    }
    Duration::from_millis(total_ms.round() as u64)
}

#[test]
fn go_durations_parse() {
    let cases = [
        ("0s", 0),
        ("150ms", 150),
        ("2s", 2000),
        ("1.5s", 1500),
        ("59.999s", 59_999),
        ("1m7.5s", 67_500),
        ("2m52.8s", 172_800),
        ("1h0m0s", 3_600_000),
    ];
    for (text, ms) in cases {
        assert_eq!(parse_go_duration(text), Duration::from_millis(ms), "{text}");
    }
}
