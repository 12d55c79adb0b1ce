//! The in-memory account store, kept next to the in-memory buckets.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::AuditEntry;
use crate::store::memory::MemoryStore;
use crate::store::{Batch, Guarded, RecordGuard};

/// Audit entries the in-memory store keeps; older ones are dropped.
pub const MAX_AUDIT_ENTRIES: usize = 10_000;

/// Account and key record values by key, and the audit log. Values never
/// expire and are never evicted.
#[derive(Debug, Default)]
pub struct MemoryAccounts {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    values: HashMap<String, String>,
    audit: VecDeque<AuditEntry>,
}

impl MemoryAccounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.lock().values.get(key).cloned()
    }

    /// Sets `key` to `value` when it holds `expected` (`None`: absent), and
    /// returns whether it did.
    pub fn compare_and_set(&self, key: &str, expected: Option<&str>, value: &str) -> bool {
        let mut inner = self.lock();
        if inner.values.get(key).map(String::as_str) != expected {
            return false;
        }
        inner.values.insert(key.to_owned(), value.to_owned());
        true
    }

    pub fn append_audit(&self, entry: AuditEntry) {
        let mut inner = self.lock();
        if inner.audit.len() >= MAX_AUDIT_ENTRIES {
            inner.audit.pop_front();
        }
        inner.audit.push_back(entry);
    }

    /// The newest `count` audit entries, oldest first.
    pub fn audit(&self, count: usize) -> Vec<AuditEntry> {
        let inner = self.lock();
        inner.audit.iter().skip(inner.audit.len().saturating_sub(count)).cloned().collect()
    }

    /// Judges `batch` in `store` unless a key record differs from its
    /// guard, exactly as the Redis script does. The account lock is held
    /// while the batch is judged, so no change lands between the two.
    pub fn apply_guarded(&self, store: &MemoryStore, batch: &Batch, guards: &[RecordGuard]) -> Guarded {
        let inner = self.lock();
        // Records are compared in place; they are copied only for a stale
        // guard, which is rare.
        if guards.iter().any(|guard| inner.values.get(&guard.key) != guard.expected.as_ref()) {
            return Guarded::Stale(guards.iter().map(|guard| inner.values.get(&guard.key).cloned()).collect());
        }
        let outcome = store.apply(batch);
        drop(inner);
        Guarded::Judged(outcome)
    }
}
