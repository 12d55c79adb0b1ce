//! Metrics and probes of the real server, in-process on loopback ports:
//! after a scripted sequence of calls the scraped values equal what was
//! sent, and no metric or log line carries an API key.

#[path = "support/ops.rs"]
mod ops;
#[path = "support/redis.rs"]
mod redis;
#[path = "support/service.rs"]
mod service;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::store::memory::MemoryBounds;
use fikra_ratelimit::store::{MemoryStore, RedisStore, Store};
use ops::{Binary, ConfigMapDir, InProcess, get, sample, value};
use redis::RedisServer;
use service::{descriptor, limits, rls_request};
use tonic::transport::Channel;

const FIKRA: &str = include_str!("../deploy/config/fikra.yaml");

/// API keys that must never show up in a metric or a log line.
const SECRET_KEYS: [&str; 4] = ["sk-live-SECRET-4242", "sk-live-SECRET-5151", "sk-live-SECRET-6363", "sk-live-SECRET-7070"];

/// Returns every log line of this test binary, at debug level.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || Capture(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("install the log capture");
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn memory() -> Store {
    Store::Memory(MemoryStore::new(Clock::monotonic()))
}

async fn call(client: &mut RateLimitServiceClient<Channel>, request: RateLimitRequest) -> Code {
    let answer = client.should_rate_limit(request).await.expect("an answer").into_inner();
    Code::try_from(answer.overall_code).expect("a known code")
}

fn requests(key: &str) -> RateLimitRequest {
    rls_request("fikra", vec![descriptor(&[("api_key", key), ("meter", "requests")], None)])
}

fn tokens_check(key: &str, request_id: &str, estimate: u64) -> RateLimitRequest {
    rls_request("fikra", vec![descriptor(&[("api_key", key), ("meter", "tokens"), ("request_id", request_id)], Some(estimate))])
}

fn report(key: &str, request_id: Option<&str>, used: Option<u64>) -> RateLimitRequest {
    let mut entries = vec![("api_key", key), ("meter", "tokens"), ("phase", "report")];
    if let Some(id) = request_id {
        entries.push(("request_id", id));
    }
    rls_request("fikra", vec![descriptor(&entries, used)])
}

#[tokio::test]
async fn metrics_equal_scripted_calls() {
    let logs = captured_logs();
    let service = InProcess::start(limits(FIKRA), memory()).await;
    let mut client = RateLimitServiceClient::connect(service.grpc_url()).await.expect("connect");
    let [key, trusted, exhausted, indebted] = SECRET_KEYS;
    let requests_rule = "api_key/meter=requests";
    let tokens_rule = "api_key/meter=tokens";

    // Three checks with the default tier, two with the trusted tier.
    for _ in 0..3 {
        assert_eq!(call(&mut client, requests(key)).await, Code::Ok);
    }
    for _ in 0..2 {
        let request = rls_request("fikra", vec![descriptor(&[("api_key", trusted), ("tier", "trusted"), ("meter", "requests")], None)]);
        assert_eq!(call(&mut client, request).await, Code::Ok);
    }

    // 31 checks on one key: 30 allowed, the last six of them near the
    // limit (fewer than 6 of 30 left), then one denial.
    for n in 0..30 {
        assert_eq!(call(&mut client, requests(exhausted)).await, Code::Ok, "check {n}");
    }
    assert_eq!(call(&mut client, requests(exhausted)).await, Code::OverLimit);

    // Settlement: a refund of 300, an extra charge of 300, a report for an
    // unknown request id, a second report, one without a request id and
    // one without a cost.
    assert_eq!(call(&mut client, tokens_check(key, "r1", 1000)).await, Code::Ok);
    assert_eq!(call(&mut client, report(key, Some("r1"), Some(700))).await, Code::Ok);
    assert_eq!(call(&mut client, tokens_check(key, "r2", 500)).await, Code::Ok);
    assert_eq!(call(&mut client, report(key, Some("r2"), Some(800))).await, Code::Ok);
    assert_eq!(call(&mut client, report(key, Some("r9"), Some(100))).await, Code::Ok);
    assert_eq!(call(&mut client, report(key, Some("r1"), Some(700))).await, Code::Ok);
    assert_eq!(call(&mut client, report(key, None, Some(50))).await, Code::Ok);
    assert_eq!(call(&mut client, report(key, None, None)).await, Code::Ok);

    // A report of 100,000 on a full bucket of 40,000: the debt clamp keeps
    // 80,000 used and forgives 20,000.
    assert_eq!(call(&mut client, report(indebted, None, Some(100_000))).await, Code::Ok);

    // Unknown domain, unmatched descriptors, an ignored override.
    for _ in 0..4 {
        let request = rls_request("fikra-typo", vec![descriptor(&[("api_key", key)], None)]);
        assert_eq!(call(&mut client, request).await, Code::Ok);
    }
    let unmatched = rls_request("fikra", vec![descriptor(&[("api_key", key), ("meter", "other")], None), descriptor(&[], None)]);
    assert_eq!(call(&mut client, unmatched).await, Code::Ok);
    let mut overridden = descriptor(&[("api_key", key), ("meter", "requests")], None);
    overridden.limit = Some(RateLimitOverride { requests_per_unit: 5, unit: 0, unit_multiplier: None });
    assert_eq!(call(&mut client, rls_request("fikra", vec![overridden])).await, Code::Ok);

    // A value over the 16 KiB bound is denied before any rule is matched.
    let long = "v".repeat(16 * 1024 + 1);
    let request = rls_request("fikra", vec![descriptor(&[("api_key", &long), ("meter", "requests")], None)]);
    assert_eq!(call(&mut client, request).await, Code::OverLimit);

    // Invalid calls: an empty domain, and no descriptors.
    let invalid = client.should_rate_limit(rls_request("", vec![descriptor(&[("api_key", key)], None)])).await;
    assert_eq!(invalid.expect_err("invalid").code(), tonic::Code::InvalidArgument);
    let invalid = client.should_rate_limit(rls_request("fikra", vec![])).await;
    assert_eq!(invalid.expect_err("invalid").code(), tonic::Code::InvalidArgument);

    let text = service.metrics().await;
    let calls = |domain: &str, code: &str| value(&text, "fikra_calls_total", &[("domain", domain), ("code", code)]);
    // 3 + 2 + 30 checks, 2 token checks, 6 reports, 1 debt report,
    // 1 unmatched and 1 override call.
    assert_eq!(calls("fikra", "ok"), 46.0);
    assert_eq!(calls("fikra", "over_limit"), 2.0, "the 31st check and the over-long value");
    assert_eq!(calls("(unknown)", "ok"), 4.0);
    assert_eq!(calls("(unknown)", "invalid_argument"), 1.0);
    assert_eq!(calls("fikra", "invalid_argument"), 1.0);
    assert_eq!(value(&text, "fikra_unknown_domain_calls_total", &[]), 4.0);

    let checks = |rule: &str, tier: &str, code: &str| {
        value(&text, "fikra_descriptor_checks_total", &[("domain", "fikra"), ("rule", rule), ("tier", tier), ("code", code)])
    };
    // 3 + 30 checks and the override call's check on the default tier.
    assert_eq!(checks(requests_rule, "unverified", "ok"), 34.0);
    assert_eq!(checks(requests_rule, "unverified", "over_limit"), 1.0);
    assert_eq!(checks(requests_rule, "trusted", "ok"), 2.0);
    assert_eq!(checks(tokens_rule, "unverified", "ok"), 2.0);
    let rule_labels = |rule: &'static str| [("domain", "fikra"), ("rule", rule), ("tier", "unverified")];
    assert_eq!(value(&text, "fikra_near_limit_total", &rule_labels(requests_rule)), 6.0);
    assert_eq!(value(&text, "fikra_shadow_denied_total", &rule_labels(requests_rule)), 0.0);
    assert_eq!(value(&text, "fikra_unmatched_descriptors_total", &[("domain", "fikra")]), 2.0);
    assert_eq!(value(&text, "fikra_ignored_overrides_total", &[("domain", "fikra")]), 1.0);

    let reports = |result: &str| {
        value(&text, "fikra_reports_total", &[("domain", "fikra"), ("rule", tokens_rule), ("tier", "unverified"), ("result", result)])
    };
    assert_eq!(reports("settled"), 2.0);
    assert_eq!(reports("unknown_request"), 1.0);
    assert_eq!(reports("duplicate"), 1.0);
    assert_eq!(reports("no_request_id"), 2.0);
    assert_eq!(reports("ignored"), 1.0);
    assert_eq!(value(&text, "fikra_settlement_refunded_units_total", &rule_labels(tokens_rule)), 300.0);
    assert_eq!(value(&text, "fikra_settlement_extra_units_total", &rule_labels(tokens_rule)), 300.0);
    assert_eq!(value(&text, "fikra_debt_forgiven_units_total", &rule_labels(tokens_rule)), 20_000.0);

    let error_labels = [("domain", "fikra"), ("rule", tokens_rule)];
    assert_eq!(value(&text, "fikra_estimate_error_units_count", &error_labels), 2.0);
    assert_eq!(value(&text, "fikra_estimate_error_units_sum", &error_labels), 0.0);
    let below = |le: &str| value(&text, "fikra_estimate_error_units_bucket", &[("domain", "fikra"), ("rule", tokens_rule), ("le", le)]);
    assert_eq!(below("-300.0"), 1.0, "the refund of 300 is an error of -300");
    assert_eq!(below("100.0"), 1.0);
    assert_eq!(below("300.0"), 2.0);

    // Every call that reached the store: 3 + 2 + 31 checks, 2 token checks,
    // 5 reports with a cost, 1 debt report, 1 override call.
    let store_calls = value(&text, "fikra_store_duration_seconds_count", &[("store", "memory"), ("result", "ok")]);
    assert_eq!(store_calls, 45.0);
    assert_eq!(value(&text, "fikra_in_flight_calls", &[]), 0.0);
    assert_eq!(value(&text, "fikra_ready", &[]), 1.0);
    assert_eq!(sample(&text, "fikra_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));

    for secret in SECRET_KEYS {
        assert!(!text.contains(secret), "a metric carries the API key {secret}");
    }
    service.stop().await;
    let logs = String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(logs.contains("Decided"), "debug logs were captured");
    for secret in SECRET_KEYS {
        assert!(!logs.contains(secret), "a log line carries the API key {secret}");
    }
}

#[tokio::test]
async fn readiness_follows_store_and_liveness_does_not() {
    let _logs = captured_logs();
    let mut redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url()).await.expect("connect to the test redis"));
    let service = InProcess::start(limits(FIKRA), store).await;
    assert_eq!(get(service.metrics_port, "/readyz").await.0, 200);

    redis.stop();
    wait_for_status(service.metrics_port, "/readyz", 503).await;
    let (status, body) = get(service.metrics_port, "/readyz").await;
    assert!(body.contains("store unavailable"), "{status} {body}");
    assert_eq!(get(service.metrics_port, "/healthz").await.0, 200, "liveness ignores the store");
    assert_eq!(value(&service.metrics().await, "fikra_ready", &[]), 0.0);

    redis.restart();
    wait_for_status(service.metrics_port, "/readyz", 200).await;
    service.stop().await;
}

#[tokio::test]
async fn unavailable_store_is_counted() {
    let _logs = captured_logs();
    let mut redis = RedisServer::start();
    let store = Store::Redis(RedisStore::connect(&redis.url()).await.expect("connect to the test redis"));
    let service = InProcess::start(limits(FIKRA), store).await;
    let mut client = RateLimitServiceClient::connect(service.grpc_url()).await.expect("connect");
    redis.stop();

    for _ in 0..3 {
        let lost = client.should_rate_limit(requests("store-lost")).await.expect_err("the store is down");
        assert_eq!(lost.code(), tonic::Code::Unavailable);
    }
    let text = service.metrics().await;
    assert_eq!(value(&text, "fikra_calls_total", &[("domain", "fikra"), ("code", "unavailable")]), 3.0);
    assert_eq!(value(&text, "fikra_store_errors_total", &[("store", "redis"), ("kind", "unavailable")]), 3.0);
    assert_eq!(value(&text, "fikra_failure_mode_answers_total", &[("answer", "unavailable")]), 3.0);
    assert_eq!(value(&text, "fikra_store_duration_seconds_count", &[("store", "redis"), ("result", "error")]), 3.0);
    service.stop().await;
}

#[tokio::test]
async fn metrics_port_serves_openmetrics_text() {
    let _logs = captured_logs();
    let service = InProcess::start(limits(FIKRA), memory()).await;
    let (status, body) = get(service.metrics_port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
    assert!(body.contains("# TYPE fikra_in_flight_calls gauge"), "{body}");
    assert_eq!(get(service.metrics_port, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get(service.metrics_port, "/nothing").await.0, 404);
    service.stop().await;
}

#[tokio::test]
async fn evictions_are_counted() {
    let _logs = captured_logs();
    let bounds = MemoryBounds { max_buckets: 10, max_estimates: 10 };
    let store = Store::Memory(MemoryStore::with_bounds(Clock::monotonic(), bounds));
    let service = InProcess::start(limits(FIKRA), store).await;
    let mut client = RateLimitServiceClient::connect(service.grpc_url()).await.expect("connect");

    // Each key uses one of its 30 requests. Past 10 buckets, every new key
    // evicts one, which forgives its one used unit less a bit of refill.
    for n in 0..25 {
        assert_eq!(call(&mut client, requests(&format!("evict-{n}"))).await, Code::Ok);
    }
    let text = service.metrics().await;
    assert_eq!(value(&text, "fikra_evicted_buckets_total", &[]), 15.0);
    let forgiven = value(&text, "fikra_eviction_forgiven_units_total", &[]);
    assert!((1.0..=15.0).contains(&forgiven), "forgiven {forgiven}");

    // A second scrape adds nothing new.
    assert_eq!(value(&service.metrics().await, "fikra_evicted_buckets_total", &[]), 15.0);
    service.stop().await;
}

#[tokio::test]
async fn readiness_holds_under_fail_open() {
    let mut redis = RedisServer::start();
    let config = ConfigMapDir::new(&[("fikra.yaml", FIKRA)]);
    let url = redis.url();
    let service = Binary::start(config.path(), &["--redis-url", &url, "--failure-mode", "allow"]).await;
    redis.stop();

    // The store is lost, but every call still gets a response, so the
    // replica stays ready. gRPC health still reports the lost store.
    let mut client = RateLimitServiceClient::connect(service.grpc_url()).await.expect("connect");
    let mut answered = 0;
    for _ in 0..10 {
        answered += u32::from(call(&mut client, requests("fail-open")).await == Code::Ok);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answered, 10);
    assert_eq!(get(service.metrics_port, "/readyz").await.0, 200);
    let text = service.metrics().await;
    assert_eq!(value(&text, "fikra_failure_mode_answers_total", &[("answer", "allowed")]), 10.0);
    assert_eq!(value(&text, "fikra_ready", &[]), 1.0);
    redis.restart();
}

async fn wait_for_status(port: u16, path: &str, expected: u16) {
    let mut last = 0;
    for _ in 0..100 {
        last = get(port, path).await.0;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} stayed {last}, expected {expected}");
}

impl InProcess {
    async fn metrics(&self) -> String {
        ops::scrape(self.metrics_port).await
    }
}
