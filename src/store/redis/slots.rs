//! Batches across Redis Cluster hash slots: grouping by slot, and the hold
//! protocol that keeps a batch spanning several slots all or nothing.
//!
//! Each slot's operations are judged by the bucket script in reserve mode,
//! all slots at once. When every slot allowed its checks, the charges stand.
//! Otherwise every slot that charged something, or whose reply was lost,
//! gets a release: the script credits back what the hold key records and
//! leaves a tombstone that stops a late reserve. A denial is answered after
//! its release (when the deadline leaves time), a failure at once. Failed
//! releases are retried in the background. The coordinator runs in its own
//! task, so a caller that gives up (a client hanging up) never leaves a hold
//! unreleased.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fred::util::redis_keyslot;
use futures_util::future::join_all;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::script::{self, Invocation, Mode};
use super::{DEADLINE_GRACE, Deadline, RedisStore};
use crate::limiter::judge::{BatchOutcome, BucketOp, BucketResult};
use crate::limiter::keys::PREFIX;
use crate::store::{Batch, StoreError};

/// Time allowed for one release attempt.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(1);
/// Release attempts before the held units are left to refill.
const RELEASE_ATTEMPTS: u32 = 3;
/// Wait before the second release attempt; it quadruples after each.
const RELEASE_BACKOFF: Duration = Duration::from_millis(100);

/// Groups the operations of `ops` by the hash slot of their bucket key, in
/// order of first appearance, and returns the operation indexes of each
/// group.
///
/// Fails when an operation's estimate key lies in another slot than its
/// bucket key, since one script could not touch both.
pub fn group_by_slot(ops: &[BucketOp]) -> Result<Vec<Vec<usize>>, StoreError> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (index, op) in ops.iter().enumerate() {
        let slot = redis_keyslot(op.key.as_bytes());
        let estimate_keys = op.reports.iter().filter_map(|report| report.estimate_key.as_deref());
        let estimate_keys = estimate_keys.chain(op.estimates.iter().map(|estimate| estimate.key.as_str()));
        for key in estimate_keys {
            if redis_keyslot(key.as_bytes()) != slot {
                return Err(StoreError::Protocol(format!(
                    "estimate key {key} is not in the hash slot of its bucket {}; give both one hash tag",
                    op.key
                )));
            }
        }
        match groups.iter_mut().find(|(group_slot, _)| *group_slot == slot) {
            Some((_, members)) => members.push(index),
            None => groups.push((slot, vec![index])),
        }
    }
    Ok(groups.into_iter().map(|(_, members)| members).collect())
}

/// Judges a batch whose operations span several hash slots with the hold
/// protocol. Returns the merged outcome once every slot replied, or an
/// error when one failed or `deadline` passed, and releases holds in the
/// background.
pub async fn apply_across_slots(
    store: &RedisStore,
    batch: &Batch,
    groups: Vec<Vec<usize>>,
    deadline: Deadline,
    permit: OwnedSemaphorePermit,
) -> Result<BatchOutcome, StoreError> {
    let hold_id = new_hold_id();
    let hold_keys = groups
        .iter()
        .map(|members| hold_key(&batch.ops[members[0]].key, &hold_id))
        .collect::<Result<Vec<_>, _>>()?;
    let coordinator = Coordinator { store: store.clone(), batch: batch.clone(), groups, hold_keys, hold_id };

    let (sender, receiver) = oneshot::channel();
    tokio::spawn(coordinator.run(deadline, permit, sender));
    match tokio::time::timeout(deadline.remaining() + 2 * DEADLINE_GRACE, receiver).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(StoreError::Unavailable("the cross-slot coordinator stopped without an answer".into())),
        Err(_) => Err(deadline.timed_out()),
    }
}

/// One batch spanning several slots, owned by its task.
struct Coordinator {
    store: RedisStore,
    batch: Batch,
    groups: Vec<Vec<usize>>,
    hold_keys: Vec<String>,
    hold_id: String,
}

impl Coordinator {
    async fn run(
        self,
        deadline: Deadline,
        permit: OwnedSemaphorePermit,
        answer: oneshot::Sender<Result<BatchOutcome, StoreError>>,
    ) {
        let this = &self;
        let calls: Vec<Invocation<'_>> = (0..self.groups.len()).map(|group| self.call(group, Mode::Reserve)).collect();
        let replies = join_all(calls.iter().map(|call| async move {
            let reply = this.store.run(call, deadline).await?;
            script::decode(&call.ops, reply)
        }))
        .await;
        drop(permit);

        let (result, mut pending) = settle(&self.batch.ops, &self.groups, replies);
        if result.is_ok() && !pending.is_empty() {
            // A denial: return its units before answering, so a retry sees
            // them, unless the deadline leaves no time.
            let release_deadline = Deadline::after(deadline.remaining().min(RELEASE_TIMEOUT));
            pending = self.release(pending, release_deadline).await;
        }
        // The caller may have given up already; the holds are released anyway.
        let _ = answer.send(result);
        if !pending.is_empty() {
            self.release_with_retries(pending).await;
        }
    }

    fn call(&self, group: usize, mode: Mode) -> Invocation<'_> {
        Invocation {
            mode,
            hold: Some((self.hold_keys[group].as_str(), self.store.inner.options.hold_ttl)),
            ops: self.groups[group].iter().map(|&index| &self.batch.ops[index]).collect(),
            ttl_slack: self.batch.ttl_slack,
            estimate_ttl: self.batch.estimate_ttl,
        }
    }

    /// Releases the holds of `groups` once and returns the groups whose
    /// release failed.
    async fn release(&self, groups: Vec<usize>, deadline: Deadline) -> Vec<usize> {
        let calls: Vec<Invocation<'_>> = groups.iter().map(|&group| self.call(group, Mode::Release)).collect();
        let store = &self.store;
        let replies = join_all(calls.iter().map(|call| async move {
            let reply = store.run(call, deadline).await?;
            script::decode_release(reply)
        }))
        .await;

        let mut failed = Vec::new();
        for (group, reply) in groups.into_iter().zip(replies) {
            match reply {
                Ok(true) => {
                    self.store.inner.faults.holds_released.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::debug!(redis.hold_key = %self.hold_keys[group], error = %error, "Releasing a hold failed");
                    failed.push(group);
                }
            }
        }
        failed
    }

    /// Releases the holds of `groups` in the background, a few times with
    /// backoff, and counts and logs those that still fail.
    async fn release_with_retries(&self, mut pending: Vec<usize>) {
        let faults = &self.store.inner.faults;
        let Ok(_permit) = self.store.inner.releases.clone().try_acquire_owned() else {
            faults.release_failures.fetch_add(pending.len() as u64, Ordering::Relaxed);
            self.log_release_failure(&pending, "too many releases in flight");
            return;
        };
        for attempt in 0..RELEASE_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(RELEASE_BACKOFF * 4_u32.pow(attempt - 1)).await;
            }
            pending = self.release(pending, Deadline::after(RELEASE_TIMEOUT)).await;
            if pending.is_empty() {
                return;
            }
        }
        faults.release_failures.fetch_add(pending.len() as u64, Ordering::Relaxed);
        self.log_release_failure(&pending, "Redis did not accept the release");
    }

    fn log_release_failure(&self, groups: &[usize], reason: &str) {
        if let Some(suppressed) = self.store.inner.release_log.allow() {
            let keys: Vec<&str> = groups.iter().map(|&group| self.hold_keys[group].as_str()).collect();
            tracing::warn!(
                redis.hold_id = %self.hold_id,
                redis.hold_keys = ?keys,
                reason,
                suppressed,
                "Releasing the hold of a denied cross-slot check failed; its units return by refill"
            );
        }
    }
}

/// Decides a batch from each slot's reserve reply. Returns the answer and
/// the groups to release: every group that charged something when the batch
/// is not allowed, and every group whose reply was lost.
fn settle(
    ops: &[BucketOp],
    groups: &[Vec<usize>],
    replies: Vec<Result<BatchOutcome, StoreError>>,
) -> (Result<BatchOutcome, StoreError>, Vec<usize>) {
    let mut first_error = None;
    let mut outcomes = Vec::with_capacity(replies.len());
    let mut to_release = Vec::new();
    for (group, reply) in replies.into_iter().enumerate() {
        match reply {
            Ok(outcome) => {
                if outcome.buckets.iter().any(|bucket| bucket.charged) {
                    to_release.push(group);
                }
                outcomes.push(outcome);
            }
            Err(error) => {
                to_release.push(group);
                first_error.get_or_insert(error);
            }
        }
    }

    if let Some(error) = first_error {
        return (Err(error), to_release);
    }
    let merged = merge(ops, groups, outcomes);
    if merged.allowed {
        to_release.clear();
    }
    (Ok(merged), to_release)
}

/// Merges the outcomes of each slot into one, in operation order. Stamps are
/// moved to the first slot's clock, so the time until full is kept. When a
/// slot denied, the charges of the others are taken out of their states, as
/// their release will do.
fn merge(ops: &[BucketOp], groups: &[Vec<usize>], outcomes: Vec<BatchOutcome>) -> BatchOutcome {
    let allowed = outcomes.iter().all(|outcome| outcome.allowed);
    let now_ms = outcomes.first().map_or(0, |outcome| outcome.now_ms);
    let mut buckets: Vec<Option<BucketResult>> = vec![None; ops.len()];
    for (members, outcome) in groups.iter().zip(outcomes) {
        let shift = i128::from(now_ms) - i128::from(outcome.now_ms);
        for (&index, mut result) in members.iter().zip(outcome.buckets) {
            let stamp = i128::from(result.state.stamp_ms) + shift;
            result.state.stamp_ms = u64::try_from(stamp.max(0)).unwrap_or(u64::MAX);
            if !allowed && result.charged {
                let cost = ops[index].check.unwrap_or(0);
                result.state.level = result.state.level.saturating_sub(cost.saturating_mul(result.state.scale));
                result.charged = false;
            }
            buckets[index] = Some(result);
        }
    }
    let buckets = buckets.into_iter().map(|bucket| bucket.expect("every operation is in one group")).collect();
    BatchOutcome { now_ms, allowed, buckets }
}

/// Returns the hold key of a batch in the slot of `bucket_key`.
fn hold_key(bucket_key: &str, hold_id: &str) -> Result<String, StoreError> {
    let key = format!("{PREFIX}:{{{}}}:h:{hold_id}", hash_tag(bucket_key));
    if redis_keyslot(key.as_bytes()) == redis_keyslot(bucket_key.as_bytes()) {
        Ok(key)
    } else {
        Err(StoreError::Protocol(format!("bucket key {bucket_key} has no hash tag a hold key can share")))
    }
}

/// The part of `key` Redis Cluster hashes: the text between the first `{`
/// and the next `}` when it is not empty, else the whole key.
fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.find('}')
            && close > 0
        {
            return &rest[..close];
        }
    }
    key
}

/// Returns a 128-bit hex id, unique across calls and processes: two hashes
/// with random keys (std's `RandomState`) of a process-wide counter.
fn new_hold_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut high = RandomState::new().build_hasher();
    high.write_u64(count);
    let mut low = RandomState::new().build_hasher();
    low.write_u64(count);
    format!("{:016x}{:016x}", high.finish(), low.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::bucket::{BucketParams, BucketState};
    use crate::limiter::judge::Estimate;

    fn check(key: &str, cost: u64) -> BucketOp {
        BucketOp {
            key: key.to_owned(),
            params: BucketParams::new(10, 1000, 10).expect("exact"),
            check: Some(cost),
            shadow: false,
            credit: 0,
            reports: Vec::new(),
            estimates: Vec::new(),
        }
    }

    fn result(level: u64, stamp_ms: u64, fits: bool, charged: bool) -> BucketResult {
        BucketResult {
            state: BucketState { level, stamp_ms, scale: 1 },
            fits,
            charged,
            forgiven: 0,
            settlements: Vec::new(),
        }
    }

    #[test]
    fn groups_follow_hash_tags() {
        let ops = [check("frl1:{a}:b:1", 1), check("frl1:{b}:b:1", 1), check("frl1:{a}:b:2", 1)];
        let groups = group_by_slot(&ops).expect("grouped");
        assert_eq!(groups, [vec![0, 2], vec![1]]);
    }

    #[test]
    fn estimate_in_another_slot_is_rejected() {
        let op = BucketOp { estimates: vec![Estimate { key: "frl1:{b}:e:1".into(), amount: 1 }], ..check("frl1:{a}:b:1", 1) };
        let error = group_by_slot(&[op]).expect_err("two slots in one op");
        assert!(matches!(error, StoreError::Protocol(_)), "{error:?}");
    }

    #[test]
    fn hold_keys_share_the_bucket_slot() {
        for key in ["frl1:{abc}:b:1", "plain-key", "x{y", "a}b{c}"] {
            let hold = hold_key(key, "id").expect("a hold key");
            assert_eq!(redis_keyslot(hold.as_bytes()), redis_keyslot(key.as_bytes()), "{key} -> {hold}");
        }
    }

    #[test]
    fn hold_key_needs_a_usable_tag() {
        // Redis hashes all of `odd{}key`, and no hold key can repeat that.
        let error = hold_key("odd{}key", "id").expect_err("no usable tag");
        assert!(matches!(error, StoreError::Protocol(_)), "{error:?}");
    }

    #[test]
    fn hold_ids_differ() {
        assert_ne!(new_hold_id(), new_hold_id());
        assert_eq!(new_hold_id().len(), 32);
    }

    #[test]
    fn merge_uncharges_when_a_slot_denies() {
        let ops = [check("frl1:{a}:b:1", 3), check("frl1:{b}:b:1", 3)];
        let groups = [vec![0], vec![1]];
        let allowed_slot = BatchOutcome { now_ms: 1_000, allowed: true, buckets: vec![result(3, 1_000, true, true)] };
        let denied_slot = BatchOutcome { now_ms: 1_010, allowed: false, buckets: vec![result(9, 1_005, false, false)] };

        let (answer, to_release) = settle(&ops, &groups, vec![Ok(allowed_slot), Ok(denied_slot)]);
        let merged = answer.expect("both slots replied");
        assert!(!merged.allowed);
        assert_eq!(to_release, [0], "only the slot that charged is released");
        assert_eq!(merged.now_ms, 1_000);
        assert_eq!(merged.buckets[0].state.level, 0, "the charge of 3 is taken out");
        assert!(!merged.buckets[0].charged);
        assert_eq!(merged.buckets[1].state.stamp_ms, 995, "stamps move to the first slot's clock");
    }

    #[test]
    fn settle_keeps_charges_when_every_slot_allows() {
        let ops = [check("frl1:{a}:b:1", 1), check("frl1:{b}:b:1", 1)];
        let groups = [vec![0], vec![1]];
        let slot = |now_ms| BatchOutcome { now_ms, allowed: true, buckets: vec![result(1, now_ms, true, true)] };

        let (answer, to_release) = settle(&ops, &groups, vec![Ok(slot(5)), Ok(slot(5))]);
        let merged = answer.expect("both slots replied");
        assert!(merged.allowed);
        assert!(merged.buckets.iter().all(|bucket| bucket.charged));
        assert!(to_release.is_empty());
    }

    #[test]
    fn settle_releases_every_slot_after_a_lost_reply() {
        let ops = [check("frl1:{a}:b:1", 1), check("frl1:{b}:b:1", 1), check("frl1:{c}:b:1", 1)];
        let groups = [vec![0], vec![1], vec![2]];
        let charged = BatchOutcome { now_ms: 5, allowed: true, buckets: vec![result(1, 5, true, true)] };
        let denied = BatchOutcome { now_ms: 5, allowed: false, buckets: vec![result(10, 5, false, false)] };
        let lost = Err(StoreError::TimedOut(Duration::from_millis(20)));

        let (answer, to_release) = settle(&ops, &groups, vec![Ok(charged), lost, Ok(denied)]);
        assert!(matches!(answer, Err(StoreError::TimedOut(_))), "{answer:?}");
        assert_eq!(to_release, [0, 1], "the charged slot and the lost one");
    }
}
