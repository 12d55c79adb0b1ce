//! Load generator for the rate-limit service: sends `ShouldRateLimit` calls
//! over a fixed number of HTTP/2 connections with a fixed number in flight,
//! as Envoy multiplexes them, then prints throughput, latency percentiles,
//! outcome counts and the service's CPU time per decision.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry};
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use tonic::transport::{Channel, Endpoint};

/// Sends rate-limit checks at a service and reports what it measured.
#[derive(Debug, Parser)]
#[command(name = "fikra-loadgen", version)]
struct Args {
    /// Service address.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    target: String,
    /// HTTP/2 connections; calls are spread over them round robin.
    #[arg(long, default_value_t = 4, value_parser = connection_count)]
    connections: usize,
    /// Calls in flight at any time.
    #[arg(long, default_value_t = 64, value_parser = in_flight_count)]
    in_flight: usize,
    /// Seconds to run; ignored when --count is set.
    #[arg(long, default_value_t = 10.0, value_parser = positive_seconds)]
    duration: f64,
    /// Total calls to send instead of a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Seconds of unmeasured load before measuring starts [default: 1, or
    /// 0 with --count, so a counted run sends exactly --count calls].
    #[arg(long, value_parser = seconds)]
    warmup: Option<f64>,
    /// Distinct API keys; 1 sends every call for one hot key.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Prefix of the generated API keys, so runs can use fresh buckets.
    #[arg(long, default_value = "load")]
    key_prefix: String,
    /// Descriptors per call.
    #[arg(long, value_enum, default_value_t = Shape::Requests)]
    shape: Shape,
    /// Per-descriptor `hits_addend` of the tokens descriptor.
    #[arg(long, default_value_t = 100)]
    hits: u64,
    /// Rate-limit domain.
    #[arg(long, default_value = "fikra")]
    domain: String,
    /// Calls per second in all, spread evenly over the workers; without it
    /// each worker sends its next call as soon as the last one returns.
    #[arg(long, value_parser = calls_per_second)]
    rate: Option<f64>,
    /// PID of the service, to read its CPU time from /proc/PID/stat.
    #[arg(long)]
    service_pid: Option<u32>,
}

/// Which descriptors each call carries, in the shipped Fikra layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// `[api_key, meter=requests]`.
    Requests,
    /// The requests descriptor plus `[api_key, meter=tokens, request_id]`.
    RequestsTokens,
    /// The requests descriptor plus `[api_key, meter=tokens]`: both buckets
    /// of an API key, without the estimate record a request id leaves.
    Meters,
    /// A usage report `[api_key, meter=tokens, phase=report, request_id]`.
    Reports,
}

#[derive(Default)]
struct Counts {
    allowed: AtomicU64,
    denied: AtomicU64,
    errors: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Arc::new(Args::parse());
    if let Some(pid) = args.service_pid {
        if cpu_seconds(pid).is_none() {
            return Err(format!("cannot read the CPU time of --service-pid {pid} from /proc/{pid}/stat; pass the PID of the running service").into());
        }
    }
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let channel = Endpoint::from_shared(args.target.clone())?.tcp_nodelay(true).connect().await?;
        channels.push(channel);
    }

    let default_warmup = if args.count.is_some() { 0.0 } else { 1.0 };
    let warmup = Duration::from_secs_f64(args.warmup.unwrap_or(default_warmup));
    let run_for = Duration::from_secs_f64(args.duration);
    let started = Instant::now();
    let measure_from = started + warmup;
    let sent = Arc::new(AtomicU64::new(0));
    let counts = Arc::new(Counts::default());
    let cpu_before = Arc::new(std::sync::Mutex::new(None));

    let mut workers = Vec::with_capacity(args.in_flight);
    for worker in 0..args.in_flight {
        let client = RateLimitServiceClient::new(channels[worker % channels.len()].clone());
        let (args, sent, counts, cpu_before) = (args.clone(), sent.clone(), counts.clone(), cpu_before.clone());
        workers.push(tokio::spawn(async move {
            run_worker(worker as u64, client, &args, measure_from, run_for, &sent, &counts, &cpu_before).await
        }));
    }

    let mut latencies: Vec<u32> = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let cpu_after = args.service_pid.and_then(cpu_seconds);
    let elapsed = measure_from.elapsed();
    report(&args, &mut latencies, elapsed, &counts, cpu_before.lock().ok().and_then(|cpu| *cpu), cpu_after);
    Ok(())
}

/// Sends calls until the run ends; returns latencies (µs) measured after warm-up.
#[allow(clippy::too_many_arguments)]
async fn run_worker(
    worker: u64,
    mut client: RateLimitServiceClient<Channel>,
    args: &Args,
    measure_from: Instant,
    run_for: Duration,
    sent: &AtomicU64,
    counts: &Counts,
    cpu_before: &std::sync::Mutex<Option<f64>>,
) -> Vec<u32> {
    let mut latencies = Vec::with_capacity(4096);
    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (worker + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut measuring = false;
    // With a rate, worker w of n sends at offsets w/n of its period, so the
    // calls of all workers are spread evenly.
    let workers = args.in_flight as f64;
    let period = args.rate.map(|rate| Duration::from_secs_f64(workers / rate));
    let mut next_send = period.map(|period| Instant::now() + period.mul_f64(worker as f64 / workers));
    loop {
        if let (Some(at), Some(period)) = (next_send.as_mut(), period) {
            tokio::time::sleep_until(tokio::time::Instant::from_std(*at)).await;
            *at += period;
        }
        let now = Instant::now();
        if !measuring && now >= measure_from {
            measuring = true;
            if let (Ok(mut cpu), Some(pid)) = (cpu_before.lock(), args.service_pid) {
                if cpu.is_none() {
                    *cpu = cpu_seconds(pid);
                }
            }
        }
        if measuring {
            let number = sent.fetch_add(1, Ordering::Relaxed);
            let done = match args.count {
                Some(count) => number >= count,
                None => now >= measure_from + run_for,
            };
            if done {
                return latencies;
            }
        }

        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let key = if args.keys <= 1 { 0 } else { seed % args.keys };
        let request = build_request(args, key, seed);

        let start = Instant::now();
        let result = client.should_rate_limit(request).await;
        let micros = u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX);
        if !measuring {
            continue;
        }
        latencies.push(micros);
        match result {
            Ok(answer) if answer.get_ref().overall_code == Code::OverLimit as i32 => counts.denied.fetch_add(1, Ordering::Relaxed),
            Ok(_) => counts.allowed.fetch_add(1, Ordering::Relaxed),
            Err(_) => counts.errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

fn build_request(args: &Args, key: u64, nonce: u64) -> RateLimitRequest {
    let api_key = format!("{}-{key}", args.key_prefix);
    let entry = |key: &str, value: &str| Entry { key: key.to_owned(), value: value.to_owned() };
    let descriptor = |entries: Vec<Entry>, hits: Option<u64>| RateLimitDescriptor { entries, limit: None, hits_addend: hits, is_negative_hits: false };
    let request_id = format!("{nonce:016x}");

    let descriptors = match args.shape {
        Shape::Requests => vec![descriptor(vec![entry("api_key", &api_key), entry("meter", "requests")], None)],
        Shape::RequestsTokens => vec![
            descriptor(vec![entry("api_key", &api_key), entry("meter", "requests")], None),
            descriptor(
                vec![entry("api_key", &api_key), entry("meter", "tokens"), entry("request_id", &request_id)],
                Some(args.hits),
            ),
        ],
        Shape::Meters => vec![
            descriptor(vec![entry("api_key", &api_key), entry("meter", "requests")], None),
            descriptor(vec![entry("api_key", &api_key), entry("meter", "tokens")], Some(args.hits)),
        ],
        Shape::Reports => vec![descriptor(
            vec![entry("api_key", &api_key), entry("meter", "tokens"), entry("phase", "report"), entry("request_id", &request_id)],
            Some(args.hits),
        )],
    };
    RateLimitRequest { domain: args.domain.clone(), descriptors, hits_addend: 0 }
}

/// The maximum number of connections a run opens.
const MAX_CONNECTIONS: usize = 1024;
/// The maximum number of calls a run keeps in flight, each with its own task.
const MAX_IN_FLIGHT: usize = 65_536;
/// The maximum run or warm-up, in seconds (one day).
const MAX_SECONDS: f64 = 86_400.0;
/// The minimum rate in calls per second, so that every worker's period
/// stays within a day even at the maximum calls in flight.
const MIN_RATE: f64 = 1.0;

/// Parses a count of connections.
fn connection_count(text: &str) -> Result<usize, String> {
    count_between(text, MAX_CONNECTIONS)
}

/// Parses a count of calls in flight.
fn in_flight_count(text: &str) -> Result<usize, String> {
    count_between(text, MAX_IN_FLIGHT)
}

/// Parses a whole number from 1 to `max`.
fn count_between(text: &str, max: usize) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(count) if (1..=max).contains(&count) => Ok(count),
        Ok(_) => Err(format!("expected a whole number from 1 to {max}")),
        Err(error) => Err(format!("{error}; expected a whole number from 1 to {max}")),
    }
}

/// Parses a number of seconds, from 0 to a day.
fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if (0.0..=MAX_SECONDS).contains(&value) => Ok(value),
        Ok(_) => Err(format!("expected a number of seconds from 0 to {MAX_SECONDS}")),
        Err(error) => Err(format!("{error}; expected a number of seconds such as 2 or 0.5")),
    }
}

/// Parses a number of seconds above 0, up to a day.
fn positive_seconds(text: &str) -> Result<f64, String> {
    match seconds(text)? {
        value if value > 0.0 => Ok(value),
        _ => Err(format!("expected a number of seconds above 0, up to {MAX_SECONDS}")),
    }
}

/// Parses a rate of at least [`MIN_RATE`] calls per second.
fn calls_per_second(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= MIN_RATE => Ok(value),
        Ok(_) => Err(format!("expected a finite rate of at least {MIN_RATE} calls per second")),
        Err(error) => Err(format!("{error}; expected calls per second such as 5000")),
    }
}

/// User plus system CPU seconds of a process, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

/// The kernel's USER_HZ, from `getconf CLK_TCK` (100 on Linux when unknown).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

fn report(args: &Args, latencies: &mut [u32], elapsed: Duration, counts: &Counts, cpu_before: Option<f64>, cpu_after: Option<f64>) {
    latencies.sort_unstable();
    let total = latencies.len() as u64;
    let percentile = |p: f64| -> u32 {
        if latencies.is_empty() {
            return 0;
        }
        let index = ((p / 100.0) * (latencies.len() as f64 - 1.0)).round() as usize;
        latencies[index.min(latencies.len() - 1)]
    };
    let throughput = total as f64 / elapsed.as_secs_f64();
    let cpu_per_decision_us = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if total > 0 => Some((after - before) / total as f64 * 1e6),
        _ => None,
    };
    let (allowed, denied, errors) = (
        counts.allowed.load(Ordering::Relaxed),
        counts.denied.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
    );

    println!("target        {}  shape {:?}  keys {}  connections {}  in flight {}", args.target, args.shape, args.keys, args.connections, args.in_flight);
    println!("decisions     {total} in {:.2} s: {throughput:.0}/s", elapsed.as_secs_f64());
    println!("outcomes      allowed {allowed}  denied {denied}  errors {errors}");
    println!(
        "latency (µs)  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        percentile(50.0),
        percentile(90.0),
        percentile(99.0),
        percentile(99.9),
        latencies.last().copied().unwrap_or(0)
    );
    match cpu_per_decision_us {
        Some(cpu) => println!("service CPU   {cpu:.2} µs per decision"),
        None if total == 0 => println!("service CPU   not measured (no call completed after the warm-up; run longer)"),
        None if args.service_pid.is_some() => println!("service CPU   not measured (the service's /proc/PID/stat became unreadable)"),
        None => println!("service CPU   not measured (pass --service-pid)"),
    }
    let summary = serde_json::json!({
        "target": args.target,
        "shape": format!("{:?}", args.shape),
        "keys": args.keys,
        "connections": args.connections,
        "in_flight": args.in_flight,
        "rate": args.rate,
        "decisions": total,
        "seconds": elapsed.as_secs_f64(),
        "throughput": throughput.round(),
        "allowed": allowed,
        "denied": denied,
        "errors": errors,
        "p50_us": percentile(50.0),
        "p90_us": percentile(90.0),
        "p99_us": percentile(99.0),
        "p999_us": percentile(99.9),
        "max_us": latencies.last().copied().unwrap_or(0),
        "service_cpu_us_per_decision": cpu_per_decision_us,
    });
    println!("{summary}");
}
