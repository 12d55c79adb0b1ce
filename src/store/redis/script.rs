//! The bucket script's arguments and reply.

use std::time::Duration;

use fred::bytes_utils::Str;
use fred::bytes::Bytes;
use fred::prelude::{Key, Value};

use crate::limiter::bucket::{BucketParams, BucketState, MAX_EXACT};
use crate::limiter::judge::{BatchOutcome, BucketOp, BucketResult, Settlement};
use crate::limiter::keys;

use super::super::{RecordGuard, StoreError};

/// The Lua script that judges one batch. Its header documents the full
/// contract.
///
/// - KEYS: in reserve and release modes the hold key first, then the bucket
///   key of each operation in order, then the estimate keys in the order
///   the operations use them (per operation: keyed reports, then estimates).
/// - ARGV: mode, operation count, bucket TTL slack in ms, estimate TTL in
///   ms, hold TTL in ms, then per operation `capacity, scale,
///   refill_per_tick, tick_ms, check cost or -1, shadow, credit, report
///   count, estimate count, field`, then its reports as `(amount, keyed)`
///   pairs and its estimate amounts. A bucket's key is its hash (see
///   [`keys::redis_location`]) and the field names it there.
/// - Reply (judge and reserve): `now_ms, allowed`, then per operation
///   `level, stamp_ms, scale, fits, charged, forgiven` and per report a
///   settlement code (0 unmatched, 1 unknown request, 3 duplicate, or 2
///   followed by the estimate). A reserve that found its hold already
///   released replies `now_ms, 2`. A release replies `now_ms, released`.
///
/// The script runs with `EVALSHA` so each call sends only its hash. It takes
/// the time from Redis's `TIME`. A bucket hash gets a TTL of the longest
/// time until one of its buckets is full plus the slack, and estimate keys
/// get the estimate TTL.
pub const BUCKET_SCRIPT: &str = include_str!("../bucket.lua");

/// ARGV fields before the first operation.
const HEADER_ARGS: usize = 5;
/// Fixed ARGV fields per operation.
const OP_ARGS: usize = 10;

/// Settlement codes of the script's reply.
const SETTLEMENT_UNMATCHED: u64 = 0;
const SETTLEMENT_UNKNOWN: u64 = 1;
const SETTLEMENT_SETTLED: u64 = 2;
const SETTLEMENT_DUPLICATE: u64 = 3;

/// The `allowed` value of a reserve that found its hold already released.
const RESERVE_REFUSED: u64 = 2;

/// The operation one script call performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Judge the batch atomically.
    Judge,
    /// Judge the batch and record what it charged under the hold key.
    Reserve,
    /// Credit back what the hold key records and mark it released.
    Release,
}

impl Mode {
    fn code(self) -> u64 {
        match self {
            Self::Judge => 0,
            Self::Reserve => 1,
            Self::Release => 2,
        }
    }
}

/// One call of the bucket script: operations that share one hash slot.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    pub mode: Mode,
    /// The hold key and its TTL, for reserve and release.
    pub hold: Option<(&'a str, Duration)>,
    pub ops: Vec<&'a BucketOp>,
    pub ttl_slack: Duration,
    pub estimate_ttl: Duration,
}

/// Builds the script's KEYS and ARGV for `call` (layout on [`BUCKET_SCRIPT`]).
pub fn encode(call: &Invocation<'_>) -> (Vec<Key>, Vec<Value>) {
    let mut key_count = call.ops.len() + usize::from(call.hold.is_some());
    let mut arg_count = HEADER_ARGS + OP_ARGS * call.ops.len();
    for op in &call.ops {
        key_count += op.reports.iter().filter(|report| report.estimate_key.is_some()).count();
        key_count += op.estimates.len();
        arg_count += 2 * op.reports.len() + op.estimates.len();
    }

    let mut keys: Vec<Key> = Vec::with_capacity(key_count);
    let mut args: Vec<Value> = Vec::with_capacity(arg_count);
    args.push(integer(call.mode.code()));
    args.push(integer(call.ops.len() as u64));
    args.push(integer(duration_ms(call.ttl_slack)));
    args.push(integer(duration_ms(call.estimate_ttl)));
    args.push(integer(call.hold.map_or(0, |(_, ttl)| duration_ms(ttl))));

    if let Some((hold_key, _)) = call.hold {
        keys.push(Key::from(hold_key));
    }
    for op in &call.ops {
        keys.push(Key::from(keys::redis_location(&op.key).0));
    }
    for op in &call.ops {
        let params = &op.params;
        args.push(integer(params.capacity));
        args.push(integer(params.scale));
        args.push(integer(params.refill_per_tick));
        args.push(integer(params.tick_ms));
        args.push(match op.check {
            Some(cost) => integer(cost),
            None => Value::String(Str::from_static(NO_CHECK)),
        });
        args.push(integer(u64::from(op.shadow)));
        args.push(integer(op.credit));
        args.push(integer(op.reports.len() as u64));
        args.push(integer(op.estimates.len() as u64));
        args.push(text(keys::redis_location(&op.key).1));

        for report in &op.reports {
            args.push(integer(report.amount));
            match &report.estimate_key {
                Some(key) => {
                    args.push(integer(1));
                    keys.push(Key::from(key.as_str()));
                }
                None => args.push(integer(0)),
            }
        }
        for estimate in &op.estimates {
            args.push(integer(estimate.amount));
            keys.push(Key::from(estimate.key.as_str()));
        }
    }
    (keys, args)
}

/// Builds KEYS and ARGV like [`encode`], followed by the account record
/// guards: their count and expected values in ARGV (`-` for no record), and
/// their keys at the end of KEYS. Without guards it equals [`encode`].
pub fn encode_guarded(call: &Invocation<'_>, guards: &[RecordGuard]) -> (Vec<Key>, Vec<Value>) {
    let (mut keys, mut args) = encode(call);
    if guards.is_empty() {
        return (keys, args);
    }
    args.push(integer(guards.len() as u64));
    for guard in guards {
        args.push(match guard.expected.as_deref() {
            Some(expected) => text(expected),
            None => Value::String(Str::from_static(NO_RECORD)),
        });
        keys.push(Key::from(guard.key.as_str()));
    }
    (keys, args)
}

/// The guard value of an absent account record.
const NO_RECORD: &str = "-";
/// The `allowed` value of a reply whose account records differ from the guards.
const GUARD_STALE: i64 = 3;

/// Reads the actual account records of a reply to a guarded call, or `None`
/// when the guards held and the reply is a judgement.
pub fn decode_stale(reply: &Value, guards: usize) -> Result<Option<Vec<Option<String>>>, StoreError> {
    let Value::Array(values) = reply else { return Ok(None) };
    if guards == 0 || values.get(1).and_then(Value::as_i64) != Some(GUARD_STALE) || values.len() != guards + 2 {
        return Ok(None);
    }
    values[2..]
        .iter()
        .map(|value| match value.as_string() {
            Some(text) if text == NO_RECORD => Ok(None),
            Some(text) => Ok(Some(text)),
            None => Err(StoreError::Protocol("the bucket script returned an unreadable account record".into())),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Encodes a count as an integer argument, capped at 2^53 - 1, the largest
/// count the script accepts (it fails on larger ones). The cap changes no
/// decision: capacities stay below 2^53 / 5, so a larger check cost never
/// fits either way, and a larger report or credit already covers the whole
/// debt range. Only the forgiven count of such a report is capped.
///
/// A value below 64 (counts, flags, most small limits) is sent as a static
/// decimal text: Redis receives the same bulk string either way, since
/// arguments travel as text, but fred formats an integer anew on each call.
pub(super) fn integer(value: u64) -> Value {
    match SMALL_TEXTS.get(usize::try_from(value).unwrap_or(usize::MAX)) {
        Some(text) => Value::String(Str::from_static(text)),
        None => Value::Integer(i64::try_from(value.min(MAX_EXACT - 1)).unwrap_or(i64::MAX)),
    }
}

/// Copies a text argument. Redis receives the same bulk string as for a
/// `Value::String`, which costs more to build because its UTF-8 is kept
/// checked.
fn text(value: &str) -> Value {
    Value::Bytes(Bytes::copy_from_slice(value.as_bytes()))
}

/// The decimal texts of 0 to 63.
const SMALL_TEXTS: [&str; 64] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20", "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31", "32", "33", "34", "35", "36", "37", "38", "39", "40", "41", "42", "43", "44", "45", "46", "47", "48", "49", "50", "51", "52", "53", "54", "55", "56", "57", "58", "59", "60", "61", "62", "63"];

/// The "no check" cost, -1, as text.
const NO_CHECK: &str = "-1";

pub fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Rejects parameters whose sub-unit values could reach 2^53, where the
/// script's doubles stop being exact, and a bucket that never refills but
/// could hold something: its hash's TTL would end it. [`BucketParams::new`]
/// never returns the first kind, and the configuration rejects the second.
pub fn check_exact(params: &BucketParams, key: &str) -> Result<(), StoreError> {
    if params.refill_per_tick == 0 && params.capacity > 0 {
        return Err(StoreError::Protocol(format!(
            "bucket {key} never refills but has a capacity of {}; the Redis store keeps only never-refilling \
             buckets of capacity 0, so give the limit a rate above 0 or a capacity of 0",
            params.capacity
        )));
    }
    let exact = params.scale > 0
        && params.tick_ms > 0
        && params
            .capacity
            .checked_mul(params.scale)
            .and_then(|capacity_sub| capacity_sub.checked_mul(2))
            .and_then(|max_level| max_level.checked_add(params.refill_per_tick))
            .is_some_and(|largest| largest < MAX_EXACT);
    if exact {
        Ok(())
    } else {
        Err(StoreError::Protocol(format!(
            "bucket {key} has parameters the Redis script cannot count exactly ({params}); \
             build them with BucketParams::new"
        )))
    }
}

/// Reads a judge or reserve reply into the outcome
/// [`judge`](crate::limiter::judge::judge) returns for `ops`.
pub fn decode(ops: &[&BucketOp], reply: Value) -> Result<BatchOutcome, StoreError> {
    let Value::Array(values) = reply else {
        return Err(StoreError::Protocol(format!("the bucket script returned a {} instead of an array", reply.kind())));
    };
    let mut reader = ReplyReader { values: values.iter(), position: 0 };

    let now_ms = reader.next()?;
    let allowed = match reader.next()? {
        0 => false,
        1 => true,
        RESERVE_REFUSED if values.len() == 2 => {
            return Err(StoreError::Unavailable("the batch's hold was released before the batch reached Redis".into()));
        }
        value => {
            return Err(StoreError::Protocol(format!("the bucket script returned {value} where 0 or 1 was expected, at 1")));
        }
    };
    let mut buckets = Vec::with_capacity(ops.len());
    for op in ops {
        let state = BucketState { level: reader.next()?, stamp_ms: reader.next()?, scale: reader.next()? };
        let fits = reader.next_flag()?;
        let charged = reader.next_flag()?;
        let forgiven = reader.next()?;

        let mut settlements = Vec::with_capacity(op.reports.len());
        for report in &op.reports {
            let settlement = match reader.next()? {
                SETTLEMENT_UNMATCHED => Settlement::Unmatched,
                SETTLEMENT_UNKNOWN => Settlement::UnknownRequest,
                SETTLEMENT_SETTLED => Settlement::Settled { estimate: reader.next()?, actual: report.amount },
                SETTLEMENT_DUPLICATE => Settlement::Duplicate,
                code => {
                    return Err(StoreError::Protocol(format!(
                        "the bucket script returned an unknown settlement code {code}"
                    )));
                }
            };
            settlements.push(settlement);
        }
        buckets.push(BucketResult { state, fits, charged, forgiven, settlements });
    }

    let expected = reader.position;
    if reader.values.next().is_some() {
        return Err(StoreError::Protocol(format!(
            "the bucket script returned more than the {expected} values {} operations need",
            ops.len()
        )));
    }
    Ok(BatchOutcome { now_ms, allowed, buckets })
}

/// Reads a release reply: whether a recorded hold was credited back.
pub fn decode_release(reply: Value) -> Result<bool, StoreError> {
    let Value::Array(values) = reply else {
        return Err(StoreError::Protocol(format!("the release returned a {} instead of an array", reply.kind())));
    };
    let mut reader = ReplyReader { values: values.iter(), position: 0 };
    reader.next()?;
    let released = reader.next_flag()?;
    if reader.values.next().is_some() {
        return Err(StoreError::Protocol("the release returned more than 2 values".into()));
    }
    Ok(released)
}

/// Walks the script's flat reply of non-negative integers.
struct ReplyReader<'a> {
    values: std::slice::Iter<'a, Value>,
    position: usize,
}

impl ReplyReader<'_> {
    fn next(&mut self) -> Result<u64, StoreError> {
        let position = self.position;
        self.position += 1;
        match self.values.next() {
            Some(Value::Integer(value)) => u64::try_from(*value).map_err(|_| {
                StoreError::Protocol(format!("the bucket script returned a negative value {value} at {position}"))
            }),
            Some(other) => Err(StoreError::Protocol(format!(
                "the bucket script returned a {} instead of an integer at {position}",
                other.kind()
            ))),
            None => Err(StoreError::Protocol(format!("the bucket script's reply ends early, at {position}"))),
        }
    }

    fn next_flag(&mut self) -> Result<bool, StoreError> {
        match self.next()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(StoreError::Protocol(format!(
                "the bucket script returned {value} where 0 or 1 was expected, at {}",
                self.position - 1
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::judge::{Estimate, Report};

    fn op(key: &str) -> BucketOp {
        BucketOp {
            key: key.to_owned(),
            params: BucketParams::new(10, 1000, 10).expect("exact"),
            check: None,
            shadow: false,
            credit: 0,
            reports: Vec::new(),
            estimates: Vec::new(),
        }
    }

    fn judge_call<'a>(ops: &[&'a BucketOp]) -> Invocation<'a> {
        Invocation {
            mode: Mode::Judge,
            hold: None,
            ops: ops.to_vec(),
            ttl_slack: Duration::from_secs(5),
            estimate_ttl: Duration::from_secs(600),
        }
    }

    fn integers(values: &[i64]) -> Value {
        Value::Array(values.iter().map(|value| Value::Integer(*value)).collect())
    }

    fn key_names(keys: &[Key]) -> Vec<&str> {
        keys.iter().map(|key| key.as_str().expect("utf-8")).collect()
    }

    #[test]
    fn encode_orders_estimate_keys_after_buckets() {
        let first = BucketOp {
            check: Some(2),
            reports: vec![
                Report { amount: 3, estimate_key: Some("e1".into()) },
                Report { amount: 4, estimate_key: None },
            ],
            estimates: vec![Estimate { key: "e2".into(), amount: 5 }],
            ..op("t:b:1")
        };
        let second = BucketOp { shadow: true, credit: 7, ..op("t:b:2") };
        let other = op("u:b:3");
        let (keys, args) = encode(&judge_call(&[&first, &second, &other]));

        assert_eq!(key_names(&keys), ["t:b", "t:b", "u:b", "e1", "e2"]);
        let params = BucketParams::new(10, 1000, 10).expect("exact");
        let (capacity, scale, refill, tick) =
            (params.capacity as i64, params.scale as i64, params.refill_per_tick as i64, params.tick_ms as i64);
        // Redis receives every argument as text, whether fred is given an
        // integer or its decimal text.
        let int = |values: &[i64]| values.iter().map(ToString::to_string).collect::<Vec<_>>();
        let text = |value: &str| vec![value.to_owned()];
        let expected = [
            int(&[0, 3, 5000, 600_000, 0]),
            int(&[capacity, scale, refill, tick, 2, 0, 0, 2, 1]),
            text("1"),
            int(&[3, 1, 4, 0, 5]),
            int(&[capacity, scale, refill, tick, -1, 1, 7, 0, 0]),
            text("2"),
            int(&[capacity, scale, refill, tick, -1, 0, 0, 0, 0]),
            text("3"),
        ]
        .concat();
        let sent: Vec<String> = args.iter().map(argument_text).collect();
        assert_eq!(sent, expected);
    }

    /// Returns the text Redis receives for an argument.
    fn argument_text(value: &Value) -> String {
        match value {
            Value::Integer(integer) => integer.to_string(),
            Value::String(text) => text.to_string(),
            Value::Bytes(bytes) => String::from_utf8(bytes.to_vec()).expect("UTF-8"),
            other => panic!("an argument that is neither an integer nor text: {other:?}"),
        }
    }

    #[test]
    fn small_integers_are_sent_as_the_same_text() {
        for value in [0, 1, 9, 10, 63, 64, 65, 1000, MAX_EXACT - 1, MAX_EXACT, u64::MAX] {
            let expected = value.min(MAX_EXACT - 1).to_string();
            assert_eq!(argument_text(&integer(value)), expected, "{value}");
        }
        assert!(matches!(integer(63), Value::String(_)), "a small value is static text");
        assert!(matches!(integer(64), Value::Integer(_)));
    }

    #[test]
    fn encode_puts_hold_key_first() {
        let first = BucketOp { check: Some(1), estimates: vec![Estimate { key: "e1".into(), amount: 2 }], ..op("t:b:1") };
        let call = Invocation {
            mode: Mode::Reserve,
            hold: Some(("h1", Duration::from_secs(60))),
            ..judge_call(&[&first])
        };
        let (keys, args) = encode(&call);

        assert_eq!(key_names(&keys), ["h1", "t:b", "e1"]);
        let header: Vec<i64> = args[..5].iter().map(|arg| arg.as_i64().expect("integer")).collect();
        assert_eq!(header, [1, 1, 5000, 600_000, 60_000]);
    }

    #[test]
    fn decode_reads_settlements() {
        let reports = vec![
            Report { amount: 9, estimate_key: None },
            Report { amount: 4, estimate_key: Some("e1".into()) },
            Report { amount: 4, estimate_key: Some("e2".into()) },
            Report { amount: 4, estimate_key: Some("e3".into()) },
        ];
        let reporting = BucketOp { reports, ..op("b1") };
        let reply = integers(&[1_000, 1, 30, 990, 1, 1, 0, 2, 0, 1, 2, 6, 3]);

        let outcome = decode(&[&reporting], reply).expect("readable reply");
        assert_eq!(outcome.now_ms, 1_000);
        assert!(outcome.allowed);
        let bucket = &outcome.buckets[0];
        assert_eq!(bucket.state, BucketState { level: 30, stamp_ms: 990, scale: 1 });
        assert!(bucket.fits);
        assert!(!bucket.charged);
        assert_eq!(bucket.forgiven, 2);
        assert_eq!(
            bucket.settlements,
            [
                Settlement::Unmatched,
                Settlement::UnknownRequest,
                Settlement::Settled { estimate: 6, actual: 4 },
                Settlement::Duplicate
            ]
        );
    }

    #[test]
    fn decode_rejects_short_and_long_replies() {
        let plain = op("b1");
        let short = decode(&[&plain], integers(&[1_000, 1, 0, 0, 1, 1]));
        assert!(matches!(short, Err(StoreError::Protocol(_))), "{short:?}");
        let long = decode(&[&plain], integers(&[1_000, 1, 0, 0, 1, 1, 0, 0, 7]));
        assert!(matches!(long, Err(StoreError::Protocol(_))), "{long:?}");
    }

    #[test]
    fn decode_rejects_negative_values() {
        let plain = op("b1");
        let reply = decode(&[&plain], integers(&[1_000, 1, -1, 0, 1, 1, 0, 0]));
        assert!(matches!(reply, Err(StoreError::Protocol(_))), "{reply:?}");
    }

    #[test]
    fn decode_reports_refused_reserve_as_unavailable() {
        let plain = op("b1");
        let reply = decode(&[&plain], integers(&[1_000, 2]));
        assert!(matches!(reply, Err(StoreError::Unavailable(_))), "{reply:?}");
    }

    #[test]
    fn decode_release_reads_flag() {
        assert!(decode_release(integers(&[1_000, 1])).expect("readable"));
        assert!(!decode_release(integers(&[1_000, 0])).expect("readable"));
        assert!(decode_release(integers(&[1_000, 3])).is_err());
    }

    #[test]
    fn check_exact_rejects_unbounded_params() {
        let exact = BucketParams::new(1_000_000_000_000, 60_000, 1_000_000_000_000).expect("exact");
        assert!(check_exact(&exact, "b").is_ok());
        let huge = BucketParams { capacity: MAX_EXACT, ..exact };
        assert!(matches!(check_exact(&huge, "b"), Err(StoreError::Protocol(_))));
        let zero_scale = BucketParams { scale: 0, ..exact };
        assert!(check_exact(&zero_scale, "b").is_err());
        let never = BucketParams { refill_per_tick: 0, ..exact };
        assert!(matches!(check_exact(&never, "b"), Err(StoreError::Protocol(_))));
        assert!(check_exact(&BucketParams { capacity: 0, ..never }, "b").is_ok());
    }
}
