//! The validated configuration the limiter runs on.

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

use crate::limiter::bucket::BucketParams;

/// A map of configuration names, looked up on every decision. Its keys
/// come from the configuration, so the names a client sends cannot crowd
/// one hash slot. A fast hash without a random key (rustc's FxHash) is
/// therefore safe here, and it costs less than the default SipHash.
pub type NameMap<V> = HashMap<String, V, BuildHasherDefault<rustc_hash::FxHasher>>;

/// Every configured domain, by name.
#[derive(Debug, Default)]
pub struct Limits {
    pub domains: NameMap<Arc<DomainLimits>>,
}

impl Limits {
    pub fn domain(&self, name: &str) -> Option<&Arc<DomainLimits>> {
        self.domains.get(name)
    }
}

/// One domain's rules.
#[derive(Debug)]
pub struct DomainLimits {
    pub name: String,
    /// The file it was loaded from, for logs.
    pub source: String,
    pub roles: EntryRoles,
    pub tiers: Vec<Tier>,
    /// Index into `tiers` of the default tier.
    pub default_tier: Option<usize>,
    /// The account store settings; `None` when the domain has no accounts.
    pub accounts: Option<AccountsSettings>,
    pub root: Node,
}

/// How a domain uses the account store; see [`super::file::AccountsFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountsSettings {
    pub key_entry: String,
    /// Index into `tiers` of the tier a top-up promotes to.
    pub promoted_tier: usize,
    pub trust_tier_entry: bool,
}

impl DomainLimits {
    /// The tier index for a tier entry value: the named tier, else the default.
    pub fn tier_index(&self, value: Option<&str>) -> Option<usize> {
        value
            .and_then(|value| self.tiers.iter().position(|tier| *tier.name == *value))
            .or(self.default_tier)
    }
}

/// Entry keys with a role; see [`super::file::EntryRolesFile`].
#[derive(Debug, Default, Clone)]
pub struct EntryRoles {
    pub tier: Option<String>,
    pub phase: Option<String>,
    pub request_id: Option<String>,
}

/// The entry value that marks a usage report.
pub const REPORT_PHASE: &str = "report";

#[derive(Debug, Clone)]
pub struct Tier {
    pub name: Arc<str>,
    pub display_name: String,
}

/// A node of the descriptor tree: the rule that ends here, if any, and the
/// rules for the next entry by key.
#[derive(Debug, Default)]
pub struct Node {
    pub rule: Option<Arc<Rule>>,
    pub children: NameMap<KeyNode>,
}

/// The rules for one entry key at one depth.
#[derive(Debug, Default)]
pub struct KeyNode {
    pub exact: NameMap<Node>,
    /// Value prefixes (from a trailing `*`), longest first.
    pub prefixes: Vec<(String, Node)>,
    /// The key-only rule: any value, each with its own bucket.
    pub any: Option<Box<Node>>,
}

impl KeyNode {
    /// Finds the node for `value` (exact beats prefix beats key-only), and
    /// whether it matched a value the configuration lists exactly.
    pub fn find(&self, value: &str) -> Option<(&Node, bool)> {
        if let Some(node) = self.exact.get(value) {
            return Some((node, true));
        }
        if let Some((_, node)) = self.prefixes.iter().find(|(prefix, _)| value.starts_with(prefix.as_str())) {
            return Some((node, false));
        }
        self.any.as_deref().map(|node| (node, false))
    }
}

/// A rule with a limit (or unlimited) at the end of a descriptor path.
#[derive(Debug)]
pub struct Rule {
    /// The rule's path in its file, such as `descriptors[0].descriptors[1]`.
    pub path: String,
    /// A readable form of the matched entries, for logs and metrics.
    pub label: Arc<str>,
    pub meter: Meter,
    pub reports: bool,
    pub shadow: bool,
    pub unlimited: bool,
    /// The limit per tier index; with no tiers, one entry.
    pub limits: Vec<Arc<Limit>>,
}

impl Rule {
    /// The limit for a tier index (the only limit when the domain has no tiers).
    pub fn limit_for(&self, tier: Option<usize>) -> Option<&Arc<Limit>> {
        self.limits.get(tier.unwrap_or(0)).or_else(|| self.limits.first())
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    Requests,
    Tokens,
}

impl Meter {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// A limit: `per_window` units per `multiplier` × `unit`, with a capacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub per_window: u64,
    pub unit: Unit,
    pub multiplier: u32,
    /// The name sent in `current_limit.name` (may be empty).
    pub name: String,
    /// Who the limit belongs to in the denial message: a tier's display name
    /// or the rule's name.
    pub owner: String,
    pub params: BucketParams,
}

impl Limit {
    pub fn window_ms(&self) -> u64 {
        self.unit.ms() * u64::from(self.multiplier)
    }

    /// The window as the denial message words it: `per minute`, `per 30 seconds`.
    pub fn window_text(&self) -> String {
        if self.multiplier == 1 {
            format!("per {}", self.unit.singular())
        } else {
            format!("per {} {}s", self.multiplier, self.unit.singular())
        }
    }
}

/// A window unit, numbered as in the rate-limit response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

impl Unit {
    /// Parses a unit name in any case.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "second" => Self::Second,
            "minute" => Self::Minute,
            "hour" => Self::Hour,
            "day" => Self::Day,
            "week" => Self::Week,
            "month" => Self::Month,
            "year" => Self::Year,
            _ => return None,
        })
    }

    /// Length in milliseconds; a month is 30 days and a year 365, as Envoy
    /// counts them.
    pub fn ms(self) -> u64 {
        const DAY: u64 = 86_400_000;
        match self {
            Self::Second => 1_000,
            Self::Minute => 60_000,
            Self::Hour => 3_600_000,
            Self::Day => DAY,
            Self::Week => 7 * DAY,
            Self::Month => 30 * DAY,
            Self::Year => 365 * DAY,
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
            Self::Year => "year",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.singular())
    }
}
