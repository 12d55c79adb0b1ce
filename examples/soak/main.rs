//! Soak and scale runs of the real service binary against a private
//! `redis-server` on loopback (or the in-memory store).
//!
//! ```sh
//! cargo build --release
//! cargo run --release --example soak -- --scenario mixed --seconds 1800
//! cargo run --release --example soak -- --scenario many-keys --keys 100000
//! cargo run --release --example soak -- --scenario odd-values
//! ```
//!
//! Every run starts its own `redis-server` on a free port of 127.0.0.1 and
//! its own service process, stops both by PID when it ends, and exits
//! non-zero when any check failed. BENCHMARKS.md records results.

#[path = "../../tests/support/redis.rs"]
mod redis;

mod cases;
mod mixed;
mod process;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::process::Server;
use crate::redis::RedisServer;
use crate::stats::Tally;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// A steady mixed load, checked against exact counts.
    Mixed,
    /// Distinct keys on a limit of 1 per hour.
    ManyKeys,
    /// 8 KiB values with odd characters.
    OddValues,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    Redis,
    Memory,
}

/// Soak and scale runs against the fikra-ratelimit binary.
#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum, default_value_t = Scenario::Mixed)]
    scenario: Scenario,
    /// Length of the mixed load, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Store of the service's buckets.
    #[arg(long, value_enum, default_value_t = StoreKind::Redis)]
    store: StoreKind,
    /// The service binary.
    #[arg(long, default_value = "target/release/fikra-ratelimit")]
    server: PathBuf,
    /// An extra argument for `serve`, such as `--max-buckets=50000`; repeat for more.
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// Distinct keys of the many-keys run.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Set when `--server-arg` bounds the in-memory store below `--keys`:
    /// early keys of the many-keys run may then come back full.
    #[arg(long)]
    bounded: bool,
    /// Hot keys of the mixed load, each sending `--hot-rate` calls per second.
    #[arg(long, default_value_t = 8)]
    hot_keys: usize,
    #[arg(long, default_value_t = 25)]
    hot_rate: u32,
    /// Ledgers of the mixed load, each doing `--ledger-rate` operations per second.
    #[arg(long, default_value_t = 4)]
    ledgers: usize,
    #[arg(long, default_value_t = 20)]
    ledger_rate: u32,
    /// Quiet keys of the mixed load and their checks per second in total.
    #[arg(long, default_value_t = 5_000)]
    quiet_keys: usize,
    #[arg(long, default_value_t = 200)]
    quiet_rate: u32,
    /// Odd and malformed calls per second.
    #[arg(long, default_value_t = 40)]
    odd_rate: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("soak: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let redis = (args.store == StoreKind::Redis).then(RedisServer::start);
    let url = redis.as_ref().map(RedisServer::url);
    let configs: Vec<(&str, String)> = match args.scenario {
        Scenario::Mixed => vec![
            ("fikra.yaml", include_str!("../../deploy/config/fikra.yaml").to_owned()),
            ("soak.yaml", mixed::SOAK_CONFIG.to_owned()),
        ],
        Scenario::ManyKeys => vec![("llm.yaml", cases::HOURLY_CONFIG.to_owned())],
        Scenario::OddValues => vec![("llm.yaml", cases::TIERS_CONFIG.to_owned())],
    };
    let server = Server::start(&args.server, &configs, url.as_deref(), &args.server_args).await?;
    println!(
        "soak: scenario {:?}, store {:?}, service pid {}, log {}",
        args.scenario,
        args.store,
        server.pid(),
        server.log_path().display()
    );

    let passed = match args.scenario {
        Scenario::Mixed => mixed_run(&server, redis.as_ref(), &args).await?,
        Scenario::ManyKeys => finish(cases::many_keys(&server, redis.as_ref(), args.keys, args.bounded).await?),
        Scenario::OddValues => finish(cases::odd_values(&server, redis.as_ref()).await?),
    };
    let panics = server.log().matches("panicked").count();
    println!("service log: {panics} panics");
    Ok(passed && panics == 0)
}

fn finish(verdict: cases::Verdict) -> bool {
    if verdict.failures.is_empty() {
        println!("result: PASS");
        true
    } else {
        println!("result: FAIL ({} checks failed)", verdict.failures.len());
        false
    }
}

async fn mixed_run(server: &Server, redis: Option<&RedisServer>, args: &Args) -> anyhow::Result<bool> {
    let shape = mixed::Shape {
        duration: Duration::from_secs(args.seconds),
        hot_keys: args.hot_keys,
        hot_rate: args.hot_rate,
        ledgers: args.ledgers,
        ledger_rate: args.ledger_rate,
        quiet_keys: args.quiet_keys,
        quiet_rate: args.quiet_rate,
        odd_rate: args.odd_rate,
    };
    let start_memory = server.memory();
    let outcome = mixed::run(server, shape).await?;
    let end_memory = server.memory();
    let tally = &outcome.tally;

    let sent: u64 = outcome.hot.iter().map(|h| h.sent).sum();
    let admitted: u64 = outcome.hot.iter().map(|h| h.admitted).sum();
    let upper: u64 = outcome.hot.iter().map(|h| h.upper).sum();
    let lower: u64 = outcome.hot.iter().map(|h| h.lower).sum();
    let over: u64 = outcome.hot.iter().map(|h| h.admitted.saturating_sub(h.upper)).sum();
    let under: u64 = outcome.hot.iter().map(|h| h.lower.saturating_sub(h.admitted)).sum();
    let seconds = args.seconds as f64;

    println!("--- soak summary ---");
    println!("duration: {} s", args.seconds);
    println!(
        "decisions: {} ({:.0} per second): {} allowed, {} denied",
        Tally::get(&tally.calls),
        Tally::get(&tally.calls) as f64 / seconds,
        Tally::get(&tally.allowed),
        Tally::get(&tally.denied)
    );
    println!(
        "errors: {} unexpected gRPC errors, {} wrong answers, {} requested errors (malformed calls)",
        Tally::get(&tally.errors),
        Tally::get(&tally.unexpected),
        Tally::get(&tally.expected_errors)
    );
    println!("latency: {}", tally.latency.summary());
    println!("hot keys: {sent} sent, {admitted} admitted; token-bucket bounds [{lower}, {upper}]; over-admission {over}, under-admission {under}");
    println!("ledgers: {} exact-balance checks, {} mismatches", outcome.ledger_checks, outcome.ledger_mismatches);
    println!("quiet keys: {} checks, {} denied (0 expected)", outcome.quiet_checks, outcome.quiet_denied);
    println!("service memory: start {start_memory}, end {end_memory}");
    if let Some(redis) = redis {
        println!("Redis keys at the end: {}; {}", redis.cli(&["DBSIZE"]), cases::redis_memory(redis));
    }
    for problem in tally.problems() {
        println!("problem: {problem}");
    }

    let passed = Tally::get(&tally.errors) == 0
        && Tally::get(&tally.unexpected) == 0
        && over == 0
        && under == 0
        && outcome.ledger_mismatches == 0
        && outcome.quiet_denied == 0;
    println!("result: {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}
