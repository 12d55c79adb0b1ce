//! The Redis store: bucket levels and remembered estimates live in Redis and
//! every batch is judged there by one Lua script, so any number of replicas
//! share the buckets. It runs against a single Redis, a Sentinel-managed
//! primary, or a Redis Cluster, through `fred`.
//!
//! Accuracy guarantees:
//! - **Atomic.** The script reads, refills, judges and writes a whole batch
//!   as one Redis command, so concurrent batches on the same bucket, from
//!   any replica, never admit more than the bucket holds.
//! - **One clock.** Refill is computed from Redis's `TIME`, never from the
//!   caller's clock, so clock skew between replicas creates no tokens. In a
//!   cluster each bucket is refilled by the clock of the primary that holds
//!   it. `BatchOutcome::now_ms` is that Redis time.
//! - **Exact.** The script repeats the integer arithmetic of
//!   [`judge`](crate::limiter::judge::judge) on Lua doubles and returns the
//!   same integers as long as every value stays below 2^53. Parameters from
//!   [`BucketParams::new`](crate::limiter::bucket::BucketParams::new)
//!   guarantee that, and [`RedisStore::apply`] rejects parameters that break
//!   it. Amounts (costs, credits, reports, estimates) are exact below 2^53;
//!   larger amounts still give the same decisions, but forgiven counts and
//!   summed estimates above 2^53 are rounded.
//! - **Bounded TTLs.** A bucket key expires when the bucket would be full
//!   again plus the batch's `ttl_slack`, and a full bucket is deleted.
//!   Estimate keys expire `estimate_ttl` after their last write. A bucket
//!   whose limit never refills has no TTL, as in the memory store. Every
//!   write sets its TTL in the same script step, so a connection lost
//!   mid-call never leaves a key without one.
//!
//! # Redis Cluster
//!
//! A script may only touch keys of one hash slot. Key names put every
//! bucket of one descriptor's first entry (the API key, in the Fikra
//! configuration) under one hash tag. So a Fikra check is always one slot
//! and one atomic script, and different API keys spread over every primary.
//! A batch whose buckets fall in several slots (a generic configuration
//! whose descriptors in one call start with different entries) is split by
//! slot and judged with a hold protocol (see `slots.rs`):
//!
//! 1. *Reserve*, in every slot at once: judge that slot's buckets; when its
//!    checks fit, charge them and record the charge under a hold key in the
//!    same slot.
//! 2. When every slot fits, the call is allowed and the charges stand.
//!    Otherwise the call is denied (or fails, when a slot did not answer),
//!    and a *release* in every slot that may hold a charge credits it back
//!    and leaves a tombstone, so a reserve that reaches Redis after its
//!    release changes nothing.
//!
//! Guarantees across slots: a call is never admitted unless every bucket
//! paid, no bucket ever admits more than it holds, and a denied call's
//! charges are returned, before the denial is answered when the deadline
//! leaves time for the release. What differs from one slot: until its
//! release, a denied call holds units that concurrent checks on those
//! buckets cannot use, so they may be denied too (never admitted past the
//! capacity). A release that fails is retried in the background for a few
//! seconds; if it still fails, the held units stay charged and return by
//! refill, and [`StoreFaults::release_failures`] counts it. A call that
//! fails (a slot did not reply in time) is answered with the failure mode
//! at once and released in the background. Reports in such a call apply
//! whatever the outcome, as in one slot.
//!
//! # Deadlines, faults and recovery
//!
//! - Every call has a deadline: the caller's budget capped at
//!   [`RedisOptions::store_timeout`]. A call not judged by then fails with
//!   [`StoreError::TimedOut`]. Redis may still run a script that was already
//!   sent, so a timed-out check may have been charged.
//! - At most [`RedisOptions::max_in_flight`] calls are in flight; more fail
//!   at once with [`StoreError::Busy`]. After 3 calls in a row time out (a
//!   frozen Redis keeps its connections open), calls fail at once except
//!   one probe per 100 ms, until a call gets an answer.
//! - Commands are never retried after a connection loss (the script may
//!   have run), and fail at once while the client reconnects, so no work
//!   queues while Redis is away. A connection with a command unanswered
//!   for [`RedisOptions::unresponsive_after`] is closed and reconnected,
//!   which drops what waited on it.
//! - A `READONLY` or `CLUSTERDOWN` reply, a closed connection or a failover
//!   makes the client reconnect with backoff, finding the new primary
//!   through Sentinel or the cluster's slot map. A `NOSCRIPT` reply (a
//!   restarted or newly promoted node) sends the script text once with
//!   `EVAL`, which caches it on that node.

mod batch;
mod breaker;
mod checks;
mod script;
mod slots;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fred::bytes_utils::Str;
use fred::interfaces::{ClientLike, EventInterface, LuaInterface};
use fred::prelude::{Builder, Config, Error as RedisError, ErrorKind, Options, Pool, ReconnectPolicy, Value};
use fred::types::config::UnresponsiveConfig;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::limiter::judge::{BatchOutcome, BucketOp};
use crate::telemetry::Throttle;

use super::{Batch, Guarded, RecordGuard, StoreError, StoreFaults};
pub use script::BUCKET_SCRIPT;
use script::{Invocation, Mode};

/// Extra time a store call waits past its deadline for `fred` to report
/// the timeout itself, which stops a queued command from being sent.
const DEADLINE_GRACE: Duration = Duration::from_millis(2);

/// The kind of Redis deployment, read from the URL's scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server (`redis://`, `rediss://`).
    Standalone,
    /// A primary found through Sentinel (`redis-sentinel://`).
    Sentinel,
    /// A Redis Cluster (`redis-cluster://`).
    Cluster,
}

impl Topology {
    pub fn name(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Sentinel => "sentinel",
            Self::Cluster => "cluster",
        }
    }
}

/// Connection and fault settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Time allowed for one TCP connection attempt (with TLS and `AUTH`),
    /// and for [`RedisStore::connect`] to connect and load the script.
    pub connect_timeout: Duration,
    /// Upper bound of every store call. A caller's shorter deadline wins.
    pub store_timeout: Duration,
    /// Store calls allowed in flight at once; more fail at once.
    pub max_in_flight: usize,
    /// Number of clients, which calls take in turn (round robin). In a
    /// cluster each client connects to every primary.
    pub pool_size: usize,
    /// First delay between reconnection attempts. It doubles after each
    /// failed attempt.
    pub reconnect_min_delay: Duration,
    /// Largest delay between reconnection attempts.
    pub reconnect_max_delay: Duration,
    /// A connection whose oldest command has waited this long for a reply
    /// is closed and reconnected.
    pub unresponsive_after: Duration,
    /// How long a hold of a call spanning several cluster slots, or its
    /// tombstone, is kept.
    pub hold_ttl: Duration,
    /// PEM file of the CAs a TLS URL's servers must chain to, instead of
    /// the system's roots (which `SSL_CERT_FILE` and `SSL_CERT_DIR` can
    /// also replace).
    pub ca_file: Option<PathBuf>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            store_timeout: Duration::from_millis(250),
            max_in_flight: 256,
            pool_size: 4,
            reconnect_min_delay: Duration::from_millis(50),
            reconnect_max_delay: Duration::from_secs(1),
            unresponsive_after: Duration::from_secs(2),
            hold_ttl: Duration::from_secs(60),
            ca_file: None,
        }
    }
}

/// A store in Redis. Clones share the connections.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    topology: Topology,
    /// SHA-1 of [`BUCKET_SCRIPT`].
    script_sha: Str,
    /// Groups judge calls into batch commands; none in a cluster.
    batcher: Option<batch::Batcher>,
    options: RedisOptions,
    /// Permits for store calls in flight.
    in_flight: Arc<Semaphore>,
    /// Permits for background releases of holds.
    releases: Arc<Semaphore>,
    faults: StoreFaults,
    breaker: breaker::Breaker,
    /// Servers named in the URL, for logs; never the URL, which may carry a
    /// password.
    servers: Vec<String>,
    noscript_log: Throttle,
    release_log: Throttle,
    role_log: Throttle,
    breaker_log: Throttle,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("topology", &self.inner.topology)
            .field("servers", &self.inner.servers)
            .finish_non_exhaustive()
    }
}

/// A call's deadline and the budget it was derived from.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    fn after(budget: Duration) -> Self {
        Self { at: Instant::now() + budget, budget }
    }

    fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    fn timed_out(&self) -> StoreError {
        StoreError::TimedOut(self.budget)
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` with [`RedisOptions::default`] and
    /// loads the bucket script.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, &RedisOptions::default()).await
    }

    /// Connects to Redis and loads the bucket script on every primary,
    /// failing after `options.connect_timeout`.
    ///
    /// `url` takes `fred`'s forms: `redis://[[user]:password@]host:port[/db]`,
    /// `rediss://` for TLS, `redis-cluster://host:port?node=host:port` and
    /// `redis-sentinel://host:port?sentinelServiceName=NAME&node=host:port`
    /// (the hosts are sentinels). Errors never contain the URL, which may
    /// carry a password. Also reads `maxmemory-policy` and logs a warning
    /// when it makes bucket writes fail.
    pub async fn connect_with(url: &str, options: &RedisOptions) -> Result<Self, StoreError> {
        if url.starts_with("rediss") || url.starts_with("valkeys") {
            install_tls_provider();
        }
        let mut config = Config::from_url(url)
            .map_err(|error| StoreError::Unavailable(format!("invalid Redis URL: {}", error.details())))?;
        if let Some(ca_file) = &options.ca_file {
            if config.tls.is_none() {
                return Err(StoreError::Unavailable(format!(
                    "the Redis CA file {} needs a TLS URL; use rediss://, rediss-cluster:// or rediss-sentinel://",
                    ca_file.display()
                )));
            }
            config.tls = Some(trusting(ca_file)?.into());
        }
        let topology = if config.server.is_clustered() {
            Topology::Cluster
        } else if config.server.is_sentinel() {
            Topology::Sentinel
        } else {
            Topology::Standalone
        };
        let servers: Vec<String> = config.server.hosts().iter().map(ToString::to_string).collect();

        let pool = Builder::from_config(config)
            .with_connection_config(|connection| {
                connection.connection_timeout = options.connect_timeout;
                connection.internal_command_timeout = options.connect_timeout;
                connection.max_command_attempts = 1;
                connection.max_command_buffer_len = options.max_in_flight.max(1) * 4;
                connection.unresponsive = UnresponsiveConfig {
                    max_timeout: Some(options.unresponsive_after),
                    interval: (options.unresponsive_after / 4).max(Duration::from_millis(10)),
                };
                connection.tcp.nodelay = Some(true);
            })
            .with_performance_config(|performance| {
                performance.default_command_timeout = options.store_timeout;
            })
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                millis_u32(options.reconnect_min_delay),
                millis_u32(options.reconnect_max_delay),
                2,
            ))
            .build_pool(options.pool_size.max(1))
            .map_err(|error| StoreError::Unavailable(format!("invalid Redis settings: {}", error.details())))?;

        let batch_text: Arc<str> = batch::batch_script().into();
        let setup = async {
            pool.init().await.map_err(|error| store_error(&error))?;
            check_version(&pool, &servers)?;
            let bucket = load_script(&pool, BUCKET_SCRIPT).await?;
            let batch = load_script(&pool, &batch_text).await?;
            Ok::<_, StoreError>((bucket, batch))
        };
        let (script_sha, batch_sha) = match tokio::time::timeout(options.connect_timeout, setup).await {
            Ok(Ok(shas)) => shas,
            Ok(Err(error)) => {
                shut_down(&pool, options.connect_timeout);
                return Err(error);
            }
            Err(_) => {
                shut_down(&pool, options.connect_timeout);
                return Err(StoreError::Unavailable(format!(
                    "timed out after {:?} connecting to Redis ({}) at {}",
                    options.connect_timeout,
                    topology.name(),
                    servers.join(", ")
                )));
            }
        };
        watch_connections(&pool);

        let max_in_flight = options.max_in_flight.max(1);
        let batcher = (topology != Topology::Cluster).then(|| {
            let scripts = batch::Scripts {
                bucket_sha: script_sha.clone(),
                batch_sha,
                batch_text,
                noscript_log: Throttle::new(),
            };
            batch::Batcher::start(pool.clone(), scripts)
        });
        let store = Self {
            inner: Arc::new(Inner {
                pool,
                topology,
                script_sha,
                batcher,
                options: options.clone(),
                in_flight: Arc::new(Semaphore::new(max_in_flight)),
                releases: Arc::new(Semaphore::new(max_in_flight)),
                faults: StoreFaults::new(),
                breaker: breaker::Breaker::new(),
                servers,
                noscript_log: Throttle::new(),
                release_log: Throttle::new(),
                role_log: Throttle::new(),
                breaker_log: Throttle::new(),
            }),
        };
        checks::warn_about_settings(&store).await;
        tracing::info!(
            redis.topology = topology.name(),
            redis.servers = ?store.inner.servers,
            redis.pool_size = store.inner.pool.size(),
            redis.version = %store.inner.pool.next().server_version().map_or_else(|| "unknown".to_owned(), |version| version.to_string()),
            "Connected to Redis"
        );
        Ok(store)
    }

    /// Judges `batch` atomically in Redis at Redis's clock, within the
    /// store's time limit.
    pub async fn apply(&self, batch: &Batch) -> Result<BatchOutcome, StoreError> {
        self.apply_within(batch, None).await
    }

    /// Judges `batch` in Redis at Redis's clock, failing once `budget`
    /// (capped at [`RedisOptions::store_timeout`]) has passed.
    ///
    /// Returns [`StoreError::TimedOut`], [`StoreError::Busy`] or
    /// [`StoreError::Unavailable`] when Redis cannot judge the batch in
    /// time, and [`StoreError::Protocol`] for parameters the script cannot
    /// count exactly, a stored value it cannot read, or a reply this code
    /// cannot read.
    pub async fn apply_within(&self, batch: &Batch, budget: Option<Duration>) -> Result<BatchOutcome, StoreError> {
        let (deadline, permit) = self.begin(batch, budget)?;
        let groups = match self.inner.topology {
            Topology::Cluster => slots::group_by_slot(&batch.ops)?,
            Topology::Standalone | Topology::Sentinel => vec![(0..batch.ops.len()).collect()],
        };
        let result = if groups.len() > 1 {
            // Boxed: the rare cross-slot path would otherwise size every call's future.
            Box::pin(slots::apply_across_slots(self, batch, groups, deadline, permit)).await
        } else {
            let result = self.judge_in_one_slot(batch, deadline).await;
            drop(permit);
            result
        };
        self.finish(&result);
        result
    }

    /// Starts a store call: checks the parameters, the circuit breaker and
    /// the in-flight bound, and derives the deadline from `budget`.
    fn begin(&self, batch: &Batch, budget: Option<Duration>) -> Result<(Deadline, OwnedSemaphorePermit), StoreError> {
        for op in &batch.ops {
            script::check_exact(&op.params, &op.key)?;
        }
        let cap = self.inner.options.store_timeout;
        let deadline = Deadline::after(budget.map_or(cap, |budget| budget.min(cap)));

        if !self.inner.breaker.admit() {
            let error = StoreError::Unavailable(format!(
                "Redis did not answer {} calls in a row in time; failing at once until a probe call gets an answer",
                breaker::TRIP_AFTER
            ));
            self.inner.faults.record(&error);
            return Err(error);
        }
        let Ok(permit) = self.inner.in_flight.clone().try_acquire_owned() else {
            let error = StoreError::Busy(self.inner.options.max_in_flight);
            self.inner.faults.record(&error);
            return Err(error);
        };
        Ok((deadline, permit))
    }

    /// Ends a store call: counts its fault and tells the circuit breaker
    /// whether Redis answered.
    fn finish<T>(&self, result: &Result<T, StoreError>) {
        let change = match result {
            // An unreadable reply is still an answer.
            Ok(_) | Err(StoreError::Protocol(_)) => self.inner.breaker.answered(),
            Err(StoreError::TimedOut(_)) => self.inner.breaker.timed_out(),
            Err(StoreError::Unavailable(_) | StoreError::Busy(_)) => breaker::Change::Unchanged,
        };
        if let Err(error) = result {
            self.inner.faults.record(error);
        }
        if change == breaker::Change::Unchanged {
            return;
        }
        // A Redis on the edge of its deadline may open and close the
        // breaker often, so these lines are throttled together.
        let Some(suppressed) = self.inner.breaker_log.allow() else { return };
        match change {
            breaker::Change::Opened => tracing::warn!(
                redis.servers = ?self.inner.servers,
                probe_interval = ?breaker::PROBE_INTERVAL,
                suppressed,
                "Redis stopped answering in time; failing calls at once and probing"
            ),
            _ => tracing::info!(redis.servers = ?self.inner.servers, suppressed, "Redis answers in time again"),
        }
    }

    /// Checks that Redis can judge batches: every primary the client routes
    /// to replies to `ROLE` as a primary. A replica where a primary was
    /// expected (a demoted primary) makes the client reconnect, so it finds
    /// the new primary.
    pub async fn ping(&self) -> Result<(), StoreError> {
        checks::check_primaries(self).await
    }

    /// Counts of this store's faults.
    pub fn faults(&self) -> &StoreFaults {
        &self.inner.faults
    }

    /// Store calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.inner.options.max_in_flight.max(1) - self.inner.in_flight.available_permits()
    }

    pub fn topology(&self) -> Topology {
        self.inner.topology
    }

    /// Judges `batch` like [`apply_within`](Self::apply_within), unless an
    /// account record differs from its guard: then returns the actual
    /// records and touches no bucket. In one hash slot (every Fikra call)
    /// the guards are checked by the bucket script itself, so this is one
    /// round trip.
    pub async fn apply_guarded(
        &self,
        batch: &Batch,
        guards: &[RecordGuard],
        budget: Option<Duration>,
    ) -> Result<Guarded, StoreError> {
        if guards.is_empty() {
            return self.apply_within(batch, budget).await.map(Guarded::Judged);
        }
        let one_slot = match self.inner.topology {
            Topology::Cluster => {
                let mut ops = batch.ops.clone();
                ops.extend(guards.iter().map(|guard| BucketOp { key: guard.key.clone(), ..batch.ops[0].clone() }));
                slots::group_by_slot(&ops)?.len() == 1
            }
            Topology::Standalone | Topology::Sentinel => true,
        };
        if !one_slot {
            // NOTE: a batch spanning several slots checks its guards with a
            // separate read first, so an account change between that read
            // and the judgement applies from the next call.
            let actual = crate::accounts::redis::read_records(self, guards).await?;
            if actual.iter().zip(guards).any(|(actual, guard)| *actual != guard.expected) {
                return Ok(Guarded::Stale(actual));
            }
            return self.apply_within(batch, budget).await.map(Guarded::Judged);
        }

        let (deadline, permit) = self.begin(batch, budget)?;
        let call = Invocation {
            mode: Mode::Judge,
            hold: None,
            ops: batch.ops.iter().collect(),
            ttl_slack: batch.ttl_slack,
            estimate_ttl: batch.estimate_ttl,
        };
        let result = async {
            let reply = self.run_guarded(&call, guards, deadline).await?;
            if let Some(actual) = script::decode_stale(&reply, guards.len())? {
                return Ok(Guarded::Stale(actual));
            }
            script::decode(&call.ops, reply).map(Guarded::Judged)
        }
        .await;
        drop(permit);
        self.finish(&result);
        result
    }

    /// The client pool, for the account store.
    pub(crate) fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    async fn judge_in_one_slot(&self, batch: &Batch, deadline: Deadline) -> Result<BatchOutcome, StoreError> {
        let call = Invocation {
            mode: Mode::Judge,
            hold: None,
            ops: batch.ops.iter().collect(),
            ttl_slack: batch.ttl_slack,
            estimate_ttl: batch.estimate_ttl,
        };
        let reply = self.run(&call, deadline).await?;
        script::decode(&call.ops, reply)
    }

    /// Runs the bucket script for `call` by its SHA-1, sending the script
    /// text instead when the node replies `NOSCRIPT`. The command is sent at
    /// most once and fails when `deadline` passes.
    async fn run(&self, call: &Invocation<'_>, deadline: Deadline) -> Result<Value, StoreError> {
        self.run_guarded(call, &[], deadline).await
    }

    /// Runs the bucket script like [`run`](Self::run), with account record guards.
    async fn run_guarded(&self, call: &Invocation<'_>, guards: &[RecordGuard], deadline: Deadline) -> Result<Value, StoreError> {
        match self.send(call, guards, ScriptRef::Sha, deadline).await {
            Err(error) if is_noscript(&error) => {
                if let Some(suppressed) = self.inner.noscript_log.allow() {
                    tracing::warn!(
                        redis.key = first_key(&call.ops),
                        suppressed,
                        "Redis replied NOSCRIPT (restarted or promoted node); sending the bucket script text"
                    );
                }
                Box::pin(self.send(call, guards, ScriptRef::Text, deadline)).await.map_err(|error| classify(&error, deadline))
            }
            reply => reply.map_err(|error| classify(&error, deadline)),
        }
    }

    /// Sends `call` once on the next client, with the time left before
    /// `deadline`, no retry, and a quick failure while the client is
    /// disconnected.
    async fn send(&self, call: &Invocation<'_>, guards: &[RecordGuard], sent_as: ScriptRef, deadline: Deadline) -> Result<Value, RedisError> {
        let remaining = deadline.remaining();
        if remaining.is_zero() {
            return Err(RedisError::new(ErrorKind::Timeout, "the deadline passed before the command was sent"));
        }
        // Judge calls on one primary join a batch; the batch takes the
        // same care over connections and deadlines.
        if let (Some(batcher), ScriptRef::Sha, Mode::Judge) = (&self.inner.batcher, sent_as, call.mode) {
            let (keys, args) = script::encode_guarded(call, guards);
            return match tokio::time::timeout(remaining + DEADLINE_GRACE, batcher.call(keys, args, remaining)).await {
                Ok(reply) => reply,
                Err(_) => Err(RedisError::new(ErrorKind::Timeout, "the command passed its deadline")),
            };
        }
        // A client that is reconnecting holds commands until it is back, so
        // fail at once when no client is connected.
        let client = self.inner.pool.next_connected();
        if !client.is_connected() {
            return Err(RedisError::new(ErrorKind::IO, "no Redis connection is up; the clients are reconnecting"));
        }
        let options = Options { timeout: Some(remaining), max_attempts: Some(1), fail_fast: true, ..Options::default() };
        let client = client.with_options(&options);
        let (keys, args) = script::encode_guarded(call, guards);
        let reply = async {
            match sent_as {
                ScriptRef::Sha => client.evalsha::<Value, _, _, _>(self.inner.script_sha.clone(), keys, args).await,
                ScriptRef::Text => client.eval::<Value, _, _, _>(BUCKET_SCRIPT, keys, args).await,
            }
        };
        match tokio::time::timeout(remaining + DEADLINE_GRACE, reply).await {
            Ok(reply) => reply,
            Err(_) => Err(RedisError::new(ErrorKind::Timeout, "the command passed its deadline")),
        }
    }
}

/// How a script call names the script.
#[derive(Debug, Clone, Copy)]
enum ScriptRef {
    /// `EVALSHA` with the script's SHA-1.
    Sha,
    /// `EVAL` with the script text, which also caches it on the node.
    Text,
}

/// Installs `ring` as the process's TLS provider unless one is installed, so
/// `rediss://` works whichever TLS features other crates enable. `ring` is
/// the provider tonic's `tls-ring` feature uses too.
#[allow(deprecated, reason = "rustls 0.23.48 deprecates ring's provider only for lacking post-quantum key exchange")]
fn install_tls_provider() {
    // An error means a provider is already installed, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Builds a TLS client that trusts only the CA certificates in `ca_file`.
fn trusting(ca_file: &Path) -> Result<fred::types::config::TlsConnector, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let invalid = |reason: String| StoreError::Unavailable(format!("invalid Redis CA file {}: {reason}", ca_file.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|error| invalid(error.to_string()))? {
        let cert = cert.map_err(|error| invalid(error.to_string()))?;
        roots.add(cert).map_err(|error| invalid(error.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("it holds no PEM certificate".into()));
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    Ok(config.into())
}

/// Loads a script on every primary (in a cluster) or on the one server,
/// and returns its SHA-1.
async fn load_script(pool: &Pool, script: &str) -> Result<Str, StoreError> {
    pool.next().script_load_cluster::<Str, _>(script).await.map_err(|error| store_error(&error))
}

/// Logs reconnections and connection errors of every client, so an outage
/// and its end show in the log with the server involved.
fn watch_connections(pool: &Pool) {
    let error_log = Arc::new(Throttle::new());
    for client in pool.clients() {
        client.on_reconnect(|server| async move {
            tracing::info!(redis.server = %server, "Reconnected to Redis");
            Ok(())
        });
        let error_log = error_log.clone();
        client.on_error(move |(error, server)| {
            let error_log = error_log.clone();
            async move {
                if let Some(suppressed) = error_log.allow() {
                    let server = server.map(|server| server.to_string()).unwrap_or_default();
                    tracing::warn!(redis.server = %server, error = %error, suppressed, "Redis connection error; reconnecting");
                }
                Ok(())
            }
        });
    }
}

/// Rejects a Redis older than 7.0, because the bucket script extends a
/// hash's TTL with `PEXPIRE ... GT` and `NX`, which older servers reject, so
/// every check would fail. A server that did not report its version is
/// accepted.
fn check_version(pool: &Pool, servers: &[String]) -> Result<(), StoreError> {
    match pool.next().server_version() {
        Some(version) if version.major < 7 => Err(StoreError::Unavailable(format!(
            "Redis at {} is version {version}, and the bucket script needs Redis 7.0 or newer \
             (it uses PEXPIRE with GT and NX); upgrade Redis",
            servers.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// Closes a pool that failed to set up, so it stops reconnecting. The close
/// runs in the background, so the failed connect returns at once.
fn shut_down(pool: &Pool, limit: Duration) {
    let pool = pool.clone();
    tokio::spawn(async move {
        if tokio::time::timeout(limit, pool.quit()).await.is_err() {
            tracing::warn!(timeout = ?limit, "Timed out closing Redis connections after a failed connect");
        }
    });
}

fn millis_u32(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// The first bucket key of `ops`, for logs. Keys hold hashes, never values.
fn first_key<'a>(ops: &[&'a BucketOp]) -> &'a str {
    ops.first().map_or("", |op| op.key.as_str())
}

fn is_noscript(error: &RedisError) -> bool {
    error.details().starts_with("NOSCRIPT")
}

/// Error replies that a retry may cure: the server is loading, busy, a
/// replica after a failover, or a cluster node in transition.
const TRANSIENT_REPLIES: [&str; 9] =
    ["LOADING", "BUSY", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS", "MISCONF", "NOSCRIPT"];

/// Errors `fred` raises itself when a connection was lost or is being
/// replaced (fred 10.1), which a later call may not meet.
const TRANSIENT_CLIENT_ERRORS: [&str; 7] = [
    "Too many failed write attempts",
    "Max attempts exceeded",
    "Max redirections exceeded",
    "Failed to route command",
    "Failed to send command to router",
    "Missing expected connection",
    "Client is not initialized",
];

/// Maps a `fred` error of a call with `deadline` to a store error.
fn classify(error: &RedisError, deadline: Deadline) -> StoreError {
    if *error.kind() == ErrorKind::Timeout {
        deadline.timed_out()
    } else {
        store_error(error)
    }
}

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
        | ErrorKind::Auth
        | ErrorKind::Tls => true,
        _ => TRANSIENT_REPLIES.iter().chain(&TRANSIENT_CLIENT_ERRORS).any(|prefix| error.details().starts_with(prefix)),
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

    #[test]
    fn transient_replies_are_unavailable() {
        let readonly = RedisError::new(ErrorKind::Unknown, "READONLY You can't write against a read only replica.");
        assert!(matches!(store_error(&readonly), StoreError::Unavailable(_)));
        let lost = RedisError::new(ErrorKind::Unknown, "Too many failed write attempts.");
        assert!(matches!(store_error(&lost), StoreError::Unavailable(_)));
        let crossslot = RedisError::new(ErrorKind::Unknown, "CROSSSLOT Keys in request don't hash to the same slot");
        assert!(matches!(store_error(&crossslot), StoreError::Protocol(_)));
    }

    #[test]
    fn timeouts_report_the_budget() {
        let deadline = Deadline::after(Duration::from_millis(20));
        let error = classify(&RedisError::new(ErrorKind::Timeout, "late"), deadline);
        assert!(matches!(error, StoreError::TimedOut(budget) if budget == Duration::from_millis(20)), "{error:?}");
    }
}
