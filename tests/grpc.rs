//! The real gRPC server, in-process on port 0, through the generated client.

#[path = "support/redis.rs"]
mod redis;
#[path = "support/service.rs"]
mod service;

use std::time::Duration;

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::store::{MemoryStore, RedisStore, Store};
use redis::RedisServer;
use service::{Service, descriptor, limits, rls_request};
use tonic::Code as Status;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const FIKRA: &str = include_str!("../deploy/config/fikra.yaml");

fn memory() -> Store {
    Store::Memory(MemoryStore::new(Clock::monotonic()))
}

async fn redis_store(server: &RedisServer) -> Store {
    Store::Redis(RedisStore::connect(&server.url()).await.expect("connect to the test redis"))
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument() {
    let service = Service::start(limits(FIKRA), memory()).await;
    let mut client = service.client().await;
    let cases = [
        (rls_request("", vec![descriptor(&[("api_key", "k")], None)]), "domain"),
        (rls_request("fikra", vec![]), "descriptors"),
        (rls_request("fikra", vec![descriptor(&[("", "v")], None)]), "descriptors[0].entries[0].key"),
    ];
    for (request, field) in cases {
        let status = client.should_rate_limit(request).await.expect_err("invalid");
        assert_eq!(status.code(), Status::InvalidArgument);
        assert!(status.message().contains(field), "{} does not name {field}", status.message());
    }

    // The service keeps serving after bad input.
    let fine = client.should_rate_limit(rls_request("fikra", vec![descriptor(&[("api_key", "k"), ("meter", "requests")], None)])).await;
    assert_eq!(fine.expect("allowed").into_inner().overall_code, Code::Ok as i32);
}

#[tokio::test]
async fn unknown_domain_is_allowed_and_touches_nothing() {
    let redis = RedisServer::start();
    let service = Service::start(limits(FIKRA), redis_store(&redis).await).await;
    let mut client = service.client().await;
    for _ in 0..50 {
        let answer = client
            .should_rate_limit(rls_request("fikra-typo", vec![descriptor(&[("api_key", "K1")], None)]))
            .await
            .expect("answer")
            .into_inner();
        assert_eq!(answer.overall_code, Code::Ok as i32);
        assert_eq!(answer.statuses.len(), 1);
        assert_eq!(answer.statuses[0].code, Code::Ok as i32);
        assert!(answer.statuses[0].current_limit.is_none());
    }
    assert!(redis.keys("*").is_empty(), "no Redis key for an unknown domain");
}

#[tokio::test]
async fn answers_never_carry_unknown_code() {
    let service = Service::start(limits(FIKRA), memory()).await;
    let mut client = service.client().await;
    let requests = [
        rls_request("fikra", vec![descriptor(&[], None)]),
        rls_request("fikra", vec![descriptor(&[("api_key", "K"), ("meter", "other")], None)]),
        rls_request("fikra", vec![descriptor(&[("api_key", "K"), ("meter", "requests")], Some(1000))]),
    ];
    for request in requests {
        let answer = client.should_rate_limit(request).await.expect("answer").into_inner();
        assert_ne!(answer.overall_code, Code::Unknown as i32);
        for status in &answer.statuses {
            assert_ne!(status.code, Code::Unknown as i32);
        }
    }
}

#[tokio::test]
async fn wire_values_saturate() {
    let huge = "domain: big\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 1000000000000}\n";
    let service = Service::start(limits(huge), memory()).await;
    let mut client = service.client().await;
    let answer = client.should_rate_limit(rls_request("big", vec![descriptor(&[("k", "v")], None)])).await.expect("answer").into_inner();

    let status = &answer.statuses[0];
    let limit = status.current_limit.as_ref().expect("limit");
    assert_eq!(limit.requests_per_unit, u32::MAX);
    assert_eq!(status.limit_remaining, u32::MAX);
    let remaining = answer.response_headers_to_add.iter().find(|h| h.key == "x-ratelimit-remaining-requests").expect("header");
    assert_eq!(remaining.value, "999999999999", "headers carry the exact count");
}

#[tokio::test]
async fn statuses_carry_limit_remaining_and_reset() {
    let service = Service::start(limits(FIKRA), memory()).await;
    let mut client = service.client().await;
    let answer = client
        .should_rate_limit(rls_request(
            "fikra",
            vec![
                descriptor(&[("api_key", "K"), ("meter", "requests")], None),
                descriptor(&[("api_key", "K"), ("meter", "tokens"), ("request_id", "r")], Some(400)),
            ],
        ))
        .await
        .expect("answer")
        .into_inner();

    assert_eq!(answer.overall_code, Code::Ok as i32);
    let requests = &answer.statuses[0];
    assert_eq!(requests.current_limit.as_ref().expect("limit").requests_per_unit, 30);
    assert_eq!(requests.current_limit.as_ref().expect("limit").unit, 2);
    assert_eq!(requests.limit_remaining, 29);
    assert_eq!(requests.duration_until_reset.as_ref().expect("reset").seconds, 2);
    assert_eq!(answer.statuses[1].limit_remaining, 39_600);
    assert!(answer.raw_body.is_empty());
    assert!(answer.response_headers_to_add.iter().all(|h| h.key != "content-type"));
}

#[tokio::test]
async fn health_follows_redis() {
    let mut redis = RedisServer::start();
    let service = Service::start(limits(FIKRA), redis_store(&redis).await).await;
    let mut health = HealthClient::new(service.channel().await);
    let status = |health: &mut HealthClient<_>| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest { service: String::new() })
                .await
                .map(|answer| answer.into_inner().status)
                .unwrap_or(-1)
        }
    };

    wait_for(|| status(&mut health), ServingStatus::Serving as i32).await;
    redis.stop();
    wait_for(|| status(&mut health), ServingStatus::NotServing as i32).await;

    let mut client = service.client().await;
    let lost = client
        .should_rate_limit(rls_request("fikra", vec![descriptor(&[("api_key", "K"), ("meter", "requests")], None)]))
        .await
        .expect_err("store is down");
    assert_eq!(lost.code(), Status::Unavailable, "Envoy's failure mode decides");

    redis.restart();
    wait_for(|| status(&mut health), ServingStatus::Serving as i32).await;
}

async fn wait_for<F, Fut>(mut probe: F, expected: i32)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = i32>,
{
    let mut last = -1;
    for _ in 0..100 {
        last = probe().await;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("health stayed {last}, expected {expected}");
}

#[tokio::test]
async fn reflection_lists_the_service() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let service = Service::start(limits(FIKRA), memory()).await;
    let mut client = ServerReflectionClient::new(service.channel().await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = client.server_reflection_info(tokio_stream::once(request)).await.expect("reflection").into_inner();
    let answer = stream.message().await.expect("message").expect("one answer");
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else { panic!("unexpected answer") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"envoy.service.ratelimit.v3.RateLimitService".to_owned()), "{names:?}");
}

#[tokio::test]
async fn two_replicas_on_one_redis_admit_exactly_the_capacity() {
    let redis = RedisServer::start();
    let first = Service::start(limits(FIKRA), redis_store(&redis).await).await;
    let second = Service::start(limits(FIKRA), redis_store(&redis).await).await;
    let clients = [first.client().await, second.client().await];

    let mut calls = Vec::new();
    for n in 0..200 {
        let mut client = clients[n % 2].clone();
        calls.push(tokio::spawn(async move {
            let request = rls_request("fikra", vec![descriptor(&[("api_key", "shared"), ("meter", "requests")], None)]);
            client.should_rate_limit(request).await.expect("answer").into_inner().overall_code
        }));
    }
    let mut admitted = 0;
    for call in calls {
        if call.await.expect("task") == Code::Ok as i32 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 30);
}

/// C10 and C11 on Redis, scaled down: odd long values and many distinct
/// keys each keep their own bucket, no key name carries a value in clear
/// text, names stay short, and every key expires by refill time plus slack.
#[tokio::test]
async fn redis_keys_hide_values_and_expire() {
    let redis = RedisServer::start();
    let config = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1}
  - key: odd
    rate_limit: {unit: minute, requests_per_unit: 30}
";
    let service = Service::start(limits(config), redis_store(&redis).await).await;
    let client = service.client().await;
    let check = |entries: Vec<(String, String)>| {
        let mut client = client.clone();
        async move {
            let pairs: Vec<(&str, &str)> = entries.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            client.should_rate_limit(rls_request("llm", vec![descriptor(&pairs, None)])).await.expect("answer").into_inner().overall_code
        }
    };

    for n in 1..=300 {
        assert_eq!(check(vec![("api_key".into(), format!("secret-key-{n}"))]).await, Code::Ok as i32);
    }
    assert_eq!(check(vec![("api_key".into(), "secret-key-1".into())]).await, Code::OverLimit as i32);
    assert_eq!(check(vec![("api_key".into(), "secret-key-177".into())]).await, Code::OverLimit as i32);
    assert_eq!(check(vec![("api_key".into(), "secret-key-301".into())]).await, Code::Ok as i32);

    let mut odd = String::from("spaces and\nnewlines\t{braces}:_ é 日本 \u{0}");
    while odd.len() < 8 * 1024 {
        odd.push('v');
    }
    let mut oks = 0;
    for _ in 0..31 {
        oks += i32::from(check(vec![("odd".into(), odd.clone())]).await == Code::Ok as i32);
    }
    assert_eq!(oks, 30);

    let keys = redis.keys("*");
    assert_eq!(keys.len(), 302, "one bucket per distinct value");
    for key in &keys {
        assert!(!key.contains("secret-key"), "{key} carries an API key");
        assert!(!key.contains("spaces"), "{key} carries a value");
        assert!(key.len() <= 128, "{key} is {} bytes", key.len());
        let ttl = redis.pttl(key);
        assert!(ttl > 0, "{key} has PTTL {ttl}");
        assert!(ttl <= 3_600_000 + 2_000, "{key} has PTTL {ttl}, beyond refill time plus slack");
    }
}
