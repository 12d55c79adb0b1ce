//! Prometheus metrics, and the HTTP server for them and the probes.
//!
//! Labels come only from the configuration (domain, rule label, tier name)
//! or from fixed sets (codes, results, store kinds). A descriptor value, such
//! as an API key, never becomes a label: a domain that is not configured is
//! counted as [`UNKNOWN_DOMAIN`], and descriptors that match no rule are
//! counted per domain only.

pub mod http;

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

use crate::limiter::judge::Settlement;
use crate::limiter::{Decision, Denial, DescriptorKind, DescriptorStatus, Outcome};
use crate::store::Store;

/// The prefix of every metric name.
const PREFIX: &str = "fikra";

/// The domain label of calls for a domain that is not configured; a
/// client-chosen domain name must not create a series.
pub const UNKNOWN_DOMAIN: &str = "(unknown)";

/// The rule label of a limit that Envoy sent with no configured rule.
pub const OVERRIDE_RULE: &str = "(override)";

/// The tier label of a domain without tiers.
pub const NO_TIER: &str = "(none)";

/// A check is near its limit when the units left after it are below this
/// share of the capacity.
pub const NEAR_LIMIT_SHARE: f64 = 0.2;

/// Upper bounds of the store latency histogram, in seconds: 0.1 ms to 1 s.
const STORE_SECONDS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Upper bounds of the estimate error histogram (A − E), in units; negative
/// when the gateway estimated more than the response used.
const ESTIMATE_ERROR_UNITS: [f64; 17] = [
    -100_000.0, -30_000.0, -10_000.0, -3_000.0, -1_000.0, -300.0, -100.0, -10.0, 0.0, 10.0, 100.0, 300.0, 1_000.0,
    3_000.0, 10_000.0, 30_000.0, 100_000.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    domain: Arc<str>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    domain: Arc<str>,
    rule: Arc<str>,
    tier: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    domain: Arc<str>,
    rule: Arc<str>,
    tier: Arc<str>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReportLabels {
    domain: Arc<str>,
    rule: Arc<str>,
    tier: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EstimateLabels {
    domain: Arc<str>,
    rule: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    store: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    store: &'static str,
    fault: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// The response to a call whose store call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureAnswer {
    /// gRPC UNAVAILABLE: Envoy's `failure_mode_deny` decides.
    Unavailable,
    /// Allowed without rate-limit headers (fail-open).
    Allowed,
}

/// The service's metrics. Clones share every series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Every registered family with its type, for [`Metrics::series_names`].
    families: Arc<Vec<(String, MetricType)>>,
    calls: Family<CallLabels, Counter>,
    checks: Family<CheckLabels, Counter>,
    /// The series of `calls` and `checks` by their label texts' addresses.
    call_handles: Arc<Handles<CallLabels>>,
    check_handles: Arc<Handles<CheckLabels>>,
    near_limit: Family<RuleLabels, Counter>,
    shadow_denied: Family<RuleLabels, Counter>,
    unmatched: Family<DomainLabels, Counter>,
    unknown_domain: Counter,
    ignored_overrides: Family<DomainLabels, Counter>,
    reports: Family<ReportLabels, Counter>,
    refunded: Family<RuleLabels, Counter>,
    extra_charged: Family<RuleLabels, Counter>,
    estimate_error: Family<EstimateLabels, Histogram>,
    debt_forgiven: Family<RuleLabels, Counter>,
    eviction_forgiven: Counter,
    evicted_buckets: Counter,
    evicted_estimates: Counter,
    store_faults: Family<FaultLabels, Counter>,
    /// The store's own counts as of the last scrape, to add only what grew.
    store_seen: Arc<Mutex<HashMap<&'static str, u64>>>,
    store_seconds: Family<StoreLabels, Histogram>,
    /// The `store_seconds` histogram of successful calls, kept so that each
    /// decision does not look it up by its labels. A server has one store.
    store_ok_seconds: Arc<OnceLock<(&'static str, Histogram)>>,
    store_errors: Family<StoreErrorLabels, Counter>,
    failure_answers: Family<AnswerLabels, Counter>,
    in_flight: Gauge,
    config_loads: Counter,
    config_load_errors: Counter,
    config_domains: Gauge,
    config_loaded_at: Gauge,
    ready: Gauge,
    /// Shared label texts, so recording a decision allocates none.
    labels: Arc<LabelTexts>,
}

/// Counters of one family found by the addresses of their label texts.
///
/// A family finds a series by hashing and comparing its label texts. On the
/// decision path those texts are `Arc<str>`s shared from the configuration,
/// so their addresses name the series as well, and are cheaper to hash.
/// Each entry keeps its labels, and with them its texts, alive, so an
/// address in the cache is never reused for another text. Two copies of one
/// text get two entries for the same series. Past [`MAX_HANDLES`] entries
/// (texts of many reloaded configurations) the cache starts over.
struct Handles<L> {
    entries: RwLock<HashMap<[usize; 4], (L, Counter), BuildHasherDefault<AddressHasher>>>,
}

/// The maximum number of entries in a [`Handles`].
const MAX_HANDLES: usize = 4096;

impl<L> Default for Handles<L> {
    fn default() -> Self {
        Self { entries: RwLock::default() }
    }
}

impl<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static> Handles<L> {
    /// Adds one to the series that `labels` names in `family`. `identity`
    /// contains the addresses of the texts in `labels`, and a fixed text's
    /// address and length.
    fn inc(&self, identity: [usize; 4], family: &Family<L, Counter>, labels: impl FnOnce() -> L) {
        if let Some((_, counter)) = self.entries.read().unwrap_or_else(PoisonError::into_inner).get(&identity) {
            counter.inc();
            return;
        }
        let labels = labels();
        let counter = family.get_or_create(&labels).clone();
        counter.inc();
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= MAX_HANDLES {
            entries.clear();
        }
        entries.insert(identity, (labels, counter));
    }
}

/// Returns the address of a shared label text.
fn text_address(text: &Arc<str>) -> usize {
    Arc::as_ptr(text).cast::<u8>().addr()
}

/// A hasher for addresses. Addresses come from this process's allocator,
/// not from callers, so they need no protection from chosen collisions.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Label texts shared by every series that uses them: each configured
/// domain name seen so far, and the fixed texts.
#[derive(Debug)]
struct LabelTexts {
    domains: RwLock<Vec<Arc<str>>>,
    override_rule: Arc<str>,
    no_tier: Arc<str>,
}

impl LabelTexts {
    /// Returns the shared text of `domain`, a configured domain name or
    /// [`UNKNOWN_DOMAIN`]. Past [`MAX_SHARED_DOMAINS`] names, a new text is
    /// returned without being kept, so the list stays bounded.
    fn domain(&self, domain: &str) -> Arc<str> {
        let known = self.domains.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(text) = known.iter().find(|text| ***text == *domain) {
            return text.clone();
        }
        drop(known);
        let mut known = self.domains.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(text) = known.iter().find(|text| ***text == *domain) {
            return text.clone();
        }
        let text: Arc<str> = Arc::from(domain);
        if known.len() < MAX_SHARED_DOMAINS {
            known.push(text.clone());
        }
        text
    }
}

/// The maximum number of domain names [`LabelTexts`] keeps.
const MAX_SHARED_DOMAINS: usize = 256;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates every metric in a new registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let mut families = Vec::new();
        let calls = Family::<CallLabels, Counter>::default();
        let checks = Family::<CheckLabels, Counter>::default();
        let near_limit = Family::<RuleLabels, Counter>::default();
        let shadow_denied = Family::<RuleLabels, Counter>::default();
        let unmatched = Family::<DomainLabels, Counter>::default();
        let unknown_domain = Counter::default();
        let ignored_overrides = Family::<DomainLabels, Counter>::default();
        let reports = Family::<ReportLabels, Counter>::default();
        let refunded = Family::<RuleLabels, Counter>::default();
        let extra_charged = Family::<RuleLabels, Counter>::default();
        let estimate_error = Family::<EstimateLabels, Histogram>::new_with_constructor(estimate_histogram as fn() -> Histogram);
        let debt_forgiven = Family::<RuleLabels, Counter>::default();
        let eviction_forgiven = Counter::default();
        let evicted_buckets = Counter::default();
        let evicted_estimates = Counter::default();
        let store_faults = Family::<FaultLabels, Counter>::default();
        let store_seconds = Family::<StoreLabels, Histogram>::new_with_constructor(store_histogram as fn() -> Histogram);
        let store_errors = Family::<StoreErrorLabels, Counter>::default();
        let failure_answers = Family::<AnswerLabels, Counter>::default();
        let in_flight = Gauge::default();
        let config_loads = Counter::default();
        let config_load_errors = Counter::default();
        let config_domains = Gauge::default();
        let config_loaded_at = Gauge::default();
        let ready = Gauge::default();

        register(&mut registry, &mut families, "build", "Build information", Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION") }));
        register(&mut registry, &mut families, "calls", "ShouldRateLimit calls by domain and answer code", calls.clone());
        register(&mut registry, &mut families, 
            "descriptor_checks",
            "Descriptors checked against a limit, by rule, tier and code (a shadowed would-be denial is ok)",
            checks.clone(),
        );
        register(&mut registry, &mut families, 
            "near_limit",
            "Allowed checks that left less than 20% of the bucket's capacity",
            near_limit.clone(),
        );
        register(&mut registry, &mut families, "shadow_denied", "Checks a shadowed limit would have denied", shadow_denied.clone());
        register(&mut registry, &mut families, 
            "unmatched_descriptors",
            "Descriptors of a configured domain that matched no rule with a limit",
            unmatched.clone(),
        );
        register(&mut registry, &mut families, "unknown_domain_calls", "Calls for a domain that is not configured", unknown_domain.clone());
        register(&mut registry, &mut families, 
            "ignored_overrides",
            "Limit overrides from Envoy that were ignored (unit UNKNOWN or multiplier 0)",
            ignored_overrides.clone(),
        );
        register(&mut registry, &mut families, 
            "reports",
            "Usage reports by settlement: settled, unknown_request, no_request_id, duplicate, ignored",
            reports.clone(),
        );
        register(&mut registry, &mut families, "settlement_refunded_units", "Units refunded because a response used less than its estimate", refunded.clone());
        register(&mut registry, &mut families, 
            "settlement_extra_units",
            "Units charged because a response used more than its estimate",
            extra_charged.clone(),
        );
        register(&mut registry, &mut families, 
            "estimate_error_units",
            "Used minus estimated units (A - E) of settled reports",
            estimate_error.clone(),
        );
        register(&mut registry, &mut families, "debt_forgiven_units", "Report units the debt clamp forgave", debt_forgiven.clone());
        register(&mut registry, &mut families, 
            "eviction_forgiven_units",
            "Units forgiven by evicting buckets from the in-memory store",
            eviction_forgiven.clone(),
        );
        register(&mut registry, &mut families, "evicted_buckets", "Buckets evicted from the in-memory store", evicted_buckets.clone());
        register(&mut registry, &mut families, 
            "evicted_estimates",
            "Token estimates evicted from the in-memory store; their reports are charged in full",
            evicted_estimates.clone(),
        );
        register(&mut registry, &mut families, 
            "store_faults",
            "Store calls by fault: timeout, busy (in-flight bound), unavailable, hold_released, release_failure",
            store_faults.clone(),
        );
        register(&mut registry, &mut families, "store_duration_seconds", "Time the store took to judge a call", store_seconds.clone());
        register(&mut registry, &mut families, "store_errors", "Store calls that failed, by kind", store_errors.clone());
        register(&mut registry, &mut families, 
            "failure_mode_answers",
            "Calls answered by the failure mode because the store failed",
            failure_answers.clone(),
        );
        register(&mut registry, &mut families, "in_flight_calls", "ShouldRateLimit calls being decided", in_flight.clone());
        register(&mut registry, &mut families, "config_loads", "Configuration loads that succeeded, at start and on reload", config_loads.clone());
        register(&mut registry, &mut families, 
            "config_load_errors",
            "Configuration loads that failed; the running configuration was kept",
            config_load_errors.clone(),
        );
        register(&mut registry, &mut families, "config_domains", "Domains in the running configuration", config_domains.clone());
        register(&mut registry, &mut families, 
            "config_loaded_timestamp_seconds",
            "Unix time of the last successful configuration load",
            config_loaded_at.clone(),
        );
        register(&mut registry, &mut families, "ready", "1 while the service is ready for traffic, else 0", ready.clone());

        Self {
            registry: Arc::new(registry),
            families: Arc::new(families),
            calls,
            checks,
            call_handles: Arc::default(),
            check_handles: Arc::default(),
            near_limit,
            shadow_denied,
            unmatched,
            unknown_domain,
            ignored_overrides,
            reports,
            refunded,
            extra_charged,
            estimate_error,
            debt_forgiven,
            eviction_forgiven,
            evicted_buckets,
            evicted_estimates,
            store_faults,
            store_seen: Arc::default(),
            store_seconds,
            store_ok_seconds: Arc::default(),
            store_errors,
            failure_answers,
            in_flight,
            config_loads,
            config_load_errors,
            config_domains,
            config_loaded_at,
            ready,
            labels: Arc::new(LabelTexts {
                domains: RwLock::default(),
                override_rule: Arc::from(OVERRIDE_RULE),
                no_tier: Arc::from(NO_TIER),
            }),
        }
    }

    /// Returns the name of every series the metrics can have, such as
    /// `fikra_calls_total` or `fikra_store_duration_seconds_bucket`, whether
    /// or not it has a value yet (a family without values is not scraped).
    pub fn series_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, kind) in self.families.iter() {
            let suffixes: &[&str] = match kind {
                MetricType::Counter => &["_total"],
                MetricType::Histogram => &["_bucket", "_count", "_sum"],
                MetricType::Info => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|suffix| format!("{PREFIX}_{name}{suffix}")));
        }
        names
    }

    /// Encodes every metric in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a call in flight until the guard drops.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight { gauge: self.in_flight.clone() }
    }

    /// Records a decided call. `domain` is the requested domain, used as a
    /// label only when the decision marks it as configured.
    pub fn record_decision(&self, domain: &str, store: &'static str, decision: &Decision) {
        let domain = self.labels.domain(if decision.unknown_domain { UNKNOWN_DOMAIN } else { domain });
        let code = match decision.outcome {
            Outcome::Allowed => "ok",
            Outcome::Denied => "over_limit",
        };
        let identity = [text_address(&domain), code.as_ptr().addr(), code.len(), 0];
        self.call_handles.inc(identity, &self.calls, || CallLabels { domain: domain.clone(), code });
        if let Some(elapsed) = decision.store_elapsed {
            match self.store_ok_seconds.get() {
                Some((kind, histogram)) if *kind == store => histogram.observe(elapsed.as_secs_f64()),
                _ => {
                    let histogram = self.store_seconds.get_or_create(&StoreLabels { store, result: "ok" }).clone();
                    histogram.observe(elapsed.as_secs_f64());
                    let _ = self.store_ok_seconds.set((store, histogram));
                }
            }
        }
        if decision.unknown_domain {
            self.unknown_domain.inc();
            return;
        }
        // A value over its bound is denied before any rule is matched, so
        // its descriptors are neither checks nor unmatched.
        if matches!(decision.denial, Some(Denial::ValueTooLong { .. })) {
            return;
        }
        for status in &decision.statuses {
            self.record_descriptor(&domain, status);
        }
    }

    fn record_descriptor(&self, domain: &Arc<str>, status: &DescriptorStatus) {
        let facts = &status.facts;
        if facts.ignored_override {
            self.ignored_overrides.get_or_create(&DomainLabels { domain: domain.clone() }).inc();
        }
        let rule = || RuleLabels {
            domain: domain.clone(),
            rule: facts.rule.clone().unwrap_or_else(|| self.labels.override_rule.clone()),
            tier: facts.tier.clone().unwrap_or_else(|| self.labels.no_tier.clone()),
        };
        match facts.kind {
            DescriptorKind::NoLimit => {
                self.unmatched.get_or_create(&DomainLabels { domain: domain.clone() }).inc();
            }
            DescriptorKind::Check => {
                let code = match status.outcome {
                    Outcome::Allowed => "ok",
                    Outcome::Denied => "over_limit",
                };
                let rule_text = facts.rule.as_ref().unwrap_or(&self.labels.override_rule);
                let tier_text = facts.tier.as_ref().unwrap_or(&self.labels.no_tier);
                let identity = [text_address(domain), text_address(rule_text), text_address(tier_text), code.as_ptr().addr()];
                self.check_handles.inc(identity, &self.checks, || CheckLabels {
                    domain: domain.clone(),
                    rule: rule_text.clone(),
                    tier: tier_text.clone(),
                    code,
                });
                if status.shadow_denied {
                    self.shadow_denied.get_or_create(&rule()).inc();
                }
                let capacity = status.limit.as_ref().map_or(0, |limit| limit.params.capacity);
                let near = (status.remaining as f64) < capacity as f64 * NEAR_LIMIT_SHARE;
                if status.outcome == Outcome::Allowed && !status.shadow_denied && near {
                    self.near_limit.get_or_create(&rule()).inc();
                }
            }
            DescriptorKind::Report => {
                let labels = rule();
                if facts.forgiven > 0 {
                    self.debt_forgiven.get_or_create(&labels).inc_by(facts.forgiven);
                }
                let result = match facts.settlement {
                    Some(Settlement::Settled { estimate, actual }) => {
                        if actual > estimate {
                            self.extra_charged.get_or_create(&labels).inc_by(actual - estimate);
                        } else {
                            self.refunded.get_or_create(&labels).inc_by(estimate - actual);
                        }
                        let error = actual as f64 - estimate as f64;
                        let estimate_labels = EstimateLabels { domain: labels.domain.clone(), rule: labels.rule.clone() };
                        self.estimate_error.get_or_create(&estimate_labels).observe(error);
                        "settled"
                    }
                    Some(Settlement::UnknownRequest) => "unknown_request",
                    Some(Settlement::Unmatched) => "no_request_id",
                    Some(Settlement::Duplicate) => "duplicate",
                    // A report judged without the store (an early denial).
                    None => "ignored",
                };
                self.reports.get_or_create(&report_labels(labels, result)).inc();
            }
            DescriptorKind::IgnoredReport => {
                self.reports.get_or_create(&report_labels(rule(), "ignored")).inc();
            }
            DescriptorKind::Credit => {}
        }
    }

    /// Records a call rejected as invalid. `configured` is whether the
    /// requested domain is configured; only then is it used as a label.
    pub fn record_invalid(&self, domain: &str, configured: bool) {
        let domain = self.labels.domain(if configured { domain } else { UNKNOWN_DOMAIN });
        self.calls.get_or_create(&CallLabels { domain, code: "invalid_argument" }).inc();
    }

    /// Records a store failure and the response the call got.
    pub fn record_store_error(&self, domain: &str, store: &'static str, transient: bool, elapsed: Duration, answer: FailureAnswer) {
        let kind = if transient { "unavailable" } else { "protocol" };
        self.store_errors.get_or_create(&StoreErrorLabels { store, kind }).inc();
        self.store_seconds.get_or_create(&StoreLabels { store, result: "error" }).observe(elapsed.as_secs_f64());
        let (code, answer) = match (transient, answer) {
            (true, FailureAnswer::Unavailable) => ("unavailable", "unavailable"),
            (true, FailureAnswer::Allowed) => ("ok", "allowed"),
            (false, _) => ("internal", "internal"),
        };
        self.calls.get_or_create(&CallLabels { domain: self.labels.domain(domain), code }).inc();
        if transient {
            self.failure_answers.get_or_create(&AnswerLabels { answer }).inc();
        }
    }

    /// Records a configuration load: `Some(domains)` when it succeeded.
    pub fn record_config_load(&self, domains: Option<usize>) {
        match domains {
            Some(domains) => {
                self.config_loads.inc();
                self.config_domains.set(i64::try_from(domains).unwrap_or(i64::MAX));
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
                self.config_loaded_at.set(i64::try_from(now).unwrap_or(i64::MAX));
            }
            None => {
                self.config_load_errors.inc();
            }
        }
    }

    /// Sets the readiness gauge.
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    /// Brings the counters the store keeps itself (evictions, faults) up to
    /// date; called before each scrape.
    pub fn observe_store(&self, store: &Store) {
        let kind = store.kind();
        let mut seen = self.store_seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut grow = |name: &'static str, now: u64, counter: &Counter| {
            let last = seen.entry(name).or_insert(0);
            counter.inc_by(now.saturating_sub(*last));
            *last = now.max(*last);
        };
        if let Store::Memory(memory) = store {
            let stats = memory.stats();
            grow("bucket_evictions", stats.bucket_evictions, &self.evicted_buckets);
            grow("forgiven_units", stats.forgiven_units, &self.eviction_forgiven);
            grow("estimate_evictions", stats.estimate_evictions, &self.evicted_estimates);
        }
        let faults = store.faults();
        let fault = |name: &'static str| self.store_faults.get_or_create(&FaultLabels { store: kind, fault: name }).clone();
        grow("timeout", faults.timeouts.load(Ordering::Relaxed), &fault("timeout"));
        grow("busy", faults.busy.load(Ordering::Relaxed), &fault("busy"));
        grow("unavailable", faults.unavailable.load(Ordering::Relaxed), &fault("unavailable"));
        grow("hold_released", faults.holds_released.load(Ordering::Relaxed), &fault("hold_released"));
        grow("release_failure", faults.release_failures.load(Ordering::Relaxed), &fault("release_failure"));
    }
}

/// Registers `metric` and remembers its name and type.
fn register<M: Metric + TypedMetric>(registry: &mut Registry, families: &mut Vec<(String, MetricType)>, name: &str, help: &str, metric: M) {
    families.push((name.to_owned(), M::TYPE));
    registry.register(name, help, metric);
}

fn report_labels(labels: RuleLabels, result: &'static str) -> ReportLabels {
    ReportLabels { domain: labels.domain, rule: labels.rule, tier: labels.tier, result }
}

fn store_histogram() -> Histogram {
    Histogram::new(STORE_SECONDS)
}

fn estimate_histogram() -> Histogram {
    Histogram::new(ESTIMATE_ERROR_UNITS)
}

/// Counts one call in flight while it lives.
pub struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_count_into_the_family() {
        let family = Family::<CallLabels, Counter>::default();
        let handles = Handles::default();
        let shared: Arc<str> = Arc::from("fikra");
        let call = |domain: &Arc<str>, code: &'static str| {
            let identity = [text_address(domain), code.as_ptr().addr(), code.len(), 0];
            handles.inc(identity, &family, || CallLabels { domain: domain.clone(), code });
        };
        for _ in 0..3 {
            call(&shared, "ok");
        }
        call(&shared, "over_limit");
        // Another copy of the same text counts into the same series.
        call(&Arc::from("fikra"), "ok");
        let count = |code| family.get_or_create(&CallLabels { domain: shared.clone(), code }).get();
        assert_eq!(count("ok"), 4);
        assert_eq!(count("over_limit"), 1);
    }

    #[test]
    fn handles_start_over_past_the_bound() {
        let family = Family::<CallLabels, Counter>::default();
        let handles = Handles::default();
        for index in 0..MAX_HANDLES + 10 {
            let domain: Arc<str> = Arc::from(format!("d{}", index % 7));
            handles.inc([text_address(&domain), index, 0, 0], &family, || CallLabels { domain: domain.clone(), code: "ok" });
            assert!(handles.entries.read().expect("lock").len() <= MAX_HANDLES);
        }
        let total: u64 = (0..7).map(|d| family.get_or_create(&CallLabels { domain: Arc::from(format!("d{d}")), code: "ok" }).get()).sum();
        assert_eq!(total, (MAX_HANDLES + 10) as u64);
    }

    #[test]
    fn label_texts_share_and_stay_bounded() {
        let texts = Metrics::new().labels;
        let first = texts.domain("fikra");
        assert!(Arc::ptr_eq(&first, &texts.domain("fikra")));

        for index in 0..2 * MAX_SHARED_DOMAINS {
            let name = format!("domain-{index}");
            assert_eq!(&*texts.domain(&name), name);
        }
        assert_eq!(texts.domains.read().expect("not poisoned").len(), MAX_SHARED_DOMAINS);
        assert!(Arc::ptr_eq(&first, &texts.domain("fikra")));
    }
}
