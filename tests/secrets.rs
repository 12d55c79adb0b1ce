//! API keys never leave the service in clear text. A scripted sequence of
//! checks, reports, denials and malformed calls with known API keys goes
//! through the real binary on Redis at debug log level. Then the log, the
//! `/metrics` page and every Redis key name are searched for those keys.

#[path = "support/ops.rs"]
mod ops;
#[path = "support/redis.rs"]
mod redis;
#[path = "support/service.rs"]
mod service;

use std::path::PathBuf;

use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ops::Binary;
use redis::RedisServer;
use service::{descriptor, rls_request};
use tonic::transport::Channel;

/// Each key carries a marker that nothing else in the service prints.
const API_KEYS: [&str; 4] = [
    "sk-live-Qm7Zt2Wx9Lp4Rv8N",
    "sk-live-denied-Hy3Kd6Fs1Jc5",
    "sk-odd {Xv9Pq} with spaces\nand é 日本 \u{0} end",
    "sk-trusted-Bn4Mw8Ge2Ta7",
];

/// Distinctive parts of the keys that must never appear anywhere.
const MARKERS: [&str; 5] = ["Qm7Zt2Wx9Lp4Rv8N", "Hy3Kd6Fs1Jc5", "Xv9Pq", "Bn4Mw8Ge2Ta7", "Ln5Vb2Ko8Rs1"];

fn check(key: &str, request_id: &str, estimate: u64) -> RateLimitRequest {
    rls_request(
        "fikra",
        vec![
            descriptor(&[("api_key", key), ("meter", "requests")], None),
            descriptor(&[("api_key", key), ("meter", "tokens"), ("request_id", request_id)], Some(estimate)),
        ],
    )
}

fn report(key: &str, request_id: &str, used: u64) -> RateLimitRequest {
    rls_request("fikra", vec![descriptor(&[("api_key", key), ("meter", "tokens"), ("phase", "report"), ("request_id", request_id)], Some(used))])
}

async fn send(client: &mut RateLimitServiceClient<Channel>, request: RateLimitRequest) {
    // Only what the service leaves behind matters here, so the responses
    // are ignored; other tests check them.
    let _ = client.should_rate_limit(request).await;
}

#[tokio::test]
async fn api_keys_absent_from_logs_metrics_redis() {
    let redis = RedisServer::start();
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/config/fikra.yaml");
    let url = redis.url();
    let binary = Binary::start(&config, &["--redis-url", &url]).await;
    let mut client = RateLimitServiceClient::connect(binary.grpc_url()).await.expect("connect to the service");
    let long_key = format!("sk-long-Ln5Vb2Ko8Rs1-{}", "k".repeat(20_000));

    // Allowed checks, settled reports, a duplicate and an unknown request id.
    for (n, key) in API_KEYS.iter().enumerate() {
        let request_id = format!("req-{n}");
        send(&mut client, check(key, &request_id, 500)).await;
        send(&mut client, report(key, &request_id, 300)).await;
        send(&mut client, report(key, &request_id, 300)).await;
        send(&mut client, report(key, "req-never-checked", 50)).await;
    }
    // A tier promotion, denials and a cost too large ever to fit.
    let promoted = descriptor(&[("api_key", API_KEYS[3]), ("tier", "trusted"), ("meter", "requests")], None);
    send(&mut client, rls_request("fikra", vec![promoted])).await;
    for n in 0..35 {
        send(&mut client, check(API_KEYS[1], &format!("burst-{n}"), 10)).await;
    }
    send(&mut client, check(API_KEYS[0], "too-large", 10_000_000)).await;
    // A value over the bound, an unknown domain and gateway faults.
    send(&mut client, check(&long_key, "long", 1)).await;
    send(&mut client, rls_request("fikra-typo", vec![descriptor(&[("api_key", API_KEYS[0])], None)])).await;
    send(&mut client, rls_request("", vec![descriptor(&[("api_key", API_KEYS[0])], None)])).await;
    send(&mut client, rls_request("fikra", vec![descriptor(&[("api_key", API_KEYS[0]), ("", API_KEYS[1])], None)])).await;
    let many: Vec<RateLimitDescriptor> = (0..65).map(|_| descriptor(&[("api_key", API_KEYS[2])], None)).collect();
    send(&mut client, rls_request("fikra", many)).await;
    send(&mut client, rls_request("fikra", vec![descriptor(&[("api_key", &"x".repeat(2 * 1024 * 1024))], None)])).await;

    let log = binary.log();
    assert!(log.contains("DEBUG"), "the service logged at debug level:\n{log}");
    let metrics = binary.metrics().await;
    assert!(!metrics.is_empty(), "the metrics page answered");
    let keys = redis.keys("*");
    assert!(keys.len() >= 8, "the calls wrote buckets: {keys:?}");

    for marker in MARKERS {
        assert!(!log.contains(marker), "the log carries an API key ({marker})");
        assert!(!metrics.contains(marker), "/metrics carries an API key ({marker})");
        for key in &keys {
            assert!(!key.contains(marker), "Redis key {key} carries an API key ({marker})");
            if redis.cli(&["TYPE", key]) == "hash" {
                let fields = redis.cli(&["HKEYS", key]);
                assert!(!fields.contains(marker), "a field of Redis hash {key} carries an API key ({marker})");
            }
        }
    }
}
