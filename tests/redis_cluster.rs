//! The service on a Redis Cluster of throwaway servers: API keys spread over
//! every primary with each key's buckets in one slot, no slot error ever
//! reaching a caller, the failure mode while a primary is lost, recovery
//! after a failover without a restart, a batch spanning slots released when
//! a slot stalls, the script sent again after NOSCRIPT, and replicas sharing
//! one cluster.

#[path = "support/checks.rs"]
mod checks;
#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/service.rs"]
mod service;
#[path = "support/service_process.rs"]
mod service_process;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use checks::{FIKRA, fikra_check, first_decided, header, requests_check, timed_call, wait_for_health};
use fikra_ratelimit::limiter::bucket::BucketParams;
use fikra_ratelimit::limiter::judge::BucketOp;
use fikra_ratelimit::limiter::keys::{bucket_key, redis_location};
use fikra_ratelimit::limiter::LimiterSettings;
use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::store::redis::RedisOptions;
use fikra_ratelimit::store::{Batch, FailureMode, RedisStore, Store, StoreError};
use fred::util::redis_keyslot;
use redis_server::RedisCluster;
use service::{Service, descriptor, limits, rls_request};
use service_process::ServiceProcess;
use tonic_health::pb::health_check_response::ServingStatus;

/// Time from a promotion to correct answers that the service must meet.
const RECOVERY: Duration = Duration::from_secs(10);

/// Store settings for a loaded test machine: calls may take up to 2 s.
fn options() -> RedisOptions {
    RedisOptions { store_timeout: Duration::from_secs(2), ..RedisOptions::default() }
}

async fn connect(cluster: &RedisCluster) -> RedisStore {
    RedisStore::connect_with(&cluster.url(), &options()).await.expect("connect to the test cluster")
}

/// The store key of the requests bucket of `api_key` in domain `fikra`.
fn requests_key(api_key: &str) -> String {
    bucket_key("fikra", &[("api_key", api_key), ("meter", "requests")], true)
}

fn tokens_key(api_key: &str) -> String {
    bucket_key("fikra", &[("api_key", api_key), ("meter", "tokens")], true)
}

/// The port of the primary that holds the buckets of `api_key`.
fn primary_of(cluster: &RedisCluster, api_key: &str) -> u16 {
    cluster.owner_of_slot(redis_keyslot(requests_key(api_key).as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c12_keys_spread_without_slot_errors() {
    let mut cluster = RedisCluster::start(3, 0);
    let store = Store::Redis(connect(&cluster).await);
    let service = Service::start(limits(FIKRA), store.clone()).await;
    let fail_open = LimiterSettings { failure_mode: FailureMode::Allow, ..LimiterSettings::default() };
    let open_service = Service::start_with(limits(FIKRA), store, fail_open).await;
    let client = service.client().await;

    let api_keys: Vec<String> = (0..1000).map(|n| format!("c12-key-{n}")).collect();
    for chunk in api_keys.chunks(50) {
        let calls: Vec<_> = chunk
            .iter()
            .map(|api_key| {
                let mut client = client.clone();
                let request = fikra_check(api_key, 100);
                tokio::spawn(async move { client.should_rate_limit(request).await })
            })
            .collect();
        for (api_key, call) in chunk.iter().zip(calls) {
            let answer = call.await.expect("task").unwrap_or_else(|status| panic!("{api_key}: {status:?}")).into_inner();
            assert_eq!(answer.overall_code, Code::Ok as i32, "{api_key}");
            assert_eq!(header(&answer, "x-ratelimit-remaining-requests"), Some("29"), "{api_key}");
            assert_eq!(header(&answer, "x-ratelimit-remaining-tokens"), Some("39900"), "{api_key}");
        }
    }

    // Every API key's two buckets share a slot, and the keys spread. A
    // bucket hash lives only until its buckets are full again (about 4 s
    // here), so the check that they are stored on that slot's primary uses
    // a second round of checks on a sample.
    let mut per_primary: HashMap<u16, usize> = HashMap::new();
    for api_key in &api_keys {
        let (requests, tokens) = (requests_key(api_key), tokens_key(api_key));
        assert_eq!(redis_keyslot(requests.as_bytes()), redis_keyslot(tokens.as_bytes()), "{api_key}");
        *per_primary.entry(primary_of(&cluster, api_key)).or_default() += 1;
    }
    let used = per_primary.values().filter(|count| **count > 0).count();
    assert!(used >= 2, "the keys use {used} of 3 primaries: {per_primary:?}");

    let mut client_again = service.client().await;
    for api_key in api_keys.iter().step_by(50) {
        let answer = client_again.should_rate_limit(fikra_check(api_key, 100)).await.expect("an answer").into_inner();
        // The first check may have refilled (1 unit per 2 s) by now.
        let remaining = header(&answer, "x-ratelimit-remaining-requests");
        assert!(matches!(remaining, Some("28" | "29")), "{api_key}: {remaining:?}");
        let owner = cluster.node(primary_of(&cluster, api_key));
        let requests_key = requests_key(api_key);
        let (hash, requests) = redis_location(&requests_key);
        let tokens_key = tokens_key(api_key);
        let (tokens_hash, tokens) = redis_location(&tokens_key);
        assert_eq!(hash, tokens_hash, "{api_key}: one hash holds both buckets");
        let stored = owner.cli(&["HKEYS", hash]);
        let mut stored: Vec<&str> = stored.lines().collect();
        stored.sort_unstable();
        let mut expected = vec![requests, tokens];
        expected.sort_unstable();
        assert_eq!(stored, expected, "both buckets of {api_key} are on the primary of their slot");
    }

    // A lost primary, with no replica to take over: its keys get the
    // failure mode, never a plain OK.
    let victim = primary_of(&cluster, &api_keys[0]);
    let on_victim: Vec<&String> = api_keys.iter().filter(|api_key| primary_of(&cluster, api_key) == victim).take(10).collect();
    assert_eq!(on_victim.len(), 10);
    cluster.node_mut(victim).kill();

    let mut client = service.client().await;
    let mut open_client = open_service.client().await;
    for api_key in on_victim {
        let answer = timed_call(&mut client, fikra_check(api_key, 100), Duration::from_millis(100)).await;
        assert!(answer.is_unavailable(), "{api_key}: {answer:?}");
        let answer = timed_call(&mut open_client, fikra_check(api_key, 100), Duration::from_millis(100)).await;
        assert!(answer.is_fail_open(), "{api_key} with --failure-mode allow: {answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_needs_no_restart() {
    let mut cluster = RedisCluster::start(3, 1);
    let service = Service::start(limits(FIKRA), Store::Redis(connect(&cluster).await)).await;
    let mut client = service.client().await;
    let channel = service.channel().await;
    wait_for_health(&channel, ServingStatus::Serving, RECOVERY).await.expect("SERVING at start");

    // A killed primary: a replica takes over.
    let api_key = "failover-key";
    for _ in 0..3 {
        let answer = timed_call(&mut client, requests_check(api_key), Duration::from_secs(1)).await;
        assert!(answer.is_decided_ok(), "{answer:?}");
    }
    let victim = primary_of(&cluster, api_key);
    cluster.node_mut(victim).kill();
    let answer = timed_call(&mut client, requests_check(api_key), Duration::from_millis(200)).await;
    assert!(answer.is_unavailable(), "a check on the lost primary gets the failure mode: {answer:?}");
    assert!(answer.elapsed <= Duration::from_millis(250), "answered after {:?}", answer.elapsed);

    let promoted = tokio::task::block_in_place(|| cluster.wait_for_failover(Duration::from_secs(20)));
    let (answer, decided) =
        first_decided(&mut client, || requests_check(api_key), RECOVERY + Duration::from_secs(5)).await.expect("a decision");
    assert!(decided - promoted <= RECOVERY, "first decision {:?} after the promotion", decided - promoted);
    let remaining = answer.remaining_requests().expect("remaining header");
    // The replica has what the primary replicated: 3 checks, fewer only if
    // the last writes were lost with the primary.
    assert!((26..=29).contains(&remaining), "remaining {remaining} after 3 checks and this one");
    let serving = wait_for_health(&channel, ServingStatus::Serving, RECOVERY).await.expect("SERVING after the failover");
    assert!(serving - promoted <= RECOVERY, "SERVING {:?} after the promotion", serving - promoted);

    // A demoted primary that stays up: a manual failover to its replica.
    // The promoted node has no replica, so the key must live on another.
    let (other_key, replica) = (0..)
        .map(|n| format!("demoted-key-{n}"))
        .find_map(|key| cluster.replica_of(primary_of(&cluster, &key)).map(|replica| (key, replica)))
        .expect("a key on a primary with a replica");
    let answer = timed_call(&mut client, requests_check(&other_key), Duration::from_secs(1)).await;
    assert!(answer.is_decided_ok(), "{answer:?}");
    cluster.node(replica).cli(&["CLUSTER", "FAILOVER"]);
    let promoted = Instant::now();
    let (answer, decided) =
        first_decided(&mut client, || requests_check(&other_key), RECOVERY).await.expect("a decision after the demotion");
    assert!(decided - promoted <= RECOVERY, "first decision {:?} after the manual failover", decided - promoted);
    assert_eq!(answer.remaining_requests(), Some(28), "the manual failover loses nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_slot_hold_released_after_stall() {
    let cluster = RedisCluster::start(3, 0);
    let store = connect(&cluster).await;
    let params = BucketParams::new(10, 86_400_000, 10).expect("exact params");

    // Two buckets whose slots are on different primaries.
    let first = "frl1:{stall-a}:b:x".to_owned();
    let second = (0..)
        .map(|n| format!("frl1:{{stall-b{n}}}:b:y"))
        .find(|key| cluster.owner_of_slot(redis_keyslot(key.as_bytes())) != cluster.owner_of_slot(redis_keyslot(first.as_bytes())))
        .expect("a key on another primary");
    let check = |key: &str, cost| BucketOp {
        key: key.to_owned(),
        params,
        check: Some(cost),
        shadow: false,
        credit: 0,
        reports: Vec::new(),
        estimates: Vec::new(),
    };
    let batch = |ops| Batch { ops, ttl_slack: Duration::from_secs(2), estimate_ttl: Duration::from_secs(600) };

    let stalled = cluster.node(cluster.owner_of_slot(redis_keyslot(second.as_bytes())));
    stalled.pause();
    let error = store
        .apply_within(&batch(vec![check(&first, 4), check(&second, 4)]), Some(Duration::from_millis(100)))
        .await
        .expect_err("one slot does not reply");
    assert!(matches!(error, StoreError::TimedOut(_)), "{error:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stalled.resume();

    // The slot that replied released its hold; the stalled one either never
    // charged (its release came first) or was released after it resumed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = store.apply(&batch(vec![check(&first, 0), check(&second, 0)])).await.expect("a decision");
        let left: Vec<u64> = out.buckets.iter().map(|bucket| bucket.state.remaining(&params)).collect();
        if left == [10, 10] {
            break;
        }
        assert!(Instant::now() < deadline, "holds not released within 5 s: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The release runs in its own task, which may count it just after the
    // credit is visible.
    while store.faults().holds_released.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no hold release counted within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(store.faults().holds_released.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(store.faults().timeouts.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_reloads_flushed_script() {
    let cluster = RedisCluster::start(3, 0);
    let store = connect(&cluster).await;
    let params = BucketParams::new(10, 86_400_000, 10).expect("exact params");
    let api_keys: Vec<String> = (0..30).map(|n| format!("noscript-{n}")).collect();
    let batch = |cost| Batch {
        ops: api_keys
            .iter()
            .map(|api_key| BucketOp {
                key: requests_key(api_key),
                params,
                check: Some(cost),
                shadow: false,
                credit: 0,
                reports: Vec::new(),
                estimates: Vec::new(),
            })
            .collect(),
        ttl_slack: Duration::from_secs(2),
        estimate_ttl: Duration::from_secs(600),
    };
    let out = store.apply(&batch(1)).await.expect("a decision across every primary");
    assert!(out.allowed);

    // A restarted or promoted primary has no script: every primary forgets it.
    for port in cluster.primary_ports() {
        assert_eq!(cluster.node(port).cli(&["SCRIPT", "FLUSH"]), "OK");
    }
    let out = store.apply(&batch(1)).await.expect("a decision after NOSCRIPT");
    assert!(out.allowed);
    let left: Vec<u64> = out.buckets.iter().map(|bucket| bucket.state.remaining(&params)).collect();
    assert!(left.iter().all(|left| *left == 8), "each batch ran once: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c21_three_replicas_share_one_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url();
    let services =
        [ServiceProcess::start(&url).await, ServiceProcess::start(&url).await, ServiceProcess::start(&url).await];
    let mut clients = Vec::new();
    for service in &services {
        let endpoint = format!("http://127.0.0.1:{}", service.port());
        clients.push(RateLimitServiceClient::connect(endpoint).await.expect("connect to a replica"));
    }

    // 90 checks in about 2 s, round robin over the replicas.
    let mut admitted = 0;
    for n in 0..90 {
        let answer = clients[n % 3].should_rate_limit(requests_check("c21-K1")).await.expect("an answer").into_inner();
        if answer.overall_code == Code::Ok as i32 {
            admitted += 1;
        }
        tokio::time::sleep(Duration::from_millis(22)).await;
    }
    assert!((30..=31).contains(&admitted), "{admitted} of 90 admitted; 30 plus at most 1 refilled");

    // An override of 1 per minute: 10 checks alternating replicas.
    let mut admitted = 0;
    for n in 0..10 {
        let mut check = descriptor(&[("api_key", "c21-K2"), ("meter", "requests")], None);
        check.limit = Some(RateLimitOverride { requests_per_unit: 1, unit: 2, unit_multiplier: None });
        let answer = clients[n % 3].should_rate_limit(rls_request("fikra", vec![check])).await.expect("an answer").into_inner();
        if answer.overall_code == Code::Ok as i32 {
            admitted += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(admitted, 1, "an override of 1 per minute admits exactly 1");
}
