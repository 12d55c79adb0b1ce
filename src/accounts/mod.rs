//! Account tiers: which tier and which limit overrides apply to an API key.
//!
//! Every new account is unverified (the domain's default tier). Its first
//! wallet top-up promotes it to the configured promoted tier for good; the
//! admin service records top-ups and overrides, and links API keys to
//! accounts. Buckets stay per API key: the tier and any override belong to
//! the account and apply to each of its keys.
//!
//! # Exact and instant with one round trip
//!
//! The account itself lives under its own key, and each of its API keys
//! carries a copy of its tier and overrides, the *key record*, in the hash
//! slot of that key's buckets (see [`record`]). The limiter keeps a local map
//! from key record key to the record it last saw and plans a check with it.
//! It sends that guess with the batch ([`crate::store::RecordGuard`]): the
//! Redis bucket script, or the in-memory store under its lock, compares the
//! stored record first and, when it differs, returns the actual record
//! without touching a bucket. The limiter then plans again with the right
//! tier and retries. So a change applies to the very next check on every
//! replica, a check costs one round trip when the guess is right, and a
//! second one only on a replica's first check after a change (or its first
//! sight of a promoted key).
//!
//! A change writes the account with compare-and-set (retried on conflict)
//! and then copies it to each key record, reading the record before the
//! account, so concurrent changes settle on the newest account state.
//!
//! # Tier resolution
//!
//! For a domain with `accounts`: the account store's tier when it has a
//! record for the key; else the tier entry, but only with
//! `trust_tier_entry: true`; else the default tier.

pub mod memory;
pub mod record;
pub mod redis;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::DomainLimits;
use crate::store::{Store, StoreError};
pub use record::{Account, KeyRecord, Overrides};

/// Redis stream of the audit log.
pub const AUDIT_STREAM: &str = "frl1:audit";

/// Attempts of a compare-and-set loop before it gives up.
const MAX_ATTEMPTS: usize = 32;

/// Why an account change failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("the account {0} changed concurrently too often; retry")]
    Contended(String),
    #[error("the stored account at {0} is unreadable")]
    Unreadable(String),
}

/// One audit log entry. `key` is the key record key (a hash), never an API key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub who: String,
    pub what: String,
    pub account: String,
    pub key: String,
    /// JSON of the account's tier and overrides before and after.
    pub before: String,
    pub after: String,
}

impl AuditEntry {
    /// The fields as the Redis stream stores them.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("at_ms", self.at_ms.to_string()),
            ("who", self.who.clone()),
            ("what", self.what.clone()),
            ("account", self.account.clone()),
            ("key", self.key.clone()),
            ("before", self.before.clone()),
            ("after", self.after.clone()),
        ]
    }

    pub fn from_fields<'a>(fields: impl Iterator<Item = (&'a str, &'a str)>) -> Self {
        let mut entry = Self::default();
        for (field, value) in fields {
            let value = value.to_owned();
            match field {
                "at_ms" => entry.at_ms = value.parse().unwrap_or(0),
                "who" => entry.who = value,
                "what" => entry.what = value,
                "account" => entry.account = value,
                "key" => entry.key = value,
                "before" => entry.before = value,
                "after" => entry.after = value,
                _ => {}
            }
        }
        entry
    }
}

/// The account store of a bucket store: the same Redis, or next to the
/// in-memory buckets.
#[derive(Clone)]
pub enum AccountStore {
    Memory(crate::store::MemoryStore),
    Redis(crate::store::RedisStore),
}

impl AccountStore {
    pub fn new(store: &Store) -> Self {
        match store {
            Store::Memory(store) => Self::Memory(store.clone()),
            Store::Redis(store) => Self::Redis(store.clone()),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.accounts().get(key)),
            Self::Redis(store) => redis::get(store, key).await,
        }
    }

    async fn compare_and_set(&self, key: &str, expected: Option<&str>, value: &str) -> Result<bool, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.accounts().compare_and_set(key, expected, value)),
            Self::Redis(store) => redis::compare_and_set(store, key, expected, value).await,
        }
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        match self {
            Self::Memory(store) => {
                store.accounts().append_audit(entry.clone());
                Ok(())
            }
            Self::Redis(store) => redis::append_audit(store, entry).await,
        }
    }

    /// The newest `count` audit entries, oldest first.
    pub async fn audit(&self, count: usize) -> Result<Vec<AuditEntry>, StoreError> {
        match self {
            Self::Memory(store) => Ok(store.accounts().audit(count)),
            Self::Redis(store) => redis::audit(store, count).await,
        }
    }
}

/// The outcome of one account change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub account: String,
    pub before: Account,
    pub after: Account,
    /// False when the account already was in the requested state.
    pub changed: bool,
}

/// What the store knows about one API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyView {
    /// The key record key (a hash of the API key).
    pub record_key: String,
    /// The key's account; `None` when the store has no record for the key.
    pub account: Option<Account>,
}

/// Account changes for one domain.
#[derive(Clone)]
pub struct Accounts {
    store: AccountStore,
    domain: String,
    key_entry: String,
    default_tier: String,
    promoted_tier: String,
}

impl Accounts {
    /// The account store of `domain`, or an error when it has no `accounts` section.
    pub fn new(store: &Store, domain: &DomainLimits) -> Result<Self, AccountError> {
        let settings = domain.accounts.as_ref().ok_or_else(|| {
            AccountError::Invalid(format!("domain `{}` has no `accounts` section in its configuration", domain.name))
        })?;
        let tier_name = |index: Option<usize>| index.and_then(|i| domain.tiers.get(i)).map(|t| t.name.to_string()).unwrap_or_default();
        Ok(Self {
            store: AccountStore::new(store),
            domain: domain.name.clone(),
            key_entry: settings.key_entry.clone(),
            default_tier: tier_name(domain.default_tier),
            promoted_tier: tier_name(Some(settings.promoted_tier)),
        })
    }

    pub fn store(&self) -> &AccountStore {
        &self.store
    }

    pub fn record_key(&self, api_key: &str) -> String {
        record::record_key(&self.domain, &self.key_entry, api_key)
    }

    /// Returns the account of `api_key`, if the store has one.
    pub async fn show(&self, api_key: &str) -> Result<KeyView, AccountError> {
        let record_key = self.record_key(api_key);
        let account = match self.store.get(&record_key).await?.as_deref().and_then(KeyRecord::decode) {
            Some(record) => self.load(&record.account).await?.map(|(account, _)| account),
            None => None,
        };
        Ok(KeyView { record_key, account })
    }

    /// Records a wallet top-up: an account in the default tier moves to the
    /// promoted tier. Any other tier is kept, so a top-up never demotes, and
    /// a second top-up changes nothing. A key never linked gets an implicit
    /// account of its own.
    pub async fn record_top_up(&self, api_key: &str, who: &str) -> Result<Change, AccountError> {
        let promoted = self.promoted_tier.clone();
        let default = self.default_tier.clone();
        self.change(api_key, who, "record_top_up", move |account| {
            if account.tier == default {
                account.tier = promoted.clone();
            }
        })
        .await
    }

    /// Sets the account's limit overrides.
    pub async fn set_override(&self, api_key: &str, overrides: Overrides, who: &str) -> Result<Change, AccountError> {
        for (what, value) in [("requests", overrides.requests), ("tokens", overrides.tokens)] {
            if let Some(value) = value {
                let window_ms = overrides.unit.ms();
                crate::limiter::bucket::BucketParams::new(value, window_ms, value)
                    .map_err(|error| AccountError::Invalid(format!("invalid {what} override {value}: {error}")))?;
                if value == 0 {
                    return Err(AccountError::Invalid(format!("the {what} override is 0; set it to 1 or more, or clear it")));
                }
            }
        }
        if overrides.requests.is_none() && overrides.tokens.is_none() {
            return Err(AccountError::Invalid("an override needs a requests or a tokens limit".into()));
        }
        self.change(api_key, who, "set_override", move |account| account.overrides = Some(overrides)).await
    }

    /// Clears the account's limit overrides, so its tier's limits apply.
    pub async fn clear_override(&self, api_key: &str, who: &str) -> Result<Change, AccountError> {
        self.change(api_key, who, "clear_override", |account| account.overrides = None).await
    }

    /// Links `api_key` to the account `account_id`, creating the account in
    /// the default tier when it is new. The key leaves its previous account.
    pub async fn link_key(&self, api_key: &str, account_id: &str, who: &str) -> Result<Change, AccountError> {
        record::validate_account_id(account_id).map_err(AccountError::Invalid)?;
        let record_key = self.record_key(api_key);
        let previous = self.store.get(&record_key).await?.as_deref().and_then(KeyRecord::decode).map(|r| r.account);
        let change = self.update(account_id, &record_key, |_| {}).await?;
        self.copy_to_key(account_id, &record_key, true).await?;
        if let Some(previous) = previous.filter(|previous| previous != account_id) {
            let key = record_key.clone();
            self.update_existing(&previous, move |account| account.keys.retain(|k| *k != key)).await?;
        }
        let change = Change { changed: change.changed || change.before.keys != change.after.keys, ..change };
        if change.changed {
            self.audit(who, "link_key", &record_key, &change).await;
        }
        Ok(change)
    }

    /// Applies `edit` to the account of `api_key` (creating an implicit one)
    /// and copies it to every key of the account.
    async fn change(
        &self,
        api_key: &str,
        who: &str,
        what: &str,
        edit: impl Fn(&mut Account),
    ) -> Result<Change, AccountError> {
        let record_key = self.record_key(api_key);
        let account_id = match self.store.get(&record_key).await?.as_deref().and_then(KeyRecord::decode) {
            Some(record) => record.account,
            None => record::implicit_account_id(&record_key),
        };
        let change = self.update(&account_id, &record_key, edit).await?;
        for key in &change.after.keys {
            self.copy_to_key(&account_id, key, *key == record_key).await?;
        }
        if change.changed {
            self.audit(who, what, &record_key, &change).await;
        }
        Ok(change)
    }

    /// Reads an account and its stored text.
    async fn load(&self, account_id: &str) -> Result<Option<(Account, String)>, AccountError> {
        let key = record::account_key(&self.domain, account_id);
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(text) => {
                let account: Account = serde_json::from_str(&text).map_err(|_| AccountError::Unreadable(key.clone()))?;
                Ok(Some((account, text)))
            }
        }
    }

    /// Applies `edit` to the account (created in the default tier when
    /// missing) with `record_key` among its keys, with compare-and-set.
    async fn update(&self, account_id: &str, record_key: &str, edit: impl Fn(&mut Account)) -> Result<Change, AccountError> {
        let key = record::account_key(&self.domain, account_id);
        for _ in 0..MAX_ATTEMPTS {
            let stored = self.load(account_id).await?;
            let before = stored.as_ref().map_or_else(|| Account::new(account_id, &self.default_tier), |(account, _)| account.clone());
            let mut after = before.clone();
            edit(&mut after);
            if !after.keys.iter().any(|k| k == record_key) {
                after.keys.push(record_key.to_owned());
            }
            if stored.is_some() && after == before {
                return Ok(Change { account: account_id.to_owned(), before, after, changed: false });
            }
            after.revision = before.revision + 1;
            let text = serde_json::to_string(&after).map_err(|error| AccountError::Invalid(error.to_string()))?;
            let expected = stored.as_ref().map(|(_, text)| text.as_str());
            if self.store.compare_and_set(&key, expected, &text).await? {
                let changed = before.tier != after.tier || before.overrides != after.overrides;
                return Ok(Change { account: account_id.to_owned(), before, after, changed });
            }
        }
        Err(AccountError::Contended(account_id.to_owned()))
    }

    /// Applies `edit` to an account that exists; nothing when it does not.
    async fn update_existing(&self, account_id: &str, edit: impl Fn(&mut Account)) -> Result<(), AccountError> {
        let key = record::account_key(&self.domain, account_id);
        for _ in 0..MAX_ATTEMPTS {
            let Some((before, text)) = self.load(account_id).await? else { return Ok(()) };
            let mut after = before.clone();
            edit(&mut after);
            if after == before {
                return Ok(());
            }
            after.revision = before.revision + 1;
            let new_text = serde_json::to_string(&after).map_err(|error| AccountError::Invalid(error.to_string()))?;
            if self.store.compare_and_set(&key, Some(&text), &new_text).await? {
                return Ok(());
            }
        }
        Err(AccountError::Contended(account_id.to_owned()))
    }

    /// Copies the account's current state to the key record at `record_key`.
    /// The record is read before the account, so a copy of an older state
    /// never replaces a newer one. A record that belongs to another account
    /// is left alone unless `claim` is set (the key was linked here).
    async fn copy_to_key(&self, account_id: &str, record_key: &str, claim: bool) -> Result<(), AccountError> {
        for _ in 0..MAX_ATTEMPTS {
            let current = self.store.get(record_key).await?;
            let Some((account, _)) = self.load(account_id).await? else { return Ok(()) };
            let owner = current.as_deref().and_then(KeyRecord::decode).map(|record| record.account);
            if !claim && owner.as_deref().is_some_and(|owner| owner != account_id) {
                return Ok(());
            }
            let desired = account.key_record().encode();
            if current.as_deref() == Some(desired.as_str()) {
                return Ok(());
            }
            if self.store.compare_and_set(record_key, current.as_deref(), &desired).await? {
                return Ok(());
            }
        }
        Err(AccountError::Contended(account_id.to_owned()))
    }

    /// Writes the change to the log and the audit store. A failed audit
    /// write is logged; the change itself stands.
    async fn audit(&self, who: &str, what: &str, record_key: &str, change: &Change) {
        let entry = AuditEntry {
            at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            who: who.to_owned(),
            what: what.to_owned(),
            account: change.account.clone(),
            key: record_key.to_owned(),
            before: limits_json(&change.before),
            after: limits_json(&change.after),
        };
        tracing::info!(
            audit.who = %entry.who,
            audit.what = %entry.what,
            audit.account = %entry.account,
            audit.key = %entry.key,
            audit.before = %entry.before,
            audit.after = %entry.after,
            audit.at_ms = entry.at_ms,
            "Audit: account changed"
        );
        if let Err(error) = self.store.append_audit(&entry).await {
            tracing::error!(%error, audit.account = %entry.account, audit.what = %entry.what, "Writing the audit entry failed");
        }
    }
}

/// The tier and overrides of an account as JSON, for the audit log.
pub fn limits_json(account: &Account) -> String {
    serde_json::json!({ "tier": account.tier, "overrides": account.overrides }).to_string()
}

/// The key records a limiter last saw, by key record key (`None`: no
/// record). Bounded: when full it starts over, which costs each key one
/// more round trip at most.
#[derive(Debug, Default)]
pub struct RecordCache {
    records: Mutex<HashMap<String, Option<String>>>,
}

impl RecordCache {
    /// Records kept before the cache starts over.
    pub const MAX_ENTRIES: usize = 100_000;

    /// The record last seen for `key`; `None` (no record) when never seen.
    pub fn guess(&self, key: &str) -> Option<String> {
        self.lock().get(key).cloned().flatten()
    }

    pub fn learn(&self, key: &str, record: Option<String>) {
        let mut records = self.lock();
        if records.len() >= Self::MAX_ENTRIES && !records.contains_key(key) {
            records.clear();
        }
        records.insert(key.to_owned(), record);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<String>>> {
        self.records.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
