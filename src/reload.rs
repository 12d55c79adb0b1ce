//! Hot reload of the configuration files.
//!
//! The watcher polls: every interval it reads the YAML files under the
//! configured paths (following symlinks, skipping names that start with a
//! dot, as the loader does) and hashes their names and contents. Polling
//! detects every way a file can change, including the way Kubernetes updates a
//! mounted ConfigMap: it writes a new timestamped directory and swaps the
//! `..data` symlink to it in one rename, which file-event watchers on the
//! old paths miss.
//!
//! When the hash changes, the files are loaded and validated. A valid
//! configuration replaces the running one at once, and calls in flight
//! finish on the old one. An invalid one is logged, problem by problem,
//! and counted, and the running configuration stays. A file that is gone
//! takes its domain with it. If the files change again while they are
//! being loaded (a swap in progress), the load is dropped and the next poll
//! tries again.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::config::{self, Limits};
use crate::limiter::Limiter;
use crate::metrics::Metrics;

/// How often the files are read when no interval is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// A hash of the configuration files' names and contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

/// Hashes every YAML file under `paths`, as the loader would find them. A
/// path that cannot be read hashes as its error, so that its return is a
/// change too.
pub fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut hash = Sha256::new();
    for path in paths {
        hash.update(path.as_os_str().as_encoded_bytes());
        hash.update([0]);
        for file in yaml_files(path) {
            hash.update(file.as_os_str().as_encoded_bytes());
            hash.update([0]);
            match std::fs::read(&file) {
                Ok(bytes) => {
                    hash.update((bytes.len() as u64).to_le_bytes());
                    hash.update(&bytes);
                }
                Err(error) => hash.update(format!("unreadable: {error}").as_bytes()),
            }
        }
    }
    Fingerprint(hash.finalize().into())
}

/// Lists the YAML files the loader reads under `path`: the path itself, or the
/// visible `*.yaml` and `*.yml` files of a directory.
fn yaml_files(path: &Path) -> Vec<PathBuf> {
    let Ok(metadata) = std::fs::metadata(path) else { return Vec::new() };
    if metadata.is_file() {
        return vec![path.to_owned()];
    }
    let Ok(entries) = std::fs::read_dir(path) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
        })
        .map(|entry| entry.path())
        .filter(|path| std::fs::metadata(path).is_ok_and(|m| m.is_file()))
        .collect();
    files.sort();
    files
}

/// Loads the configuration at start: counts the load and logs it.
pub fn load_initial(paths: &[PathBuf], metrics: &Metrics) -> Result<(Limits, Fingerprint), config::ConfigError> {
    let before = fingerprint(paths);
    match config::load(paths) {
        Ok(limits) => {
            metrics.record_config_load(Some(limits.domains.len()));
            info!(config.paths = %show(paths), config.domains = %domain_list(&limits), "Configuration loaded");
            Ok((limits, before))
        }
        Err(error) => {
            metrics.record_config_load(None);
            Err(error)
        }
    }
}

/// Watches `paths` every `interval` and applies changes to `limiter`, from
/// the state `loaded` was taken at, until the task is dropped.
pub async fn watch(paths: Vec<PathBuf>, limiter: Limiter, metrics: Metrics, loaded: Fingerprint, interval: Duration) {
    let mut seen = loaded;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let read_paths = paths.clone();
        let step = tokio::task::spawn_blocking(move || {
            let now = fingerprint(&read_paths);
            if now == seen {
                return (seen, None);
            }
            let result = config::load(&read_paths);
            // A swap in progress: try again on the next poll.
            if fingerprint(&read_paths) != now {
                return (seen, None);
            }
            (now, Some(result))
        });
        let Ok((now, result)) = step.await else { continue };
        seen = now;
        if let Some(result) = result {
            apply(result, &paths, &limiter, &metrics);
        }
    }
}

/// Applies one load result: replaces the limits, or keeps them and reports
/// every problem.
fn apply(result: Result<Limits, config::ConfigError>, paths: &[PathBuf], limiter: &Limiter, metrics: &Metrics) {
    match result {
        Ok(limits) => {
            let old = limiter.limits();
            let before: BTreeSet<&String> = old.domains.keys().collect();
            let after: BTreeSet<&String> = limits.domains.keys().collect();
            let added: Vec<&str> = after.difference(&before).map(|d| d.as_str()).collect();
            let removed: Vec<&str> = before.difference(&after).map(|d| d.as_str()).collect();
            info!(
                config.paths = %show(paths),
                config.domains = %domain_list(&limits),
                config.added = %added.join(","),
                config.removed = %removed.join(","),
                "Configuration reloaded"
            );
            metrics.record_config_load(Some(limits.domains.len()));
            limiter.replace_limits(limits);
        }
        Err(error) => {
            metrics.record_config_load(None);
            for problem in &error.problems {
                warn!(
                    config.file = %problem.file,
                    config.key = %problem.path,
                    problem = %problem.message,
                    "Configuration reload failed; keeping the running configuration"
                );
            }
        }
    }
}

fn show(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(",")
}

fn domain_list(limits: &Limits) -> String {
    let names: BTreeSet<&String> = limits.domains.keys().collect();
    names.into_iter().map(String::as_str).collect::<Vec<_>>().join(",")
}
