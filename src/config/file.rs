//! The configuration file format, as serde reads it.
//!
//! The descriptor tree reads like envoyproxy/ratelimit's files (`domain`,
//! `descriptors`, `key`, `value`, `rate_limit`, `shadow_mode`), so those files
//! load unchanged. The extensions are all explicit keys: `entry_roles`,
//! `tiers`, and on a rule `meter`, `reports`, `tier_limits`, and in a
//! `rate_limit` the `unit_multiplier` and `burst`. Values that need checking
//! (units, signs, names) are read loosely here and checked in
//! [`super::compile`], which names the key path of every problem.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One file: one domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainFile {
    /// The domain Envoy sends in `RateLimitRequest.domain`.
    pub domain: String,
    /// Descriptor entries that carry facts about a call rather than naming
    /// its bucket. Absent: every entry is part of the bucket's identity.
    #[serde(default)]
    pub entry_roles: EntryRolesFile,
    /// Account tiers, in order; one is the default.
    #[serde(default)]
    pub tiers: Vec<TierFile>,
    /// Shadow mode for every rule of the domain: nothing is denied, and
    /// would-be denials are counted.
    #[serde(default)]
    pub shadow_mode: bool,
    /// The account store: tiers and overrides recorded per account, which
    /// apply to each of the account's API keys. Absent: tiers come only from
    /// the tier entry.
    pub accounts: Option<AccountsFile>,
    /// The descriptor tree.
    #[serde(default)]
    pub descriptors: Vec<RuleFile>,
}

/// The `accounts` section of a domain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsFile {
    /// Entry key carrying the API key (for example `api_key`). It must be the
    /// first entry of the descriptors it limits, as it names their hash tag.
    pub key_entry: String,
    /// The tier a first wallet top-up promotes an account to (for example
    /// `trusted`).
    pub promoted_tier: String,
    /// Whether a tier entry set by a trusted proxy applies to keys the
    /// account store does not know. Default false: the entry is ignored and
    /// such keys get the default tier.
    #[serde(default)]
    pub trust_tier_entry: bool,
}

/// Entry keys with a role. Each is optional and never part of a bucket's
/// identity, so one API key keeps one bucket per meter whatever the tier or
/// the request id sent with it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryRolesFile {
    /// Entry key carrying the account tier (for example `tier`).
    pub tier: Option<String>,
    /// Entry key marking a usage report with the value `report`.
    pub phase: Option<String>,
    /// Entry key carrying the request id that settles an estimate.
    pub request_id: Option<String>,
}

/// An account tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierFile {
    /// The value of the tier entry, such as `trusted`.
    pub name: String,
    /// The name shown to clients in the denial message, such as `Trusted Tier`.
    pub display_name: Option<String>,
    /// Whether descriptors without a known tier get this one. Exactly one
    /// tier is the default when tiers are listed.
    #[serde(default)]
    pub default: bool,
}

/// A node of the descriptor tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// Entry key to match.
    pub key: String,
    /// Entry value to match: exact, or a prefix when it ends in `*`. Absent:
    /// any value, each value with its own bucket.
    pub value: Option<String>,
    /// The limit, or `unlimited: true`.
    pub rate_limit: Option<RateLimitFile>,
    /// Limits per tier name; a tier not listed gets `rate_limit`.
    #[serde(default)]
    pub tier_limits: BTreeMap<String, RateLimitFile>,
    /// What the limit counts: `requests` (default) or `tokens`. It picks the
    /// `x-ratelimit-*-requests` or `-tokens` headers and the denial text.
    pub meter: Option<String>,
    /// Whether descriptors with the report phase settle usage on this rule.
    #[serde(default)]
    pub reports: bool,
    /// Shadow mode for this rule only.
    #[serde(default)]
    pub shadow_mode: bool,
    /// Accepted for compatibility with envoyproxy/ratelimit files; it only
    /// affects that service's statistics.
    #[serde(default)]
    pub detailed_metric: bool,
    /// Nested rules, matched against the next entry.
    #[serde(default)]
    pub descriptors: Vec<RuleFile>,
}

/// A limit as written in a file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    /// `second`, `minute`, `hour`, `day`, `week`, `month` (30 days) or
    /// `year` (365 days), in any case.
    pub unit: Option<String>,
    /// Units per window; read signed so a negative value gets a clear error.
    pub requests_per_unit: Option<i64>,
    /// Window length in units (default 1), so `unit: second` with 30 is a
    /// 30-second window.
    pub unit_multiplier: Option<i64>,
    /// Bucket capacity in units (default: the limit).
    pub burst: Option<i64>,
    /// The limit's name, sent back in `current_limit.name`.
    pub name: Option<String>,
    /// No limit: matching descriptors are always allowed and touch no state.
    #[serde(default)]
    pub unlimited: bool,
}
