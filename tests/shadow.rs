//! C25: shadow mode end to end against the real binary: shadowed checks
//! are allowed and counted, would-be denials are not charged, the answer
//! marks them in dynamic metadata, and a reload that ends shadow mode keeps
//! the state, so the next check is denied.

#[path = "support/ops.rs"]
mod ops;
#[path = "support/service.rs"]
mod service;

use std::time::{Duration, Instant};

use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ops::{Binary, ConfigMapDir, value};
use prost_types::value::Kind;
use service::{descriptor, rls_request};
use tonic::transport::Channel;

const RULE: &str = "api_key/kind=rpm";

fn config(shadow: bool) -> String {
    format!(
        "
domain: llm
descriptors:
  - key: api_key
    descriptors:
      - key: kind
        value: rpm
        shadow_mode: {shadow}
        rate_limit: {{unit: minute, requests_per_unit: 2}}
      - key: kind
        value: enforced
        rate_limit: {{unit: minute, requests_per_unit: 2}}
"
    )
}

async fn call(client: &mut RateLimitServiceClient<Channel>, descriptors: &[(&str, &str)]) -> RateLimitResponse {
    let descriptors = descriptors.iter().map(|(key, kind)| descriptor(&[("api_key", key), ("kind", kind)], None)).collect();
    client.should_rate_limit(rls_request("llm", descriptors)).await.expect("an answer").into_inner()
}

/// The dynamic metadata field `name`, if the answer has one.
fn metadata<'a>(answer: &'a RateLimitResponse, name: &str) -> Option<&'a Kind> {
    answer.dynamic_metadata.as_ref()?.fields.get(name)?.kind.as_ref()
}

fn shadow_count(answer: &RateLimitResponse) -> f64 {
    match metadata(answer, "shadow_denied") {
        Some(Kind::NumberValue(count)) => *count,
        None => 0.0,
        other => panic!("shadow_denied is {other:?}"),
    }
}

#[tokio::test]
async fn c25_shadow_mode_counts_and_keeps_state() {
    let shadow_on = config(true);
    let mut configmap = ConfigMapDir::new(&[("llm.yaml", &shadow_on)]);
    let service = Binary::start(configmap.path(), &[]).await;
    let mut client = RateLimitServiceClient::connect(service.grpc_url()).await.expect("connect");

    // Five checks on a shadowed 2/min: all allowed, the last three marked.
    for n in 1..=5 {
        let answer = call(&mut client, &[("K1", "rpm")]).await;
        assert_eq!(answer.overall_code, Code::Ok as i32, "check {n}");
        assert_eq!(answer.statuses[0].code, Code::Ok as i32, "check {n}");
        // The stored level stays at 2: would-be denials are not charged.
        assert_eq!(answer.statuses[0].limit_remaining, 0_u32.max(2_u32.saturating_sub(n)), "check {n}");
        if n <= 2 {
            assert!(answer.dynamic_metadata.is_none(), "check {n} is within the limit");
            continue;
        }
        assert_eq!(shadow_count(&answer), 1.0, "check {n}");
        match metadata(&answer, "shadow_denied_rules") {
            Some(Kind::StringValue(rules)) => assert_eq!(rules, RULE),
            other => panic!("shadow_denied_rules is {other:?}"),
        }
        match metadata(&answer, "shadow_denied_descriptors") {
            Some(Kind::ListValue(list)) => {
                assert_eq!(list.values.len(), 1);
                assert_eq!(list.values[0].kind, Some(Kind::NumberValue(0.0)));
            }
            other => panic!("shadow_denied_descriptors is {other:?}"),
        }
    }

    // Statistics: five hits, three of them would have been denied.
    let labels = [("domain", "llm"), ("rule", RULE), ("tier", "(none)")];
    let text = service.metrics().await;
    let ok = [("domain", "llm"), ("rule", RULE), ("tier", "(none)"), ("code", "ok")];
    assert_eq!(value(&text, "fikra_descriptor_checks_total", &ok), 5.0);
    assert_eq!(value(&text, "fikra_shadow_denied_total", &labels), 3.0);
    assert_eq!(value(&text, "fikra_calls_total", &[("domain", "llm"), ("code", "ok")]), 5.0);

    // Mixed: a shadowed descriptor over its limit and an enforced one that
    // fits is allowed; once the enforced one is over, the call is denied.
    call(&mut client, &[("K2", "rpm")]).await;
    call(&mut client, &[("K2", "rpm")]).await;
    let mixed = call(&mut client, &[("K2", "rpm"), ("K2", "enforced")]).await;
    assert_eq!(mixed.overall_code, Code::Ok as i32);
    assert_eq!(shadow_count(&mixed), 1.0);
    assert_eq!(mixed.statuses[1].limit_remaining, 1);
    assert_eq!(call(&mut client, &[("K2", "enforced")]).await.overall_code, Code::Ok as i32);
    let mixed = call(&mut client, &[("K2", "rpm"), ("K2", "enforced")]).await;
    assert_eq!(mixed.overall_code, Code::OverLimit as i32);
    assert_eq!(mixed.statuses[0].code, Code::Ok as i32, "the shadowed descriptor never denies");
    assert_eq!(mixed.statuses[1].code, Code::OverLimit as i32);

    // Turn shadow mode off: the state is kept, so the next check is denied.
    let loads = value(&service.metrics().await, "fikra_config_loads_total", &[]);
    configmap.update(&[("llm.yaml", &config(false))]);
    let started = Instant::now();
    while value(&service.metrics().await, "fikra_config_loads_total", &[]) <= loads {
        assert!(started.elapsed() < Duration::from_secs(5), "the reload did not apply within 5 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let enforced = call(&mut client, &[("K1", "rpm")]).await;
    assert_eq!(enforced.overall_code, Code::OverLimit as i32);
    assert!(enforced.dynamic_metadata.is_none(), "an enforced denial is not a shadow mark");
    let text = service.metrics().await;
    let over = [("domain", "llm"), ("rule", RULE), ("tier", "(none)"), ("code", "over_limit")];
    assert_eq!(value(&text, "fikra_descriptor_checks_total", &over), 1.0);
}

#[tokio::test]
async fn shadow_mode_for_a_whole_domain() {
    let global = "
domain: llm
shadow_mode: true
descriptors:
  - key: api_key
    rate_limit: {unit: minute, requests_per_unit: 1}
";
    let configmap = ConfigMapDir::new(&[("llm.yaml", global)]);
    let service = Binary::start(configmap.path(), &[]).await;
    let mut client = RateLimitServiceClient::connect(service.grpc_url()).await.expect("connect");
    for _ in 0..3 {
        let request = rls_request("llm", vec![descriptor(&[("api_key", "K1")], None)]);
        let answer = client.should_rate_limit(request).await.expect("an answer").into_inner();
        assert_eq!(answer.overall_code, Code::Ok as i32);
    }
    let labels = [("domain", "llm"), ("rule", "api_key"), ("tier", "(none)")];
    assert_eq!(value(&service.metrics().await, "fikra_shadow_denied_total", &labels), 2.0);
}
