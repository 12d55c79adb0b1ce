//! C17: hot reload through a directory laid out like a mounted Kubernetes
//! ConfigMap, driven against the real binary. A broken file keeps the
//! running limits and a valid one applies within 5 s. A deleted file
//! removes its domain, and a start with only a broken file fails with
//! every problem listed.

#[path = "support/ops.rs"]
mod ops;
#[path = "support/service.rs"]
mod service;

use std::time::{Duration, Instant};

use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ops::{Binary, ConfigMapDir, get, value};
use service::{descriptor, rls_request};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The maximum time a valid change may take to apply.
const APPLY_WITHIN: Duration = Duration::from_secs(5);

const LLM_10_PER_HOUR: &str = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 10}
";

const LLM_5_PER_HOUR: &str = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 5}
";

const OTHER: &str = "
domain: other
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 10}
";

const YAML_SYNTAX_ERROR: &str = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 10
";

const UNKNOWN_UNIT: &str = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: fortnight, requests_per_unit: 10}
";

const NEGATIVE_LIMIT: &str = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: -3}
";

async fn check(client: &mut RateLimitServiceClient<Channel>, domain: &str, key: &str) -> RateLimitResponse {
    let request = rls_request(domain, vec![descriptor(&[("api_key", key)], None)]);
    client.should_rate_limit(request).await.expect("an answer").into_inner()
}

fn remaining(answer: &RateLimitResponse) -> u32 {
    assert!(answer.statuses[0].current_limit.is_some(), "a limit applies: {answer:?}");
    answer.statuses[0].limit_remaining
}

/// Waits until the metric reaches `target` and returns how long that took.
async fn wait_for_metric(service: &Binary, name: &str, target: f64) -> Duration {
    let started = Instant::now();
    loop {
        let now = value(&service.metrics().await, name, &[]);
        if now >= target {
            return started.elapsed();
        }
        assert!(started.elapsed() < APPLY_WITHIN * 2, "{name} stayed {now}, expected {target}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health(service: &Binary) -> i32 {
    let channel = Channel::from_shared(service.grpc_url()).expect("a URL").connect().await.expect("connect");
    let mut health = HealthClient::new(channel);
    health.check(HealthCheckRequest { service: String::new() }).await.expect("health").into_inner().status
}

/// Steps 1 to 4 of C17 with one kind of broken file.
async fn reload_steps(broken: &str, problem: &str) {
    let mut config = ConfigMapDir::new(&[("llm.yaml", LLM_10_PER_HOUR), ("other.yaml", OTHER)]);
    let service = Binary::start(config.path(), &[]).await;
    let mut client = RateLimitServiceClient::connect(service.grpc_url()).await.expect("connect");
    assert_eq!(value(&service.metrics().await, "fikra_config_loads_total", &[]), 1.0);
    assert_eq!(value(&service.metrics().await, "fikra_config_domains", &[]), 2.0);

    // 1. Three requests: 7 left.
    let mut last = None;
    for _ in 0..3 {
        last = Some(check(&mut client, "llm", "K1").await);
    }
    assert_eq!(remaining(&last.expect("three answers")), 7);

    // 2. A broken file keeps the old limits, counts one load error and
    // names the file, the key and the fix in the log.
    config.update(&[("llm.yaml", broken), ("other.yaml", OTHER)]);
    wait_for_metric(&service, "fikra_config_load_errors_total", 1.0).await;
    let answer = check(&mut client, "llm", "K1").await;
    assert_eq!(answer.overall_code, Code::Ok as i32);
    assert_eq!(remaining(&answer), 6);
    let log = service.log();
    let failure = log
        .lines()
        .find(|line| line.contains("Configuration reload failed"))
        .unwrap_or_else(|| panic!("no reload failure in the log:\n{log}"));
    assert!(failure.contains("llm.yaml"), "the log names the file: {failure}");
    assert!(failure.contains(problem), "the log names the key and the fix: {failure}");
    assert_eq!(health(&service).await, ServingStatus::Serving as i32);
    assert_eq!(get(service.metrics_port, "/readyz").await.0, 200);
    assert_eq!(value(&service.metrics().await, "fikra_config_loads_total", &[]), 1.0);

    // 3. A valid file of 5 per hour applies within 5 s, and the usage
    // stays: one more request fits, the next does not.
    config.update(&[("llm.yaml", LLM_5_PER_HOUR), ("other.yaml", OTHER)]);
    let took = wait_for_metric(&service, "fikra_config_loads_total", 2.0).await;
    assert!(took < APPLY_WITHIN, "the change took {took:?}");
    let first = check(&mut client, "llm", "K1").await;
    assert_eq!(first.overall_code, Code::Ok as i32);
    assert_eq!(remaining(&first), 0);
    assert_eq!(check(&mut client, "llm", "K1").await.overall_code, Code::OverLimit as i32);
    assert!(!service.log().contains("duplicate"), "the hidden ConfigMap entries never load twice");
    assert_eq!(value(&service.metrics().await, "fikra_config_domains", &[]), 2.0);

    // 4. Deleting other.yaml removes its domain: unknown-domain behaviour.
    config.update(&[("llm.yaml", LLM_5_PER_HOUR)]);
    wait_for_metric(&service, "fikra_config_loads_total", 3.0).await;
    let answer = check(&mut client, "other", "K1").await;
    assert_eq!(answer.overall_code, Code::Ok as i32);
    assert!(answer.statuses[0].current_limit.is_none(), "no limit for a removed domain");
    let text = service.metrics().await;
    assert_eq!(value(&text, "fikra_unknown_domain_calls_total", &[]), 1.0);
    assert_eq!(value(&text, "fikra_config_domains", &[]), 1.0);
    assert_eq!(value(&text, "fikra_config_load_errors_total", &[]), 1.0);
}

#[tokio::test]
async fn c17_reload_after_yaml_syntax_error() {
    reload_steps(YAML_SYNTAX_ERROR, "invalid YAML").await;
}

#[tokio::test]
async fn c17_reload_after_unknown_unit() {
    reload_steps(UNKNOWN_UNIT, "descriptors[0].rate_limit.unit").await;
}

#[tokio::test]
async fn c17_reload_after_negative_limit() {
    reload_steps(NEGATIVE_LIMIT, "descriptors[0].rate_limit.requests_per_unit").await;
}

#[tokio::test]
async fn c17_start_with_broken_file_fails() {
    let broken = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: fortnight, requests_per_unit: 10}
  - key: user
    rate_limit: {unit: hour, requests_per_unit: -3}
";
    let config = ConfigMapDir::new(&[("llm.yaml", broken)]);
    let mut service = Binary::spawn(config.path(), &[]);
    let status = service.wait_exit(Duration::from_secs(30)).await.expect("serve exits on a broken file");
    assert!(!status.success(), "serve exited with {status}");

    let log = service.log();
    assert!(log.contains("llm.yaml: descriptors[0].rate_limit.unit: unknown unit `fortnight`"), "{log}");
    assert!(log.contains("llm.yaml: descriptors[1].rate_limit.requests_per_unit"), "{log}");
    assert!(!log.contains("Serving ShouldRateLimit"), "it never starts answering: {log}");
}
