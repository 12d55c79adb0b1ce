//! The all-or-nothing judgement of one batch of bucket operations.
//!
//! Both stores run these steps atomically: the in-memory store calls
//! [`judge`] under its lock, and the Redis script mirrors it line for line
//! (`src/store/bucket.lua`). The store contract tests hold the two equal.

use super::bucket::{BucketParams, BucketState};

/// Everything one check or report does to one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketOp {
    /// Store key of the bucket.
    pub key: String,
    pub params: BucketParams,
    /// Summed cost of the checks naming this bucket; `Some(0)` is check only.
    pub check: Option<u64>,
    /// A shadowed bucket never denies and is charged only when it fits.
    pub shadow: bool,
    /// Units credited back (`is_negative_hits`).
    pub credit: u64,
    /// Usage reports, applied whatever the checks decide.
    pub reports: Vec<Report>,
    /// Estimates to remember under their request ids when the check is charged.
    pub estimates: Vec<Estimate>,
}

/// A usage report: `amount` units used, settled against the estimate under
/// `estimate_key` when one is remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub amount: u64,
    pub estimate_key: Option<String>,
}

/// An estimate charged by a check, remembered for settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub key: String,
    pub amount: u64,
}

/// A remembered estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateRecord {
    /// Charged and not yet reported.
    Open(u64),
    /// Reported; later reports for the same request change nothing.
    Settled,
}

/// How a report was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// The report had no request id: charged in full.
    Unmatched,
    /// No estimate was remembered for the request id: charged in full.
    UnknownRequest,
    /// Settled against the estimate: the difference was charged or refunded.
    Settled { estimate: u64, actual: u64 },
    /// The request id was already settled: nothing changed.
    Duplicate,
}

/// What happened to one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketResult {
    /// The state after the batch.
    pub state: BucketState,
    /// Whether the check fitted before anything was charged; true without a check.
    pub fits: bool,
    /// Whether the check was charged.
    pub charged: bool,
    /// Units the debt clamp forgave from reports, saturating at `u64::MAX`.
    pub forgiven: u64,
    pub settlements: Vec<Settlement>,
}

/// The judgement of one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// The store clock the batch was judged at, in milliseconds.
    pub now_ms: u64,
    /// Whether every enforced check fitted.
    pub allowed: bool,
    /// One result per operation, in order.
    pub buckets: Vec<BucketResult>,
}

/// Remembered estimates, as a store keeps them.
pub trait EstimateTable {
    fn get(&mut self, key: &str) -> Option<EstimateRecord>;
    fn put(&mut self, key: &str, record: EstimateRecord);
}

/// Judges `ops` against `states` (one per op, already loaded, `None` for a
/// bucket the store does not hold) at `now_ms`, updating states and
/// estimates in place.
///
/// Steps: refill every bucket; apply credits; apply reports (never denied,
/// debt clamped at one capacity); allow the checks only if every enforced
/// bucket can pay its summed cost; charge them all or none; charge each
/// shadowed bucket that fits when the checks are allowed; remember the
/// estimates of charged checks.
pub fn judge(
    ops: &[BucketOp],
    states: &[Option<BucketState>],
    now_ms: u64,
    estimates: &mut impl EstimateTable,
) -> BatchOutcome {
    let mut buckets: Vec<BucketResult> = ops
        .iter()
        .zip(states)
        .map(|(op, state)| {
            let mut state = state.unwrap_or_else(|| BucketState::full(&op.params, now_ms));
            state.refill(&op.params, now_ms);
            state.credit(&op.params, op.credit);
            BucketResult { state, fits: true, charged: false, forgiven: 0, settlements: Vec::new() }
        })
        .collect();

    for (op, result) in ops.iter().zip(&mut buckets) {
        for report in &op.reports {
            let settlement = apply_report(op, report, &mut result.state, &mut result.forgiven, estimates);
            result.settlements.push(settlement);
        }
    }

    let mut allowed = true;
    for (op, result) in ops.iter().zip(&mut buckets) {
        if let Some(cost) = op.check {
            result.fits = result.state.fits(&op.params, cost);
            if !op.shadow && !result.fits {
                allowed = false;
            }
        }
    }

    if allowed {
        for (op, result) in ops.iter().zip(&mut buckets) {
            let Some(cost) = op.check else { continue };
            if !result.fits {
                continue;
            }
            result.state.charge(&op.params, cost);
            result.charged = true;
            for estimate in &op.estimates {
                remember(estimates, estimate);
            }
        }
    }

    BatchOutcome { now_ms, allowed, buckets }
}

fn apply_report(
    op: &BucketOp,
    report: &Report,
    state: &mut BucketState,
    forgiven: &mut u64,
    estimates: &mut impl EstimateTable,
) -> Settlement {
    let Some(key) = &report.estimate_key else {
        *forgiven = forgiven.saturating_add(state.charge_report(&op.params, report.amount));
        return Settlement::Unmatched;
    };
    match estimates.get(key) {
        None => {
            *forgiven = forgiven.saturating_add(state.charge_report(&op.params, report.amount));
            estimates.put(key, EstimateRecord::Settled);
            Settlement::UnknownRequest
        }
        Some(EstimateRecord::Settled) => Settlement::Duplicate,
        Some(EstimateRecord::Open(estimate)) => {
            if report.amount >= estimate {
                *forgiven = forgiven.saturating_add(state.charge_report(&op.params, report.amount - estimate));
            } else {
                state.credit(&op.params, estimate - report.amount);
            }
            estimates.put(key, EstimateRecord::Settled);
            Settlement::Settled { estimate, actual: report.amount }
        }
    }
}

fn remember(estimates: &mut impl EstimateTable, estimate: &Estimate) {
    if estimate.amount == 0 {
        return;
    }
    match estimates.get(&estimate.key) {
        None => estimates.put(&estimate.key, EstimateRecord::Open(estimate.amount)),
        Some(EstimateRecord::Open(sum)) => {
            estimates.put(&estimate.key, EstimateRecord::Open(sum.saturating_add(estimate.amount)))
        }
        Some(EstimateRecord::Settled) => {}
    }
}
