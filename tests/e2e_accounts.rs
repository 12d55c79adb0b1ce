//! End to end: a wallet top-up recorded with the real
//! `fikra-ratelimit admin record-top-up` command promotes an API key that is
//! sending requests through a real Envoy 1.40, and its very next request gets
//! the Trusted Tier limits.
//!
//! The service runs as a child process with its admin port on loopback and
//! its buckets and account records in a test `redis-server`. Buckets refill
//! continuously: a trusted key's requests bucket refills one request per
//! 600 ms, so counts read after some time are checked against a range that
//! allows for the refill in the measured elapsed time.

#[path = "support/envoy.rs"]
mod envoy;
#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/service_process.rs"]
mod service_process;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use envoy::{Envoy, EnvoyOptions, HttpResponse, Upstream};
use redis_server::RedisServer;
use serde_json::Value;
use service_process::ServiceProcess;

const PATH: &str = "/v1/chat/completions";

/// A body whose token estimate is 0, so the tokens check only reads the bucket.
const CHECK_ONLY_BODY: &str = r#"{"max_tokens":0}"#;

const ADMIN_TOKEN: &str = "e2e-admin-token-6f1c2a9d";

const UNVERIFIED_REQUESTS: u64 = 30;
const TRUSTED_REQUESTS: u64 = 100;
const TRUSTED_TOKENS: u64 = 160_000;

/// Milliseconds in which a trusted key's requests bucket refills one request.
const TRUSTED_REQUEST_MS: u64 = 60_000 / TRUSTED_REQUESTS;

/// Requests the key sends as an unverified key, before its top-up.
const REQUESTS_BEFORE_TOP_UP: u64 = 12;

#[tokio::test]
async fn top_up_promotes_key_on_next_request() {
    let token_dir = tempfile::Builder::new().prefix("fikra-admin-token-").tempdir().expect("create a token directory");
    let token_file = token_dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).expect("write the admin token file");
    let admin_addr = format!("127.0.0.1:{}", envoy::free_port());
    let token_path = token_file.to_str().expect("a UTF-8 temporary path");

    let redis = tokio::task::spawn_blocking(RedisServer::start).await.expect("start redis-server");
    let redis_url = redis.url();
    let service_args = ["--admin-listen", admin_addr.as_str(), "--token-file", token_path];
    let (upstream, service) =
        tokio::join!(Upstream::start(), ServiceProcess::start_with(&redis_url, &service_args, &[]));
    let envoy = Envoy::start(EnvoyOptions::new(upstream.port(), service.port())).await;
    let key = "e2e-top-up-key";

    // Unverified: a burst of requests, all allowed.
    let started = Instant::now();
    let responses = burst(&envoy, key, REQUESTS_BEFORE_TOP_UP).await;
    for response in &responses {
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(single_u64(response, "x-ratelimit-limit-requests"), UNVERIFIED_REQUESTS);
    }

    // The billing system records the top-up with the shipped command.
    let output = record_top_up(key, &admin_addr, &token_file).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "record-top-up failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    let change: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    assert_eq!(change["changed"], true, "{stdout}");
    assert_eq!(change["before"]["tier"], "unverified", "{stdout}");
    assert_eq!(change["after"]["tier"], "trusted", "{stdout}");

    // The very next request gets the trusted limits, and the promotion keeps
    // what the key used before it.
    let next = send(&envoy, key).await;
    let elapsed_ms = millis(started.elapsed());
    assert_eq!(next.status, 200, "{}", next.text());
    assert_eq!(single_u64(&next, "x-ratelimit-limit-requests"), TRUSTED_REQUESTS);
    assert_eq!(single_u64(&next, "x-ratelimit-limit-tokens"), TRUSTED_TOKENS);
    assert_eq!(single_u64(&next, "x-ratelimit-remaining-tokens"), TRUSTED_TOKENS);
    let used = REQUESTS_BEFORE_TOP_UP + 1;
    let refilled = elapsed_ms / TRUSTED_REQUEST_MS + 1;
    let remaining = single_u64(&next, "x-ratelimit-remaining-requests");
    assert!(
        (TRUSTED_REQUESTS - used..=TRUSTED_REQUESTS - used + refilled).contains(&remaining),
        "remaining requests {remaining} after {used} requests in {elapsed_ms} ms, expected {} plus at most {refilled} refilled",
        TRUSTED_REQUESTS - used
    );

    // Exhausting the trusted bucket ends in the trusted denial.
    let responses = burst(&envoy, key, remaining).await;
    let statuses: Vec<u16> = responses.iter().map(|response| response.status).collect();
    assert!(statuses.iter().all(|status| *status == 200), "statuses {statuses:?}");
    let denied = first_denial(&envoy, key, TRUSTED_REQUESTS).await;
    assert_eq!(denied.status, 429, "{}", denied.text());
    let body: Value = serde_json::from_slice(&denied.body).unwrap_or_else(|error| panic!("{error}: {}", denied.text()));
    assert_eq!(
        body["error"]["message"],
        "You have exceeded your Trusted Tier threshold of 100 requests per minute.",
        "{}",
        denied.text()
    );
    assert_eq!(single_u64(&denied, "x-ratelimit-limit-requests"), TRUSTED_REQUESTS);
    assert_eq!(single_u64(&denied, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(single_u64(&denied, "x-ratelimit-limit-tokens"), TRUSTED_TOKENS);

    // The service logged the change, and no log line contains the API key.
    let log = service.log();
    assert!(log.contains("Audit: account changed"), "no audit line in the service log");
    assert!(!log.contains(key), "the service log contains the API key");
}

#[tokio::test]
async fn top_up_with_wrong_token_fails() {
    let token_dir = tempfile::Builder::new().prefix("fikra-admin-token-").tempdir().expect("create a token directory");
    let token_file = token_dir.path().join("admin.token");
    std::fs::write(&token_file, ADMIN_TOKEN).expect("write the admin token file");
    let wrong_file = token_dir.path().join("wrong.token");
    std::fs::write(&wrong_file, "not-the-admin-token").expect("write the wrong token file");
    let admin_addr = format!("127.0.0.1:{}", envoy::free_port());
    let token_path = token_file.to_str().expect("a UTF-8 temporary path");

    let redis = tokio::task::spawn_blocking(RedisServer::start).await.expect("start redis-server");
    let service_args = ["--admin-listen", admin_addr.as_str(), "--token-file", token_path];
    let service = ServiceProcess::start_with(&redis.url(), &service_args, &[]).await;

    let output = record_top_up("e2e-wrong-token-key", &admin_addr, &wrong_file).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "record-top-up succeeded with a wrong token: {stdout}");
    let error: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    let message = error["error"].as_str().unwrap_or_default();
    assert!(message.contains("Unauthenticated"), "{stdout}");
    assert!(!service.log().contains("Audit: account changed"), "a rejected call changed an account");
}

/// Runs `fikra-ratelimit admin record-top-up --json` for `key` and returns
/// its output.
async fn record_top_up(key: &str, admin_addr: &str, token_file: &Path) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fikra-ratelimit"));
    command
        .args(["admin", "record-top-up", "--json", "--api-key", key, "--admin-addr", admin_addr])
        .arg("--token-file")
        .arg(token_file)
        .env_remove("FIKRA_ADMIN_ADDR")
        .env_remove("FIKRA_ADMIN_TOKEN_FILE")
        .env_remove("FIKRA_API_KEY");
    tokio::task::spawn_blocking(move || command.output().expect("run fikra-ratelimit admin record-top-up"))
        .await
        .expect("wait for fikra-ratelimit admin record-top-up")
}

/// Sends one check-only request with `x-api-key: key`.
async fn send(envoy: &Envoy, key: &str) -> HttpResponse {
    let headers = [("x-api-key", key), ("x-test-usage-tokens", "none"), ("content-type", "application/json")];
    envoy.request("POST", PATH, &headers, CHECK_ONLY_BODY.as_bytes()).await
}

/// Sends `count` check-only requests at once and returns the responses.
async fn burst(envoy: &Envoy, key: &str, count: u64) -> Vec<HttpResponse> {
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..count {
        let port = envoy.port();
        let key = key.to_owned();
        requests.spawn(async move {
            let headers = [("x-api-key", key.as_str()), ("x-test-usage-tokens", "none")];
            envoy::http_request(port, "POST", PATH, &headers, CHECK_ONLY_BODY.as_bytes()).await
        });
    }
    requests.join_all().await
}

/// Sends requests one at a time until one is denied, at most `limit`.
/// Each one allowed is a request the bucket refilled meanwhile.
async fn first_denial(envoy: &Envoy, key: &str, limit: u64) -> HttpResponse {
    for _ in 0..limit {
        let response = send(envoy, key).await;
        if response.status != 200 {
            return response;
        }
    }
    panic!("{limit} more requests allowed and none denied");
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Returns the only value of a response header as an integer, panicking
/// when it is missing, repeated or not an integer.
fn single_u64(response: &HttpResponse, name: &str) -> u64 {
    match response.header_values(name).as_slice() {
        [value] => value.parse().unwrap_or_else(|_| panic!("{name} is {value:?}, expected an integer")),
        values => panic!("expected one {name} header, got {values:?} (status {})", response.status),
    }
}
