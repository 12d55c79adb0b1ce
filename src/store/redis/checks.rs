//! Health and settings checks of the Redis servers behind a store.

use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::{ClientLike, ClusterInterface};
use fred::prelude::{Options, Server, Value};
use fred::types::{ClusterHash, CustomCommand};

use super::{RedisStore, Topology, store_error};
use crate::store::StoreError;

/// Time allowed for one `ROLE` or `CONFIG GET` reply.
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// Checks that every primary each client routes to replies to `ROLE` as a
/// primary. A node that replies as a replica makes that client reconnect in
/// the background, which finds the new primary through Sentinel or the
/// cluster's slot map.
pub async fn check_primaries(store: &RedisStore) -> Result<(), StoreError> {
    let inner = &store.inner;
    for client in inner.pool.clients() {
        for node in primaries(client, inner.topology)? {
            let role = role(client, node.clone()).await?;
            if role == "master" {
                continue;
            }

            let server = describe(client, node.as_ref());
            if let Some(suppressed) = inner.role_log.allow() {
                tracing::warn!(
                    redis.server = %server,
                    redis.role = %role,
                    suppressed,
                    "Redis server is no longer a primary; reconnecting to find the new one"
                );
            }
            if inner.topology != Topology::Standalone {
                let client = client.clone();
                tokio::spawn(async move {
                    if let Err(error) = client.force_reconnection().await {
                        tracing::warn!(error = %error, "Reconnecting to find the new Redis primary failed; retrying with backoff");
                    }
                });
            }
            return Err(StoreError::Unavailable(format!("Redis at {server} is a {role}, not a primary")));
        }
    }
    Ok(())
}

/// Redis settings that decide whether buckets and account records survive
/// a full memory and a restart, as `CONFIG GET` returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub maxmemory_policy: String,
    /// Bytes; 0 is no limit.
    pub maxmemory: u64,
    /// `yes` or `no`.
    pub appendonly: String,
    /// The RDB snapshot schedule; empty when snapshots are off.
    pub save: String,
}

/// Reads the memory and persistence settings of every primary and logs one
/// warning per problem found, with the setting names, their values and the
/// fix. Managed services may disable `CONFIG`: then the check is skipped
/// and logged at info level.
pub async fn warn_about_settings(store: &RedisStore) {
    let inner = &store.inner;
    let Some(client) = inner.pool.clients().first() else { return };
    let Ok(nodes) = primaries(client, inner.topology) else { return };
    for node in nodes {
        let server = describe(client, node.as_ref());
        let settings = match read_settings(client, node).await {
            Ok(settings) => settings,
            Err(error) => {
                tracing::info!(
                    redis.server = %server,
                    error = %error,
                    "Skipped the check of Redis settings because CONFIG GET failed (some managed services \
                     disable CONFIG); make sure maxmemory-policy is volatile-ttl or volatile-lru and that \
                     persistence (appendonly or save) is on"
                );
                continue;
            }
        };
        let problems = assess_settings(&settings);
        for problem in &problems {
            tracing::warn!(
                redis.server = %server,
                redis.maxmemory_policy = %settings.maxmemory_policy,
                redis.maxmemory = settings.maxmemory,
                redis.appendonly = %settings.appendonly,
                redis.save = %settings.save,
                "{problem}"
            );
        }
        if problems.is_empty() {
            tracing::info!(
                redis.server = %server,
                redis.maxmemory_policy = %settings.maxmemory_policy,
                redis.maxmemory = settings.maxmemory,
                redis.appendonly = %settings.appendonly,
                redis.save = %settings.save,
                "Redis memory and persistence settings are safe for buckets and account records"
            );
        }
    }
}

/// Reads [`RedisSettings`] from one server with `CONFIG GET`.
async fn read_settings(client: &Client, node: Option<Server>) -> Result<RedisSettings, StoreError> {
    let maxmemory_policy = config_get(client, node.clone(), "maxmemory-policy").await?;
    let maxmemory = config_get(client, node.clone(), "maxmemory").await?;
    let appendonly = config_get(client, node.clone(), "appendonly").await?;
    let save = config_get(client, node, "save").await?;
    let maxmemory = maxmemory
        .parse()
        .map_err(|_| StoreError::Protocol(format!("CONFIG GET maxmemory returned {maxmemory:?}, not a byte count")))?;
    Ok(RedisSettings { maxmemory_policy, maxmemory, appendonly, save })
}

/// Returns every problem with `settings`, as log messages that name the fix.
pub fn assess_settings(settings: &RedisSettings) -> Vec<String> {
    let mut problems = Vec::new();
    problems.extend(assess_memory_policy(&settings.maxmemory_policy, settings.maxmemory));
    problems.extend(assess_account_safety(settings));
    problems
}

/// Returns the problem with a Redis memory policy for bucket keys, if any.
/// Every bucket key has a TTL, so any `volatile-*` or `allkeys-*` policy can
/// evict it (the bucket then starts full again). `noeviction` with a memory
/// limit instead fails every write once Redis is full.
pub fn assess_memory_policy(policy: &str, maxmemory: u64) -> Option<String> {
    if policy == "noeviction" && maxmemory > 0 {
        Some(format!(
            "maxmemory-policy is noeviction: once Redis holds maxmemory ({maxmemory} bytes) every bucket \
             write fails and checks get the failure mode; set maxmemory-policy to volatile-ttl or volatile-lru"
        ))
    } else {
        None
    }
}

/// Returns the problems for account records, which have no TTL: an
/// `allkeys-*` policy may evict them, and without persistence a restart
/// loses them. Either way their API keys fall back to the default tier.
///
/// NOTE: the store does not know whether any domain has an `accounts`
/// section, so these warnings also appear for a configuration without one.
pub fn assess_account_safety(settings: &RedisSettings) -> Vec<String> {
    let mut problems = Vec::new();
    if settings.maxmemory_policy.starts_with("allkeys-") {
        problems.push(format!(
            "maxmemory-policy is {}: once Redis reaches maxmemory ({} bytes, 0 is no limit) it may evict \
             account records, which have no TTL, and their API keys fall back to the default tier; set \
             maxmemory-policy to volatile-ttl or volatile-lru",
            settings.maxmemory_policy, settings.maxmemory
        ));
    }
    if settings.appendonly == "no" && settings.save.trim().is_empty() {
        problems.push(
            "Redis persistence is off (appendonly is no and save is empty): account tiers and overrides \
             would be lost on a restart, and promoted API keys would fall back to the default tier; set \
             appendonly yes, or a save schedule"
                .to_owned(),
        );
    }
    problems
}

/// The primaries `client` routes to: every primary of its cluster slot map,
/// or its one server (`None`).
fn primaries(client: &Client, topology: Topology) -> Result<Vec<Option<Server>>, StoreError> {
    if topology != Topology::Cluster {
        return Ok(vec![None]);
    }
    match client.cached_cluster_state() {
        Some(state) => Ok(state.unique_primary_nodes().into_iter().map(Some).collect()),
        None => Err(StoreError::Unavailable("the Redis client has no cluster slot map yet".into())),
    }
}

/// Names the server `node` (or the client's one server) for logs.
fn describe(client: &Client, node: Option<&Server>) -> String {
    match node {
        Some(node) => node.to_string(),
        None => client.active_connections().iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
    }
}

fn check_options(node: Option<Server>) -> Options {
    Options {
        timeout: Some(CHECK_TIMEOUT),
        max_attempts: Some(1),
        fail_fast: true,
        cluster_node: node,
        ..Options::default()
    }
}

/// Returns the role a server replies to `ROLE` with: `master`, `slave` or
/// `sentinel`.
async fn role(client: &Client, node: Option<Server>) -> Result<String, StoreError> {
    let command = CustomCommand::new_static("ROLE", ClusterHash::Random, false);
    let reply: Value = client
        .with_options(&check_options(node))
        .custom(command, Vec::<Value>::new())
        .await
        .map_err(|error| store_error(&error))?;
    let Value::Array(fields) = reply else {
        return Err(StoreError::Protocol(format!("ROLE returned a {} instead of an array", reply.kind())));
    };
    fields
        .first()
        .and_then(Value::as_string)
        .ok_or_else(|| StoreError::Protocol("ROLE returned no role name".into()))
}

/// Reads one setting with `CONFIG GET`.
async fn config_get(client: &Client, node: Option<Server>, name: &'static str) -> Result<String, StoreError> {
    let command = CustomCommand::new_static("CONFIG", ClusterHash::Random, false);
    let reply: Value = client
        .with_options(&check_options(node))
        .custom(command, vec!["GET", name])
        .await
        .map_err(|error| store_error(&error))?;
    let value = match reply {
        Value::Array(fields) => fields.get(1).and_then(Value::as_string),
        Value::Map(map) => map.inner().values().next().and_then(Value::as_string),
        _ => None,
    };
    value.ok_or_else(|| StoreError::Protocol(format!("CONFIG GET {name} returned no value")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noeviction_with_limit_is_a_problem() {
        let problem = assess_memory_policy("noeviction", 1 << 30).expect("a problem");
        assert!(problem.contains("volatile-ttl"), "{problem}");
    }

    #[test]
    fn evicting_policies_are_fine() {
        for policy in ["volatile-lru", "volatile-ttl", "allkeys-lru", "allkeys-lfu", "volatile-random"] {
            assert_eq!(assess_memory_policy(policy, 1 << 30), None, "{policy}");
        }
        assert_eq!(assess_memory_policy("noeviction", 0), None, "no limit: writes never fail for memory");
    }

    fn settings(policy: &str, appendonly: &str, save: &str) -> RedisSettings {
        RedisSettings { maxmemory_policy: policy.into(), maxmemory: 0, appendonly: appendonly.into(), save: save.into() }
    }

    #[test]
    fn allkeys_policies_risk_account_records() {
        for policy in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            let problems = assess_account_safety(&settings(policy, "yes", ""));
            assert_eq!(problems.len(), 1, "{policy}: {problems:?}");
            assert!(problems[0].contains(&format!("maxmemory-policy is {policy}")), "{}", problems[0]);
            assert!(problems[0].contains("volatile-ttl"), "{}", problems[0]);
        }
    }

    #[test]
    fn persistence_off_risks_account_records() {
        let problems = assess_account_safety(&settings("volatile-lru", "no", ""));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("lost on a restart"), "{}", problems[0]);
        assert!(problems[0].contains("appendonly yes"), "{}", problems[0]);
    }

    #[test]
    fn safe_settings_have_no_problems() {
        for (appendonly, save) in [("yes", ""), ("no", "3600 1 300 100"), ("yes", "3600 1")] {
            let safe = settings("volatile-ttl", appendonly, save);
            assert_eq!(assess_settings(&safe), Vec::<String>::new(), "appendonly {appendonly}, save {save:?}");
        }
        assert_eq!(assess_settings(&settings("noeviction", "yes", "")), Vec::<String>::new(), "noeviction without a limit");
    }

    #[test]
    fn problems_add_up() {
        let mut risky = settings("allkeys-lru", "no", "");
        risky.maxmemory = 1 << 30;
        assert_eq!(assess_settings(&risky).len(), 2);
        risky.maxmemory_policy = "noeviction".into();
        assert_eq!(assess_settings(&risky).len(), 2, "noeviction with a limit and no persistence");
    }
}
