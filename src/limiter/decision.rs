//! The decision on one call, read from the store's outcome.

use std::sync::Arc;
use std::time::Duration;

use super::judge::{BatchOutcome, BucketOp, Settlement};
use super::resolve::{Kind, Planned, TooLarge};
use crate::config::{Limit, Meter};

/// Allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
}

/// The decision on one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// One status per descriptor, in order.
    pub statuses: Vec<DescriptorStatus>,
    /// Why the call was denied.
    pub denial: Option<Denial>,
    /// Whether the domain was unknown (everything allowed, nothing touched).
    pub unknown_domain: bool,
    /// How long the store took to judge the call; `None` when it was not asked.
    pub store_elapsed: Option<Duration>,
}

/// The state of one descriptor's bucket after the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorStatus {
    pub outcome: Outcome,
    /// The limit applied; `None` when no rule with a limit matched.
    pub limit: Option<Arc<Limit>>,
    pub meter: Meter,
    /// Whole units left after this call (on a denial: left now).
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
    /// A shadowed limit that would have denied.
    pub shadow_denied: bool,
    /// Facts for metrics and logs.
    pub facts: DescriptorFacts,
}

/// Facts about one descriptor beyond its status, for metrics and logs. Every text here comes from the configuration, never
/// from a descriptor value, so it is safe to use as a metric label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescriptorFacts {
    pub kind: DescriptorKind,
    /// Label of the matched rule, such as `api_key/meter=tokens`; `None`
    /// when no rule matched (a limit override from Envoy may still apply).
    pub rule: Option<Arc<str>>,
    /// The configured name of the tier the limit was chosen for.
    pub tier: Option<Arc<str>>,
    /// Whether the limit is in shadow mode.
    pub shadow: bool,
    /// How a report was settled.
    pub settlement: Option<Settlement>,
    /// Units the debt clamp forgave from this descriptor's bucket (counted
    /// once per bucket, on its first report).
    pub forgiven: u64,
    /// Whether Envoy's limit override was ignored (unit UNKNOWN or a
    /// multiplier of 0).
    pub ignored_override: bool,
}

/// What a descriptor asked of its bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DescriptorKind {
    /// No rule with a limit matched.
    #[default]
    NoLimit,
    Check,
    Report,
    /// A report without a cost of its own, or on a rule that takes no reports.
    IgnoredReport,
    Credit,
}

/// Why a call was denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A bucket cannot pay now; `retry_ms` until this call would fit (the
    /// longest wait over the denying buckets).
    OverLimit { limit: Arc<Limit>, meter: Meter, retry_ms: u64 },
    /// The cost exceeds the capacity, so the call can never fit.
    TooLarge { limit: Arc<Limit>, meter: Meter, cost: u64 },
    /// An entry value longer than the bound.
    ValueTooLong { index: usize, entry: usize, len: usize, max: usize },
}

impl Decision {
    /// Everything allowed without limits: the domain is not configured.
    pub fn unknown_domain(descriptors: usize) -> Self {
        Self {
            outcome: Outcome::Allowed,
            statuses: vec![DescriptorStatus::unlimited(); descriptors],
            denial: None,
            unknown_domain: true,
            store_elapsed: None,
        }
    }

    /// A denial decided before any store work.
    pub fn denied_early(descriptors: usize, denial: Denial) -> Self {
        let status = DescriptorStatus { outcome: Outcome::Denied, ..DescriptorStatus::unlimited() };
        Self { outcome: Outcome::Denied, statuses: vec![status; descriptors], denial: Some(denial), unknown_domain: false, store_elapsed: None }
    }

    /// Descriptors whose shadowed limit would have denied.
    pub fn shadow_denials(&self) -> usize {
        self.statuses.iter().filter(|status| status.shadow_denied).count()
    }
}

impl DescriptorStatus {
    fn unlimited() -> Self {
        Self {
            outcome: Outcome::Allowed,
            limit: None,
            meter: Meter::Requests,
            remaining: 0,
            reset_ms: 0,
            shadow_denied: false,
            facts: DescriptorFacts::default(),
        }
    }
}

/// Reads the decision from the store's outcome.
pub fn read(planned: &[Planned], ops: &[BucketOp], outcome: Option<&BatchOutcome>, too_large: Option<TooLarge>) -> Decision {
    let allowed = too_large.is_none() && outcome.is_none_or(|outcome| outcome.allowed);
    let mut statuses = Vec::with_capacity(planned.len());
    let mut denial: Option<Denial> = too_large.map(|TooLarge { op, cost }| {
        let planned = planned.iter().find(|p| p.op == Some(op)).expect("a too-large op comes from a descriptor");
        Denial::TooLarge { limit: planned.limit.clone().expect("an op has a limit"), meter: planned.meter, cost }
    });

    // The n-th report naming a bucket got the bucket's n-th settlement.
    let mut reports_seen = vec![0_usize; ops.len()];
    for descriptor in planned {
        let facts = descriptor.facts.clone();
        let (Some(index), Some(outcome), Some(limit)) = (descriptor.op, outcome, &descriptor.limit) else {
            let mut status = DescriptorStatus { facts, ..DescriptorStatus::unlimited() };
            if let Some(limit) = &descriptor.limit {
                status.limit = Some(limit.clone());
                status.meter = descriptor.meter;
                status.remaining = limit.params.capacity;
            }
            statuses.push(status);
            continue;
        };
        let op = &ops[index];
        let result = &outcome.buckets[index];
        let state = &result.state;
        let is_check = matches!(descriptor.kind, Kind::Check { .. });
        let mut status = DescriptorStatus {
            outcome: Outcome::Allowed,
            limit: Some(limit.clone()),
            meter: descriptor.meter,
            remaining: state.remaining(&op.params),
            reset_ms: state.reset_ms(&op.params, outcome.now_ms),
            shadow_denied: is_check && descriptor.shadow && !result.fits,
            facts,
        };
        if matches!(descriptor.kind, Kind::Report { .. }) {
            let seen = &mut reports_seen[index];
            status.facts.settlement = result.settlements.get(*seen).copied();
            if *seen == 0 {
                status.facts.forgiven = result.forgiven;
            }
            *seen += 1;
        }
        if too_large.is_some_and(|t| t.op == index) {
            status.outcome = Outcome::Denied;
        }
        if is_check && !descriptor.shadow && !result.fits {
            status.outcome = Outcome::Denied;
            let cost = op.check.unwrap_or(0);
            let retry_ms = state.retry_ms(&op.params, cost, outcome.now_ms);
            let candidate = match retry_ms {
                Some(retry_ms) => Denial::OverLimit { limit: limit.clone(), meter: descriptor.meter, retry_ms },
                None => Denial::TooLarge { limit: limit.clone(), meter: descriptor.meter, cost },
            };
            denial = Some(match denial {
                None => candidate,
                Some(current) => longer_wait(current, candidate),
            });
        }
        statuses.push(status);
    }

    Decision {
        outcome: if allowed { Outcome::Allowed } else { Outcome::Denied },
        statuses,
        denial: if allowed { None } else { denial },
        unknown_domain: false,
        store_elapsed: None,
    }
}

/// The denial that describes the call: one that can never fit wins, then
/// the longest wait.
fn longer_wait(current: Denial, candidate: Denial) -> Denial {
    match (&current, &candidate) {
        (Denial::OverLimit { retry_ms: a, .. }, Denial::OverLimit { retry_ms: b, .. }) if b > a => candidate,
        (Denial::OverLimit { .. }, Denial::TooLarge { .. }) => candidate,
        _ => current,
    }
}
