//! The start-up check of Redis settings, read from the log of the real
//! `fikra-ratelimit` binary connected to a test `redis-server` started with
//! the settings under test.
//!
//! The test servers run without persistence (`save ""`, `appendonly no`)
//! unless a test turns it on.

#[path = "support/redis.rs"]
mod redis_server;
#[path = "support/service_process.rs"]
mod service_process;

use redis_server::RedisServer;
use service_process::ServiceProcess;

const ALLKEYS_WARNING: &str = "maxmemory-policy is allkeys-lru: once Redis reaches maxmemory";
const PERSISTENCE_WARNING: &str = "Redis persistence is off (appendonly is no and save is empty)";
const SKIPPED_CHECK: &str = "Skipped the check of Redis settings because CONFIG GET failed";
const SAFE_SETTINGS: &str = "Redis memory and persistence settings are safe for buckets and account records";

/// Starts the service on a `redis-server` with `redis_args` and returns the
/// service's log once it serves.
async fn service_log(redis_args: &'static [&'static str]) -> String {
    let redis = tokio::task::spawn_blocking(move || RedisServer::start_with(redis_args)).await.expect("start redis-server");
    let service = ServiceProcess::start(&redis.url()).await;
    service.log()
}

/// Returns the log lines that contain `text`.
fn lines_with<'a>(log: &'a str, text: &str) -> Vec<&'a str> {
    log.lines().filter(|line| line.contains(text)).collect()
}

#[tokio::test]
async fn allkeys_policy_warns_about_accounts() {
    let log = service_log(&["--maxmemory-policy", "allkeys-lru", "--appendonly", "yes"]).await;

    let warnings = lines_with(&log, ALLKEYS_WARNING);
    assert_eq!(warnings.len(), 1, "expected one allkeys-lru warning in the log:\n{log}");
    let warning = warnings[0];
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("evict account records"), "{warning}");
    assert!(warning.contains("set maxmemory-policy to volatile-ttl or volatile-lru"), "{warning}");
    assert!(warning.contains("allkeys-lru"), "{warning}");
    assert!(lines_with(&log, PERSISTENCE_WARNING).is_empty(), "appendonly is on:\n{log}");
    assert!(lines_with(&log, SAFE_SETTINGS).is_empty(), "{log}");
}

#[tokio::test]
async fn persistence_off_warns_about_restart() {
    let log = service_log(&["--maxmemory-policy", "volatile-lru"]).await;

    let warnings = lines_with(&log, PERSISTENCE_WARNING);
    assert_eq!(warnings.len(), 1, "expected one persistence warning in the log:\n{log}");
    let warning = warnings[0];
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("account tiers and overrides would be lost on a restart"), "{warning}");
    assert!(warning.contains("set appendonly yes, or a save schedule"), "{warning}");
    assert!(lines_with(&log, "maxmemory-policy is").is_empty(), "volatile-lru is safe:\n{log}");
}

#[tokio::test]
async fn safe_settings_log_no_warning() {
    let log = service_log(&["--maxmemory-policy", "volatile-ttl", "--save", "3600 1"]).await;

    assert_eq!(lines_with(&log, SAFE_SETTINGS).len(), 1, "expected the safe settings line:\n{log}");
    assert!(lines_with(&log, PERSISTENCE_WARNING).is_empty(), "{log}");
    assert!(lines_with(&log, "maxmemory-policy is").is_empty(), "{log}");
}

#[tokio::test]
async fn disabled_config_skips_check() {
    // Managed services often rename or disable CONFIG like this.
    let log = service_log(&["--rename-command", "CONFIG", ""]).await;

    let skipped = lines_with(&log, SKIPPED_CHECK);
    assert_eq!(skipped.len(), 1, "expected one skipped-check line in the log:\n{log}");
    assert!(skipped[0].contains("INFO"), "{}", skipped[0]);
    assert!(lines_with(&log, PERSISTENCE_WARNING).is_empty(), "{log}");
    assert!(lines_with(&log, SAFE_SETTINGS).is_empty(), "{log}");
}
