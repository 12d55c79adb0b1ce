//! Micro-benchmarks of the decision path's pure parts: bucket arithmetic,
//! key hashing, a whole decision on the in-memory store, and the answer.
//!
//! Run with `cargo bench --bench decision`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use fikra_ratelimit::answer;
use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::config;
use fikra_ratelimit::limiter::bucket::{BucketParams, BucketState};
use fikra_ratelimit::limiter::keys;
use fikra_ratelimit::limiter::{CheckRequest, Descriptor, Entry, Limiter, LimiterSettings, Outcome};
use fikra_ratelimit::store::{MemoryStore, Store};

fn bucket(c: &mut Criterion) {
    let params = BucketParams::new(40_000, 60_000, 40_000).expect("exact");
    c.bench_function("bucket_refill_check_charge", |b| {
        let mut state = BucketState::full(&params, 0);
        let mut now = 0u64;
        b.iter(|| {
            now += 1;
            state.refill(&params, black_box(now));
            if state.fits(&params, 100) {
                state.charge(&params, 100);
            }
            black_box(state.remaining(&params))
        });
    });
}

fn key_hashing(c: &mut Criterion) {
    let long = "k".repeat(8 * 1024);
    c.bench_function("bucket_key_short", |b| {
        b.iter(|| keys::bucket_key("fikra", &[("api_key", black_box("sk-0123456789abcdef")), ("meter", "requests")], true))
    });
    c.bench_function("bucket_key_8k_value", |b| {
        b.iter(|| keys::bucket_key("fikra", &[("api_key", black_box(long.as_str())), ("meter", "requests")], true))
    });
}

fn entry(key: &str, value: &str) -> Entry {
    Entry { key: key.to_owned(), value: value.to_owned() }
}

fn decision(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let domain = config::parse(include_str!("../deploy/config/fikra.yaml"), "fikra.yaml").expect("valid");
    let limits = config::Limits { domains: [(domain.name.clone(), Arc::new(domain))].into_iter().collect() };
    let clock = Clock::manual(0);
    let store = Store::Memory(MemoryStore::new(clock.clone()));
    let limiter = Limiter::new(limits, store, LimiterSettings::default());
    let mut n = 0u64;
    // The clock moves 1 ms per call, so each of the 10,000 keys refills for
    // 10 s between its calls. Every call is then allowed, as under a steady
    // load within the limits, however many iterations criterion runs.
    let request = |n: u64| {
        clock.advance_ms(1);
        let key = format!("key-{}", n % 10_000);
        CheckRequest {
            domain: "fikra".to_owned(),
            descriptors: vec![
                Descriptor { entries: vec![entry("api_key", &key), entry("meter", "requests")], ..Descriptor::default() },
                Descriptor {
                    entries: vec![entry("api_key", &key), entry("meter", "tokens"), entry("request_id", &n.to_string())],
                    hits: Some(100),
                    ..Descriptor::default()
                },
            ],
            hits: 0,
        }
    };

    c.bench_function("decide_requests_and_tokens_memory", |b| {
        b.iter(|| {
            n += 1;
            let decision = runtime.block_on(limiter.decide(&request(n))).expect("decision");
            black_box(answer::build(&decision))
        });
    });
    for _ in 0..10_000 {
        n += 1;
        let decision = runtime.block_on(limiter.decide(&request(n))).expect("decision");
        assert_eq!(decision.outcome, Outcome::Allowed, "call {n} was denied, so the benchmark measured denials");
    }

    // The response builder alone: the six headers of an allowed call, and
    // the headers and JSON body of a denial.
    let check = |key: &str| CheckRequest {
        domain: "fikra".to_owned(),
        descriptors: vec![Descriptor { entries: vec![entry("api_key", key), entry("meter", "requests")], ..Descriptor::default() }],
        hits: 0,
    };
    let allowed = runtime.block_on(limiter.decide(&check("answer-allowed"))).expect("decision");
    let mut denied = allowed.clone();
    for _ in 0..31 {
        denied = runtime.block_on(limiter.decide(&check("answer-denied"))).expect("decision");
    }
    assert!(answer::build(&denied).body.is_some(), "the 31st call is denied");
    c.bench_function("answer_allowed", |b| b.iter(|| black_box(answer::build(black_box(&allowed)))));
    c.bench_function("answer_denied", |b| b.iter(|| black_box(answer::build(black_box(&denied)))));
}

criterion_group!(benches, bucket, key_hashing, decision);
criterion_main!(benches);
