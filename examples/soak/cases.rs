//! Two scale cases through the real server: many distinct keys on a slow
//! limit, and 8 KiB values with odd characters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;

use crate::mixed::{descriptor, odd_value, request};
use crate::process::Server;
use crate::redis::RedisServer;

/// One limit of 1 per hour for every distinct `api_key`.
pub const HOURLY_CONFIG: &str = "\
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: hour, requests_per_unit: 1}
";

/// The field-report tiers, requests as `kind=rpm` and tokens as `kind=tpm`.
pub const TIERS_CONFIG: &str = include_str!("../../tests/fixtures/llm.yaml");

/// Failed checks of a case; every check is printed as it runs.
pub struct Verdict {
    pub failures: Vec<String>,
}

impl Verdict {
    fn expect(&mut self, what: &str, ok: bool) {
        println!("  {} {what}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failures.push(what.to_owned());
        }
    }
}

/// Sends one request for each of `keys` distinct keys, then K1, K77777
/// (when there are that many keys) and a new key.
///
/// `bounded` means the server's in-memory store holds fewer buckets than
/// there are keys, so the early keys may have been evicted and come back
/// full. Otherwise they must stay denied.
pub async fn many_keys(server: &Server, redis: Option<&RedisServer>, keys: u64, bounded: bool) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict { failures: Vec::new() };
    let start_memory = server.memory();
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(1));
    let allowed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut client = server.client().await?;
        let (next, allowed, errors) = (next.clone(), allowed.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n > keys {
                    return;
                }
                let call = request("llm", vec![descriptor(&[("api_key", &format!("K{n}"))], None)], 0);
                match client.should_rate_limit(call).await {
                    Ok(answer) if answer.get_ref().overall_code == Code::Ok as i32 => {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed();
    println!(
        "many keys: {keys} first requests in {:.1} s ({:.0} per second), {} allowed, {} errors",
        elapsed.as_secs_f64(),
        keys as f64 / elapsed.as_secs_f64(),
        allowed.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed)
    );
    verdict.expect("every first request is allowed", allowed.load(Ordering::Relaxed) == keys);
    verdict.expect("no gRPC errors", errors.load(Ordering::Relaxed) == 0);

    let mut client = server.client().await?;
    let mut code_of = async |key: String| -> anyhow::Result<i32> {
        let call = request("llm", vec![descriptor(&[("api_key", &key)], None)], 0);
        Ok(client.should_rate_limit(call).await?.into_inner().overall_code)
    };
    let again = [1, 77_777].into_iter().filter(|n| *n <= keys);
    for n in again {
        let code = code_of(format!("K{n}")).await?;
        if bounded {
            println!("  info K{n} again: {} (the bounded store may have evicted it)", name(code));
        } else {
            verdict.expect(&format!("K{n} again is OVER_LIMIT (got {})", name(code)), code == Code::OverLimit as i32);
        }
    }
    let fresh = code_of(format!("K{}", keys + 1)).await?;
    verdict.expect(&format!("K{} is OK (got {})", keys + 1, name(fresh)), fresh == Code::Ok as i32);

    let end_memory = server.memory();
    println!("  service memory: start {start_memory}, end {end_memory}");
    if let Some(redis) = redis {
        let count: u64 = redis.cli(&["DBSIZE"]).parse().unwrap_or(0);
        println!("  Redis keys: {count}; {}", redis_memory(redis));
        verdict.expect(&format!("one Redis key per distinct API key ({count})"), count == keys + 1);
        let sample = redis.cli(&["--scan"]);
        let mut checked = 0;
        let mut worst = 0;
        for key in sample.lines().take(1_000) {
            let ttl: i64 = redis.cli(&["PTTL", key]).parse().unwrap_or(-3);
            worst = worst.max(ttl);
            if ttl <= 0 || ttl > 3_600_000 + 2_000 {
                verdict.expect(&format!("{key} has PTTL {ttl} within (0, 3602000]"), false);
            }
            checked += 1;
        }
        println!("  checked the PTTL of {checked} keys; the largest is {worst} ms (bound 3,602,000)");
    }
    Ok(verdict)
}

/// Sends 31 requests for an 8 KiB odd value V and one for V′, checks the
/// Redis key names, then times short against long values.
pub async fn odd_values(server: &Server, redis: Option<&RedisServer>) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict { failures: Vec::new() };
    let mut client = server.client().await?;
    let value = odd_value(0);
    let mut other = value.clone();
    other.pop();
    other.push('b');
    assert_eq!(value.len(), 8 * 1024);

    let rpm = |key: &str| descriptor(&[("api_key", key), ("kind", "rpm")], None);
    let tpm = |key: &str| descriptor(&[("api_key", key), ("kind", "tpm")], Some(100));
    let mut allowed = 0;
    for n in 0..31 {
        let descriptors = if n == 0 { vec![rpm(&value), tpm(&value)] } else { vec![rpm(&value)] };
        let answer = client.should_rate_limit(request("llm", descriptors, 0)).await?.into_inner();
        allowed += u32::from(answer.overall_code == Code::Ok as i32);
    }
    verdict.expect(&format!("V gets 30 of 31 ({allowed})"), allowed == 30);
    let answer = client.should_rate_limit(request("llm", vec![rpm(&other)], 0)).await?.into_inner();
    verdict.expect("V′ is OK: it has its own counter", answer.overall_code == Code::Ok as i32);

    if let Some(redis) = redis {
        let keys = redis.keys("*");
        println!("  Redis keys: {keys:?}");
        verdict.expect("two bucket hashes: V's and V′'s", keys.len() == 2);
        verdict.expect("no key name carries the value", keys.iter().all(|k| !k.contains("odd") && !k.contains("spaces")));
        verdict.expect("every key name is at most 128 bytes", keys.iter().all(|k| k.len() <= 128));
        let fields: Vec<String> = keys.iter().map(|key| redis.cli(&["HKEYS", key])).collect();
        let counts: Vec<usize> = fields.iter().map(|names| names.lines().count()).collect();
        println!("  buckets per hash: {counts:?}");
        verdict.expect(
            "V's two buckets share one hash (one cluster slot) and V′ has another",
            counts.contains(&2) && counts.contains(&1),
        );
        verdict.expect("no field name carries the value", fields.iter().all(|f| !f.contains("odd") && !f.contains("spaces")));
    }

    // Long values cost about the same as short ones: both are hashed to a
    // fixed-length key. A limit far above the load keeps every call allowed.
    let calls = 5_000;
    for (label, key) in [("short value", "short-key".to_owned()), ("8 KiB value", odd_value(1))] {
        let started = Instant::now();
        for n in 0..calls {
            let call = request("llm", vec![descriptor(&[("api_key", &key), ("kind", "tpm")], Some(n % 2))], 0);
            client.should_rate_limit(call).await?;
        }
        let per_call = started.elapsed() / calls as u32;
        println!("  {label}: {calls} sequential calls, {:.1} µs per call", per_call.as_secs_f64() * 1e6);
    }
    Ok(verdict)
}

fn name(code: i32) -> &'static str {
    match code {
        c if c == Code::Ok as i32 => "OK",
        c if c == Code::OverLimit as i32 => "OVER_LIMIT",
        _ => "UNKNOWN",
    }
}

/// `used_memory_human` and `used_memory_peak_human` from INFO memory.
pub fn redis_memory(redis: &RedisServer) -> String {
    let info = redis.cli(&["INFO", "memory"]);
    let field = |name: &str| info.lines().find_map(|l| l.strip_prefix(name)).unwrap_or("?").trim().to_owned();
    format!("Redis used_memory {} (peak {})", field("used_memory_human:"), field("used_memory_peak_human:"))
}
