//! The Redis store: bucket levels and remembered estimates live in Redis and
//! every batch is judged there by one Lua script, so any number of replicas
//! share the buckets.
//!
//! Accuracy guarantees:
//! - **Atomic.** The script reads, refills, judges and writes a whole batch
//!   as one Redis command, so concurrent batches on the same bucket, from
//!   any replica, never admit more than the bucket holds.
//! - **One clock.** Refill is computed from Redis's `TIME`, never from the
//!   caller's clock, so clock skew between replicas creates no tokens.
//!   `BatchOutcome::now_ms` is that Redis time.
//! - **Exact.** The script repeats the integer arithmetic of
//!   [`judge`](crate::limiter::judge::judge) on Lua doubles and returns the
//!   same integers as long as every value stays below 2^53. Parameters from
//!   [`BucketParams::new`] guarantee that, and [`RedisStore::apply`] rejects
//!   parameters that break it. Amounts (costs, credits, reports, estimates)
//!   are exact below 2^53; larger amounts still give the same decisions,
//!   but forgiven counts and summed estimates above 2^53 are rounded.
//! - **Bounded TTLs.** A bucket key expires when the bucket would be full
//!   again plus the batch's `ttl_slack`, and a full bucket is deleted.
//!   Estimate keys expire `estimate_ttl` after their last write. A bucket
//!   whose limit never refills has no TTL, as in the memory store.

use std::time::Duration;

use fred::bytes_utils::Str;
use fred::prelude::{
    Builder, ClientLike, Config, Error as RedisError, ErrorKind, Key, LuaInterface, Pool, ReconnectPolicy, Value,
};

use crate::limiter::bucket::{BucketParams, BucketState, MAX_EXACT};
use crate::limiter::judge::{BatchOutcome, BucketResult, Settlement};

use super::{Batch, StoreError};

/// The Lua script that judges one batch. Its header documents the full
/// contract.
///
/// - KEYS: the bucket key of each operation in order, then the estimate
///   keys in the order the operations use them (per operation: keyed
///   reports, then estimates).
/// - ARGV: operation count, bucket TTL slack in ms, estimate TTL in ms, then
///   per operation `capacity, scale, refill_per_tick, tick_ms, check cost or
///   -1, shadow, credit, report count, estimate count`, then its reports as
///   `(amount, keyed)` pairs and its estimate amounts.
/// - Reply: `now_ms, allowed`, then per operation `level, stamp_ms, scale,
///   fits, charged, forgiven` and per report a settlement code (0 unmatched,
///   1 unknown request, 3 duplicate, or 2 followed by the estimate).
///
/// The script runs with `EVALSHA` so each call sends only its hash. It takes
/// the time from Redis's `TIME`. Bucket keys get a TTL of the time until
/// full plus the slack, and estimate keys get the estimate TTL.
pub const BUCKET_SCRIPT: &str = include_str!("bucket.lua");

/// ARGV fields before the first operation.
const HEADER_ARGS: usize = 3;
/// Fixed ARGV fields per operation.
const OP_ARGS: usize = 9;

/// Settlement codes of the script's reply.
const SETTLEMENT_UNMATCHED: u64 = 0;
const SETTLEMENT_UNKNOWN: u64 = 1;
const SETTLEMENT_SETTLED: u64 = 2;
const SETTLEMENT_DUPLICATE: u64 = 3;

/// Connection settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Time allowed for one TCP connection attempt, and for [`RedisStore::connect`]
    /// to connect and load the script.
    pub connect_timeout: Duration,
    /// Time allowed for one command, including any wait for a reconnection.
    pub command_timeout: Duration,
    /// Number of connections, which commands take in turn (round robin).
    pub pool_size: usize,
    /// First delay between reconnection attempts. It doubles after each
    /// failed attempt.
    pub reconnect_min_delay: Duration,
    /// Largest delay between reconnection attempts.
    pub reconnect_max_delay: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(1),
            pool_size: 4,
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(2),
        }
    }
}

/// A store in Redis. Clones share the connections.
#[derive(Clone)]
pub struct RedisStore {
    pool: Pool,
    /// SHA-1 of [`BUCKET_SCRIPT`], as returned by `SCRIPT LOAD`.
    script_sha: Str,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").field("script_sha", &self.script_sha).finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` with [`RedisOptions::default`] and
    /// loads the bucket script.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, &RedisOptions::default()).await
    }

    /// Connects to the Redis at `url` (for example `redis://127.0.0.1:6379`)
    /// and loads the bucket script, failing after `options.connect_timeout`.
    ///
    /// Errors never contain the URL, which may carry a password.
    pub async fn connect_with(url: &str, options: &RedisOptions) -> Result<Self, StoreError> {
        let config = Config::from_url(url)
            .map_err(|error| StoreError::Unavailable(format!("invalid Redis URL: {}", error.details())))?;
        let servers: Vec<String> = config.server.hosts().iter().map(ToString::to_string).collect();

        let pool = Builder::from_config(config)
            .with_connection_config(|connection| {
                connection.connection_timeout = options.connect_timeout;
                connection.internal_command_timeout = options.connect_timeout;
            })
            .with_performance_config(|performance| {
                performance.default_command_timeout = options.command_timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                millis_u32(options.reconnect_min_delay),
                millis_u32(options.reconnect_max_delay),
                2,
            ))
            .build_pool(options.pool_size.max(1))
            .map_err(|error| StoreError::Unavailable(format!("invalid Redis settings: {}", error.details())))?;

        let setup = async {
            pool.init().await.map_err(|error| store_error(&error))?;
            load_script(&pool).await
        };
        let script_sha = match tokio::time::timeout(options.connect_timeout, setup).await {
            Ok(Ok(sha)) => sha,
            Ok(Err(error)) => {
                shut_down(&pool, options.connect_timeout);
                return Err(error);
            }
            Err(_) => {
                shut_down(&pool, options.connect_timeout);
                return Err(StoreError::Unavailable(format!(
                    "timed out after {:?} connecting to Redis at {}",
                    options.connect_timeout,
                    servers.join(", ")
                )));
            }
        };

        tracing::info!(servers = ?servers, pool_size = pool.size(), "connected to Redis");
        Ok(Self { pool, script_sha })
    }

    /// Judges `batch` atomically in Redis at Redis's clock.
    ///
    /// Returns [`StoreError::Unavailable`] when Redis cannot be reached or
    /// does not reply within the command timeout, and
    /// [`StoreError::Protocol`] for parameters the script cannot count
    /// exactly, a stored value it cannot read, or a reply this code cannot
    /// read.
    pub async fn apply(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        for op in &batch.ops {
            check_exact(&op.params, &op.key)?;
        }

        let (keys, args) = encode(batch);
        let reply = match self.pool.evalsha::<Value, _, _, _>(self.script_sha.clone(), keys, args).await {
            Err(error) if is_noscript(&error) => {
                // Redis restarted, failed over or flushed its script cache.
                tracing::warn!("Redis replied NOSCRIPT, loading the bucket script again");
                load_script(&self.pool).await?;
                let (keys, args) = encode(batch);
                self.pool.evalsha::<Value, _, _, _>(self.script_sha.clone(), keys, args).await
            }
            reply => reply,
        };
        let reply = reply.map_err(|error| store_error(&error))?;
        decode(batch, reply)
    }

    /// Sends `PING` and checks that Redis replies.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.pool.ping::<()>(None).await.map_err(|error| store_error(&error))
    }
}

/// Loads [`BUCKET_SCRIPT`] and returns its SHA-1.
///
/// TODO: in Redis Cluster this loads the script on one node only. Other
/// nodes reply NOSCRIPT, and the reload may reach the wrong node again.
async fn load_script(pool: &Pool) -> Result<Str, StoreError> {
    pool.script_load::<Str, _>(BUCKET_SCRIPT).await.map_err(|error| store_error(&error))
}

/// Closes a pool that failed to set up, so it stops reconnecting. The close
/// runs in the background, so the failed connect returns at once.
fn shut_down(pool: &Pool, limit: Duration) {
    let pool = pool.clone();
    tokio::spawn(async move {
        if tokio::time::timeout(limit, pool.quit()).await.is_err() {
            tracing::warn!(timeout = ?limit, "timed out closing Redis connections after a failed connect");
        }
    });
}

fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Rejects parameters whose sub-unit values could reach 2^53, where the
/// script's doubles stop being exact. [`BucketParams::new`] never returns
/// such parameters.
fn check_exact(params: &BucketParams, key: &str) -> Result<(), StoreError> {
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

/// Builds the script's KEYS and ARGV for `batch` (layout on [`BUCKET_SCRIPT`]).
fn encode(batch: &Batch) -> (Vec<Key>, Vec<Value>) {
    let mut key_count = batch.ops.len();
    let mut arg_count = HEADER_ARGS + OP_ARGS * batch.ops.len();
    for op in &batch.ops {
        key_count += op.reports.iter().filter(|report| report.estimate_key.is_some()).count();
        key_count += op.estimates.len();
        arg_count += 2 * op.reports.len() + op.estimates.len();
    }

    let mut keys: Vec<Key> = Vec::with_capacity(key_count);
    let mut args: Vec<Value> = Vec::with_capacity(arg_count);
    args.push(integer(batch.ops.len() as u64));
    args.push(integer(duration_ms(batch.ttl_slack)));
    args.push(integer(duration_ms(batch.estimate_ttl)));

    for op in &batch.ops {
        keys.push(Key::from(op.key.as_str()));
    }
    for op in &batch.ops {
        let params = &op.params;
        args.push(integer(params.capacity));
        args.push(integer(params.scale));
        args.push(integer(params.refill_per_tick));
        args.push(integer(params.tick_ms));
        args.push(match op.check {
            Some(cost) => integer(cost),
            None => Value::Integer(-1),
        });
        args.push(Value::Integer(i64::from(op.shadow)));
        args.push(integer(op.credit));
        args.push(integer(op.reports.len() as u64));
        args.push(integer(op.estimates.len() as u64));

        for report in &op.reports {
            args.push(integer(report.amount));
            match &report.estimate_key {
                Some(key) => {
                    args.push(Value::Integer(1));
                    keys.push(Key::from(key.as_str()));
                }
                None => args.push(Value::Integer(0)),
            }
        }
        for estimate in &op.estimates {
            args.push(integer(estimate.amount));
            keys.push(Key::from(estimate.key.as_str()));
        }
    }
    (keys, args)
}

/// Encodes a count as an integer argument. Counts above `i64::MAX` are sent
/// as `i64::MAX`: the script rounds every count at or above 2^53 anyway.
fn integer(value: u64) -> Value {
    Value::Integer(i64::try_from(value).unwrap_or(i64::MAX))
}

fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Reads the script's reply into the outcome [`judge`](crate::limiter::judge::judge) returns.
fn decode(batch: &Batch, reply: Value) -> Result<BatchOutcome, StoreError> {
    let Value::Array(values) = reply else {
        return Err(StoreError::Protocol(format!("the bucket script returned a {} instead of an array", reply.kind())));
    };
    let mut reader = ReplyReader { values: values.iter(), position: 0 };

    let now_ms = reader.next()?;
    let allowed = reader.next_flag()?;
    let mut buckets = Vec::with_capacity(batch.ops.len());
    for op in &batch.ops {
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
            batch.ops.len()
        )));
    }
    Ok(BatchOutcome { now_ms, allowed, buckets })
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

fn is_noscript(error: &RedisError) -> bool {
    error.details().starts_with("NOSCRIPT")
}

/// Error replies that a retry may cure: the server is loading, busy, a
/// replica after a failover, or a cluster node in transition.
const TRANSIENT_REPLIES: [&str; 9] =
    ["LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS", "MISCONF", "NOSCRIPT"];

/// Maps a `fred` error to a store error. Failures to reach Redis or to get
/// a reply in time are transient, and anything else is a protocol error.
fn store_error(error: &RedisError) -> StoreError {
    let transient = match error.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Backpressure
        | ErrorKind::Cluster
        | ErrorKind::Routing
        | ErrorKind::Sentinel
        | ErrorKind::Auth => true,
        _ => TRANSIENT_REPLIES.iter().any(|prefix| error.details().starts_with(prefix)),
    };
    if transient {
        StoreError::Unavailable(format!("Redis: {error}"))
    } else {
        StoreError::Protocol(format!("Redis: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::judge::{BucketOp, Estimate, Report};

    fn batch(ops: Vec<BucketOp>) -> Batch {
        Batch { ops, ttl_slack: Duration::from_secs(5), estimate_ttl: Duration::from_secs(600) }
    }

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

    fn integers(values: &[i64]) -> Value {
        Value::Array(values.iter().map(|value| Value::Integer(*value)).collect())
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
            ..op("b1")
        };
        let second = BucketOp { shadow: true, credit: 7, ..op("b2") };
        let (keys, args) = encode(&batch(vec![first, second]));

        let keys: Vec<&str> = keys.iter().map(|key| key.as_str().expect("utf-8")).collect();
        assert_eq!(keys, ["b1", "b2", "e1", "e2"]);
        let args: Vec<i64> = args.iter().map(|arg| arg.as_i64().expect("integer")).collect();
        let params = BucketParams::new(10, 1000, 10).expect("exact");
        let (capacity, scale, refill, tick) =
            (params.capacity as i64, params.scale as i64, params.refill_per_tick as i64, params.tick_ms as i64);
        #[rustfmt::skip]
        let expected = [
            2, 5000, 600_000,
            capacity, scale, refill, tick, 2, 0, 0, 2, 1, 3, 1, 4, 0, 5,
            capacity, scale, refill, tick, -1, 1, 7, 0, 0,
        ];
        assert_eq!(args, expected);
    }

    #[test]
    fn decode_reads_settlements() {
        let reports = vec![
            Report { amount: 9, estimate_key: None },
            Report { amount: 4, estimate_key: Some("e1".into()) },
            Report { amount: 4, estimate_key: Some("e2".into()) },
            Report { amount: 4, estimate_key: Some("e3".into()) },
        ];
        let batch = batch(vec![BucketOp { reports, ..op("b1") }]);
        let reply = integers(&[1_000, 1, 30, 990, 1, 1, 0, 2, 0, 1, 2, 6, 3]);

        let outcome = decode(&batch, reply).expect("readable reply");
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
        let batch = batch(vec![op("b1")]);
        let short = decode(&batch, integers(&[1_000, 1, 0, 0, 1, 1]));
        assert!(matches!(short, Err(StoreError::Protocol(_))), "{short:?}");
        let long = decode(&batch, integers(&[1_000, 1, 0, 0, 1, 1, 0, 0, 7]));
        assert!(matches!(long, Err(StoreError::Protocol(_))), "{long:?}");
    }

    #[test]
    fn decode_rejects_negative_values() {
        let batch = batch(vec![op("b1")]);
        let reply = decode(&batch, integers(&[1_000, 1, -1, 0, 1, 1, 0, 0]));
        assert!(matches!(reply, Err(StoreError::Protocol(_))), "{reply:?}");
    }

    #[test]
    fn check_exact_rejects_unbounded_params() {
        let exact = BucketParams::new(1_000_000_000_000, 60_000, 1_000_000_000_000).expect("exact");
        assert!(check_exact(&exact, "b").is_ok());
        let huge = BucketParams { capacity: MAX_EXACT, ..exact };
        assert!(matches!(check_exact(&huge, "b"), Err(StoreError::Protocol(_))));
        let zero_scale = BucketParams { scale: 0, ..exact };
        assert!(check_exact(&zero_scale, "b").is_err());
    }
}
