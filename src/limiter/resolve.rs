//! Descriptors to rules, limits and bucket operations.

use std::sync::Arc;

use super::decision::{Decision, Denial, DescriptorFacts, DescriptorKind};
use super::judge::{BucketOp, Estimate, Report};
use super::keys;
use super::request::{CheckRequest, Descriptor, LimitOverride, RequestBounds};
use crate::accounts::KeyRecord;
use crate::config::model::{DomainLimits, Node, REPORT_PHASE, Rule};
use crate::config::{Limit, Meter, Unit};
use crate::limiter::bucket::BucketParams;

/// The operation one descriptor requests of its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No rule with a limit matched: allowed, no state touched.
    NoLimit,
    Check { cost: u64 },
    Report { amount: u64 },
    /// A report without a cost of its own, or on a rule that takes no
    /// reports: nothing is charged.
    IgnoredReport,
    Credit { amount: u64 },
}

/// One descriptor after resolution.
#[derive(Debug, Clone)]
pub struct Planned {
    pub kind: Kind,
    pub limit: Option<Arc<Limit>>,
    pub meter: Meter,
    pub shadow: bool,
    /// Index of the bucket operation in the batch.
    pub op: Option<usize>,
    /// Rule, tier and kind, for metrics and logs.
    pub facts: DescriptorFacts,
}

/// A check whose summed cost exceeds its bucket's capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub op: usize,
    pub cost: u64,
}

/// A resolved call.
#[derive(Debug)]
pub struct Plan {
    pub descriptors: Vec<Planned>,
    pub ops: Vec<BucketOp>,
    pub too_large: Option<TooLarge>,
    denial: Option<Denial>,
}

impl Plan {
    /// A decision that needs no store: a value over its bound.
    pub fn early_decision(&self) -> Option<Decision> {
        let denial = self.denial.clone()?;
        Some(Decision::denied_early(self.descriptors.len(), denial))
    }
}

/// Key records by API key value, for a domain with accounts. A check
/// usually names one API key, so the records are a list searched in order,
/// which costs less than hashing, and the keys are borrowed from the request.
#[derive(Debug, Default)]
pub struct AccountRecords<'a> {
    records: Vec<(&'a str, KeyRecord)>,
}

impl<'a> AccountRecords<'a> {
    /// Creates an empty set with room for `count` records.
    pub fn with_capacity(count: usize) -> Self {
        Self { records: Vec::with_capacity(count) }
    }

    /// Stores the record of `api_key`, replacing an earlier one.
    pub fn insert(&mut self, api_key: &'a str, record: KeyRecord) {
        match self.records.iter_mut().find(|(key, _)| *key == api_key) {
            Some((_, stored)) => *stored = record,
            None => self.records.push((api_key, record)),
        }
    }

    /// Returns the record of `api_key`.
    pub fn get(&self, api_key: &str) -> Option<&KeyRecord> {
        self.records.iter().find(|(key, _)| *key == api_key).map(|(_, record)| record)
    }
}

/// Resolves every descriptor of `request` in `domain`, with the tiers and
/// overrides of `accounts`.
pub fn plan(domain: &DomainLimits, request: &CheckRequest, bounds: &RequestBounds, accounts: &AccountRecords<'_>) -> Plan {
    let count = request.descriptors.len();
    let mut plan = Plan { descriptors: Vec::with_capacity(count), ops: Vec::with_capacity(count), too_large: None, denial: None };

    for (index, descriptor) in request.descriptors.iter().enumerate() {
        if let Some((entry, value)) = descriptor.entries.iter().enumerate().find(|(_, e)| e.value.len() > bounds.max_value_len) {
            plan.denial = Some(Denial::ValueTooLong { index, entry, len: value.value.len(), max: bounds.max_value_len });
        }
        let planned = resolve(domain, request, descriptor, accounts, &mut plan.ops);
        plan.descriptors.push(planned);
    }

    // Descriptors naming one bucket with different limits (different
    // overrides) share the parameters the first of them set. Every such
    // descriptor reports that first limit, so its status and headers
    // describe the bucket that was judged.
    for index in 0..plan.descriptors.len() {
        let Some(op) = plan.descriptors[index].op else { continue };
        let first = plan.descriptors.iter().position(|p| p.op == Some(op)).unwrap_or(index);
        if first != index {
            let limit = plan.descriptors[first].limit.clone();
            plan.descriptors[index].limit = limit;
        }
    }

    // Too large is judged on the summed cost of each bucket; a request with
    // one such check charges nothing, so its checks turn into reads.
    for (index, op) in plan.ops.iter().enumerate() {
        if let Some(cost) = op.check.filter(|cost| *cost > op.params.capacity) {
            if !op.shadow {
                plan.too_large.get_or_insert(TooLarge { op: index, cost });
            }
        }
    }
    if plan.too_large.is_some() {
        for op in &mut plan.ops {
            op.check = None;
            op.estimates.clear();
        }
    }
    plan
}

fn resolve(
    domain: &DomainLimits,
    request: &CheckRequest,
    descriptor: &Descriptor,
    accounts: &AccountRecords<'_>,
    ops: &mut Vec<BucketOp>,
) -> Planned {
    let roles = &domain.roles;
    let mut tier = None;
    let mut phase = None;
    let mut request_id = None;
    let mut identity = Vec::with_capacity(descriptor.entries.len());
    for entry in &descriptor.entries {
        let key = Some(entry.key.as_str());
        if key == roles.tier.as_deref() {
            tier = Some(entry.value.as_str());
        } else if key == roles.phase.as_deref() {
            phase = Some(entry.value.as_str());
        } else if key == roles.request_id.as_deref() {
            request_id = Some(entry.value.as_str());
        } else {
            identity.push((entry.key.as_str(), entry.value.as_str()));
        }
    }

    let no_limit = |facts: DescriptorFacts| Planned { kind: Kind::NoLimit, limit: None, meter: Meter::Requests, shadow: false, op: None, facts };
    if identity.is_empty() {
        return no_limit(DescriptorFacts::default());
    }
    let (rule, exact_last) = find_rule(&domain.root, &identity);
    let (tier_index, account) = account_tier(domain, &identity, tier, accounts);
    let overridden = descriptor.limit.and_then(|o| override_limit(o, rule.map(Arc::as_ref), tier_index, domain));
    let mut facts = DescriptorFacts {
        rule: rule.map(|rule| rule.label.clone()),
        tier: tier_index.and_then(|t| domain.tiers.get(t)).map(|t| t.name.clone()),
        ignored_override: descriptor.limit.is_some() && overridden.is_none(),
        ..DescriptorFacts::default()
    };
    let limit = match overridden {
        Some(limit) => Some(limit),
        None => rule.filter(|rule| !rule.unlimited).and_then(|rule| {
            let configured = rule.limit_for(tier_index)?;
            Some(account.and_then(|record| account_limit(record, rule.meter, configured)).unwrap_or_else(|| configured.clone()))
        }),
    };
    let Some(limit) = limit else { return no_limit(facts) };
    let meter = rule.map_or(Meter::Requests, |rule| rule.meter);
    let shadow = rule.is_some_and(|rule| rule.shadow);

    let cost = descriptor.hits.unwrap_or(if request.hits == 0 { 1 } else { u64::from(request.hits) });
    let is_report = phase == Some(REPORT_PHASE);
    let kind = if is_report {
        match descriptor.hits {
            Some(amount) if rule.is_some_and(|rule| rule.reports) => Kind::Report { amount },
            _ => Kind::IgnoredReport,
        }
    } else if descriptor.negative {
        Kind::Credit { amount: cost }
    } else {
        Kind::Check { cost }
    };
    facts.shadow = shadow;
    facts.kind = match kind {
        Kind::NoLimit => DescriptorKind::NoLimit,
        Kind::Check { .. } => DescriptorKind::Check,
        Kind::Report { .. } => DescriptorKind::Report,
        Kind::IgnoredReport => DescriptorKind::IgnoredReport,
        Kind::Credit { .. } => DescriptorKind::Credit,
    };
    if kind == Kind::IgnoredReport {
        return Planned { kind, limit: Some(limit), meter, shadow, op: None, facts };
    }

    let key = keys::bucket_key(&domain.name, &identity, exact_last);
    let op_index = match ops.iter().position(|op| op.key == key) {
        Some(index) => index,
        None => {
            ops.push(BucketOp {
                key,
                params: limit.params,
                check: None,
                shadow,
                credit: 0,
                reports: Vec::new(),
                estimates: Vec::new(),
            });
            ops.len() - 1
        }
    };
    let op = &mut ops[op_index];
    match kind {
        Kind::Check { cost } => {
            op.check = Some(op.check.unwrap_or(0).saturating_add(cost));
            if let (Some(id), true) = (request_id, cost > 0) {
                op.estimates.push(Estimate { key: keys::estimate_key(&op.key, id), amount: cost });
            }
        }
        Kind::Report { amount } => {
            let estimate_key = request_id.map(|id| keys::estimate_key(&op.key, id));
            op.reports.push(Report { amount, estimate_key });
        }
        Kind::Credit { amount } => op.credit = op.credit.saturating_add(amount),
        Kind::NoLimit | Kind::IgnoredReport => {}
    }
    Planned { kind, limit: Some(limit), meter, shadow, op: Some(op_index), facts }
}

/// The tier of a descriptor, and the account record that chose it. With
/// accounts: the store's tier for a key it has a record for, else the tier
/// entry when the domain trusts it, else the default tier.
fn account_tier<'a>(
    domain: &DomainLimits,
    identity: &[(&str, &str)],
    tier_entry: Option<&str>,
    accounts: &'a AccountRecords<'_>,
) -> (Option<usize>, Option<&'a KeyRecord>) {
    let Some(settings) = &domain.accounts else { return (domain.tier_index(tier_entry), None) };
    let api_key = identity.iter().find(|(key, _)| *key == settings.key_entry).map(|(_, value)| *value);
    match api_key.and_then(|api_key| accounts.get(api_key)) {
        Some(record) => (domain.tier_index(Some(record.tier.as_str())), Some(record)),
        None if settings.trust_tier_entry => (domain.tier_index(tier_entry), None),
        None => (domain.default_tier, None),
    }
}

/// The account's own limit for a meter, replacing `configured`; `None`
/// when the account has no override for this meter.
fn account_limit(record: &KeyRecord, meter: Meter, configured: &Arc<Limit>) -> Option<Arc<Limit>> {
    let overrides = record.overrides?;
    let per_window = match meter {
        Meter::Requests => overrides.requests?,
        Meter::Tokens => overrides.tokens?,
    };
    let params = BucketParams::new(per_window, overrides.unit.ms(), per_window).ok()?;
    Some(Arc::new(Limit {
        per_window,
        unit: overrides.unit,
        multiplier: 1,
        name: configured.name.clone(),
        owner: configured.owner.clone(),
        params,
    }))
}

/// Walks the tree: every entry must match, in order, and the rule must end
/// exactly at the last entry. Also returns whether the last entry matched
/// a value the configuration lists (not a prefix or any value). Only such
/// an entry may name the bucket's field in its store hash.
fn find_rule<'a>(root: &'a Node, entries: &[(&str, &str)]) -> (Option<&'a Arc<Rule>>, bool) {
    let mut node = root;
    let mut exact = false;
    for (key, value) in entries {
        let Some((next, matched_exactly)) = node.children.get(*key).and_then(|key_node| key_node.find(value)) else {
            return (None, false);
        };
        node = next;
        exact = matched_exactly;
    }
    (node.rule.as_ref(), exact && node.rule.is_some())
}

/// The limit Envoy chose for one descriptor, or `None` when it is unusable
/// (unit UNKNOWN, a multiplier of 0, or a window longer than `u64::MAX`
/// milliseconds, such as `u32::MAX` years), in which case the configured
/// limit applies.
fn override_limit(
    limit: LimitOverride,
    rule: Option<&Rule>,
    tier: Option<usize>,
    domain: &DomainLimits,
) -> Option<Arc<Limit>> {
    let unit = match limit.unit {
        1 => Unit::Second,
        2 => Unit::Minute,
        3 => Unit::Hour,
        4 => Unit::Day,
        5 => Unit::Month,
        6 => Unit::Year,
        7 => Unit::Week,
        _ => return None,
    };
    let multiplier = limit.multiplier.unwrap_or(1);
    if multiplier == 0 {
        return None;
    }
    let per_window = u64::from(limit.requests_per_unit);
    let window_ms = unit.ms().checked_mul(u64::from(multiplier))?;
    let params = BucketParams::new(per_window, window_ms, per_window).ok()?;
    let configured = rule.and_then(|rule| rule.limit_for(tier));
    let owner = match configured {
        Some(configured) => configured.owner.clone(),
        None => tier.and_then(|t| domain.tiers.get(t)).map_or_else(|| "rate limit".to_owned(), |t| t.display_name.clone()),
    };
    Some(Arc::new(Limit { per_window, unit, multiplier, name: configured.map(|c| c.name.clone()).unwrap_or_default(), owner, params }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tier: &str) -> KeyRecord {
        KeyRecord { revision: 1, account: "acme".into(), tier: tier.into(), overrides: None }
    }

    #[test]
    fn account_records_find_by_api_key() {
        let mut records = AccountRecords::with_capacity(2);
        records.insert("k1", record("unverified"));
        records.insert("k2", record("trusted"));

        assert_eq!(records.get("k1").map(|record| record.tier.as_str()), Some("unverified"));
        assert_eq!(records.get("k2").map(|record| record.tier.as_str()), Some("trusted"));
        assert_eq!(records.get("k3"), None);
    }

    #[test]
    fn account_records_insert_replaces() {
        let mut records = AccountRecords::default();
        records.insert("k1", record("unverified"));
        records.insert("k1", record("trusted"));

        assert_eq!(records.get("k1").map(|record| record.tier.as_str()), Some("trusted"));
        assert_eq!(records.records.len(), 1);
    }
}
