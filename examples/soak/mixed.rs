//! The mixed soak: a steady load of hot keys, ledgers, many quiet keys and
//! malformed or odd calls, each checked against what it must get.
//!
//! - *Hot keys* send 2.5 times their limit of 10 per second. Token-bucket
//!   math bounds what each may get over the time it sent: at most
//!   `10 + 10 × elapsed` (elapsed from its first send to its last response),
//!   and at least one less than `10 + 10 × elapsed` over its last send minus
//!   its first response. Any admission above the upper bound is over-admission.
//! - *Ledgers* are buckets of 10^9 tokens that refill 1 token per year, so
//!   their remaining count must equal 10^9 minus exactly what the load
//!   charged: estimates, settlements (more and less than estimated),
//!   duplicate reports, reports for unknown request ids, lost reports and
//!   credits.
//! - *Quiet keys* send the Fikra check and report far below their limits,
//!   so every check must be allowed.
//! - *Odd calls* must each get one exact answer: unknown domains and empty
//!   descriptors are allowed, costs beyond any capacity and over-long values
//!   are denied with `x-should-retry: false`, gateway faults get
//!   INVALID_ARGUMENT and an oversized message OUT_OF_RANGE.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor};
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tokio::time::MissedTickBehavior;
use tonic::transport::Channel;

use crate::process::Server;
use crate::stats::Tally;

/// The soak's own domain, next to the shipped `fikra` domain.
pub const SOAK_CONFIG: &str = "\
domain: soak
entry_roles: {phase: phase, request_id: request_id}
descriptors:
  - key: hot
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: ledger
    meter: tokens
    reports: true
    rate_limit: {unit: year, requests_per_unit: 1, burst: 1000000000}
";

const HOT_LIMIT: u64 = 10;
const LEDGER_CAPACITY: u64 = 1_000_000_000;

/// Load shape of one run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub duration: Duration,
    pub hot_keys: usize,
    /// Calls per second of each hot key.
    pub hot_rate: u32,
    pub ledgers: usize,
    /// Operations per second of each ledger.
    pub ledger_rate: u32,
    pub quiet_keys: usize,
    /// Quiet checks per second over all quiet keys (each followed by a report).
    pub quiet_rate: u32,
    /// Odd calls per second.
    pub odd_rate: u32,
}

/// Results of one run.
pub struct Outcome {
    pub tally: Arc<Tally>,
    pub hot: Vec<HotResult>,
    pub ledger_mismatches: u64,
    pub ledger_checks: u64,
    pub quiet_denied: u64,
    pub quiet_checks: u64,
}

/// One hot key's admissions against the token-bucket bounds.
#[derive(Debug, Clone, Copy)]
pub struct HotResult {
    pub sent: u64,
    pub admitted: u64,
    pub upper: u64,
    pub lower: u64,
}

/// Runs the load for `shape.duration` against `server`.
pub async fn run(server: &Server, shape: Shape) -> anyhow::Result<Outcome> {
    let tally = Arc::new(Tally::new());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let mut hot_tasks = Vec::new();
    for n in 0..shape.hot_keys {
        let client = server.client().await?;
        hot_tasks.push(tokio::spawn(hot_key(client, format!("H{n}"), shape.hot_rate, tally.clone(), stop.clone())));
    }
    let ledger_mismatches = Arc::new(AtomicU64::new(0));
    let ledger_checks = Arc::new(AtomicU64::new(0));
    let mut other_tasks = Vec::new();
    for n in 0..shape.ledgers {
        let client = server.client().await?;
        let task = ledger(client, n as u64, shape.ledger_rate, tally.clone(), stop.clone(), ledger_mismatches.clone(), ledger_checks.clone());
        other_tasks.push(tokio::spawn(task));
    }
    let quiet_denied = Arc::new(AtomicU64::new(0));
    let quiet_checks = Arc::new(AtomicU64::new(0));
    let quiet_workers = 8;
    for worker in 0..quiet_workers {
        let client = server.client().await?;
        let keys: Vec<usize> = (worker..shape.quiet_keys).step_by(quiet_workers).collect();
        let rate = (shape.quiet_rate / quiet_workers as u32).max(1);
        let task = quiet(client, keys, rate, tally.clone(), stop.clone(), quiet_denied.clone(), quiet_checks.clone());
        other_tasks.push(tokio::spawn(task));
    }
    let client = server.client().await?;
    other_tasks.push(tokio::spawn(odd(client, shape.odd_rate, tally.clone(), stop.clone())));

    let mut next_report = Duration::from_secs(60);
    while started.elapsed() < shape.duration {
        tokio::time::sleep(Duration::from_secs(1).min(shape.duration.saturating_sub(started.elapsed()))).await;
        if started.elapsed() >= next_report {
            next_report += Duration::from_secs(60);
            println!(
                "[{:>5} s] calls {} allowed {} denied {} errors {} unexpected {} ledger mismatches {} | {} | {}",
                started.elapsed().as_secs(),
                Tally::get(&tally.calls),
                Tally::get(&tally.allowed),
                Tally::get(&tally.denied),
                Tally::get(&tally.errors),
                Tally::get(&tally.unexpected),
                ledger_mismatches.load(Ordering::Relaxed),
                server.memory(),
                tally.latency.summary(),
            );
        }
    }
    stop.store(true, Ordering::Relaxed);

    let mut hot = Vec::new();
    for task in hot_tasks {
        hot.push(task.await?);
    }
    for task in other_tasks {
        task.await?;
    }
    Ok(Outcome {
        tally,
        hot,
        ledger_mismatches: ledger_mismatches.load(Ordering::Relaxed),
        ledger_checks: ledger_checks.load(Ordering::Relaxed),
        quiet_denied: quiet_denied.load(Ordering::Relaxed),
        quiet_checks: quiet_checks.load(Ordering::Relaxed),
    })
}

/// Sends one call, counts it and returns the response or the error.
async fn send(client: &mut RateLimitServiceClient<Channel>, request: RateLimitRequest, tally: &Tally) -> Result<RateLimitResponse, tonic::Status> {
    let started = Instant::now();
    let result = client.should_rate_limit(request).await.map(tonic::Response::into_inner);
    tally.latency.record(started.elapsed());
    Tally::add(&tally.calls);
    match &result {
        Ok(answer) if answer.overall_code == Code::Ok as i32 => Tally::add(&tally.allowed),
        Ok(answer) if answer.overall_code == Code::OverLimit as i32 => Tally::add(&tally.denied),
        Ok(answer) => {
            Tally::add(&tally.unexpected);
            tally.note(format!("overall_code {} is neither OK nor OVER_LIMIT", answer.overall_code));
        }
        Err(_) => {}
    }
    result
}

/// Sends a call that must get a response, and counts an error otherwise.
async fn answer(client: &mut RateLimitServiceClient<Channel>, request: RateLimitRequest, tally: &Tally) -> Option<RateLimitResponse> {
    match send(client, request, tally).await {
        Ok(answer) => Some(answer),
        Err(status) => {
            Tally::add(&tally.errors);
            tally.note(format!("gRPC error {:?}: {}", status.code(), status.message()));
            None
        }
    }
}

fn ticker(per_second: u32) -> tokio::time::Interval {
    let period = Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)));
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

async fn hot_key(mut client: RateLimitServiceClient<Channel>, key: String, rate: u32, tally: Arc<Tally>, stop: Arc<AtomicBool>) -> HotResult {
    let mut interval = ticker(rate);
    let (mut sent, mut admitted) = (0, 0);
    let (mut first_send, mut first_answer) = (None, None);
    let (mut last_send, mut last_answer) = (Instant::now(), Instant::now());
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        let request = request("soak", vec![descriptor(&[("hot", &key)], None)], 0);
        last_send = Instant::now();
        first_send.get_or_insert(last_send);
        let result = answer(&mut client, request, &tally).await;
        last_answer = Instant::now();
        first_answer.get_or_insert(last_answer);
        sent += 1;
        admitted += u64::from(result.is_some_and(|a| a.overall_code == Code::Ok as i32));
    }
    let (Some(first_send), Some(first_answer)) = (first_send, first_answer) else {
        return HotResult { sent, admitted, upper: 0, lower: 0 };
    };
    // Redis reads its clock in whole milliseconds, so allow one more.
    let outer_ms = last_answer.duration_since(first_send).as_millis() as u64 + 1;
    let inner_ms = last_send.saturating_duration_since(first_answer).as_millis().saturating_sub(1) as u64;
    let upper = HOT_LIMIT + HOT_LIMIT * outer_ms / 1000;
    let lower = (HOT_LIMIT + HOT_LIMIT * inner_ms / 1000).saturating_sub(1);
    HotResult { sent, admitted, upper, lower }
}

#[allow(clippy::too_many_arguments)]
async fn ledger(
    mut client: RateLimitServiceClient<Channel>,
    id: u64,
    rate: u32,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    mismatches: Arc<AtomicU64>,
    checks: Arc<AtomicU64>,
) {
    let key = format!("L{id}");
    let mut random = Random(0x5eed_0000 + id);
    let mut used: u64 = 0;
    let mut interval = ticker(rate);
    let mut step: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        step += 1;
        let request_id = format!("{key}-r{step}");
        let estimate = 1 + random.below(5_000);
        match random.below(20) {
            // A report for a request id no check charged: charged in full.
            0 => {
                let amount = random.below(3_000);
                let report = descriptor(&[("ledger", &key), ("phase", "report"), ("request_id", &request_id)], Some(amount));
                if answer(&mut client, request("soak", vec![report], 0), &tally).await.is_some() {
                    used += amount;
                }
            }
            // A check whose report never comes: the estimate stays charged.
            1 => {
                let check = descriptor(&[("ledger", &key), ("request_id", &request_id)], Some(estimate));
                if let Some(a) = answer(&mut client, request("soak", vec![check], 0), &tally).await {
                    if a.overall_code == Code::Ok as i32 {
                        used += estimate;
                    }
                }
            }
            // A credit (is_negative_hits), never above capacity.
            2 => {
                let amount = random.below(2_000);
                let mut credit = descriptor(&[("ledger", &key)], Some(amount));
                credit.is_negative_hits = true;
                if answer(&mut client, request("soak", vec![credit], 0), &tally).await.is_some() {
                    used = used.saturating_sub(amount);
                }
            }
            // A check, its report (more or less than the estimate), and
            // sometimes a duplicate report that must change nothing.
            choice => {
                let check = descriptor(&[("ledger", &key), ("request_id", &request_id)], Some(estimate));
                let Some(a) = answer(&mut client, request("soak", vec![check], 0), &tally).await else { continue };
                if a.overall_code != Code::Ok as i32 {
                    Tally::add(&tally.unexpected);
                    tally.note(format!("ledger {key} denied a check with {used} of {LEDGER_CAPACITY} used"));
                    continue;
                }
                used += estimate;
                let amount = random.below(2 * estimate + 1);
                let reports = if choice == 3 { 2 } else { 1 };
                for _ in 0..reports {
                    let report = descriptor(&[("ledger", &key), ("phase", "report"), ("request_id", &request_id)], Some(amount));
                    if answer(&mut client, request("soak", vec![report], 0), &tally).await.is_none() {
                        break;
                    }
                }
                used = used - estimate + amount;
            }
        }

        if step % 50 == 0 {
            let peek = descriptor(&[("ledger", &key)], Some(0));
            if let Some(a) = answer(&mut client, request("soak", vec![peek], 0), &tally).await {
                checks.fetch_add(1, Ordering::Relaxed);
                let remaining = header(&a, "x-ratelimit-remaining-tokens").and_then(|v| v.parse::<u64>().ok());
                if remaining != Some(LEDGER_CAPACITY - used) {
                    mismatches.fetch_add(1, Ordering::Relaxed);
                    tally.note(format!("ledger {key}: remaining {remaining:?}, expected {}", LEDGER_CAPACITY - used));
                }
            }
        }
    }
}

async fn quiet(
    mut client: RateLimitServiceClient<Channel>,
    keys: Vec<usize>,
    rate: u32,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    denied: Arc<AtomicU64>,
    checks: Arc<AtomicU64>,
) {
    const TIERS: [Option<&str>; 3] = [None, Some("unverified"), Some("trusted")];
    let mut random = Random(0x9e37_79b9 ^ keys.first().copied().unwrap_or(0) as u64);
    let mut interval = ticker(rate);
    let mut step: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        step += 1;
        let key = format!("soak-quiet-{}", keys[(step as usize) % keys.len()]);
        let request_id = format!("{key}-{step}");
        let tier = TIERS[random.below(3) as usize];
        let estimate = 1 + random.below(1_000);
        let with_tier = |mut entries: Vec<(&'static str, String)>| {
            if let Some(tier) = tier {
                entries.insert(1, ("tier", tier.to_owned()));
            }
            entries
        };
        let requests = with_tier(vec![("api_key", key.clone()), ("meter", "requests".to_owned())]);
        let tokens = with_tier(vec![("api_key", key.clone()), ("meter", "tokens".to_owned()), ("request_id", request_id.clone())]);
        let check = request("fikra", vec![owned_descriptor(&requests, None), owned_descriptor(&tokens, Some(estimate))], 1);
        let Some(a) = answer(&mut client, check, &tally).await else { continue };
        checks.fetch_add(1, Ordering::Relaxed);
        if a.overall_code != Code::Ok as i32 {
            denied.fetch_add(1, Ordering::Relaxed);
            tally.note(format!("quiet key {key} was denied"));
            continue;
        }
        let report = with_tier(vec![
            ("api_key", key.clone()),
            ("meter", "tokens".to_owned()),
            ("phase", "report".to_owned()),
            ("request_id", request_id),
        ]);
        let amount = random.below(estimate + 1);
        answer(&mut client, request("fikra", vec![owned_descriptor(&report, Some(amount))], 0), &tally).await;
    }
}

/// Sends the odd and malformed calls in turn.
async fn odd(mut client: RateLimitServiceClient<Channel>, rate: u32, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let odd_values: Vec<String> = (0..64).map(odd_value).collect();
    let over_long = "v".repeat(16 * 1024 + 1);
    let oversized = "x".repeat(5 * 1024 * 1024);
    let mut interval = ticker(rate);
    let mut step: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        interval.tick().await;
        step += 1;
        let requests = |key: &str| descriptor(&[("api_key", key), ("meter", "requests")], None);
        let (name, call, expected) = match step % 12 {
            0 => ("unknown domain", request("fikra-typo", vec![requests("K")], 0), Expect::AllowedWithoutLimit),
            1 => {
                let value = &odd_values[(step / 12 % 64) as usize];
                ("odd 8 KiB value", request("fikra", vec![requests(value)], 0), Expect::Allowed)
            }
            2 => ("request cost u32::MAX", request("fikra", vec![requests("big-cost")], u32::MAX), Expect::NeverFits),
            3 => {
                let tokens = descriptor(&[("api_key", "big-cost"), ("meter", "tokens")], Some(u64::MAX));
                ("descriptor cost u64::MAX", request("fikra", vec![tokens], 0), Expect::NeverFits)
            }
            4 => ("value over the bound", request("fikra", vec![requests(&over_long)], 0), Expect::NeverFits),
            5 => ("empty domain", request("", vec![requests("K")], 0), Expect::Error(tonic::Code::InvalidArgument)),
            6 => ("no descriptors", request("fikra", vec![], 0), Expect::Error(tonic::Code::InvalidArgument)),
            7 => {
                let many = (0..65).map(|_| requests("many")).collect();
                ("65 descriptors", request("fikra", many, 0), Expect::Error(tonic::Code::InvalidArgument))
            }
            8 => ("descriptor without entries", request("fikra", vec![descriptor(&[], None)], 0), Expect::AllowedWithoutLimit),
            9 => ("empty entry key", request("fikra", vec![descriptor(&[("", "v")], None)], 0), Expect::Error(tonic::Code::InvalidArgument)),
            10 if step % 240 == 10 => {
                ("5 MiB message", request("fikra", vec![requests(&oversized)], 0), Expect::Error(tonic::Code::OutOfRange))
            }
            _ => {
                let peek = descriptor(&[("api_key", "peek"), ("meter", "tokens")], Some(0));
                ("check only", request("fikra", vec![peek], 0), Expect::Allowed)
            }
        };
        let result = send(&mut client, call, &tally).await;
        if let Some(problem) = expected.judge(&result) {
            Tally::add(&tally.unexpected);
            tally.note(format!("{name}: {problem}"));
        }
        if let Err(status) = &result {
            if matches!(expected, Expect::Error(code) if code == status.code()) {
                Tally::add(&tally.expected_errors);
            } else {
                Tally::add(&tally.errors);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Allowed,
    AllowedWithoutLimit,
    /// Denied with `x-should-retry: false`.
    NeverFits,
    Error(tonic::Code),
}

impl Expect {
    /// Describes what is wrong with `result`, if anything.
    fn judge(self, result: &Result<RateLimitResponse, tonic::Status>) -> Option<String> {
        match (self, result) {
            (Self::Error(code), Err(status)) if status.code() == code => None,
            (Self::Error(code), other) => Some(format!("expected {code:?}, got {}", show(other))),
            (_, Err(status)) => Some(format!("expected an answer, got {:?}: {}", status.code(), status.message())),
            (Self::Allowed, Ok(a)) if a.overall_code == Code::Ok as i32 => None,
            (Self::AllowedWithoutLimit, Ok(a))
                if a.overall_code == Code::Ok as i32 && a.statuses.iter().all(|s| s.current_limit.is_none()) =>
            {
                None
            }
            (Self::NeverFits, Ok(a))
                if a.overall_code == Code::OverLimit as i32 && header(a, "x-should-retry") == Some("false") && !a.raw_body.is_empty() =>
            {
                None
            }
            (expected, other) => Some(format!("expected {expected:?}, got {}", show(other))),
        }
    }
}

fn show(result: &Result<RateLimitResponse, tonic::Status>) -> String {
    match result {
        Ok(a) => format!("overall_code {} with {} headers", a.overall_code, a.response_headers_to_add.len()),
        Err(status) => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// Returns an 8 KiB value with spaces, control characters, braces, multi-byte
/// UTF-8 and U+0000, different for each `n`.
pub fn odd_value(n: usize) -> String {
    let mut value = format!("odd {n} with spaces\n\t{{braces}}:_ é 日本 🙂 \u{0} ");
    while value.len() < 8 * 1024 - 1 {
        value.push('x');
    }
    value.push(char::from(b'a' + (n % 26) as u8));
    value
}

fn header<'a>(answer: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    answer.response_headers_to_add.iter().find(|h| h.key == name).map(|h| h.value.as_str())
}

pub fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| rate_limit_descriptor::Entry { key: (*key).to_owned(), value: (*value).to_owned() })
            .collect(),
        limit: None,
        hits_addend: hits,
        is_negative_hits: false,
    }
}

fn owned_descriptor(entries: &[(&str, String)], hits: Option<u64>) -> RateLimitDescriptor {
    let pairs: Vec<(&str, &str)> = entries.iter().map(|(k, v)| (*k, v.as_str())).collect();
    descriptor(&pairs, hits)
}

pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest { domain: domain.to_owned(), descriptors, hits_addend: hits }
}

/// SplitMix64: a small deterministic generator, so runs repeat.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}
