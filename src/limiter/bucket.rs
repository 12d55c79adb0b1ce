//! Token-bucket arithmetic in exact integers.
//!
//! A bucket stores the amount *used* (its level), not the amount left, so a
//! change of capacity shows its new headroom at once. Refill is continuous:
//! `L` units per window of `W` milliseconds. To keep every step exact, the
//! level is counted in sub-units: one unit is `scale` sub-units and one clock
//! tick of `tick_ms` refills `refill_per_tick` sub-units, where
//! `refill_per_tick / scale == L * tick_ms / W` exactly. The Redis script runs
//! the same steps on Lua doubles, which are exact up to 2^53, so a limit is
//! only accepted when every value it can produce stays below [`MAX_EXACT`].

use std::fmt;

/// The largest integer a double (and so a Redis Lua number) holds exactly.
pub const MAX_EXACT: u64 = 1 << 53;

/// Clock resolutions tried in turn, finest first. A window that needs a
/// coarser tick to stay exact refills in steps of that tick.
const TICKS_MS: [u64; 4] = [1, 10, 100, 1000];

/// Integer parameters of one bucket, derived from a limit by [`BucketParams::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketParams {
    /// Capacity in units (the burst, by default the limit).
    pub capacity: u64,
    /// Sub-units per unit.
    pub scale: u64,
    /// Sub-units refilled per tick.
    pub refill_per_tick: u64,
    /// Length of one tick in milliseconds.
    pub tick_ms: u64,
}

/// A limit whose arithmetic cannot stay exact within [`MAX_EXACT`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a capacity of {capacity} units refilled at {limit} per {window_ms} ms cannot be counted exactly; \
     the capacity must stay below {max} units",
    max = MAX_EXACT / 5
)]
pub struct InexactLimit {
    pub limit: u64,
    pub window_ms: u64,
    pub capacity: u64,
}

impl BucketParams {
    /// Derives the parameters of a bucket of `capacity` units that refills
    /// `limit` units per `window_ms`.
    ///
    /// The finest tick that keeps `5 * capacity` sub-units plus one tick of
    /// refill below [`MAX_EXACT`] is chosen: levels reach twice the capacity
    /// (debt) and a report may add up to twice the capacity before the clamp.
    pub fn new(limit: u64, window_ms: u64, capacity: u64) -> Result<Self, InexactLimit> {
        let error = InexactLimit { limit, window_ms, capacity };
        if window_ms == 0 {
            return Err(error);
        }

        let candidates = TICKS_MS
            .iter()
            .copied()
            .filter(|tick| window_ms % tick == 0)
            .chain(std::iter::once(window_ms));
        for tick_ms in candidates {
            let ticks_per_window = window_ms / tick_ms;
            let divisor = gcd(limit, ticks_per_window);
            let scale = ticks_per_window / divisor;
            let refill_per_tick = limit / divisor;
            let fits = capacity
                .checked_mul(scale)
                .and_then(|sub| sub.checked_mul(5))
                .and_then(|sub| sub.checked_add(refill_per_tick))
                .is_some_and(|sub| sub < MAX_EXACT);
            if fits {
                return Ok(Self { capacity, scale, refill_per_tick, tick_ms });
            }
        }
        Err(error)
    }

    /// Capacity in sub-units.
    pub fn capacity_sub(&self) -> u64 {
        self.capacity * self.scale
    }

    /// Maximum level in sub-units: one capacity of debt beyond empty.
    pub fn max_level(&self) -> u64 {
        2 * self.capacity_sub()
    }

    /// Milliseconds until `excess` sub-units have refilled, counted from
    /// `stamp_ms` (the start of the current tick), minus what has passed.
    fn wait_ms(&self, excess: u64, stamp_ms: u64, now_ms: u64) -> u64 {
        if excess == 0 {
            return 0;
        }
        if self.refill_per_tick == 0 {
            return u64::MAX;
        }
        let ticks = excess.div_ceil(self.refill_per_tick);
        (stamp_ms + ticks * self.tick_ms).saturating_sub(now_ms)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The stored state of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketState {
    /// Used amount in sub-units of `scale`; 0 is a full bucket.
    pub level: u64,
    /// Start of the tick from which refill is next counted, in store-clock ms.
    pub stamp_ms: u64,
    /// The sub-unit scale `level` is counted in.
    pub scale: u64,
}

impl BucketState {
    /// A full bucket as of `now_ms`.
    pub fn full(params: &BucketParams, now_ms: u64) -> Self {
        Self { level: 0, stamp_ms: now_ms, scale: params.scale }
    }

    /// Brings the state to `now_ms` under `params`: converts the level to
    /// the current scale (rounding up, so no unit is created), refills whole
    /// ticks, and clamps the level at the maximum debt.
    pub fn refill(&mut self, params: &BucketParams, now_ms: u64) {
        if self.scale != params.scale {
            self.level = rescale(self.level, self.scale, params.scale);
            self.scale = params.scale;
        }
        self.level = self.level.min(params.max_level());

        // A clock that went back refills nothing and keeps the stamp.
        let elapsed = now_ms.saturating_sub(self.stamp_ms);
        let ticks = elapsed / params.tick_ms;
        if self.level == 0 {
            self.stamp_ms = now_ms;
            return;
        }
        let needed = if params.refill_per_tick == 0 {
            u64::MAX
        } else {
            self.level.div_ceil(params.refill_per_tick)
        };
        if ticks >= needed {
            self.level = 0;
            self.stamp_ms = now_ms;
        } else {
            self.level -= ticks * params.refill_per_tick;
            self.stamp_ms += ticks * params.tick_ms;
        }
    }

    /// Whether a check of `cost` units fits; a cost of 0 (check only) fits
    /// while at least one whole unit is left.
    pub fn fits(&self, params: &BucketParams, cost: u64) -> bool {
        let need = cost.max(1);
        match need.checked_mul(params.scale) {
            Some(need_sub) => self.level.saturating_add(need_sub) <= params.capacity_sub(),
            None => false,
        }
    }

    /// Charges a check that [`fits`](Self::fits).
    pub fn charge(&mut self, params: &BucketParams, cost: u64) {
        self.level += cost * params.scale;
    }

    /// Charges a report in full, past empty if need be, and returns the
    /// units forgiven by the clamp at the maximum debt.
    pub fn charge_report(&mut self, params: &BucketParams, amount: u64) -> u64 {
        let room = (params.max_level() - self.level) / params.scale;
        let taken = amount.min(room);
        self.level += taken * params.scale;
        amount - taken
    }

    /// Credits `amount` units back, never above capacity.
    pub fn credit(&mut self, params: &BucketParams, amount: u64) {
        let sub = amount.saturating_mul(params.scale);
        self.level = self.level.saturating_sub(sub);
    }

    /// Whole units left, never below 0.
    pub fn remaining(&self, params: &BucketParams) -> u64 {
        params.capacity_sub().saturating_sub(self.level) / params.scale
    }

    /// Milliseconds until the bucket is full again.
    pub fn reset_ms(&self, params: &BucketParams, now_ms: u64) -> u64 {
        params.wait_ms(self.level, self.stamp_ms, now_ms)
    }

    /// Milliseconds until a check of `cost` units would fit, or `None` when
    /// it never can (a cost above capacity, or a bucket that never refills).
    pub fn retry_ms(&self, params: &BucketParams, cost: u64, now_ms: u64) -> Option<u64> {
        let need = cost.max(1);
        if need > params.capacity || params.refill_per_tick == 0 && !self.fits(params, cost) {
            return None;
        }
        let allowed_level = params.capacity_sub() - need * params.scale;
        let excess = self.level.saturating_sub(allowed_level);
        Some(params.wait_ms(excess, self.stamp_ms, now_ms))
    }
}

/// Converts a level between sub-unit scales, rounding up.
fn rescale(level: u64, from: u64, to: u64) -> u64 {
    if from == 0 {
        return 0;
    }
    let whole = level / from;
    let part = level % from;
    let part_to = (u128::from(part) * u128::from(to)).div_ceil(u128::from(from));
    let total = u128::from(whole) * u128::from(to) + part_to;
    u64::try_from(total).unwrap_or(u64::MAX)
}

impl fmt::Display for BucketParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "capacity {} units, {} sub-units per unit, {} per {} ms tick",
            self.capacity, self.scale, self.refill_per_tick, self.tick_ms
        )
    }
}

#[cfg(test)]
#[path = "bucket/tests.rs"]
mod tests;
