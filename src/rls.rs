//! The `ShouldRateLimit` handler: protocol to domain, decide, domain to
//! protocol, and the one place where errors become gRPC statuses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost_types::{Duration as ProtoDuration, Struct, Value, value::Kind as ValueKind};
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::answer;
use crate::metrics::{FailureAnswer, Metrics};
use crate::limiter::{CheckRequest, Decision, Descriptor, Entry, LimitOverride, Limiter, LimiterError, Outcome};
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit};
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use crate::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use crate::store::FailureMode;
use crate::telemetry::Throttle;

pub mod wire;

/// Most of a caller's deadline kept back from the store call, for decoding,
/// scheduling, the answer and the network.
const DEADLINE_RESERVE_MAX: Duration = Duration::from_millis(50);

/// Serves `ShouldRateLimit` from a [`Limiter`].
#[derive(Clone)]
pub struct RateLimitHandler {
    limiter: Limiter,
    metrics: Metrics,
    unknown_domain_log: Arc<Throttle>,
    store_error_log: Arc<Throttle>,
}

impl RateLimitHandler {
    pub fn new(limiter: Limiter, metrics: Metrics) -> Self {
        Self { limiter, metrics, unknown_domain_log: Arc::new(Throttle::new()), store_error_log: Arc::new(Throttle::new()) }
    }
}

#[tonic::async_trait]
impl RateLimitService for RateLimitHandler {
    async fn should_rate_limit(&self, request: Request<RateLimitRequest>) -> Result<Response<RateLimitResponse>, Status> {
        let timeout = request.metadata().get("grpc-timeout").and_then(|value| value.to_str().ok()).and_then(parse_grpc_timeout);
        let reply = self.decide(timeout, request.into_inner()).await?;
        Ok(Response::new(reply.into_message()))
    }
}

impl RateLimitHandler {
    /// Decides one call. `timeout` is what is left of the caller's
    /// `grpc-timeout`, which bounds the store call.
    pub async fn decide(&self, timeout: Option<Duration>, request: RateLimitRequest) -> Result<Reply, Status> {
        let _in_flight = self.metrics.in_flight();
        let started = Instant::now();
        let budget = timeout.map(store_budget);
        let request = translate(request);
        match self.limiter.decide_within(&request, budget).await {
            Ok(decision) => {
                self.metrics.record_decision(&request.domain, self.limiter.store().kind(), &decision);
                if decision.unknown_domain {
                    if let Some(suppressed) = self.unknown_domain_log.allow() {
                        warn!(rls.domain = %request.domain, suppressed, "Unknown domain; allowing the call without limits");
                    }
                }
                debug!(
                    rls.domain = %request.domain,
                    rls.descriptors = request.descriptors.len(),
                    rls.allowed = decision.outcome == Outcome::Allowed,
                    rls.rules = %rule_labels(&decision),
                    "Decided"
                );
                Ok(Reply::Decided(decision))
            }
            Err(LimiterError::Store(store))
                if store.is_transient() && self.limiter.settings().failure_mode == FailureMode::Allow =>
            {
                let kind = self.limiter.store().kind();
                self.metrics.record_store_error(&request.domain, kind, true, started.elapsed(), FailureAnswer::Allowed);
                if let Some(suppressed) = self.store_error_log.allow() {
                    warn!(rls.domain = %request.domain, error = %store, suppressed, "Store unavailable; allowing the call (fail-open)");
                }
                Ok(Reply::FailOpen(request.descriptors.len()))
            }
            Err(error) => {
                self.count_error(&error, &request.domain, started);
                Err(self.rescue(error, &request.domain))
            }
        }
    }
}

/// The answer to a call, before it is written.
pub enum Reply {
    /// The limiter decided the call.
    Decided(Decision),
    /// The store failed under fail-open: this many descriptors, all allowed.
    FailOpen(usize),
}

impl Reply {
    /// Builds the protocol message.
    pub fn into_message(self) -> RateLimitResponse {
        match self {
            Reply::Decided(decision) => respond(&decision),
            Reply::FailOpen(descriptors) => fail_open(descriptors),
        }
    }
}

/// Returns the store's share of the caller's deadline: the time left less
/// a quarter of it (at most 50 ms), so the answer leaves before the caller
/// gives up. Envoy's 20 ms leave the store 15 ms.
fn store_budget(timeout: Duration) -> Duration {
    timeout - (timeout / 4).min(DEADLINE_RESERVE_MAX)
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit, `H`, `M`,
/// `S`, `m`, `u` or `n` (gRPC over HTTP/2). `None` for an invalid value.
pub fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let digits = text.get(..text.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    let timeout = match &text[digits.len()..] {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    };
    Some(timeout)
}

/// The fail-open answer: allowed, an OK status without a limit per
/// descriptor, and no rate-limit headers, since nothing was counted.
fn fail_open(descriptors: usize) -> RateLimitResponse {
    let status = DescriptorStatus { code: Code::Ok as i32, ..Default::default() };
    RateLimitResponse { overall_code: Code::Ok as i32, statuses: vec![status; descriptors], ..Default::default() }
}

impl RateLimitHandler {
    /// Counts a call that got no decision.
    fn count_error(&self, error: &LimiterError, domain: &str, started: Instant) {
        match error {
            LimiterError::Invalid(_) => self.metrics.record_invalid(domain, self.limiter.limits().domain(domain).is_some()),
            LimiterError::Store(store) => {
                let kind = self.limiter.store().kind();
                self.metrics.record_store_error(domain, kind, store.is_transient(), started.elapsed(), FailureAnswer::Unavailable)
            }
        }
    }

    /// Maps every failure to a gRPC status.
    fn rescue(&self, error: LimiterError, domain: &str) -> Status {
        match error {
            // The gateway built a wrong call: tell it which field, never
            // UNKNOWN, which Envoy would treat as "allowed".
            LimiterError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
            // The store did not answer: UNAVAILABLE lets Envoy's
            // `failure_mode_deny` decide what the client gets.
            LimiterError::Store(store) if store.is_transient() => {
                if let Some(suppressed) = self.store_error_log.allow() {
                    warn!(rls.domain = %domain, error = %store, suppressed, "Store unavailable");
                }
                Status::unavailable("rate-limit store unavailable")
            }
            LimiterError::Store(store) => {
                if let Some(suppressed) = self.store_error_log.allow() {
                    warn!(rls.domain = %domain, error = %store, suppressed, "Store returned an unreadable reply");
                }
                Status::internal("rate-limit store error")
            }
        }
    }
}

/// Converts the protocol request, normalising its quirks once.
pub fn translate(request: RateLimitRequest) -> CheckRequest {
    CheckRequest {
        domain: request.domain,
        descriptors: request.descriptors.into_iter().map(descriptor).collect(),
        hits: request.hits_addend,
    }
}

fn descriptor(descriptor: RateLimitDescriptor) -> Descriptor {
    Descriptor {
        entries: descriptor.entries.into_iter().map(|e| Entry { key: e.key, value: e.value }).collect(),
        limit: descriptor.limit.map(|limit| LimitOverride {
            requests_per_unit: limit.requests_per_unit,
            unit: limit.unit,
            multiplier: limit.unit_multiplier,
        }),
        // A present wrapper holding 0 means "check only"; absent means the
        // request-level cost applies.
        hits: descriptor.hits_addend,
        negative: descriptor.is_negative_hits,
    }
}

/// Builds the protocol answer; never `overall_code` UNKNOWN, which Envoy
/// would let through.
pub fn respond(decision: &Decision) -> RateLimitResponse {
    let answer = answer::build(decision);
    let statuses = decision.statuses.iter().map(status).collect();
    let dynamic_metadata = (decision.shadow_denials() > 0).then(|| shadow_metadata(decision));
    RateLimitResponse {
        overall_code: code(decision.outcome) as i32,
        statuses,
        response_headers_to_add: answer
            .headers
            .into_iter()
            .map(|(key, value)| HeaderValue { key: key.to_owned(), value, raw_value: Vec::new() })
            .collect(),
        request_headers_to_add: Vec::new(),
        raw_body: answer.body.map(String::into_bytes).unwrap_or_default(),
        dynamic_metadata,
        quota: None,
    }
}

fn code(outcome: Outcome) -> Code {
    match outcome {
        Outcome::Allowed => Code::Ok,
        Outcome::Denied => Code::OverLimit,
    }
}

fn status(status: &crate::limiter::DescriptorStatus) -> DescriptorStatus {
    let Some(limit) = &status.limit else {
        return DescriptorStatus { code: code(status.outcome) as i32, ..Default::default() };
    };
    DescriptorStatus {
        code: code(status.outcome) as i32,
        current_limit: Some(RateLimit {
            name: limit.name.clone(),
            requests_per_unit: saturate(limit.per_window),
            unit: unit(limit.unit) as i32,
            unit_multiplier: (limit.multiplier != 1).then_some(limit.multiplier),
        }),
        limit_remaining: saturate(status.remaining),
        duration_until_reset: Some(duration(status.reset_ms)),
        quota: None,
    }
}

/// Values on the wire saturate at the uint32 maximum, never wrap.
fn saturate(value: u64) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

fn unit(unit: crate::config::Unit) -> Unit {
    use crate::config::Unit as U;
    match unit {
        U::Second => Unit::Second,
        U::Minute => Unit::Minute,
        U::Hour => Unit::Hour,
        U::Day => Unit::Day,
        U::Week => Unit::Week,
        U::Month => Unit::Month,
        U::Year => Unit::Year,
    }
}

fn duration(ms: u64) -> ProtoDuration {
    ProtoDuration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from(ms % 1000 * 1_000_000).unwrap_or(0),
    }
}

/// Marks shadowed would-be denials for Envoy's formatters and access logs,
/// in the `envoy.filters.http.ratelimit` namespace:
///
/// - `shadow_denied`: how many descriptors a shadowed limit would have denied;
/// - `shadow_denied_descriptors`: their indexes in the request, in order;
/// - `shadow_denied_rules`: their rule labels from the configuration,
///   joined with `,` (never a descriptor value).
fn shadow_metadata(decision: &Decision) -> Struct {
    let mut indexes = Vec::new();
    let mut rules: Vec<&str> = Vec::new();
    for (index, status) in decision.statuses.iter().enumerate() {
        if !status.shadow_denied {
            continue;
        }
        indexes.push(Value { kind: Some(ValueKind::NumberValue(index as f64)) });
        let rule = status.facts.rule.as_deref().unwrap_or(crate::metrics::OVERRIDE_RULE);
        if !rules.contains(&rule) {
            rules.push(rule);
        }
    }
    let count = indexes.len() as f64;
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("shadow_denied".to_owned(), Value { kind: Some(ValueKind::NumberValue(count)) });
    fields.insert(
        "shadow_denied_descriptors".to_owned(),
        Value { kind: Some(ValueKind::ListValue(prost_types::ListValue { values: indexes })) },
    );
    fields.insert("shadow_denied_rules".to_owned(), Value { kind: Some(ValueKind::StringValue(rules.join(","))) });
    Struct { fields }
}

/// The rule labels of a decision's descriptors for the debug log, `-` for a
/// descriptor without a rule.
fn rule_labels(decision: &Decision) -> String {
    let labels: Vec<&str> = decision.statuses.iter().map(|status| status.facts.rule.as_deref().unwrap_or("-")).collect();
    labels.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_every_unit() {
        assert_eq!(parse_grpc_timeout("20m"), Some(Duration::from_millis(20)));
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("500u"), Some(Duration::from_micros(500)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn invalid_grpc_timeouts_are_ignored() {
        for text in ["", "m", "20", "20x", "123456789m", "-1m", "1.5S", "2é"] {
            assert_eq!(parse_grpc_timeout(text), None, "{text:?}");
        }
    }

    #[test]
    fn store_budget_keeps_a_reserve() {
        assert_eq!(store_budget(Duration::from_millis(20)), Duration::from_millis(15), "a quarter of 20 ms");
        assert_eq!(store_budget(Duration::from_millis(100)), Duration::from_millis(75), "a quarter of 100 ms");
        assert_eq!(store_budget(Duration::from_secs(1)), Duration::from_millis(950), "at most 50 ms");
    }

    #[test]
    fn fail_open_answer_has_no_headers() {
        let answer = fail_open(2);
        assert_eq!(answer.overall_code, Code::Ok as i32);
        assert_eq!(answer.statuses.len(), 2);
        assert!(answer.statuses.iter().all(|status| status.current_limit.is_none()));
        assert!(answer.response_headers_to_add.is_empty());
        assert!(answer.raw_body.is_empty());
    }
}
