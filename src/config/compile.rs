//! Validation: a parsed file to the limiter's model, with every problem
//! named by its key path.

use std::collections::HashSet;
use std::sync::Arc;

use super::file::{DomainFile, RateLimitFile, RuleFile};
use super::model::{AccountsSettings, DomainLimits, EntryRoles, KeyNode, Limit, Meter, NameMap, Node, Rule, Tier, Unit};
use crate::limiter::bucket::BucketParams;

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// Key path in the file, such as `descriptors[0].rate_limit.unit`; empty
    /// for a problem with the whole file.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.message)
        }
    }
}

const UNITS_HINT: &str = "use second, minute, hour, day, week, month or year";

/// Validates `file` (read from `source`) and builds its domain, or returns
/// every problem found.
pub fn compile(file: DomainFile, source: &str) -> Result<DomainLimits, Vec<Problem>> {
    let mut ctx = Context { source, problems: Vec::new() };

    if file.domain.trim().is_empty() {
        ctx.problem("domain", "the domain is empty; set it to the domain Envoy sends");
    }
    let roles = ctx.roles(&file);
    let (tiers, default_tier) = ctx.tiers(&file);
    let accounts = ctx.accounts(&file, &tiers);

    let scope = Scope { roles: &roles, tiers: &tiers, global_shadow: file.shadow_mode };
    let root = ctx.nodes(&file.descriptors, "descriptors", "", &scope);

    if !ctx.problems.is_empty() {
        return Err(ctx.problems);
    }
    Ok(DomainLimits { name: file.domain, source: source.to_owned(), roles, tiers, default_tier, accounts, root })
}

struct Context<'a> {
    source: &'a str,
    problems: Vec<Problem>,
}

struct Scope<'a> {
    roles: &'a EntryRoles,
    tiers: &'a [Tier],
    global_shadow: bool,
}

impl Context<'_> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { file: self.source.to_owned(), path: path.into(), message: message.into() });
    }

    fn roles(&mut self, file: &DomainFile) -> EntryRoles {
        let roles = &file.entry_roles;
        let named = [("tier", &roles.tier), ("phase", &roles.phase), ("request_id", &roles.request_id)];
        let mut seen = HashSet::new();
        for (role, key) in named {
            let Some(key) = key else { continue };
            let path = format!("entry_roles.{role}");
            if key.is_empty() {
                self.problem(path, "the entry key is empty; name the descriptor entry key or remove the line");
            } else if !seen.insert(key.as_str()) {
                self.problem(path, format!("entry key `{key}` already has another role; give each role its own key"));
            }
        }
        EntryRoles { tier: roles.tier.clone(), phase: roles.phase.clone(), request_id: roles.request_id.clone() }
    }

    fn tiers(&mut self, file: &DomainFile) -> (Vec<Tier>, Option<usize>) {
        let mut tiers = Vec::new();
        let mut default_tier = None;
        let mut names = HashSet::new();
        for (i, tier) in file.tiers.iter().enumerate() {
            let path = format!("tiers[{i}]");
            if tier.name.is_empty() {
                self.problem(format!("{path}.name"), "the tier name is empty; set it to the value of the tier entry");
            } else if !names.insert(tier.name.as_str()) {
                self.problem(format!("{path}.name"), format!("tier `{}` is listed twice; remove one", tier.name));
            }
            if tier.default {
                if default_tier.is_some() {
                    self.problem(format!("{path}.default"), "a second default tier; mark exactly one tier `default: true`");
                }
                default_tier = Some(i);
            }
            let display_name = tier.display_name.clone().unwrap_or_else(|| tier.name.clone());
            tiers.push(Tier { name: Arc::from(tier.name.as_str()), display_name });
        }
        if !tiers.is_empty() && default_tier.is_none() {
            self.problem("tiers", "no default tier; mark the tier of new accounts `default: true`");
        }
        if !tiers.is_empty() && file.entry_roles.tier.is_none() {
            self.problem("entry_roles.tier", "tiers are listed but no entry carries them; set `entry_roles.tier`, for example to `tier`");
        }
        (tiers, default_tier)
    }

    fn accounts(&mut self, file: &DomainFile, tiers: &[Tier]) -> Option<AccountsSettings> {
        let accounts = file.accounts.as_ref()?;
        if tiers.is_empty() {
            self.problem("accounts", "accounts need tiers; list them under `tiers` or remove `accounts`");
            return None;
        }
        if accounts.key_entry.is_empty() {
            self.problem("accounts.key_entry", "the entry key is empty; name the entry that carries the API key");
        }
        let roles = &file.entry_roles;
        if [&roles.tier, &roles.phase, &roles.request_id].iter().any(|role| role.as_deref() == Some(accounts.key_entry.as_str())) {
            self.problem("accounts.key_entry", format!("`{}` is an entry role; name the entry that carries the API key", accounts.key_entry));
        }
        if !file.descriptors.is_empty() && !file.descriptors.iter().any(|rule| rule.key == accounts.key_entry) {
            self.problem(
                "accounts.key_entry",
                format!("no top-level rule matches `{}`; the API key must be the first entry of a descriptor", accounts.key_entry),
            );
        }
        let Some(promoted_tier) = tiers.iter().position(|tier| *tier.name == *accounts.promoted_tier) else {
            self.problem(
                "accounts.promoted_tier",
                format!("unknown tier `{}`; name a tier listed under `tiers`", accounts.promoted_tier),
            );
            return None;
        };
        Some(AccountsSettings { key_entry: accounts.key_entry.clone(), promoted_tier, trust_tier_entry: accounts.trust_tier_entry })
    }

    fn nodes(&mut self, rules: &[RuleFile], path: &str, label: &str, scope: &Scope<'_>) -> Node {
        let mut node = Node::default();
        let mut seen = HashSet::new();
        for (i, rule) in rules.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let child_label = match &rule.value {
                Some(value) => format!("{label}{}={value}", rule.key),
                None => format!("{label}{}", rule.key),
            };
            if !seen.insert((rule.key.as_str(), rule.value.as_deref())) {
                self.problem(format!("{path}.key"), format!("`{child_label}` is defined twice at this level; merge the two rules"));
            }
            let child = self.node(rule, &path, &child_label, scope);
            let slot = node.children.entry(rule.key.clone()).or_default();
            insert_child(slot, rule.value.as_deref(), child);
        }
        for slot in node.children.values_mut() {
            slot.prefixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()));
        }
        node
    }

    fn node(&mut self, rule: &RuleFile, path: &str, label: &str, scope: &Scope<'_>) -> Node {
        if rule.key.is_empty() {
            self.problem(format!("{path}.key"), "the entry key is empty; set it to the descriptor entry key to match");
        }
        let roles = [&scope.roles.tier, &scope.roles.phase, &scope.roles.request_id];
        if roles.iter().any(|role| role.as_deref() == Some(rule.key.as_str())) {
            self.problem(
                format!("{path}.key"),
                format!("`{}` is an entry role, which never names a bucket; match another key", rule.key),
            );
        }
        let children = self.nodes(&rule.descriptors, &format!("{path}.descriptors"), &format!("{label}/"), scope);
        Node { rule: self.rule(rule, path, label, scope).map(Arc::new), children: children.children }
    }

    fn rule(&mut self, rule: &RuleFile, path: &str, label: &str, scope: &Scope<'_>) -> Option<Rule> {
        let meter = match rule.meter.as_deref() {
            None | Some("requests") => Meter::Requests,
            Some("tokens") => Meter::Tokens,
            Some(other) => {
                self.problem(format!("{path}.meter"), format!("unknown meter `{other}`; use requests or tokens"));
                Meter::Requests
            }
        };
        for name in rule.tier_limits.keys() {
            if !scope.tiers.iter().any(|tier| *tier.name == **name) {
                self.problem(
                    format!("{path}.tier_limits.{name}"),
                    format!("unknown tier `{name}`; list it under `tiers` or remove the limit"),
                );
            }
        }
        if rule.rate_limit.is_none() && rule.tier_limits.is_empty() {
            if rule.reports {
                self.problem(format!("{path}.reports"), "reports need a limit to charge; add `rate_limit` or `tier_limits`");
            }
            return None;
        }

        let unlimited = rule.rate_limit.as_ref().is_some_and(|limit| limit.unlimited);
        let mut limits = Vec::new();
        if !rule.tier_limits.is_empty() {
            for tier in scope.tiers {
                let (limit, limit_path) = match rule.tier_limits.get(&*tier.name) {
                    Some(limit) => (limit, format!("{path}.tier_limits.{}", tier.name)),
                    None => match &rule.rate_limit {
                        Some(limit) => (limit, format!("{path}.rate_limit")),
                        None => {
                            self.problem(
                                format!("{path}.tier_limits"),
                                format!("tier `{}` has no limit; add it to `tier_limits` or add a `rate_limit`", tier.name),
                            );
                            continue;
                        }
                    },
                };
                if let Some(limit) = self.limit(limit, &limit_path, &tier.display_name) {
                    limits.push(Arc::new(limit));
                }
            }
        } else if let Some(limit) = rule.rate_limit.as_ref().filter(|limit| !limit.unlimited) {
            let owner = limit.name.clone().unwrap_or_else(|| label.to_owned());
            if let Some(limit) = self.limit(limit, &format!("{path}.rate_limit"), &owner) {
                limits.push(Arc::new(limit));
            }
        } else if let Some(limit) = &rule.rate_limit {
            self.unlimited(limit, &format!("{path}.rate_limit"));
        }

        Some(Rule {
            path: path.to_owned(),
            label: Arc::from(label),
            meter,
            reports: rule.reports,
            shadow: rule.shadow_mode || scope.global_shadow,
            unlimited: unlimited && rule.tier_limits.is_empty(),
            limits,
        })
    }

    fn unlimited(&mut self, limit: &RateLimitFile, path: &str) {
        if limit.requests_per_unit.is_some() || limit.unit.is_some() || limit.burst.is_some() {
            self.problem(path, "`unlimited: true` with a limit; remove either `unlimited` or the limit fields");
        }
    }

    fn limit(&mut self, limit: &RateLimitFile, path: &str, owner: &str) -> Option<Limit> {
        if limit.unlimited {
            self.problem(format!("{path}.unlimited"), "`unlimited` is only allowed in `rate_limit` of a rule without tier limits");
            return None;
        }
        let before = self.problems.len();
        let unit = match limit.unit.as_deref() {
            None => {
                self.problem(format!("{path}.unit"), format!("the unit is missing; {UNITS_HINT}"));
                None
            }
            Some(name) => Unit::parse(name).or_else(|| {
                self.problem(format!("{path}.unit"), format!("unknown unit `{name}`; {UNITS_HINT}"));
                None
            }),
        };
        let per_window = match limit.requests_per_unit {
            None => {
                self.problem(format!("{path}.requests_per_unit"), "the limit is missing; set `requests_per_unit` to 0 or more");
                None
            }
            Some(n) if n < 0 => {
                self.problem(format!("{path}.requests_per_unit"), format!("the limit {n} is negative; set it to 0 or more"));
                None
            }
            Some(n) => Some(n.unsigned_abs()),
        };
        let multiplier = self.positive(limit.unit_multiplier, &format!("{path}.unit_multiplier"), 1, u64::from(u32::MAX));
        let burst = self.positive(limit.burst, &format!("{path}.burst"), per_window.unwrap_or(0), u64::MAX);
        if self.problems.len() > before {
            return None;
        }
        let (unit, per_window, multiplier) = (unit?, per_window?, u32::try_from(multiplier?).ok()?);
        let capacity = burst?;
        if per_window == 0 && capacity > 0 {
            // Such a bucket would never refill, so its key could carry no TTL.
            self.problem(format!("{path}.burst"), "a limit of 0 never refills; remove `burst` or set a limit above 0");
            return None;
        }

        let Some(window_ms) = unit.ms().checked_mul(u64::from(multiplier)) else {
            let message = format!("a window of {multiplier} {}s is longer than this service can count in milliseconds; lower it", unit.singular());
            self.problem(format!("{path}.unit_multiplier"), message);
            return None;
        };
        let params = match BucketParams::new(per_window, window_ms, capacity) {
            Ok(params) => params,
            Err(error) => {
                self.problem(path, format!("{error}; lower the limit or the burst"));
                return None;
            }
        };
        Some(Limit {
            per_window,
            unit,
            multiplier,
            name: limit.name.clone().unwrap_or_default(),
            owner: owner.to_owned(),
            params,
        })
    }

    /// Reads an optional count that must be at least 1, with a default.
    fn positive(&mut self, value: Option<i64>, path: &str, default: u64, max: u64) -> Option<u64> {
        match value {
            None => Some(default),
            Some(n) if n < 1 || n.unsigned_abs() > max => {
                self.problem(path, format!("{n} is out of range; set it between 1 and {max}"));
                None
            }
            Some(n) => Some(n.unsigned_abs()),
        }
    }
}

fn insert_child(slot: &mut KeyNode, value: Option<&str>, child: Node) {
    match value {
        None => slot.any = Some(Box::new(child)),
        Some(value) => match value.strip_suffix('*') {
            Some(prefix) => slot.prefixes.push((prefix.to_owned(), child)),
            None => {
                slot.exact.insert(value.to_owned(), child);
            }
        },
    }
}

/// Checks that no two domains share a name, returning the domains by name.
pub fn index_domains(domains: Vec<DomainLimits>) -> Result<NameMap<Arc<DomainLimits>>, Vec<Problem>> {
    let mut by_name: NameMap<Arc<DomainLimits>> = NameMap::default();
    let mut problems = Vec::new();
    for domain in domains {
        if let Some(first) = by_name.get(&domain.name) {
            problems.push(Problem {
                file: domain.source.clone(),
                path: "domain".to_owned(),
                message: format!("domain `{}` is already defined in {}; keep one file per domain", domain.name, first.source),
            });
            continue;
        }
        by_name.insert(domain.name.clone(), Arc::new(domain));
    }
    if problems.is_empty() { Ok(by_name) } else { Err(problems) }
}
