//! Account tiers through the admin service: promotion on every replica at
//! once, idempotent top-ups, authentication, overrides and the audit log,
//! against two in-process servers sharing one test Redis, and against the
//! in-memory store.

#[path = "support/redis.rs"]
mod redis;
#[path = "support/service.rs"]
mod service;

use std::net::SocketAddr;

use fikra_ratelimit::accounts::{AccountStore, AuditEntry};
use fikra_ratelimit::admin::{self, AdminService, AdminToken};
use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitResponse;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::proto::fikra::admin::v1 as pb;
use fikra_ratelimit::proto::fikra::admin::v1::account_admin_client::AccountAdminClient;
use fikra_ratelimit::server;
use fikra_ratelimit::store::{MemoryStore, RedisStore, Store};
use redis::RedisServer;
use service::{descriptor, rls_request};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request};

const TOKEN: &str = "test-admin-token-0123456789";

/// The shipped configuration: accounts on, tier entry trusted.
const SHIPPED: &str = include_str!("../deploy/config/fikra.yaml");

/// One replica: the decision port and the admin port over one limiter.
struct Replica {
    decision: SocketAddr,
    admin: SocketAddr,
    store: Store,
    _stops: Vec<oneshot::Sender<()>>,
}

impl Replica {
    async fn start(yaml: &str, store: Store) -> Replica {
        Self::start_with(yaml, store, LimiterSettings::default()).await
    }

    async fn start_with(yaml: &str, store: Store, settings: LimiterSettings) -> Replica {
        let limiter = Limiter::new(service::limits(yaml), store.clone(), settings);
        let decision_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind decision port");
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin port");
        let decision = decision_listener.local_addr().expect("decision address");
        let admin = admin_listener.local_addr().expect("admin address");

        let (stop_decision, decision_stopped) = oneshot::channel::<()>();
        let (stop_admin, admin_stopped) = oneshot::channel::<()>();
        let serving = limiter.clone();
        tokio::spawn(async move {
            let _ = server::run(decision_listener, serving, async {
                let _ = decision_stopped.await;
            })
            .await;
        });
        let token = AdminToken::new(TOKEN).expect("token");
        tokio::spawn(admin::serve(admin_listener, AdminService::new(limiter), token, async {
            let _ = admin_stopped.await;
        }));
        Replica { decision, admin, store, _stops: vec![stop_decision, stop_admin] }
    }

    async fn rls(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.decision)).await.expect("connect to the decision port")
    }

    async fn admin(&self) -> AccountAdminClient<Channel> {
        AccountAdminClient::connect(format!("http://{}", self.admin)).await.expect("connect to the admin port")
    }

    /// One check of `key`: a request and a token estimate of 1, no tier entry.
    async fn check(&self, key: &str) -> RateLimitResponse {
        let descriptors = vec![
            descriptor(&[("api_key", key), ("meter", "requests")], None),
            descriptor(&[("api_key", key), ("meter", "tokens")], Some(1)),
        ];
        self.rls().await.should_rate_limit(rls_request("fikra", descriptors)).await.expect("check").into_inner()
    }

    async fn audit(&self) -> Vec<AuditEntry> {
        AccountStore::new(&self.store).audit(1000).await.expect("read the audit log")
    }
}

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {TOKEN}").parse().expect("header"));
    request
}

fn header(response: &RateLimitResponse, name: &str) -> u64 {
    let header = response.response_headers_to_add.iter().find(|h| h.key == name);
    header.unwrap_or_else(|| panic!("no {name} in {response:?}")).value.parse().expect("a number")
}

async fn top_up(replica: &Replica, key: &str) -> pb::ChangeResponse {
    let request = pb::RecordTopUpRequest { api_key: key.into(), domain: String::new() };
    replica.admin().await.record_top_up(authorized(request)).await.expect("record the top-up").into_inner()
}

async fn set_override(replica: &Replica, key: &str, requests: u64) -> pb::ChangeResponse {
    let request = pb::SetOverrideRequest {
        api_key: key.into(),
        domain: String::new(),
        requests_per_unit: Some(requests),
        tokens_per_unit: None,
        unit: "minute".into(),
    };
    replica.admin().await.set_override(authorized(request)).await.expect("set the override").into_inner()
}

async fn clear_override(replica: &Replica, key: &str) -> pb::ChangeResponse {
    let request = pb::ClearOverrideRequest { api_key: key.into(), domain: String::new() };
    replica.admin().await.clear_override(authorized(request)).await.expect("clear the override").into_inner()
}

async fn two_replicas(redis: &RedisServer) -> (Replica, Replica) {
    let first = Store::Redis(RedisStore::connect(&redis.url()).await.expect("connect to the test redis"));
    let second = Store::Redis(RedisStore::connect(&redis.url()).await.expect("connect to the test redis"));
    (Replica::start(SHIPPED, first).await, Replica::start(SHIPPED, second).await)
}

fn memory_replica_store() -> Store {
    Store::Memory(MemoryStore::new(Clock::monotonic()))
}

#[tokio::test]
async fn promotion_applies_on_every_replica_at_once() {
    let redis = RedisServer::start();
    let (a, b) = two_replicas(&redis).await;
    let key = "sk-promote-me";

    // Both replicas see the key unverified, so both remember it has no record.
    for replica in [&a, &b, &a, &b, &a, &b, &a, &b, &a, &b] {
        let answer = replica.check(key).await;
        assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 30);
    }

    let change = top_up(&a, key).await;
    assert!(change.changed);
    assert_eq!(change.before.expect("before").tier, "unverified");
    assert_eq!(change.after.expect("after").tier, "trusted");

    // The next answer, on the other replica: 100 - 10 used - this one = 89
    // (90 when refill added one meanwhile).
    let answer = b.check(key).await;
    assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 100);
    assert!((89..=90).contains(&header(&answer, "x-ratelimit-remaining-requests")), "{answer:?}");
    assert_eq!(header(&answer, "x-ratelimit-limit-tokens"), 160_000);

    let answer = a.check(key).await;
    assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 100);
    assert!((88..=89).contains(&header(&answer, "x-ratelimit-remaining-requests")), "{answer:?}");
    assert_eq!(header(&answer, "x-ratelimit-limit-tokens"), 160_000);
}

#[tokio::test]
async fn promotion_keeps_usage_before_next_request() {
    let redis = RedisServer::start();
    let (a, _b) = two_replicas(&redis).await;
    let key = "sk-show-me";
    for _ in 0..10 {
        a.check(key).await;
    }
    top_up(&a, key).await;

    let request = pb::ShowRequest { api_key: key.into(), domain: String::new() };
    let shown = a.admin().await.show(authorized(request)).await.expect("show").into_inner();
    assert!(shown.known);
    assert_eq!(shown.effective_tier, "trusted");
    let requests = shown.buckets.iter().find(|b| b.meter == "requests").expect("requests bucket");
    assert_eq!(requests.capacity, 100);
    assert_eq!(requests.remaining, 90, "{shown:?}");
    let tokens = shown.buckets.iter().find(|b| b.meter == "tokens").expect("tokens bucket");
    assert_eq!(tokens.capacity, 160_000);
    assert!(!shown.key_hash.contains(key));

    // Show charges nothing.
    let request = pb::ShowRequest { api_key: key.into(), domain: String::new() };
    let again = a.admin().await.show(authorized(request)).await.expect("show").into_inner();
    let requests = again.buckets.iter().find(|b| b.meter == "requests").expect("requests bucket");
    assert_eq!(requests.remaining, 90);
}

#[tokio::test]
async fn top_up_is_idempotent_and_never_demotes() {
    let redis = RedisServer::start();
    let (a, b) = two_replicas(&redis).await;
    let key = "sk-twice";

    assert!(top_up(&a, key).await.changed);
    let second = top_up(&b, key).await;
    assert!(!second.changed);
    assert_eq!(second.before, second.after);
    assert_eq!(second.after.expect("after").tier, "trusted");

    let entries: Vec<_> = a.audit().await.into_iter().filter(|e| e.what == "record_top_up").collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(header(&a.check(key).await, "x-ratelimit-limit-requests"), 100);
}

#[tokio::test]
async fn admin_requires_the_token() {
    let replica = Replica::start(SHIPPED, memory_replica_store()).await;
    let request = pb::RecordTopUpRequest { api_key: "sk-auth".into(), domain: String::new() };

    let missing = replica.admin().await.record_top_up(Request::new(request.clone())).await.expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);

    let mut wrong = Request::new(request.clone());
    wrong.metadata_mut().insert("authorization", "Bearer not-the-token".parse().expect("header"));
    let wrong = replica.admin().await.record_top_up(wrong).await.expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(header(&replica.check("sk-auth").await, "x-ratelimit-limit-requests"), 30);

    let on_decision_port = AccountAdminClient::connect(format!("http://{}", replica.decision)).await.expect("connect");
    let refused = on_decision_port.clone().record_top_up(authorized(request)).await.expect_err("not served there");
    assert_eq!(refused.code(), Code::Unimplemented);
}

async fn override_applies_and_clears(replica: &Replica) {
    let (custom, other) = ("sk-custom", "sk-other");
    let change = set_override(replica, custom, 500).await;
    assert!(change.changed);

    let answer = replica.check(custom).await;
    assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 500);
    assert_eq!(header(&answer, "x-ratelimit-remaining-requests"), 499);
    assert_eq!(header(&answer, "x-ratelimit-limit-tokens"), 40_000, "no tokens override: the tier's");
    assert_eq!(header(&replica.check(other).await, "x-ratelimit-limit-requests"), 30);

    assert!(clear_override(replica, custom).await.changed);
    let answer = replica.check(custom).await;
    assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 30);
    assert_eq!(header(&answer, "x-ratelimit-remaining-requests"), 28, "two used, kept across the change");

    let entries = replica.audit().await;
    let set: Vec<_> = entries.iter().filter(|e| e.what == "set_override").collect();
    let cleared: Vec<_> = entries.iter().filter(|e| e.what == "clear_override").collect();
    assert_eq!(set.len(), 1, "{entries:?}");
    assert_eq!(cleared.len(), 1, "{entries:?}");
    assert!(set[0].before.contains("\"overrides\":null"), "{}", set[0].before);
    assert!(set[0].after.contains("500"), "{}", set[0].after);
    assert!(cleared[0].before.contains("500"));
    assert!(cleared[0].after.contains("\"overrides\":null"));
    for entry in &entries {
        assert!(entry.who.starts_with("token:"), "{entry:?}");
        assert!(!entry.who.contains(TOKEN));
        assert!(!format!("{entry:?}").contains("sk-custom"), "{entry:?}");
    }
}

#[tokio::test]
async fn override_applies_and_clears_in_redis() {
    let redis = RedisServer::start();
    let (a, _b) = two_replicas(&redis).await;
    override_applies_and_clears(&a).await;
}

#[tokio::test]
async fn override_applies_and_clears_in_memory() {
    let replica = Replica::start(SHIPPED, memory_replica_store()).await;
    override_applies_and_clears(&replica).await;
}

#[tokio::test]
async fn audit_records_each_change_once() {
    let redis = RedisServer::start();
    let (a, b) = two_replicas(&redis).await;
    let key = "sk-audited";

    top_up(&a, key).await;
    top_up(&b, key).await;
    set_override(&a, key, 500).await;
    clear_override(&b, key).await;
    let link = pb::LinkKeyRequest { api_key: key.into(), domain: String::new(), account_id: "acme".into() };
    a.admin().await.link_key(authorized(link)).await.expect("link");

    let entries = a.audit().await;
    let what: Vec<&str> = entries.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(what, ["record_top_up", "set_override", "clear_override", "link_key"]);
    let top = &entries[0];
    assert!(top.before.contains("unverified") && top.after.contains("trusted"), "{top:?}");
    assert!(top.at_ms > 0);
    for entry in &entries {
        assert!(!format!("{entry:?}").contains(key), "{entry:?}");
    }
    assert!(redis.keys("*").iter().all(|name| !name.contains(key)));
    assert!(redis.keys("frl1:acct:*").iter().all(|name| redis.pttl(name) == -1), "accounts carry no TTL");
}

#[tokio::test]
async fn linked_keys_share_the_account_tier() {
    let replica = Replica::start(SHIPPED, memory_replica_store()).await;
    for key in ["sk-team-1", "sk-team-2"] {
        let link = pb::LinkKeyRequest { api_key: key.into(), domain: String::new(), account_id: "team".into() };
        replica.admin().await.link_key(authorized(link)).await.expect("link");
        assert_eq!(header(&replica.check(key).await, "x-ratelimit-limit-requests"), 30);
    }
    let change = top_up(&replica, "sk-team-1").await;
    assert_eq!(change.after.expect("after").key_count, 2);

    for key in ["sk-team-1", "sk-team-2"] {
        let answer = replica.check(key).await;
        assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 100, "{key}");
        assert_eq!(header(&answer, "x-ratelimit-remaining-requests"), 98, "{key}: buckets stay per key");
    }
}

#[tokio::test]
async fn untrusted_tier_entry_is_ignored() {
    let yaml = SHIPPED.replace("trust_tier_entry: true", "trust_tier_entry: false");
    let replica = Replica::start(&yaml, memory_replica_store()).await;
    let descriptors = vec![descriptor(&[("api_key", "sk-claims"), ("tier", "trusted"), ("meter", "requests")], None)];
    let answer = replica.rls().await.should_rate_limit(rls_request("fikra", descriptors)).await.expect("check").into_inner();
    assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 30);

    let trusting = Replica::start(SHIPPED, memory_replica_store()).await;
    let descriptors = vec![descriptor(&[("api_key", "sk-claims"), ("tier", "trusted"), ("meter", "requests")], None)];
    let answer = trusting.rls().await.should_rate_limit(rls_request("fikra", descriptors)).await.expect("check").into_inner();
    assert_eq!(header(&answer, "x-ratelimit-limit-requests"), 100);
}

#[tokio::test]
async fn one_script_call_per_check_with_accounts() {
    let redis = RedisServer::start();
    let (a, b) = two_replicas(&redis).await;
    a.check("sk-warm").await;

    let before = redis.script_calls();
    a.check("sk-warm").await;
    assert_eq!(redis.script_calls() - before, 1, "an unknown key");

    top_up(&a, "sk-warm").await;
    let before = redis.script_calls();
    a.check("sk-warm").await;
    assert_eq!(redis.script_calls() - before, 2, "the first check after a change learns the record");
    let before = redis.script_calls();
    a.check("sk-warm").await;
    b.check("sk-warm").await;
    let after_first_sight = redis.script_calls() - before;
    assert_eq!(after_first_sight, 3, "replica b sees the promoted key for the first time");
    let before = redis.script_calls();
    a.check("sk-warm").await;
    b.check("sk-warm").await;
    assert_eq!(redis.script_calls() - before, 2, "one call per check once known");
}

/// With the local denial cache on, a key over its tier is denied without a
/// store call. A promotion through this replica applies at its next check,
/// and one made through another replica within the cache's maximum age.
#[tokio::test]
async fn cached_denials_follow_promotions() {
    let redis = RedisServer::start();
    let max_age = std::time::Duration::from_millis(1500);
    let settings = LimiterSettings { deny_cache_max_age: max_age, ..LimiterSettings::default() };
    let connect = || async { Store::Redis(RedisStore::connect(&redis.url()).await.expect("connect to the test redis")) };
    let a = Replica::start_with(SHIPPED, connect().await, settings.clone()).await;
    let b = Replica::start_with(SHIPPED, connect().await, settings).await;
    let (here, elsewhere) = ("sk-cached-here", "sk-cached-elsewhere");

    for key in [here, elsewhere] {
        for _ in 0..30 {
            assert_eq!(a.check(key).await.overall_code, 1, "{key} within its 30 per minute");
        }
        assert_eq!(a.check(key).await.overall_code, 2, "{key} over its 30 per minute");
    }
    let before = redis.script_calls();
    for _ in 0..20 {
        assert_eq!(a.check(here).await.overall_code, 2);
    }
    assert_eq!(redis.script_calls(), before, "denials of a known empty bucket make no store call, accounts or not");

    top_up(&a, here).await;
    let promoted = a.check(here).await;
    assert_eq!(promoted.overall_code, 1, "a promotion through this replica applies at once");
    assert_eq!(header(&promoted, "x-ratelimit-limit-requests"), 100);

    // The promotion here cleared this replica's cache: deny once more to
    // cache the other key again, then promote it through the other replica.
    assert_eq!(a.check(elsewhere).await.overall_code, 2);
    top_up(&b, elsewhere).await;
    let started = std::time::Instant::now();
    assert_eq!(a.check(elsewhere).await.overall_code, 2, "this replica has not seen the promotion yet");
    while a.check(elsewhere).await.overall_code == 2 {
        assert!(started.elapsed() <= max_age + std::time::Duration::from_millis(500), "denied past the cache's maximum age");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
