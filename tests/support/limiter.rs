//! Drives a limiter on the in-memory store with a manual clock.
#![allow(dead_code)]

use fikra_ratelimit::answer::{self, Answer};
use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::config;
use fikra_ratelimit::limiter::{
    CheckRequest, Decision, Descriptor, Entry, LimitOverride, Limiter, LimiterError, LimiterSettings, Outcome,
};
use fikra_ratelimit::store::{MemoryStore, Store};

/// A limiter over `yaml` on a fresh in-memory store, with its clock.
pub fn limiter(yaml: &str) -> (Limiter, Clock) {
    limiter_with(yaml, LimiterSettings::default())
}

/// A limiter over `yaml` with `settings` on a fresh in-memory store.
pub fn limiter_with(yaml: &str, settings: LimiterSettings) -> (Limiter, Clock) {
    let clock = Clock::manual(1_000_000);
    let limiter = Limiter::new(limits(yaml), Store::Memory(MemoryStore::new(clock.clone())), settings);
    (limiter, clock)
}

/// Limits from one YAML text.
pub fn limits(yaml: &str) -> config::Limits {
    let domain = config::parse(yaml, "test.yaml").unwrap_or_else(|problems| panic!("test config is invalid: {problems:?}"));
    config::Limits { domains: [(domain.name.clone(), std::sync::Arc::new(domain))].into_iter().collect() }
}

/// The shared field-report configuration.
pub fn llm() -> (Limiter, Clock) {
    limiter(include_str!("../fixtures/llm.yaml"))
}

/// A descriptor from `key=value` pairs.
pub fn desc(entries: &[(&str, &str)]) -> Descriptor {
    Descriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: (*k).to_owned(), value: (*v).to_owned() }).collect(),
        ..Descriptor::default()
    }
}

/// The same descriptor with its own `hits_addend`.
pub fn with_hits(mut descriptor: Descriptor, hits: u64) -> Descriptor {
    descriptor.hits = Some(hits);
    descriptor
}

/// The same descriptor with Envoy's limit override.
pub fn with_override(mut descriptor: Descriptor, requests_per_unit: u32, unit: i32) -> Descriptor {
    descriptor.limit = Some(LimitOverride { requests_per_unit, unit, multiplier: None });
    descriptor
}

pub fn request(domain: &str, descriptors: Vec<Descriptor>) -> CheckRequest {
    CheckRequest { domain: domain.to_owned(), descriptors, hits: 0 }
}

/// A decided call with its answer.
pub struct Call {
    pub decision: Decision,
    pub answer: Answer,
}

impl Call {
    pub fn ok(&self) -> bool {
        self.decision.outcome == Outcome::Allowed
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.answer.headers.iter().find(|(key, _)| *key == name).map(|(_, value)| value.as_str())
    }

    /// A numeric header.
    pub fn number(&self, name: &str) -> u64 {
        let value = self.header(name).unwrap_or_else(|| panic!("header {name} missing in {:?}", self.answer.headers));
        value.parse().unwrap_or_else(|_| panic!("header {name} is not a number: {value}"))
    }
}

pub async fn call(limiter: &Limiter, request: CheckRequest) -> Call {
    let decision = limiter.decide(&request).await.expect("decision");
    let answer = answer::build(&decision);
    Call { decision, answer }
}

pub async fn try_call(limiter: &Limiter, request: CheckRequest) -> Result<Call, LimiterError> {
    let decision = limiter.decide(&request).await?;
    let answer = answer::build(&decision);
    Ok(Call { decision, answer })
}

/// `[api_key=K, kind=rpm]`, optionally with a tier.
pub fn rpm(key: &str, tier: Option<&str>) -> Descriptor {
    match tier {
        Some(tier) => desc(&[("api_key", key), ("tier", tier), ("kind", "rpm")]),
        None => desc(&[("api_key", key), ("kind", "rpm")]),
    }
}

/// `[api_key=K, kind=tpm]` with a per-descriptor cost.
pub fn tpm(key: &str, hits: u64) -> Descriptor {
    with_hits(desc(&[("api_key", key), ("kind", "tpm")]), hits)
}
