//! Store contract: the memory store and the Redis store give the same
//! decisions and the same remaining counts for the same batches.
//!
//! Each contract case is one async function that takes a [`Harness`], and
//! `contract_tests!` runs it on a `MemoryStore` and on a `RedisStore`
//! connected to a throwaway `redis-server` on loopback, one test each. It
//! also runs every case, one after the other, on a Redis Cluster of three
//! primaries and on a Sentinel-managed primary, each shared by its cases
//! (each case has its own hash tags). Cases that inspect Redis itself, and a
//! randomized comparison of the Redis script with `judge()`, run on a single
//! Redis only.
//!
//! Most cases use buckets that refill their whole capacity once per day, so
//! the few milliseconds a test takes never refill a whole unit.

#[path = "support/redis.rs"]
mod redis_server;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::limiter::bucket::{BucketParams, BucketState};
use fikra_ratelimit::limiter::keys::redis_location;
use fikra_ratelimit::limiter::judge::{
    BatchOutcome, BucketOp, Estimate, EstimateRecord, EstimateTable, Report, Settlement, judge,
};
use fikra_ratelimit::store::redis::RedisOptions;
use fikra_ratelimit::store::{Batch, Guarded, MemoryStore, RecordGuard, RedisStore, Store, StoreError};
use redis_server::{RedisCluster, RedisSentinel, RedisServer};

const TTL_SLACK: Duration = Duration::from_secs(5);
const ESTIMATE_TTL: Duration = Duration::from_secs(600);
const MINUTE_MS: u64 = 60_000;
const DAY_MS: u64 = 86_400_000;

/// Gives every test its own hash tag, so tests never share keys.
static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

/// One store under test, with a second handle on the same state.
struct Harness<'a> {
    store: Store,
    /// The same state through another handle: a clone of the memory store,
    /// or a second Redis connection pool.
    second: Store,
    backend: Backend<'a>,
    tag: u64,
}

/// Where a harness keeps its state, for cases that count stored keys.
enum Backend<'a> {
    Memory(MemoryStore),
    Redis(RedisServer),
    Cluster(&'a RedisCluster),
    Sentinel(&'a RedisSentinel),
}

/// A Redis setup shared by every case of one topology.
enum Shared {
    Cluster(RedisCluster),
    Sentinel(RedisSentinel),
}

impl Shared {
    fn url(&self) -> String {
        match self {
            Self::Cluster(cluster) => cluster.url(),
            Self::Sentinel(sentinel) => sentinel.url(),
        }
    }
}

impl Harness<'static> {
    fn memory() -> Self {
        let memory = MemoryStore::new(Clock::monotonic());
        Self {
            store: Store::Memory(memory.clone()),
            second: Store::Memory(memory.clone()),
            backend: Backend::Memory(memory),
            tag: NEXT_TAG.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn redis() -> Self {
        Self::redis_with(&options()).await
    }

    async fn redis_with(options: &RedisOptions) -> Self {
        let server = RedisServer::start();
        let store = RedisStore::connect_with(&server.url(), options).await.expect("connect to the test redis-server");
        let second =
            RedisStore::connect_with(&server.url(), options).await.expect("connect to the test redis-server again");
        Self {
            store: Store::Redis(store),
            second: Store::Redis(second),
            backend: Backend::Redis(server),
            tag: NEXT_TAG.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl<'a> Harness<'a> {
    /// Builds a harness on `shared` through the two stores every case
    /// shares, with a new tag.
    fn on(shared: &'a Shared, store: &Store, second: &Store) -> Self {
        let backend = match shared {
            Shared::Cluster(cluster) => Backend::Cluster(cluster),
            Shared::Sentinel(sentinel) => Backend::Sentinel(sentinel),
        };
        Self {
            store: store.clone(),
            second: second.clone(),
            backend,
            tag: NEXT_TAG.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn bucket(&self, name: &str) -> String {
        format!("frl1:{{t{}}}:b:{name}", self.tag)
    }

    fn estimate(&self, name: &str) -> String {
        format!("frl1:{{t{}}}:e:{name}", self.tag)
    }

    /// Returns a bucket key in another cluster slot than the keys of
    /// [`bucket`](Self::bucket).
    fn bucket_elsewhere(&self, name: &str) -> String {
        format!("frl1:{{t{}-{}}}:b:{name}", self.tag, other_slot(self.tag))
    }

    fn server(&self) -> &RedisServer {
        match &self.backend {
            Backend::Redis(server) => server,
            _ => panic!("a single-Redis harness"),
        }
    }

    fn server_mut(&mut self) -> &mut RedisServer {
        match &mut self.backend {
            Backend::Redis(server) => server,
            _ => panic!("a single-Redis harness"),
        }
    }

    async fn apply(&self, ops: Vec<BucketOp>) -> BatchOutcome {
        self.store.apply(&batch(ops)).await.expect("the store judges the batch")
    }

    /// Key of this test's account key record, in the hash slot of
    /// [`bucket`](Self::bucket).
    fn record_key(&self) -> String {
        format!("frl1:{{t{}}}:a", self.tag)
    }

    /// Stores `value` under the account key record key `key`, as an account
    /// change does.
    fn set_record(&self, key: &str, value: &str) {
        match &self.backend {
            Backend::Memory(memory) => {
                let accounts = memory.accounts();
                let current = accounts.get(key);
                assert!(accounts.compare_and_set(key, current.as_deref(), value), "set the record {key}");
            }
            Backend::Redis(server) => assert_eq!(server.cli(&["SET", key, value]), "OK"),
            Backend::Cluster(cluster) => assert_eq!(cluster.cli(&["SET", key, value]), "OK"),
            Backend::Sentinel(sentinel) => assert_eq!(sentinel.primary().cli(&["SET", key, value]), "OK"),
        }
    }

    /// Applies `ops` with one guard expecting `expected` at `record_key`.
    async fn apply_guarded(&self, ops: Vec<BucketOp>, expected: Option<&str>) -> Guarded {
        let guard = RecordGuard { key: self.record_key(), expected: expected.map(str::to_owned) };
        self.store.apply_guarded(&batch(ops), &[guard], None).await.expect("the store judges the guarded batch")
    }

    /// Number of buckets the store keeps for this test: in Redis, the
    /// fields of the hash that contains the buckets of its tag.
    fn stored_buckets(&self) -> usize {
        let hash = format!("frl1:{{t{}}}:b", self.tag);
        let count = |output: String| output.parse().unwrap_or_else(|_| panic!("HLEN {hash} returned {output:?}"));
        match &self.backend {
            Backend::Memory(memory) => memory.bucket_count(),
            Backend::Redis(server) => count(server.cli(&["HLEN", &hash])),
            Backend::Cluster(cluster) => count(cluster.cli(&["HLEN", &hash])),
            Backend::Sentinel(sentinel) => count(sentinel.primary().cli(&["HLEN", &hash])),
        }
    }
}

/// Returns a suffix that puts `frl1:{t<tag>-<suffix>}` in another cluster
/// slot than `frl1:{t<tag>}`.
fn other_slot(tag: u64) -> u32 {
    let home = fred::util::redis_keyslot(format!("t{tag}").as_bytes());
    (0..).find(|suffix| fred::util::redis_keyslot(format!("t{tag}-{suffix}").as_bytes()) != home).expect("a suffix")
}

/// Store settings for tests: a generous time limit, since a loaded test
/// machine may take longer than a production deadline.
fn options() -> RedisOptions {
    RedisOptions { store_timeout: Duration::from_secs(5), ..RedisOptions::default() }
}

fn batch(ops: Vec<BucketOp>) -> Batch {
    Batch { ops, ttl_slack: TTL_SLACK, estimate_ttl: ESTIMATE_TTL }
}

/// Returns params for a bucket of `capacity` units that refills `capacity`
/// units per day.
fn slow(capacity: u64) -> BucketParams {
    BucketParams::new(capacity, DAY_MS, capacity).expect("exact params")
}

fn op(key: &str, params: BucketParams) -> BucketOp {
    BucketOp {
        key: key.to_owned(),
        params,
        check: None,
        shadow: false,
        credit: 0,
        reports: Vec::new(),
        estimates: Vec::new(),
    }
}

fn check(key: &str, params: BucketParams, cost: u64) -> BucketOp {
    BucketOp { check: Some(cost), ..op(key, params) }
}

fn report(key: &str, params: BucketParams, amount: u64, estimate_key: Option<&str>) -> BucketOp {
    let reports = vec![Report { amount, estimate_key: estimate_key.map(str::to_owned) }];
    BucketOp { reports, ..op(key, params) }
}

fn estimated(key: &str, params: BucketParams, cost: u64, estimate_key: &str) -> BucketOp {
    let estimates = vec![Estimate { key: estimate_key.to_owned(), amount: cost }];
    BucketOp { estimates, ..check(key, params, cost) }
}

/// Whole units left in bucket `index` of `outcome`.
fn left(outcome: &BatchOutcome, index: usize, params: &BucketParams) -> u64 {
    outcome.buckets[index].state.remaining(params)
}

macro_rules! contract_tests {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn memory() {
                    super::$case(&super::Harness::memory()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$case(&super::Harness::redis().await).await;
                }
            }
        )*

        /// Runs every contract case in turn on `shared`, naming each case
        /// before it runs so a failure shows which one.
        async fn run_every_case(shared: &Shared) {
            let url = shared.url();
            let store = Store::Redis(RedisStore::connect_with(&url, &options()).await.expect("connect"));
            let second = Store::Redis(RedisStore::connect_with(&url, &options()).await.expect("connect again"));
            $(
                eprintln!("contract case {}", stringify!($case));
                $case(&Harness::on(shared, &store, &second)).await;
            )*
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_on_cluster() {
    run_every_case(&Shared::Cluster(RedisCluster::start(3, 0))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_on_sentinel() {
    run_every_case(&Shared::Sentinel(RedisSentinel::start())).await;
}

contract_tests!(
    fresh_bucket_is_full,
    checks_are_charged,
    all_or_nothing_across_buckets,
    all_or_nothing_across_slots,
    check_only_needs_one_unit,
    cost_above_capacity_is_denied,
    reports_make_debt_up_to_clamp,
    reports_apply_when_checks_deny,
    reports_apply_across_slots_when_checks_deny,
    credits_stop_at_capacity,
    settlement_refunds_overestimate,
    settlement_charges_underestimate,
    settlement_of_unknown_request_charges_report,
    settlement_duplicate_changes_nothing,
    settlement_estimates_add_up,
    settlement_denied_check_remembers_nothing,
    settlement_denied_across_slots_remembers_nothing,
    shadow_ops_never_deny,
    full_bucket_is_not_stored,
    refill_follows_real_time,
    rescale_keeps_used_amount,
    trillion_per_minute_is_exact,
    concurrent_checks_admit_capacity,
    concurrent_checks_across_slots_charge_only_admitted,
    guard_matching_record_applies,
    guard_stale_record_touches_nothing,
    guard_across_slots_matches_one_slot,
);

// === Contract cases ===

/// Key records as the account store writes them: revision 1 in the
/// unverified tier, then revision 2 after a top-up.
const RECORD_BEFORE: &str = "a1|1|acme|unverified|||";
const RECORD_AFTER: &str = "a1|2|acme|trusted|||";

/// Returns the outcome of a guarded batch that was judged, panicking when
/// the store found the guard stale.
fn judged(guarded: Guarded) -> BatchOutcome {
    match guarded {
        Guarded::Judged(outcome) => outcome,
        Guarded::Stale(actual) => panic!("the guard was stale, the store holds {actual:?}"),
    }
}

async fn fresh_bucket_is_full(h: &Harness<'_>) {
    let p = slow(10);
    let out = h.apply(vec![check(&h.bucket("a"), p, 0)]).await;
    assert!(out.allowed);
    assert!(out.buckets[0].fits);
    assert_eq!(out.buckets[0].state.level, 0);
    assert_eq!(left(&out, 0, &p), 10);
}

async fn checks_are_charged(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket("b"));
    let p = slow(10);

    let out = h.apply(vec![check(&a, p, 3), check(&b, p, 5)]).await;
    assert!(out.allowed);
    assert!(out.buckets[0].charged);
    assert!(out.buckets[1].charged);
    assert_eq!(left(&out, 0, &p), 7);
    assert_eq!(left(&out, 1, &p), 5);

    let out = h.apply(vec![check(&a, p, 4)]).await;
    assert!(out.allowed);
    assert_eq!(left(&out, 0, &p), 3);

    let out = h.apply(vec![check(&a, p, 4)]).await;
    assert!(!out.allowed, "4 units do not fit in 3");
    assert!(!out.buckets[0].fits);
    assert!(!out.buckets[0].charged);
    assert_eq!(left(&out, 0, &p), 3);

    let out = h.apply(vec![check(&a, p, 3)]).await;
    assert!(out.allowed);
    assert_eq!(left(&out, 0, &p), 0);
}

async fn all_or_nothing_across_buckets(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket("b"));
    let (pa, pb) = (slow(10), slow(3));

    let out = h.apply(vec![check(&a, pa, 5), check(&b, pb, 5)]).await;
    assert!(!out.allowed);
    assert!(out.buckets[0].fits);
    assert!(!out.buckets[0].charged, "a denied check charges no bucket");
    assert!(!out.buckets[1].fits);
    assert!(!out.buckets[1].charged);
    assert_eq!(left(&out, 0, &pa), 10);
    assert_eq!(left(&out, 1, &pb), 3);

    let out = h.apply(vec![check(&a, pa, 5)]).await;
    assert!(out.allowed);
    assert_eq!(left(&out, 0, &pa), 5, "the denied batch charged nothing before");
}

async fn all_or_nothing_across_slots(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket_elsewhere("b"));
    let (pa, pb) = (slow(10), slow(3));

    let out = h.apply(vec![check(&a, pa, 5), check(&b, pb, 5)]).await;
    assert!(!out.allowed);
    assert!(out.buckets[0].fits);
    assert!(!out.buckets[0].charged, "a denied check charges no bucket in any slot");
    assert!(!out.buckets[1].fits);
    assert_eq!(left(&out, 0, &pa), 10);
    assert_eq!(left(&out, 1, &pb), 3);

    let out = h.apply(vec![check(&a, pa, 5), check(&b, pb, 2)]).await;
    assert!(out.allowed);
    assert!(out.buckets.iter().all(|bucket| bucket.charged));
    assert_eq!(left(&out, 0, &pa), 5, "the denied batch left nothing held");
    assert_eq!(left(&out, 1, &pb), 1);

    let out = h.apply(vec![check(&b, pb, 2), check(&a, pa, 1)]).await;
    assert!(!out.allowed, "2 units do not fit in 1");
    assert_eq!(left(&out, 1, &pa), 5);

    let out = h.apply(vec![check(&a, pa, 0), check(&b, pb, 0)]).await;
    assert_eq!(left(&out, 0, &pa), 5, "the second denial left nothing held either");
    assert_eq!(left(&out, 1, &pb), 1);
}

async fn check_only_needs_one_unit(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = slow(2);

    let out = h.apply(vec![check(&a, p, 1)]).await;
    assert_eq!(left(&out, 0, &p), 1);
    let out = h.apply(vec![check(&a, p, 0)]).await;
    assert!(out.allowed, "one unit left admits a check-only descriptor");
    assert_eq!(left(&out, 0, &p), 1, "a check-only descriptor costs nothing");

    h.apply(vec![check(&a, p, 1)]).await;
    let out = h.apply(vec![check(&a, p, 0)]).await;
    assert!(!out.allowed, "an empty bucket denies a check-only descriptor");
    assert_eq!(left(&out, 0, &p), 0);
}

async fn cost_above_capacity_is_denied(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = slow(5);
    let out = h.apply(vec![check(&a, p, 6)]).await;
    assert!(!out.allowed);
    assert_eq!(left(&out, 0, &p), 5);
}

async fn reports_make_debt_up_to_clamp(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = slow(10);

    let out = h.apply(vec![BucketOp { check: Some(0), ..report(&a, p, 15, None) }]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::Unmatched]);
    assert_eq!(out.buckets[0].forgiven, 0);
    assert_eq!(out.buckets[0].state.level, 15 * p.scale, "the report goes 5 units into debt");
    assert!(!out.allowed, "a bucket in debt denies checks");
    assert_eq!(left(&out, 0, &p), 0);

    // A millisecond between the batches refills a few sub-units, less than
    // a unit, so the clamp still forgives 5 whole units.
    let out = h.apply(vec![report(&a, p, 10, None)]).await;
    assert_eq!(out.buckets[0].forgiven, 5, "debt stops at one capacity");
    let level = out.buckets[0].state.level;
    assert!(level <= p.max_level(), "level {level} is above the clamp");
    assert!(level > p.max_level() - p.scale, "level {level} is a unit or more below the clamp");

    let out = h.apply(vec![check(&a, p, 1)]).await;
    assert!(!out.allowed);
}

async fn reports_apply_when_checks_deny(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket("b"));
    let (pa, pb) = (slow(3), slow(10));

    let out = h.apply(vec![check(&a, pa, 5), report(&b, pb, 4, None)]).await;
    assert!(!out.allowed);
    assert_eq!(left(&out, 1, &pb), 6, "the report is charged although the check is denied");
    assert_eq!(left(&out, 0, &pa), 3);
}

async fn reports_apply_across_slots_when_checks_deny(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket_elsewhere("b"));
    let (pa, pb) = (slow(3), slow(10));

    let out = h.apply(vec![check(&a, pa, 5), report(&b, pb, 4, None)]).await;
    assert!(!out.allowed);
    assert_eq!(left(&out, 1, &pb), 6, "the report is charged although the check is denied");

    let out = h.apply(vec![check(&b, pb, 0)]).await;
    assert_eq!(left(&out, 0, &pb), 6, "the denial did not take the report back");
}

async fn credits_stop_at_capacity(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = slow(10);

    h.apply(vec![check(&a, p, 3)]).await;
    let out = h.apply(vec![BucketOp { credit: 5, ..op(&a, p) }]).await;
    assert_eq!(left(&out, 0, &p), 10, "a credit never goes above capacity");
    assert_eq!(out.buckets[0].state.level, 0);

    h.apply(vec![check(&a, p, 8)]).await;
    let out = h.apply(vec![BucketOp { credit: 2, ..check(&a, p, 4) }]).await;
    assert!(out.allowed, "the credit applies before the check");
    assert_eq!(left(&out, 0, &p), 0);
}

async fn settlement_refunds_overestimate(h: &Harness<'_>) {
    let (a, r) = (h.bucket("a"), h.estimate("r1"));
    let p = slow(100);

    let out = h.apply(vec![estimated(&a, p, 10, &r)]).await;
    assert_eq!(left(&out, 0, &p), 90);

    let out = h.apply(vec![report(&a, p, 4, Some(&r))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::Settled { estimate: 10, actual: 4 }]);
    assert_eq!(left(&out, 0, &p), 96);
}

async fn settlement_charges_underestimate(h: &Harness<'_>) {
    let (a, r) = (h.bucket("a"), h.estimate("r1"));
    let p = slow(100);

    h.apply(vec![estimated(&a, p, 10, &r)]).await;
    let out = h.apply(vec![report(&a, p, 25, Some(&r))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::Settled { estimate: 10, actual: 25 }]);
    assert_eq!(left(&out, 0, &p), 75);
}

async fn settlement_of_unknown_request_charges_report(h: &Harness<'_>) {
    let (a, r) = (h.bucket("a"), h.estimate("unknown"));
    let p = slow(100);

    let out = h.apply(vec![report(&a, p, 7, Some(&r))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::UnknownRequest]);
    assert_eq!(left(&out, 0, &p), 93);

    let out = h.apply(vec![report(&a, p, 7, Some(&r))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::Duplicate], "the first report settled the request id");
    assert_eq!(left(&out, 0, &p), 93);
}

async fn settlement_duplicate_changes_nothing(h: &Harness<'_>) {
    let (a, r) = (h.bucket("a"), h.estimate("r1"));
    let p = slow(100);

    h.apply(vec![estimated(&a, p, 10, &r)]).await;
    h.apply(vec![report(&a, p, 4, Some(&r))]).await;
    for amount in [4, 50] {
        let out = h.apply(vec![report(&a, p, amount, Some(&r))]).await;
        assert_eq!(out.buckets[0].settlements, [Settlement::Duplicate]);
        assert_eq!(left(&out, 0, &p), 96, "a second report of {amount} changes nothing");
    }
}

async fn settlement_estimates_add_up(h: &Harness<'_>) {
    let (a, r) = (h.bucket("a"), h.estimate("r1"));
    let p = slow(100);

    h.apply(vec![estimated(&a, p, 10, &r)]).await;
    let out = h.apply(vec![estimated(&a, p, 10, &r)]).await;
    assert_eq!(left(&out, 0, &p), 80);

    let out = h.apply(vec![report(&a, p, 5, Some(&r))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::Settled { estimate: 20, actual: 5 }]);
    assert_eq!(left(&out, 0, &p), 95);
}

async fn settlement_denied_check_remembers_nothing(h: &Harness<'_>) {
    let (a, b, r) = (h.bucket("a"), h.bucket("b"), h.estimate("r1"));
    let (pa, pb) = (slow(10), slow(1));

    // The estimate's bucket fits, but another bucket of the batch denies it.
    let out = h.apply(vec![estimated(&a, pa, 5, &r), check(&b, pb, 2)]).await;
    assert!(!out.allowed);
    assert_eq!(left(&out, 0, &pa), 10);

    let out = h.apply(vec![report(&a, pa, 3, Some(&r))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::UnknownRequest]);
    assert_eq!(left(&out, 0, &pa), 7, "the report is charged in full");
}

async fn settlement_denied_across_slots_remembers_nothing(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket_elsewhere("b"));
    let (denied, allowed) = (h.estimate("r1"), h.estimate("r2"));
    let (pa, pb) = (slow(10), slow(1));

    // The estimate's slot fits, but the other slot denies the batch.
    let out = h.apply(vec![estimated(&a, pa, 5, &denied), check(&b, pb, 2)]).await;
    assert!(!out.allowed);
    assert_eq!(left(&out, 0, &pa), 10);

    let out = h.apply(vec![report(&a, pa, 3, Some(&denied))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::UnknownRequest]);
    assert_eq!(left(&out, 0, &pa), 7, "the report is charged in full");

    let out = h.apply(vec![estimated(&a, pa, 2, &allowed), check(&b, pb, 1)]).await;
    assert!(out.allowed);
    let out = h.apply(vec![report(&a, pa, 1, Some(&allowed))]).await;
    assert_eq!(out.buckets[0].settlements, [Settlement::Settled { estimate: 2, actual: 1 }]);
    assert_eq!(left(&out, 0, &pa), 6, "an allowed batch across slots remembers its estimate");
}

async fn shadow_ops_never_deny(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket("b"));
    let (pa, pb) = (slow(10), slow(3));
    let shadow = |cost| BucketOp { shadow: true, ..check(&b, pb, cost) };

    let out = h.apply(vec![check(&a, pa, 1), shadow(5)]).await;
    assert!(out.allowed, "a shadow bucket that cannot pay does not deny");
    assert!(out.buckets[0].charged);
    assert!(!out.buckets[1].fits);
    assert!(!out.buckets[1].charged);
    assert_eq!(left(&out, 0, &pa), 9);
    assert_eq!(left(&out, 1, &pb), 3);

    let out = h.apply(vec![check(&a, pa, 1), shadow(2)]).await;
    assert!(out.buckets[1].charged, "a shadow bucket that can pay is charged");
    assert_eq!(left(&out, 0, &pa), 8);
    assert_eq!(left(&out, 1, &pb), 1);

    let out = h.apply(vec![check(&a, pa, 20), shadow(1)]).await;
    assert!(!out.allowed);
    assert!(out.buckets[1].fits);
    assert!(!out.buckets[1].charged, "a denied batch charges no shadow bucket");
    assert_eq!(left(&out, 1, &pb), 1);
}

async fn full_bucket_is_not_stored(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = slow(10);

    h.apply(vec![check(&a, p, 0)]).await;
    assert_eq!(h.stored_buckets(), 0, "a check-only descriptor on a full bucket stores nothing");

    h.apply(vec![check(&a, p, 3)]).await;
    assert_eq!(h.stored_buckets(), 1);

    let out = h.apply(vec![BucketOp { credit: 3, ..op(&a, p) }]).await;
    assert_eq!(out.buckets[0].state.level, 0);
    assert_eq!(h.stored_buckets(), 0, "a bucket credited back to full is deleted");
}

async fn refill_follows_real_time(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = BucketParams::new(10, 1000, 10).expect("exact params");

    let out = h.apply(vec![check(&a, p, 10)]).await;
    assert_eq!(left(&out, 0, &p), 0);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = h.apply(vec![check(&a, p, 0)]).await;
    let refilled = left(&out, 0, &p);
    assert!((2..=4).contains(&refilled), "300 ms refills 3 of 10 per second, give or take one: got {refilled}");
}

async fn rescale_keeps_used_amount(h: &Harness<'_>) {
    let a = h.bucket("a");
    let per_minute = |limit| BucketParams::new(limit, MINUTE_MS, limit).expect("exact params");

    let out = h.apply(vec![check(&a, per_minute(30), 10)]).await;
    assert_eq!(left(&out, 0, &per_minute(30)), 20);

    let out = h.apply(vec![check(&a, per_minute(100), 0)]).await;
    assert_eq!(left(&out, 0, &per_minute(100)), 90, "the 10 units used stay used under the higher limit");
    assert_eq!(out.buckets[0].state.scale, per_minute(100).scale);

    let out = h.apply(vec![check(&a, per_minute(5), 0)]).await;
    assert!(!out.allowed, "10 used of a 5 capacity is debt");
    assert_eq!(left(&out, 0, &per_minute(5)), 0);
}

async fn trillion_per_minute_is_exact(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket("b"));
    let trillion = 1_000_000_000_000;
    let p = BucketParams::new(trillion, MINUTE_MS, trillion).expect("10^12 per minute is exact");

    let out = h.apply(vec![check(&a, p, 1)]).await;
    assert_eq!(left(&out, 0, &p), 999_999_999_999);

    let out = h.apply(vec![report(&b, p, 3 * trillion + 7, None)]).await;
    assert_eq!(out.buckets[0].forgiven, trillion + 7, "the clamp forgives exactly what passes 2x capacity");
    assert_eq!(out.buckets[0].state.level, p.max_level());
}

async fn concurrent_checks_admit_capacity(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = slow(30);

    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = if i % 2 == 0 { h.store.clone() } else { h.second.clone() };
        let batch = batch(vec![check(&a, p, 1)]);
        tasks.push(tokio::spawn(async move { store.apply(&batch).await }));
    }
    let mut admitted = 0;
    for task in tasks {
        let outcome = task.await.expect("task runs").expect("the store judges the batch");
        if outcome.allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 30, "200 concurrent checks of 1 on a bucket of 30");

    let out = h.apply(vec![check(&a, p, 0)]).await;
    assert_eq!(left(&out, 0, &p), 0);
}

async fn concurrent_checks_across_slots_charge_only_admitted(h: &Harness<'_>) {
    let (small, large) = (h.bucket("small"), h.bucket_elsewhere("large"));
    let (ps, pl) = (slow(30), slow(1000));

    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = if i % 2 == 0 { h.store.clone() } else { h.second.clone() };
        let ops = if i % 3 == 0 {
            vec![check(&large, pl, 1), check(&small, ps, 1)]
        } else {
            vec![check(&small, ps, 1), check(&large, pl, 1)]
        };
        let batch = batch(ops);
        tasks.push(tokio::spawn(async move { store.apply(&batch).await }));
    }
    let mut admitted = 0;
    for task in tasks {
        let outcome = task.await.expect("task runs").expect("the store judges the batch");
        if outcome.allowed {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 30, "200 concurrent checks on a bucket of 30 and one of 1000");

    let out = h.apply(vec![check(&small, ps, 0), check(&large, pl, 0)]).await;
    assert_eq!(left(&out, 0, &ps), 0);
    assert_eq!(left(&out, 1, &pl), 970, "only the admitted checks stay charged on the large bucket");
}

async fn guard_matching_record_applies(h: &Harness<'_>) {
    let a = h.bucket("a");
    let p = slow(10);

    // No record stored and none expected.
    let out = judged(h.apply_guarded(vec![check(&a, p, 3)], None).await);
    assert!(out.allowed);
    assert!(out.buckets[0].charged);
    assert_eq!(left(&out, 0, &p), 7);

    h.set_record(&h.record_key(), RECORD_BEFORE);
    let out = judged(h.apply_guarded(vec![check(&a, p, 3)], Some(RECORD_BEFORE)).await);
    assert!(out.allowed);
    assert!(out.buckets[0].charged);
    assert_eq!(left(&out, 0, &p), 4);
}

async fn guard_stale_record_touches_nothing(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket("b"));
    let p = slow(10);
    h.set_record(&h.record_key(), RECORD_AFTER);

    // A check and a report, which applies even when checks deny, both wait
    // for a guard that holds.
    let ops = || vec![check(&a, p, 3), report(&b, p, 4, None)];
    let stale = h.apply_guarded(ops(), Some(RECORD_BEFORE)).await;
    assert_eq!(stale, Guarded::Stale(vec![Some(RECORD_AFTER.to_owned())]), "an older record expected");
    let stale = h.apply_guarded(ops(), None).await;
    assert_eq!(stale, Guarded::Stale(vec![Some(RECORD_AFTER.to_owned())]), "no record expected");
    assert_eq!(h.stored_buckets(), 0, "a stale guard stored a bucket");

    let out = h.apply(vec![check(&a, p, 0), check(&b, p, 0)]).await;
    assert_eq!(left(&out, 0, &p), 10, "a stale guard charged the check");
    assert_eq!(left(&out, 1, &p), 10, "a stale guard applied the report");

    // Expecting a record where none is stored is stale too.
    let missing = RecordGuard { key: format!("{}-missing", h.record_key()), expected: Some(RECORD_BEFORE.to_owned()) };
    let stale = h.store.apply_guarded(&batch(ops()), &[missing], None).await.expect("the store judges the guarded batch");
    assert_eq!(stale, Guarded::Stale(vec![None]));
    assert_eq!(h.stored_buckets(), 0, "a stale guard stored a bucket");

    // With the actual record as its guess, the same batch applies.
    let out = judged(h.apply_guarded(ops(), Some(RECORD_AFTER)).await);
    assert!(out.allowed);
    assert_eq!(left(&out, 0, &p), 7);
    assert_eq!(left(&out, 1, &p), 6);
}

async fn guard_across_slots_matches_one_slot(h: &Harness<'_>) {
    let (a, b) = (h.bucket("a"), h.bucket_elsewhere("b"));
    let p = slow(10);
    h.set_record(&h.record_key(), RECORD_AFTER);

    let stale = h.apply_guarded(vec![check(&a, p, 2), check(&b, p, 2)], Some(RECORD_BEFORE)).await;
    assert_eq!(stale, Guarded::Stale(vec![Some(RECORD_AFTER.to_owned())]));
    let out = h.apply(vec![check(&a, p, 0), check(&b, p, 0)]).await;
    assert_eq!(left(&out, 0, &p), 10, "a stale guard charged the bucket in the record's slot");
    assert_eq!(left(&out, 1, &p), 10, "a stale guard charged the bucket in another slot");

    let out = judged(h.apply_guarded(vec![check(&a, p, 2), check(&b, p, 2)], Some(RECORD_AFTER)).await);
    assert!(out.allowed);
    assert_eq!(left(&out, 0, &p), 8);
    assert_eq!(left(&out, 1, &p), 8);
}

// === Redis only ===

#[tokio::test]
async fn redis_keys_expire_when_full() {
    let h = Harness::redis().await;
    let (fast, slow_key, r) = (h.bucket("fast"), h.bucket("slow"), h.estimate("r1"));
    let fast_params = BucketParams::new(10, 1000, 10).expect("exact params");
    let slow_params = slow(100);

    let ops = vec![check(&fast, fast_params, 4), estimated(&slow_key, slow_params, 30, &r)];
    let out = h.apply(ops.clone()).await;
    assert!(out.allowed);

    // Both buckets are fields of one hash, whose TTL covers the one that
    // needs longer: the slow one.
    let (hash, _) = redis_location(&fast);
    assert_eq!(redis_location(&slow_key).0, hash);
    let mut bounds = Vec::new();
    for (op, result) in ops.iter().zip(&out.buckets) {
        let reset_ms = result.state.reset_ms(&op.params, out.now_ms);
        bounds.push(reset_ms + TTL_SLACK.as_millis() as u64);

        let stored = h.server().cli(&["HGET", hash, redis_location(&op.key).1]);
        let state = result.state;
        let params = &op.params;
        let expected =
            format!("{}:{}:{}:{}:{}", state.level, state.stamp_ms, state.scale, params.refill_per_tick, params.tick_ms);
        assert_eq!(stored, expected);
    }
    let pttl = h.server().pttl(hash);
    assert!(bounds[0] < bounds[1], "{bounds:?}");
    assert!(pttl as u64 > bounds[0], "PTTL of {hash} is {pttl}, below the fast bucket's {}", bounds[0]);
    assert!(pttl as u64 <= bounds[1], "PTTL of {hash} is {pttl}, above {}", bounds[1]);

    // A write that needs a shorter TTL never shortens the hash's TTL. A
    // report takes the general path. The slow bucket needs hours, so a
    // minute of margin covers the test's own time.
    h.apply(vec![report(&fast, fast_params, 1, None)]).await;
    let after = h.server().pttl(hash);
    assert!(after as u64 + 60_000 > bounds[1], "PTTL of {hash} went from {pttl} to {after}");
    assert!(after <= pttl, "PTTL of {hash} grew from {pttl} to {after}");

    let pttl = h.server().pttl(&r);
    assert!(pttl > 0, "estimate PTTL is {pttl}");
    assert!(pttl as u128 <= ESTIMATE_TTL.as_millis(), "estimate PTTL {pttl} is above the estimate TTL");
    assert_eq!(h.server().cli(&["GET", &r]), "o:30");

    h.apply(vec![report(&slow_key, slow_params, 30, Some(&r))]).await;
    assert_eq!(h.server().cli(&["GET", &r]), "s");
}

/// The plain path (checks only) gives a hash the TTL of its longest-lived
/// bucket and never shortens it, also when the buckets arrive in another
/// order or alone.
#[tokio::test]
async fn redis_hash_ttl_covers_longest_bucket() {
    let h = Harness::redis().await;
    let (fast, slow_key) = (h.bucket("fast"), h.bucket("slow"));
    let fast_params = BucketParams::new(10, 1000, 10).expect("exact params");
    let slow_params = slow(100);
    let (hash, _) = redis_location(&fast);
    let slack = TTL_SLACK.as_millis() as u64;

    // The slow bucket needs hours, the fast one less than a second; a
    // minute of margin covers the time the test takes.
    let out = h.apply(vec![check(&fast, fast_params, 4), check(&slow_key, slow_params, 30)]).await;
    assert!(out.allowed);
    let fast_needs = out.buckets[0].state.reset_ms(&fast_params, out.now_ms) + slack;
    let slow_needs = out.buckets[1].state.reset_ms(&slow_params, out.now_ms) + slack;
    assert!(fast_needs + 60_000 < slow_needs, "{fast_needs} {slow_needs}");
    let pttl = h.server().pttl(hash) as u64;
    assert!(pttl + 60_000 > slow_needs, "PTTL {pttl} of {hash} does not cover the slow bucket ({slow_needs})");
    assert!(pttl <= slow_needs, "PTTL {pttl} of {hash} is above the slow bucket's {slow_needs}");

    h.apply(vec![check(&fast, fast_params, 1)]).await;
    let after = h.server().pttl(hash) as u64;
    assert!(after + 60_000 > slow_needs, "a check of the fast bucket cut PTTL {pttl} to {after}");

    // A new hash gets a TTL from its first write.
    let other = h.bucket_elsewhere("fast");
    h.apply(vec![check(&other, fast_params, 1)]).await;
    let (other_hash, _) = redis_location(&other);
    let ttl = h.server().pttl(other_hash);
    assert!(ttl > 0, "PTTL {ttl} of a new hash");
    assert!(ttl as u64 <= 100 + slack, "PTTL {ttl} of a new hash");
}

#[tokio::test]
async fn redis_reloads_flushed_script() {
    let h = Harness::redis().await;
    let a = h.bucket("a");
    let p = slow(10);

    h.apply(vec![check(&a, p, 1)]).await;
    h.server().cli(&["SCRIPT", "FLUSH"]);
    let out = h.apply(vec![check(&a, p, 1)]).await;
    assert_eq!(left(&out, 0, &p), 8, "the batch after SCRIPT FLUSH runs once");
}

#[tokio::test]
async fn redis_unreadable_value_aborts_batch() {
    let h = Harness::redis().await;
    let (good, bad) = (h.bucket("good"), h.bucket("bad"));
    let p = slow(10);
    let too_large = format!("{}:1:{}", 1_u64 << 53, p.scale);
    let values = ["not-a-bucket", "1:2", "1:2:3:4", "-1:2:3", " 1:2:3", "1:2:", too_large.as_str()];

    // Checks alone and with reports, each without and with a matching guard.
    let batches = [
        vec![check(&good, p, 1), check(&bad, p, 1)],
        vec![check(&good, p, 1), report(&bad, p, 1, None)],
        vec![check(&bad, p, 0)],
    ];
    let (hash, bad_field) = redis_location(&bad);
    let good_field = redis_location(&good).1;
    for value in values {
        h.server().cli(&["HSET", hash, bad_field, value]);
        for ops in &batches {
            let guard = RecordGuard { key: h.record_key(), expected: None };
            for guards in [&[][..], &[guard][..]] {
                let result = h.store.apply_guarded(&batch(ops.clone()), guards, None).await;
                let error = result.expect_err("an unreadable bucket fails the batch");
                assert!(matches!(error, StoreError::Protocol(_)), "{value:?}: {error:?}");
                assert!(error.to_string().contains("unreadable bucket value at"), "{value:?}: {error}");
                assert!(!error.is_transient());
                assert_eq!(h.server().cli(&["HEXISTS", hash, good_field]), "0", "{value:?}: nothing is written");
                assert_eq!(h.server().cli(&["HGET", hash, bad_field]), value, "the unreadable value stays");
            }
        }
    }
}

#[tokio::test]
async fn redis_outage_is_transient_and_recovers() {
    let mut h = Harness::redis().await;
    let a = h.bucket("a");
    let p = slow(10);
    h.apply(vec![check(&a, p, 1)]).await;

    h.server_mut().stop();
    let started = Instant::now();
    let error = h.store.apply(&batch(vec![check(&a, p, 1)])).await.expect_err("Redis is down");
    assert!(error.is_transient(), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "the failure took {:?}", started.elapsed());
    assert!(h.store.ping().await.is_err());

    // The restarted server is empty and has no script loaded.
    h.server_mut().restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        match h.store.apply(&batch(vec![check(&a, p, 1)])).await {
            Ok(out) => break out,
            Err(error) if error.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the store did not recover: {error:?}"),
        }
    };
    assert_eq!(left(&out, 0, &p), 9);

    // Every pooled connection reconnects on its own schedule, so a ping may
    // meet one still reconnecting just after the first call succeeded.
    loop {
        match h.store.ping().await {
            Ok(()) => break,
            Err(error) if Instant::now() < deadline => {
                assert!(error.is_transient(), "{error:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("ping after recovery: {error:?}"),
        }
    }
}

#[tokio::test]
async fn redis_hung_server_times_out() {
    let h = Harness::redis_with(&RedisOptions { store_timeout: Duration::from_millis(500), ..options() }).await;
    let a = h.bucket("a");
    let p = slow(10);
    h.apply(vec![check(&a, p, 1)]).await;

    h.server().pause();
    let started = Instant::now();
    let error = h.store.apply(&batch(vec![check(&a, p, 1)])).await.expect_err("Redis does not reply");
    let waited = started.elapsed();
    h.server().resume();
    assert!(error.is_transient(), "{error:?}");
    assert!(waited < Duration::from_secs(3), "the call waited {waited:?} for a hung Redis");

    // Redis still runs the timed-out batch once it resumes, so that check
    // may have been charged.
    let out = h.apply(vec![check(&a, p, 1)]).await;
    let remaining = left(&out, 0, &p);
    assert!((7..=8).contains(&remaining), "remaining {remaining}");
}

#[tokio::test]
async fn redis_connect_to_silent_listener_times_out() {
    // The kernel accepts connections to this listener, but nothing replies.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let options = RedisOptions { connect_timeout: Duration::from_millis(500), ..RedisOptions::default() };

    let started = Instant::now();
    let error =
        RedisStore::connect_with(&format!("redis://127.0.0.1:{port}"), &options).await.expect_err("nothing replies");
    assert!(started.elapsed() < Duration::from_secs(2), "connect took {:?}", started.elapsed());
    assert!(error.is_transient(), "{error:?}");
}

#[tokio::test]
async fn redis_connect_fails_fast_without_leaking_password() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    let url = format!("redis://user:s3cret-password@127.0.0.1:{free}");
    let options = RedisOptions { connect_timeout: Duration::from_millis(500), ..RedisOptions::default() };

    let started = Instant::now();
    let error = RedisStore::connect_with(&url, &options).await.expect_err("nothing listens");
    assert!(started.elapsed() < Duration::from_secs(2), "connect took {:?}", started.elapsed());
    assert!(error.is_transient(), "{error:?}");
    assert!(!error.to_string().contains("s3cret"), "the error shows the password: {error}");
}

// === Redis script against judge() ===

/// Estimate records as `judge` keeps them, without expiry: every TTL in the
/// comparison outlasts it.
#[derive(Default)]
struct Estimates(HashMap<String, EstimateRecord>);

impl EstimateTable for Estimates {
    fn get(&mut self, key: &str) -> Option<EstimateRecord> {
        self.0.get(key).copied()
    }

    fn put(&mut self, key: &str, record: EstimateRecord) {
        self.0.insert(key.to_owned(), record);
    }
}

/// A xorshift64* generator, so the comparison is the same on every run.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Returns an amount from 0 to `percent`% of `capacity`, often a small one.
    fn amount(&mut self, capacity: u64, percent: u64) -> u64 {
        if self.chance(30) {
            return self.below(4);
        }
        let ceiling = capacity.saturating_mul(percent) / 100;
        self.below(ceiling + 1)
    }
}

/// Params the comparison switches between. The 30- and 29-day windows have
/// scales near 2.5e9, so a rescale between them multiplies past 2^53.
fn comparison_params() -> Vec<BucketParams> {
    let exact = |limit, window_ms, capacity| BucketParams::new(limit, window_ms, capacity).expect("exact params");
    vec![
        exact(10, 1_000, 10),
        exact(30, MINUTE_MS, 30),
        exact(100, MINUTE_MS, 100),
        exact(5, 3_600_000, 20),
        exact(7, 30 * DAY_MS, 7),
        exact(11, 29 * DAY_MS, 11),
        exact(1_000_000_000_000, MINUTE_MS, 1_000_000_000_000),
        exact(999_999_999_989, DAY_MS, 999_999_999_989),
        exact(3, 1_000, 1),
        exact(0, MINUTE_MS, 0),
    ]
}

/// Builds a random operation on one of the buckets `current` lists. Estimate keys
/// come from a window of three that moves with `round`, and reports mostly
/// name keys of the window before, so most reports find an open estimate
/// (a settled key stays settled, and reports on it are duplicates).
fn random_op(random: &mut Random, h: &Harness, round: u64, params: &[BucketParams], current: &mut [usize]) -> BucketOp {
    let bucket = random.below(current.len() as u64) as usize;
    if random.chance(20) {
        current[bucket] = random.below(params.len() as u64) as usize;
    }
    let p = params[current[bucket]];
    let window = round / 6 + 2;
    let estimate_key = |random: &mut Random| h.estimate(&format!("r{}", window + random.below(3)));
    let report_key = |random: &mut Random| h.estimate(&format!("r{}", window - 2 + random.below(3)));

    let mut op = op(&h.bucket(&format!("k{bucket}")), p);
    if random.chance(80) {
        op.check = Some(random.amount(p.capacity, 60));
    }
    op.shadow = random.chance(15);
    if random.chance(25) {
        op.credit = random.amount(p.capacity, 100);
    }
    while random.chance(35) {
        let key = if random.chance(70) { Some(report_key(random)) } else { None };
        op.reports.push(Report { amount: random.amount(p.capacity, 80), estimate_key: key });
    }
    while random.chance(50) {
        op.estimates.push(Estimate { key: estimate_key(random), amount: random.amount(p.capacity, 50) });
    }
    op
}

/// Checks that a bucket that has refilled to full starts full after a
/// limit change, whatever keeps its store entry. It is never refilled at
/// the new rate from the stamp of its last charge. In Redis the bucket is a
/// field of a hash that its slow sibling keeps alive.
async fn refilled_bucket_starts_full(h: Harness<'_>) {
    let (fast, sibling) = (h.bucket("fast"), h.bucket("sibling"));
    let before = BucketParams::new(3, 400, 3).expect("exact params");
    let after = BucketParams::new(3, 3_600_000, 3).expect("exact params");
    let apply = |ops: Vec<BucketOp>| {
        let batch = Batch { ops, ttl_slack: Duration::from_millis(100), estimate_ttl: ESTIMATE_TTL };
        let store = h.store.clone();
        async move { store.apply(&batch).await.expect("the store judges the batch") }
    };

    let out = apply(vec![check(&fast, before, 3), check(&sibling, slow(100), 1)]).await;
    assert!(out.allowed);
    // Full again after 400 ms, and past its slack after 500 ms.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let out = apply(vec![check(&fast, after, 1)]).await;
    assert!(out.allowed, "a full bucket was judged as used after a limit change: {out:?}");
    assert_eq!(left(&out, 0, &after), 2);
    if let Backend::Redis(server) = &h.backend {
        assert_eq!(server.cli(&["HLEN", redis_location(&fast).0]), "2");
    }
}

#[tokio::test]
async fn memory_refilled_bucket_starts_full() {
    refilled_bucket_starts_full(Harness::memory()).await;
}

#[tokio::test]
async fn redis_refilled_bucket_starts_full() {
    refilled_bucket_starts_full(Harness::redis().await).await;
}

#[tokio::test]
async fn redis_rescale_is_exact_past_2_53() {
    let h = Harness::redis().await;
    let a = h.bucket("a");
    // Coprime windows give scales of 2592000000 and 2592000007. For this
    // level the product of a part and the new scale passes 2^53, and a
    // plain double computation rounds the rescaled level one too low.
    let from = BucketParams::new(7, 2_592_000_000, 7).expect("exact params");
    let to = BucketParams::new(7, 2_592_000_007, 7).expect("exact params");
    assert_eq!((from.scale, to.scale), (2_592_000_000, 2_592_000_007));
    let level: u64 = 1_110_857_143;

    let time = h.server().cli(&["TIME"]);
    let seconds: u64 = time.lines().next().and_then(|line| line.parse().ok()).expect("TIME seconds");
    let stored = BucketState { level, stamp_ms: seconds * 1000, scale: from.scale };
    let value = format!("{}:{}:{}:{}:{}", stored.level, stored.stamp_ms, stored.scale, from.refill_per_tick, from.tick_ms);
    let (hash, field) = redis_location(&a);
    h.server().cli(&["HSET", hash, field, &value]);

    let ops = vec![check(&a, to, 0)];
    let out = h.apply(ops.clone()).await;
    let expected = judge(&ops, &[Some(stored)], out.now_ms, &mut Estimates::default());
    assert_eq!(out, expected);
}

#[tokio::test]
async fn redis_script_matches_judge() {
    let h = Harness::redis().await;
    let params = comparison_params();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut current = [0, 1, 4, 6];
    let mut states: HashMap<String, BucketState> = HashMap::new();
    let mut estimates = Estimates::default();

    h.set_record(&h.record_key(), RECORD_BEFORE);
    // Judged calls of the plain shape, without and with a guard.
    let mut plain = [0_u32; 2];

    for round in 0..900_u64 {
        let mut ops: Vec<BucketOp> =
            (0..1 + random.below(3)).map(|_| random_op(&mut random, &h, round, &params, &mut current)).collect();
        // Most calls carry only checks and credits, which the script judges
        // on a path of its own.
        if random.chance(40) {
            for op in &mut ops {
                op.reports.clear();
                op.estimates.clear();
            }
        }

        // Some calls carry a guard on the account record. A matching guard
        // lets the batch be judged, and a stale one changes nothing.
        let guarded = random.chance(30);
        let out = if guarded {
            let stale = random.chance(25);
            let expected = if stale { RECORD_AFTER } else { RECORD_BEFORE };
            match h.apply_guarded(ops.clone(), Some(expected)).await {
                Guarded::Stale(actual) => {
                    assert!(stale, "round {round}: a holding guard was stale");
                    assert_eq!(actual, [Some(RECORD_BEFORE.to_owned())], "round {round}");
                    continue;
                }
                Guarded::Judged(out) => {
                    assert!(!stale, "round {round}: a stale guard judged {ops:#?}");
                    out
                }
            }
        } else {
            h.apply(ops.clone()).await
        };

        // judge() on the states the script started from, at the script's time.
        let before: Vec<Option<BucketState>> = ops.iter().map(|op| states.get(&op.key).copied()).collect();
        let expected = judge(&ops, &before, out.now_ms, &mut estimates);
        assert_eq!(out, expected, "round {round}: the script and judge() differ for {ops:#?}");

        if is_plain(&ops, &before) {
            plain[usize::from(guarded)] += 1;
        }
        for (op, result) in ops.iter().zip(&expected.buckets) {
            states.insert(op.key.clone(), result.state);
        }
    }
    assert!(plain[0] >= 100, "too few unguarded calls of the plain shape: {plain:?}");
    assert!(plain[1] >= 30, "too few guarded calls of the plain shape: {plain:?}");
}

/// Calls sent together share one command of the batch script, which reads
/// each call in place. Each round sends up to 12 random calls at once, some
/// guarded, and checks every reply against judge() applied in the order the
/// calls were sent.
#[tokio::test]
async fn redis_batches_match_judge() {
    let h = Harness::redis().await;
    let params = comparison_params();
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    let mut current = [0, 1, 4, 6];
    let mut states: HashMap<String, BucketState> = HashMap::new();
    let mut estimates = Estimates::default();
    h.set_record(&h.record_key(), RECORD_BEFORE);
    let commands_before = h.server().command_calls("evalsha");
    let mut calls = 0_u64;
    let mut plain = 0_u32;

    for round in 0..150_u64 {
        let mut sent = Vec::new();
        for _ in 0..1 + random.below(12) {
            let mut ops: Vec<BucketOp> =
                (0..1 + random.below(3)).map(|_| random_op(&mut random, &h, round, &params, &mut current)).collect();
            if random.chance(60) {
                for op in &mut ops {
                    op.reports.clear();
                    op.estimates.clear();
                }
            }
            let guard = random.chance(30).then(|| if random.chance(25) { RECORD_AFTER } else { RECORD_BEFORE });
            sent.push((ops, guard));
        }
        calls += sent.len() as u64;
        let outcomes = futures_util::future::join_all(sent.iter().map(|(ops, guard)| {
            let h = &h;
            async move {
                match guard {
                    Some(expected) => h.apply_guarded(ops.clone(), Some(expected)).await,
                    None => Guarded::Judged(h.apply(ops.clone()).await),
                }
            }
        }))
        .await;

        for ((ops, guard), outcome) in sent.iter().zip(outcomes) {
            let out = match outcome {
                Guarded::Stale(actual) => {
                    assert_eq!(*guard, Some(RECORD_AFTER), "round {round}: a holding guard was stale");
                    assert_eq!(actual, [Some(RECORD_BEFORE.to_owned())], "round {round}");
                    continue;
                }
                Guarded::Judged(out) => {
                    assert_ne!(*guard, Some(RECORD_AFTER), "round {round}: a stale guard judged {ops:#?}");
                    out
                }
            };
            let before: Vec<Option<BucketState>> = ops.iter().map(|op| states.get(&op.key).copied()).collect();
            let expected = judge(ops, &before, out.now_ms, &mut estimates);
            assert_eq!(out, expected, "round {round}: the batch script and judge() differ for {ops:#?}");
            if is_plain(ops, &before) {
                plain += 1;
            }
            for (op, result) in ops.iter().zip(&expected.buckets) {
                states.insert(op.key.clone(), result.state);
            }
        }
    }
    let commands = h.server().command_calls("evalsha") - commands_before;
    assert!(commands < calls / 2, "{calls} calls took {commands} commands");
    assert!(plain >= 200, "too few calls of the plain shape: {plain}");
}

/// Returns whether the script judges `ops` on its plain path: no reports,
/// no estimates, every bucket key once, and stored states at the new scale.
fn is_plain(ops: &[BucketOp], before: &[Option<BucketState>]) -> bool {
    ops.iter().zip(before).enumerate().all(|(i, (op, state))| {
        op.reports.is_empty()
            && op.estimates.is_empty()
            && ops[..i].iter().all(|other| other.key != op.key)
            && state.is_none_or(|state| state.scale == op.params.scale)
    })
}
