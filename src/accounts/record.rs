//! Account records and the per-key record the hot path reads.
//!
//! Two kinds of value, both without a TTL:
//!
//! - the *account*, under `frl1:acct:{H}` where `H` hashes the domain and
//!   the account id: JSON with the schema version `v`, the id, the tier, the
//!   optional overrides, a revision counted up on every change, and the
//!   per-key record keys of its API keys;
//! - the *key record*, under `frl1:{T}:a` where `{T}` is the hash tag of the
//!   API key's buckets, so one script reads it with the buckets:
//!   `a1|REVISION|ACCOUNT|TIER|REQUESTS|TOKENS|UNIT`, a copy of the
//!   account's tier and overrides (`REQUESTS` and `TOKENS` empty when not
//!   overridden, `UNIT` the override window).
//!
//! Neither contains the API key: keys are named by the BLAKE3 hash tag only.

use serde::{Deserialize, Serialize};

use crate::config::Unit;
use crate::limiter::keys;

/// Schema version of the account JSON.
pub const ACCOUNT_SCHEMA: u32 = 1;
/// Prefix and schema version of a key record.
const RECORD_PREFIX: &str = "a1";

/// Limits an operator set for one account, replacing its tier's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    /// Requests per window; `None` keeps the tier's requests limit.
    pub requests: Option<u64>,
    /// Tokens per window; `None` keeps the tier's tokens limit.
    pub tokens: Option<u64>,
    /// The window unit of both limits.
    #[serde(with = "unit_name")]
    pub unit: Unit,
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// Schema version, [`ACCOUNT_SCHEMA`].
    pub v: u32,
    pub id: String,
    /// Tier name from the domain's configuration.
    pub tier: String,
    pub overrides: Option<Overrides>,
    /// Counted up on every change, so a key record names the account state
    /// it copies.
    pub revision: u64,
    /// Key record keys of the account's API keys (hash tags, never keys).
    pub keys: Vec<String>,
}

impl Account {
    pub fn new(id: &str, tier: &str) -> Self {
        Self { v: ACCOUNT_SCHEMA, id: id.to_owned(), tier: tier.to_owned(), overrides: None, revision: 0, keys: Vec::new() }
    }

    /// The key record every API key of this account carries.
    pub fn key_record(&self) -> KeyRecord {
        KeyRecord { revision: self.revision, account: self.id.clone(), tier: self.tier.clone(), overrides: self.overrides }
    }
}

/// The per-key copy of an account's tier and overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub revision: u64,
    pub account: String,
    pub tier: String,
    pub overrides: Option<Overrides>,
}

impl KeyRecord {
    /// Encodes the record as stored.
    pub fn encode(&self) -> String {
        let (requests, tokens, unit) = match &self.overrides {
            Some(o) => (
                o.requests.map(|n| n.to_string()).unwrap_or_default(),
                o.tokens.map(|n| n.to_string()).unwrap_or_default(),
                o.unit.singular(),
            ),
            None => (String::new(), String::new(), ""),
        };
        format!("{RECORD_PREFIX}|{}|{}|{}|{requests}|{tokens}|{unit}", self.revision, self.account, self.tier)
    }

    /// Decodes a stored record; `None` for any other layout, which the
    /// limiter treats like an unknown key.
    pub fn decode(text: &str) -> Option<Self> {
        let mut fields = text.split('|');
        if fields.next()? != RECORD_PREFIX {
            return None;
        }
        let revision = fields.next()?.parse().ok()?;
        let account = fields.next()?.to_owned();
        let tier = fields.next()?.to_owned();
        let requests = optional_count(fields.next()?)?;
        let tokens = optional_count(fields.next()?)?;
        let unit = fields.next()?;
        if fields.next().is_some() {
            return None;
        }
        let overrides = if unit.is_empty() {
            None
        } else {
            Some(Overrides { requests, tokens, unit: Unit::parse(unit)? })
        };
        Some(Self { revision, account, tier, overrides })
    }
}

fn optional_count(text: &str) -> Option<Option<u64>> {
    if text.is_empty() { Some(None) } else { text.parse().ok().map(Some) }
}

/// Builds the key record key of `api_key` in `domain`: the hash tag of the
/// key's buckets (see [`keys::bucket_key`]) with the suffix `:a`.
pub fn record_key(domain: &str, key_entry: &str, api_key: &str) -> String {
    let tag = keys::hash_tag(domain, key_entry, api_key);
    let mut key = String::with_capacity(keys::PREFIX.len() + tag.len() + 3);
    key.push_str(keys::PREFIX);
    key.push(':');
    key.push_str(&tag);
    key.push_str(":a");
    key
}

/// Builds the account key of `account_id` in `domain`.
pub fn account_key(domain: &str, account_id: &str) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(domain.len() as u64).to_le_bytes());
    hasher.update(domain.as_bytes());
    hasher.update(account_id.as_bytes());
    let hex = hasher.finalize().to_hex();
    format!("{}:acct:{{{}}}", keys::PREFIX, &hex[..24])
}

/// The account id a key never linked gets on its first top-up: `key-`
/// and 16 hex digits of its record key's hash, never the key itself.
pub fn implicit_account_id(record_key: &str) -> String {
    let hex = blake3::hash(record_key.as_bytes()).to_hex();
    format!("key-{}", &hex[..16])
}

/// Checks an operator-chosen account id: 1 to 64 ASCII letters, digits,
/// `.`, `_` or `-`.
pub fn validate_account_id(id: &str) -> Result<(), String> {
    let valid = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(format!("invalid account id `{id}`: use 1 to 64 ASCII letters, digits, `.`, `_` or `-`"))
    }
}

mod unit_name {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::Unit;

    pub fn serialize<S: Serializer>(unit: &Unit, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(unit.singular())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Unit, D::Error> {
        let name = String::deserialize(deserializer)?;
        Unit::parse(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown unit `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_record_round_trips() {
        let plain = KeyRecord { revision: 3, account: "acme".into(), tier: "trusted".into(), overrides: None };
        assert_eq!(plain.encode(), "a1|3|acme|trusted|||");
        assert_eq!(KeyRecord::decode(&plain.encode()), Some(plain));

        let overrides = Overrides { requests: Some(500), tokens: None, unit: Unit::Minute };
        let custom = KeyRecord { revision: 4, account: "acme".into(), tier: "unverified".into(), overrides: Some(overrides) };
        assert_eq!(custom.encode(), "a1|4|acme|unverified|500||minute");
        assert_eq!(KeyRecord::decode(&custom.encode()), Some(custom));
    }

    #[test]
    fn foreign_records_are_unreadable() {
        assert_eq!(KeyRecord::decode("a2|1|x|t|||"), None);
        assert_eq!(KeyRecord::decode("a1|x|x|t|||"), None);
        assert_eq!(KeyRecord::decode("a1|1|x|t|||fortnight"), None);
    }

    #[test]
    fn record_key_shares_bucket_tag_and_hides_key() {
        let record = record_key("fikra", "api_key", "sk-secret");
        let bucket = keys::bucket_key("fikra", &[("api_key", "sk-secret"), ("meter", "requests")], true);
        let tag_end = bucket.find('}').expect("a hash tag") + 1;
        assert_eq!(record[..tag_end], bucket[..tag_end]);
        assert!(record.ends_with(":a"));
        assert!(!record.contains("sk-secret"));
    }

    #[test]
    fn account_ids_are_checked() {
        assert!(validate_account_id("acme-01.prod_x").is_ok());
        assert!(validate_account_id("").is_err());
        assert!(validate_account_id("a|b").is_err());
        assert!(validate_account_id(&"a".repeat(65)).is_err());
    }
}
