//! C16: a Redis that freezes (SIGSTOP) and then dies (SIGKILL) while
//! checks arrive at a steady rate with Envoy's 20 ms deadline. Every answer
//! comes by the deadline plus 50 ms and follows the failure mode, store work
//! in flight and memory stay bounded, and correct answers return within 5 s
//! of Redis. It is the only test in this binary, so the process's memory
//! and CPU are its own.

#[path = "support/checks.rs"]
mod checks;
#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/service.rs"]
mod service;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use checks::{FIKRA, Timed, fikra_check, timed_call};
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::store::redis::RedisOptions;
use fikra_ratelimit::store::{RedisStore, Store};
use redis_server::RedisServer;
use service::{Service, limits};
use tonic::transport::Channel;

/// Envoy's default deadline for a check.
const ENVOY_DEADLINE: Duration = Duration::from_millis(20);

/// How late an answer may be past the caller's deadline.
const LATE_ALLOWANCE: Duration = Duration::from_millis(50);

/// Checks sent per second.
const RATE: u32 = 200;

/// Bound on store calls in flight.
const MAX_IN_FLIGHT: usize = 64;

fn options() -> RedisOptions {
    RedisOptions { max_in_flight: MAX_IN_FLIGHT, ..RedisOptions::default() }
}

/// Resident memory of this process in KiB, from `/proc/self/status`.
fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// One check sent by [`Load`], with when it was sent.
struct Sent {
    at: Instant,
    answer: Timed,
}

/// Sends a Fikra check for a new API key every `1 / RATE` seconds, each
/// with Envoy's deadline, and keeps every answer.
struct Load {
    sent: Arc<Mutex<Vec<Sent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(client: RateLimitServiceClient<Channel>, prefix: &'static str) -> Self {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let record = sent.clone();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1) / RATE);
            for n in 0_u64.. {
                ticks.tick().await;
                let mut client = client.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    let at = Instant::now();
                    let answer = timed_call(&mut client, fikra_check(&format!("{prefix}-{n}"), 100), ENVOY_DEADLINE).await;
                    record.lock().expect("the answers").push(Sent { at, answer });
                });
            }
        });
        Self { sent, task }
    }

    /// Stops sending, waits for the answers in flight and returns them all.
    async fn stop(self) -> Vec<Sent> {
        self.task.abort();
        tokio::time::sleep(ENVOY_DEADLINE + LATE_ALLOWANCE + Duration::from_millis(200)).await;
        std::mem::take(&mut *self.sent.lock().expect("the answers"))
    }
}

/// A task that sleeps 5 ms at a time and records each oversleep above
/// 10 ms: moments when this process ran none of its tasks, as on a machine
/// loaded by other work.
struct Canary {
    stalls: Arc<Mutex<Vec<(Instant, Instant)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Canary {
    fn start() -> Self {
        let stalls = Arc::new(Mutex::new(Vec::new()));
        let record = stalls.clone();
        let task = tokio::spawn(async move {
            loop {
                let before = Instant::now();
                tokio::time::sleep(Duration::from_millis(5)).await;
                if before.elapsed() > Duration::from_millis(15) {
                    record.lock().expect("the stalls").push((before, Instant::now()));
                }
            }
        });
        Self { stalls, task }
    }

    /// Whether a stall overlapped the time from `start` to `end`.
    fn stalled_between(&self, start: Instant, end: Instant) -> bool {
        self.stalls.lock().expect("the stalls").iter().any(|(from, to)| *from < end && *to > start)
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c16_frozen_redis_answers_by_deadline() {
    let mut redis = RedisServer::start();
    let store = RedisStore::connect_with(&redis.url(), &options()).await.expect("connect");
    let service = Service::start(limits(FIKRA), Store::Redis(store.clone())).await;
    let canary = Canary::start();
    let load = Load::start(service.client().await, "c16");

    tokio::time::sleep(Duration::from_secs(1)).await;
    let memory_before = resident_kib();
    let frozen = Instant::now();
    tokio::task::block_in_place(|| redis.pause());

    // While Redis is frozen, store work in flight stays under the bound.
    let mut most_in_flight = 0;
    while frozen.elapsed() < Duration::from_secs(3) {
        most_in_flight = most_in_flight.max(store.in_flight());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let memory_frozen = resident_kib();
    // The fixture's calls block their thread, so they leave the runtime's
    // other thread to the service.
    tokio::task::block_in_place(|| redis.kill());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarting = Instant::now();
    tokio::task::block_in_place(|| redis.restart());
    let returned = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = load.stop().await;

    // Each answer must come by the deadline plus 50 ms and be the failure
    // mode during the outage and a decision once Redis is back. During the
    // outage the failure mode is the service's UNAVAILABLE, or tonic's
    // CANCELLED when the service's answer was not out by the deadline:
    // Envoy applies `failure_mode_deny` to both. Any other miss is excused
    // only when the whole process stalled meanwhile, because the machine
    // was busy with other work.
    let outage_start = frozen + Duration::from_millis(100);
    let recovered = sent
        .iter()
        .find(|sent| sent.at >= returned && sent.answer.is_decided_ok())
        .map(|sent| sent.at - returned)
        .expect("a correct answer after Redis returned");
    assert!(recovered <= Duration::from_secs(5), "first correct answer {recovered:?} after Redis returned");
    let settled = returned + recovered + Duration::from_millis(500);

    // Once Redis is back, a call that Redis answers too slowly for the
    // 15 ms budget (a loaded machine) still gets the failure mode; at most
    // one in ten may.
    let mut outage = 0;
    let mut unavailable = 0;
    let mut healthy = 0;
    let mut healthy_failures = 0;
    let mut excused = Vec::new();
    for sent in &sent {
        let answer = &sent.answer;
        let failure_mode = answer.is_unavailable() || answer.is_cancelled_at_deadline();
        let in_outage = sent.at >= outage_start && sent.at < restarting;
        outage += usize::from(in_outage);
        unavailable += usize::from(in_outage && answer.is_unavailable());
        let after_recovery = sent.at >= settled;
        healthy += usize::from(after_recovery);
        healthy_failures += usize::from(after_recovery && failure_mode);
        let expected = if in_outage {
            failure_mode
        } else if after_recovery {
            answer.is_decided_ok() || failure_mode
        } else {
            true
        };
        if expected && answer.elapsed <= ENVOY_DEADLINE + LATE_ALLOWANCE {
            continue;
        }
        assert!(
            canary.stalled_between(sent.at, sent.at + answer.elapsed),
            "a check sent {:?} after the freeze got {answer:?} while the process ran",
            sent.at.saturating_duration_since(frozen)
        );
        excused.push(answer);
    }
    eprintln!("{} of {} answers missed their expectation during process stalls", excused.len(), sent.len());
    assert!(outage as u32 >= 3 * RATE / 2, "only {outage} checks were sent during the outage");
    assert!(unavailable * 2 >= outage, "only {unavailable} of {outage} outage answers were UNAVAILABLE");
    eprintln!("{unavailable} of {outage} outage answers were UNAVAILABLE, the others CANCELLED at the deadline");
    assert!(excused.len() * 4 <= sent.len(), "{} of {} answers needed excusing", excused.len(), sent.len());
    assert!(
        healthy_failures * 10 <= healthy,
        "{healthy_failures} of {healthy} answers after the recovery got the failure mode"
    );

    assert!(most_in_flight <= MAX_IN_FLIGHT, "{most_in_flight} store calls in flight");
    let growth = memory_frozen.saturating_sub(memory_before);
    assert!(growth < 20 * 1024, "memory grew {growth} KiB while Redis was frozen");
    assert!(store.faults().timeouts.load(Ordering::Relaxed) > 0, "timeouts are counted");
}
