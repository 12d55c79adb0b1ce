//! The load generator against the real server: a counted run reports every
//! call and the service's CPU, and invalid options are rejected with the
//! option and the fix named.

#[path = "support/service.rs"]
mod service;

use fikra_ratelimit::clock::Clock;
use fikra_ratelimit::store::{MemoryStore, Store};
use service::{Service, limits};
use tokio::process::Command;

const CONFIG: &str = "
domain: fikra
descriptors:
  - key: api_key
    descriptors:
      - key: meter
        value: requests
        rate_limit: {unit: minute, requests_per_unit: 3}
";

/// Runs the load generator with `args` and returns its exit success,
/// stdout and stderr.
async fn loadgen(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fikra-loadgen")).args(args).output().await.expect("run fikra-loadgen");
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test]
async fn counted_run_reports_every_call() {
    let server = Service::start(limits(CONFIG), Store::Memory(MemoryStore::new(Clock::monotonic()))).await;
    let target = format!("http://{}", server.addr);
    // The server runs in this process, so its CPU is this process's.
    let pid = std::process::id().to_string();
    let args = ["--target", &target, "--count", "300", "--keys", "20", "--connections", "2", "--in-flight", "8", "--service-pid", &pid];

    let (success, stdout, stderr) = loadgen(&args).await;

    assert!(success, "fikra-loadgen failed: {stderr}");
    assert!(stdout.contains("latency (µs)  p50"), "{stdout}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().expect("a summary line")).expect("JSON summary");
    assert_eq!(summary["decisions"], 300, "{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    let allowed = summary["allowed"].as_u64().expect("allowed count");
    let denied = summary["denied"].as_u64().expect("denied count");
    assert_eq!(allowed + denied, 300, "{summary}");
    // 20 keys of 3 requests each admit at most 60 calls.
    assert!(allowed <= 60, "{summary}");
    assert!(denied >= 240, "{summary}");
    assert!(summary["service_cpu_us_per_decision"].is_number(), "{summary}");
}

#[tokio::test]
async fn invalid_options_are_rejected() {
    let cases: [(&[&str], &str); 11] = [
        (&["--connections", "0"], "from 1 to 1024"),
        (&["--in-flight", "0"], "from 1 to 65536"),
        (&["--in-flight", "18446744073709551615"], "from 1 to 65536"),
        (&["--keys", "0"], "0 is not in 1.."),
        (&["--count", "0"], "0 is not in 1.."),
        (&["--duration", "0"], "above 0"),
        (&["--duration", "1e300"], "from 0 to 86400"),
        (&["--warmup", "inf"], "from 0 to 86400"),
        (&["--rate", "0"], "at least 1 calls per second"),
        (&["--rate", "1e-20"], "at least 1 calls per second"),
        (&["--service-pid", "4294967295"], "pass the PID of the running service"),
    ];
    for (args, expected) in cases {
        let (success, _, stderr) = loadgen(&[&["--target", "http://127.0.0.1:9"], args].concat()).await;
        assert!(!success, "{args:?} was accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
