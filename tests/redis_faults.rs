//! Store faults on a single Redis: the fail-open answer while it is frozen,
//! calls past the in-flight bound failing at once, a demoted primary,
//! connections dropped mid-call leaving no key without a TTL, and
//! passwords, TLS and memory settings at start. The frozen Redis under
//! steady load is in `redis_outage.rs`.

#[path = "support/checks.rs"]
mod checks;
#[path = "support/ops.rs"]
mod ops;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/service.rs"]
mod service;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use checks::{FIKRA, fikra_check, first_decided, requests_check, timed_call, wait_for_health};
use fikra_ratelimit::limiter::LimiterSettings;
use fikra_ratelimit::limiter::bucket::BucketParams;
use fikra_ratelimit::limiter::judge::BucketOp;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::store::redis::RedisOptions;
use fikra_ratelimit::store::{Batch, FailureMode, RedisStore, Store, StoreError};
use ops::Binary;
use proxy::DroppingProxy;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use redis_server::RedisServer;
use service::{Service, limits};
use tonic_health::pb::health_check_response::ServingStatus;

/// Envoy's default deadline for a check.
const ENVOY_DEADLINE: Duration = Duration::from_millis(20);

fn options() -> RedisOptions {
    RedisOptions::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_allows_while_frozen() {
    let redis = RedisServer::start();
    let store = RedisStore::connect_with(&redis.url(), &options()).await.expect("connect");
    let settings = LimiterSettings { failure_mode: FailureMode::Allow, ..LimiterSettings::default() };
    let service = Service::start_with(limits(FIKRA), Store::Redis(store), settings).await;
    let mut client = service.client().await;

    let answer = timed_call(&mut client, requests_check("open"), ENVOY_DEADLINE).await;
    assert!(answer.is_decided_ok(), "{answer:?}");
    redis.pause();
    for _ in 0..20 {
        let answer = timed_call(&mut client, requests_check("open"), Duration::from_millis(100)).await;
        assert!(answer.is_fail_open(), "allowed without headers while Redis is frozen: {answer:?}");
        assert!(answer.elapsed <= Duration::from_millis(150), "answered after {:?}", answer.elapsed);
    }
    redis.resume();
    let (answer, _) = first_decided(&mut client, || requests_check("open"), Duration::from_secs(5)).await.expect("a decision");
    let remaining = answer.remaining_requests().expect("headers are back");
    assert!(remaining <= 29, "the bucket kept its state: {remaining}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_calls_fail_at_once() {
    let redis = RedisServer::start();
    let options = RedisOptions { max_in_flight: 2, store_timeout: Duration::from_millis(500), ..RedisOptions::default() };
    let store = RedisStore::connect_with(&redis.url(), &options).await.expect("connect");
    let params = BucketParams::new(10, 60_000, 10).expect("exact params");
    let batch = Batch {
        ops: vec![BucketOp {
            key: "frl1:{busy}:b:1".into(),
            params,
            check: Some(1),
            shadow: false,
            credit: 0,
            reports: Vec::new(),
            estimates: Vec::new(),
        }],
        ttl_slack: Duration::from_secs(2),
        estimate_ttl: Duration::from_secs(60),
    };

    redis.pause();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let (store, batch) = (store.clone(), batch.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let result = store.apply(&batch).await;
                (started.elapsed(), result)
            })
        })
        .collect();
    let mut busy = 0;
    let mut timed_out = 0;
    for call in calls {
        match call.await.expect("task") {
            (elapsed, Err(StoreError::Busy(2))) => {
                busy += 1;
                assert!(elapsed < Duration::from_millis(50), "a call past the bound waited {elapsed:?}");
            }
            (elapsed, Err(StoreError::TimedOut(_))) => {
                timed_out += 1;
                assert!(elapsed < Duration::from_millis(600), "a call waited {elapsed:?} for a 500 ms limit");
            }
            other => panic!("unexpected result {other:?}"),
        }
    }
    redis.resume();
    assert_eq!(timed_out, 2, "the two calls in flight time out");
    assert_eq!(busy, 18, "the others fail at once");
    assert_eq!(store.faults().busy.load(Ordering::Relaxed), 18);
    assert_eq!(store.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_primary_recovers_without_restart() {
    let redis = RedisServer::start();
    let other = RedisServer::start();
    let store = RedisStore::connect_with(&redis.url(), &options()).await.expect("connect");
    let service = Service::start(limits(FIKRA), Store::Redis(store)).await;
    let mut client = service.client().await;
    let channel = service.channel().await;
    wait_for_health(&channel, ServingStatus::Serving, Duration::from_secs(10)).await.expect("SERVING at start");
    let answer = timed_call(&mut client, requests_check("demoted"), Duration::from_secs(1)).await;
    assert!(answer.is_decided_ok(), "{answer:?}");

    // The server stays up but turns into a replica: writes get READONLY.
    redis.cli(&["REPLICAOF", "127.0.0.1", &other.port().to_string()]);
    for _ in 0..5 {
        let answer = timed_call(&mut client, requests_check("demoted"), Duration::from_millis(200)).await;
        assert!(answer.is_unavailable(), "a check on a replica gets the failure mode: {answer:?}");
    }
    wait_for_health(&channel, ServingStatus::NotServing, Duration::from_secs(10)).await.expect("NOT_SERVING on a replica");

    redis.cli(&["REPLICAOF", "NO", "ONE"]);
    let promoted = Instant::now();
    let (_, decided) =
        first_decided(&mut client, || requests_check("demoted"), Duration::from_secs(10)).await.expect("a decision");
    assert!(decided - promoted <= Duration::from_secs(10), "first decision {:?} after the promotion", decided - promoted);
    wait_for_health(&channel, ServingStatus::Serving, Duration::from_secs(10)).await.expect("SERVING again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c13_ttls_survive_dropped_connections() {
    let redis = RedisServer::start();
    let direct = RedisStore::connect_with(&redis.url(), &options()).await.expect("connect");
    let service = Service::start(limits(FIKRA), Store::Redis(direct)).await;
    let mut client = service.client().await;

    // One check: every key it writes expires by refill time plus slack.
    let answer = timed_call(&mut client, fikra_check("K1", 100), Duration::from_secs(1)).await;
    assert!(answer.is_decided_ok(), "{answer:?}");
    let keys = redis.keys("frl1:*");
    assert_eq!(keys.len(), 1, "one hash holds the requests and the tokens bucket: {keys:?}");
    assert_eq!(redis.cli(&["HLEN", &keys[0]]), "2", "{keys:?}");
    for key in &keys {
        let ttl = redis.pttl(key);
        assert!(ttl > 0, "{key} has PTTL {ttl}");
        assert!(ttl <= 60_000 + 2_000, "{key} has PTTL {ttl}, beyond refill time plus slack");
    }

    // A proxy drops each connection right after it forwards a script call.
    let proxy = DroppingProxy::start(format!("127.0.0.1:{}", redis.port()).parse().expect("address")).await;
    let dropping = RedisStore::connect_with(&proxy.url(), &options()).await.expect("connect through the proxy");
    let dropping_service = Service::start(limits(FIKRA), Store::Redis(dropping)).await;
    let mut dropping_client = dropping_service.client().await;
    for n in 2..=101 {
        let before = proxy.dropped();
        let deadline = Instant::now() + Duration::from_secs(3);
        while proxy.dropped() == before {
            let answer = timed_call(&mut dropping_client, fikra_check(&format!("K{n}"), 100), Duration::from_millis(200)).await;
            assert!(answer.is_unavailable(), "a check whose connection dropped gets the failure mode: {answer:?}");
            assert!(Instant::now() < deadline, "K{n} never reached Redis through the proxy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(proxy.dropped() >= 100);

    let keys = redis.keys("frl1:*");
    assert!(keys.len() >= 100, "Redis ran the dropped calls: {} keys", keys.len());
    for key in &keys {
        // -2: the key expired since the scan; -1 would be a key without TTL.
        let ttl = redis.pttl(key);
        assert!(ttl > 0 || ttl == -2, "{key} has PTTL {ttl}");
    }

    // With no traffic, K1 is full again once its bucket refilled (30 per
    // minute refill its one unit in 2 s).
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let answer = timed_call(&mut client, fikra_check("K1", 0), Duration::from_secs(1)).await;
    assert_eq!(answer.remaining_requests(), Some(29), "{answer:?}");
}

/// A CA and a server certificate for 127.0.0.1, written as PEM files.
fn write_certificates(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "redis test CA");
    let ca_key = KeyPair::generate().expect("a CA key");
    let ca = ca_params.self_signed(&ca_key).expect("a self-signed CA");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).expect("parameters");
    params.distinguished_name.push(DnType::CommonName, "redis");
    let key = KeyPair::generate().expect("a server key");
    let cert = params.signed_by(&key, &issuer).expect("a server certificate");
    std::fs::write(dir.join("redis.pem"), cert.pem()).expect("write redis.pem");
    std::fs::write(dir.join("redis-key.pem"), key.serialize_pem()).expect("write redis-key.pem");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_tls_stay_out_of_logs() {
    const PASSWORD: &str = "s3cret-redis-pw";
    const LIMITED_PASSWORD: &str = "an0ther-secret";
    let redis = RedisServer::start();
    let pki = tempfile::tempdir().expect("a certificate directory");
    write_certificates(pki.path());
    let tls_port = ops::free_port().to_string();
    let path = |name: &str| pki.path().join(name).display().to_string();
    for (name, value) in [
        ("tls-cert-file", path("redis.pem")),
        ("tls-key-file", path("redis-key.pem")),
        ("tls-ca-cert-file", path("ca.pem")),
        ("tls-auth-clients", "no".to_owned()),
        ("tls-port", tls_port.clone()),
        ("maxmemory", "64mb".to_owned()),
        ("maxmemory-policy", "noeviction".to_owned()),
    ] {
        assert_eq!(redis.cli(&["CONFIG", "SET", name, &value]), "OK", "CONFIG SET {name}");
    }
    let acl = format!(">{LIMITED_PASSWORD}");
    assert_eq!(redis.cli(&["ACL", "SETUSER", "limited", "on", &acl, "~*", "&*", "+@all", "-config"]), "OK");
    assert_eq!(redis.cli(&["CONFIG", "SET", "requirepass", PASSWORD]), "OK");

    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/fikra.yaml");
    let plain_url = format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port());
    let tls_url = format!("rediss://:{PASSWORD}@127.0.0.1:{tls_port}");
    let limited_url = format!("redis://limited:{LIMITED_PASSWORD}@127.0.0.1:{}", redis.port());
    let ca_file = path("ca.pem");
    let plain = Binary::start(&config, &["--redis-url", &plain_url]).await;
    let tls = Binary::start(&config, &["--redis-url", &tls_url, "--redis-ca-file", &ca_file]).await;
    let limited = Binary::start(&config, &["--redis-url", &limited_url]).await;

    for binary in [&plain, &tls, &limited] {
        let mut client = RateLimitServiceClient::connect(binary.grpc_url()).await.expect("connect to the service");
        let answer = client.should_rate_limit(requests_check("secret-test")).await.expect("an answer").into_inner();
        assert_eq!(answer.overall_code, Code::Ok as i32);
        let log = binary.log();
        assert!(!log.contains(PASSWORD), "the password is in the log:\n{log}");
        assert!(!log.contains(LIMITED_PASSWORD), "the second password is in the log:\n{log}");
    }
    assert!(plain.log().contains("maxmemory-policy is noeviction"), "the unsafe setting is reported:\n{}", plain.log());
    assert!(limited.log().contains("CONFIG GET failed"), "a refused CONFIG is reported:\n{}", limited.log());
    assert!(tls.log().contains("Using the Redis store"), "{}", tls.log());
}
