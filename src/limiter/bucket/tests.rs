use proptest::prelude::*;

use super::*;

const MINUTE: u64 = 60_000;

fn params(limit: u64, window_ms: u64) -> BucketParams {
    BucketParams::new(limit, window_ms, limit).expect("exact")
}

#[test]
fn params_are_exact_for_tier_limits() {
    let requests = params(30, MINUTE);
    assert_eq!((requests.scale, requests.refill_per_tick, requests.tick_ms), (2000, 1, 1));

    let tokens = params(40_000, MINUTE);
    assert_eq!(tokens.refill_per_tick * MINUTE / tokens.tick_ms, 40_000 * tokens.scale);
}

#[test]
fn params_accept_a_trillion_per_window() {
    for window_ms in [1_000, MINUTE, 3_600_000, 86_400_000, 7 * 86_400_000] {
        let limit = 1_000_000_000_000;
        let params = BucketParams::new(limit, window_ms, limit).expect("10^12 per window is exact");
        assert!(5 * params.capacity_sub() + params.refill_per_tick < MAX_EXACT);
    }
}

#[test]
fn params_take_coarser_ticks_for_awkward_rates() {
    // A prime limit per day cannot refill per millisecond within 2^53.
    let limit = 999_999_999_989;
    let params = BucketParams::new(limit, 86_400_000, limit).expect("coarser tick keeps it exact");
    assert!(params.tick_ms > 1);
}

#[test]
fn params_refuse_capacity_beyond_exact_range() {
    let error = BucketParams::new(1, 1000, MAX_EXACT).expect_err("too large");
    assert_eq!(error.capacity, MAX_EXACT);
}

#[test]
fn new_bucket_is_full() {
    let p = params(30, MINUTE);
    let state = BucketState::full(&p, 0);
    assert_eq!(state.remaining(&p), 30);
    assert_eq!(state.reset_ms(&p, 0), 0);
}

#[test]
fn refill_is_continuous_without_window_edges() {
    let p = params(30, MINUTE);
    let mut state = BucketState::full(&p, 0);
    state.charge(&p, 30);

    // 1.9 s refills 0.95 of a unit: still nothing whole.
    state.refill(&p, 1_900);
    assert_eq!(state.remaining(&p), 0);
    // 2 s refills exactly one unit.
    state.refill(&p, 2_000);
    assert_eq!(state.remaining(&p), 1);
    assert!(state.fits(&p, 1));
}

#[test]
fn check_only_needs_one_whole_unit() {
    let p = params(30, MINUTE);
    let mut state = BucketState::full(&p, 0);
    state.charge(&p, 29);
    assert!(state.fits(&p, 0));
    state.charge(&p, 1);
    assert!(!state.fits(&p, 0));
}

#[test]
fn report_makes_debt_clamped_at_one_capacity() {
    let p = params(40_000, MINUTE);
    let mut state = BucketState::full(&p, 0);

    assert_eq!(state.charge_report(&p, 45_000), 0);
    assert_eq!(state.remaining(&p), 0);
    assert!(!state.fits(&p, 0));

    let forgiven = state.charge_report(&p, 50_000);
    assert_eq!(forgiven, 15_000);
    assert_eq!(state.level, p.max_level());
}

#[test]
fn debt_is_repaid_by_refill_before_admitting() {
    let p = params(40_000, MINUTE);
    let mut state = BucketState::full(&p, 0);
    state.charge_report(&p, 45_000);

    state.refill(&p, 1_000);
    assert!(!state.fits(&p, 0));
    // 8 s refills 5,333 tokens: 333 left after the 5,000 of debt.
    state.refill(&p, 8_000);
    assert_eq!(state.remaining(&p), 333);
}

#[test]
fn credit_never_exceeds_capacity() {
    let p = params(30, MINUTE);
    let mut state = BucketState::full(&p, 0);
    state.charge(&p, 5);
    state.credit(&p, 100);
    assert_eq!(state.remaining(&p), 30);
    assert_eq!(state.level, 0);
}

#[test]
fn retry_after_is_time_until_cost_fits() {
    let p = params(30, MINUTE);
    let mut state = BucketState::full(&p, 0);
    state.charge(&p, 30);
    state.refill(&p, 100);

    assert_eq!(state.retry_ms(&p, 1, 100), Some(1_900));
    assert_eq!(state.reset_ms(&p, 100), 59_900);
    assert_eq!(state.retry_ms(&p, 31, 100), None);
}

#[test]
fn rescale_keeps_used_amount() {
    let unverified = params(30, MINUTE);
    let trusted = params(100, MINUTE);
    let mut state = BucketState::full(&unverified, 0);
    state.charge(&unverified, 10);

    state.refill(&trusted, 0);
    assert_eq!(state.remaining(&trusted), 90);
}

#[test]
fn zero_limit_denies_everything() {
    let p = params(0, MINUTE);
    let state = BucketState::full(&p, 0);
    assert!(!state.fits(&p, 1));
    assert!(!state.fits(&p, 0));
    assert_eq!(state.retry_ms(&p, 1, 0), None);
    assert_eq!(state.reset_ms(&p, 0), 0);
}

#[test]
fn clock_going_back_refills_nothing() {
    let p = params(30, MINUTE);
    let mut state = BucketState::full(&p, 10_000);
    state.charge(&p, 30);
    state.refill(&p, 5_000);
    assert_eq!(state.remaining(&p), 0);
    assert_eq!(state.stamp_ms, 10_000);
}

fn any_params() -> impl Strategy<Value = BucketParams> {
    let windows = prop::sample::select(vec![1_000u64, MINUTE, 3_600_000, 86_400_000]);
    (1u64..=1_000_000_000_000, windows).prop_filter_map("exact", |(limit, window)| BucketParams::new(limit, window, limit).ok())
}

#[derive(Debug, Clone)]
enum Step {
    Wait(u64),
    Check(u64),
    Report(u64),
    Credit(u64),
}

fn any_step(capacity: u64) -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u64..120_000).prop_map(Step::Wait),
        (0..=capacity.saturating_mul(2)).prop_map(Step::Check),
        (0..=capacity.saturating_mul(3)).prop_map(Step::Report),
        (0..=capacity).prop_map(Step::Credit),
    ]
}

proptest! {
    #[test]
    fn invariants_hold_for_any_steps(
        (p, steps) in any_params().prop_flat_map(|p| (Just(p), prop::collection::vec(any_step(p.capacity), 1..40)))
    ) {
        let mut now = 0u64;
        let mut state = BucketState::full(&p, now);
        for step in steps {
            let before = state;
            match step {
                Step::Wait(ms) => now += ms,
                Step::Check(cost) => {
                    state.refill(&p, now);
                    let refilled = state;
                    if state.fits(&p, cost) {
                        state.charge(&p, cost);
                        prop_assert!(state.level <= p.capacity_sub(), "a check never goes past capacity");
                    } else {
                        prop_assert_eq!(state, refilled, "a denied check changes nothing");
                    }
                }
                Step::Report(amount) => {
                    state.refill(&p, now);
                    state.charge_report(&p, amount);
                }
                Step::Credit(amount) => {
                    state.refill(&p, now);
                    state.credit(&p, amount);
                }
            }
            prop_assert!(state.level <= p.max_level(), "debt is bounded at one capacity");
            prop_assert!(state.remaining(&p) <= p.capacity, "never above capacity");
            prop_assert!(state.stamp_ms <= now.max(before.stamp_ms));
        }
    }

    #[test]
    fn refill_is_linear_in_time(p in any_params(), used in 0u64..=1000, split in 0u64..=60_000, rest in 0u64..=60_000) {
        let used = used.min(p.capacity);
        let mut once = BucketState::full(&p, 0);
        once.charge(&p, used);
        let mut twice = once;

        once.refill(&p, split + rest);
        twice.refill(&p, split);
        twice.refill(&p, split + rest);
        prop_assert_eq!(once.level, twice.level, "refilling in two steps equals one step");

        let elapsed_ticks = (split + rest) / p.tick_ms;
        let expected = (used * p.scale).saturating_sub(elapsed_ticks * p.refill_per_tick);
        prop_assert_eq!(once.level, expected);
    }
}
