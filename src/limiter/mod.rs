//! Decision logic: descriptors to buckets to one all-or-nothing decision.
//!
//! The limiter holds no tonic or Redis types. It resolves each descriptor
//! to a rule and a bucket, groups the descriptors that name the same
//! bucket (summing their costs), hands the batch to the store in one call,
//! and reads the outcome back into a [`Decision`].

pub mod bucket;
pub mod decision;
pub mod deny_cache;
pub mod judge;
pub mod keys;
pub mod request;
mod resolve;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::Limits;
use crate::accounts::{KeyRecord, RecordCache, record};
use crate::store::{Batch, FailureMode, Guarded, RecordGuard, Store, StoreError};
use deny_cache::DenyCache;

pub use decision::{Decision, Denial, DescriptorFacts, DescriptorKind, DescriptorStatus, Outcome};
pub use request::{CheckRequest, Descriptor, Entry, InvalidRequest, LimitOverride, RequestBounds};

/// Settings of the limiter that are not limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterSettings {
    pub bounds: RequestBounds,
    /// Added to a bucket's refill time to give its store TTL.
    pub ttl_slack: Duration,
    /// How long an estimate waits for its report.
    pub estimate_ttl: Duration,
    /// How long a bucket known to be unable to admit is answered locally;
    /// zero turns the local denial cache off.
    pub deny_cache_max_age: Duration,
    /// The answer when the store fails; the gRPC handler applies it.
    pub failure_mode: FailureMode,
}

impl Default for LimiterSettings {
    fn default() -> Self {
        Self {
            bounds: RequestBounds::default(),
            ttl_slack: Duration::from_secs(2),
            estimate_ttl: Duration::from_secs(600),
            deny_cache_max_age: Duration::ZERO,
            failure_mode: FailureMode::Unavailable,
        }
    }
}

/// Why no decision could be made.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The limiter: the current limits and the store. Clones share both.
#[derive(Clone)]
pub struct Limiter {
    limits: Arc<RwLock<Arc<Limits>>>,
    store: Store,
    settings: LimiterSettings,
    deny_cache: Arc<DenyCache>,
    /// Key records last seen, sent as guards with each batch.
    records: Arc<RecordCache>,
}

impl Limiter {
    pub fn new(limits: Limits, store: Store, settings: LimiterSettings) -> Self {
        let deny_cache = Arc::new(DenyCache::new(store.local_clock(), settings.deny_cache_max_age));
        Self { limits: Arc::new(RwLock::new(Arc::new(limits))), store, settings, deny_cache, records: Arc::default() }
    }

    /// The limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Replaces the limits; calls in flight finish on the old ones.
    pub fn replace_limits(&self, limits: Limits) {
        *self.limits.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(limits);
        self.deny_cache.clear();
    }

    /// Drops this replica's cached denials and account records after an
    /// account change made through it, so the next check reads the new
    /// record at once.
    // NOTE: every record is dropped, not only the changed account's, so each
    // key seen before costs one extra store round trip after the change.
    pub fn forget_accounts(&self) {
        self.deny_cache.clear();
        self.records.clear();
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings this limiter was built with, including the request bounds.
    pub fn settings(&self) -> &LimiterSettings {
        &self.settings
    }

    /// Decides one call.
    pub async fn decide(&self, request: &CheckRequest) -> Result<Decision, LimiterError> {
        self.decide_within(request, None).await
    }

    /// Decides one call, failing with a transient store error when the store
    /// has not judged it within `budget` (capped by the store's own limit).
    pub async fn decide_within(&self, request: &CheckRequest, budget: Option<Duration>) -> Result<Decision, LimiterError> {
        request.validate(&self.settings.bounds)?;

        let limits = self.limits();
        let Some(domain) = limits.domain(&request.domain) else {
            return Ok(Decision::unknown_domain(request.descriptors.len()));
        };

        let api_keys = account_keys(domain, request);
        if api_keys.is_empty() {
            let plan = resolve::plan(domain, request, &self.settings.bounds, &resolve::AccountRecords::default());
            return match self.judge(plan, &[], budget).await? {
                Judged::Decided(decision) => Ok(decision),
                Judged::Stale(_) => unreachable!("a call without guards is never stale"),
            };
        }

        // Plan with the key records last seen. When the store has others,
        // learn them and plan again (see the `accounts` module).
        let started = Instant::now();
        for _ in 0..MAX_ACCOUNT_ATTEMPTS {
            let mut records = resolve::AccountRecords::with_capacity(api_keys.len());
            let mut guards = Vec::with_capacity(api_keys.len());
            for (api_key, record_key) in &api_keys {
                let expected = self.records.guess(record_key);
                if let Some(record) = expected.as_deref().and_then(KeyRecord::decode) {
                    records.insert(api_key, record);
                }
                guards.push(RecordGuard { key: record_key.clone(), expected });
            }
            let plan = resolve::plan(domain, request, &self.settings.bounds, &records);
            let remaining = budget.map(|budget| budget.saturating_sub(started.elapsed()));
            match self.judge(plan, &guards, remaining).await? {
                Judged::Decided(decision) => return Ok(decision),
                Judged::Stale(actual) => {
                    for (guard, record) in guards.iter().zip(actual) {
                        self.records.learn(&guard.key, record);
                    }
                }
            }
        }
        Err(LimiterError::Store(StoreError::Unavailable("account records kept changing during the check".into())))
    }

    /// Judges a plan, guarded by `guards`. Returns the decision, or the
    /// actual key records when a guard did not match.
    async fn judge(
        &self,
        plan: resolve::Plan,
        guards: &[RecordGuard],
        budget: Option<Duration>,
    ) -> Result<Judged, LimiterError> {
        if let Some(decision) = plan.early_decision() {
            return Ok(Judged::Decided(decision));
        }

        let batch = Batch {
            ops: plan.ops,
            ttl_slack: self.settings.ttl_slack,
            estimate_ttl: self.settings.estimate_ttl,
        };
        let mut store_elapsed = None;
        // The local denial cache denies by the tier last seen. An account
        // change made through this replica clears it, and one made through
        // another is missed for at most the cache's maximum age.
        let outcome = if batch.ops.is_empty() {
            None
        } else if let Some(local) = self.deny_cache.deny_locally(&batch.ops) {
            Some(local)
        } else {
            let started = Instant::now();
            let generation = self.deny_cache.generation();
            let outcome = match self.store.apply_guarded(&batch, guards, budget).await? {
                Guarded::Judged(outcome) => outcome,
                Guarded::Stale(actual) => return Ok(Judged::Stale(actual)),
            };
            store_elapsed = Some(started.elapsed());
            self.deny_cache.learn(generation, &batch.ops, &outcome);
            Some(outcome)
        };
        let mut decision = decision::read(&plan.descriptors, &batch.ops, outcome.as_ref(), plan.too_large);
        decision.store_elapsed = store_elapsed;
        Ok(Judged::Decided(decision))
    }
}

/// The result of judging one plan.
enum Judged {
    Decided(Decision),
    /// A guard did not match: the key records the store has, one per guard.
    Stale(Vec<Option<String>>),
}

/// Checks of one call planned before it fails: the first guess, the
/// records the store returned, and one more for a change in between.
const MAX_ACCOUNT_ATTEMPTS: usize = 3;

/// The distinct API keys of a call in a domain with accounts, with their
/// key record keys, in order of first appearance.
fn account_keys<'r>(domain: &crate::config::DomainLimits, request: &'r CheckRequest) -> Vec<(&'r str, String)> {
    let Some(settings) = &domain.accounts else { return Vec::new() };
    // A check names one API key in nearly every case.
    let mut found: Vec<(&str, String)> = Vec::with_capacity(1);
    for descriptor in &request.descriptors {
        let Some(entry) = descriptor.entries.iter().find(|entry| entry.key == settings.key_entry) else { continue };
        if !found.iter().any(|(api_key, _)| *api_key == entry.value) {
            let record_key = record::record_key(&domain.name, &settings.key_entry, &entry.value);
            found.push((&entry.value, record_key));
        }
    }
    found
}
