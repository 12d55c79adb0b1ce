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

/// Reads `maxmemory-policy` and `maxmemory` from every primary and logs a
/// warning where bucket writes would fail once Redis is full. Managed
/// services may disable `CONFIG`, which is logged and otherwise ignored.
pub async fn warn_about_settings(store: &RedisStore) {
    let inner = &store.inner;
    let Some(client) = inner.pool.clients().first() else { return };
    let Ok(nodes) = primaries(client, inner.topology) else { return };
    for node in nodes {
        let server = describe(client, node.as_ref());
        let policy = config_get(client, node.clone(), "maxmemory-policy").await;
        let maxmemory = config_get(client, node.clone(), "maxmemory").await;
        let (policy, maxmemory) = match (policy, maxmemory) {
            (Ok(policy), Ok(maxmemory)) => (policy, maxmemory.parse::<u64>().unwrap_or(0)),
            (Err(error), _) | (_, Err(error)) => {
                tracing::info!(
                    redis.server = %server,
                    error = %error,
                    "Cannot read Redis settings (some managed services disable CONFIG); \
                     make sure maxmemory-policy is not noeviction"
                );
                continue;
            }
        };
        match assess_memory_policy(&policy, maxmemory) {
            Some(problem) => tracing::warn!(
                redis.server = %server,
                redis.maxmemory_policy = %policy,
                redis.maxmemory = maxmemory,
                "{problem}"
            ),
            None => tracing::info!(
                redis.server = %server,
                redis.maxmemory_policy = %policy,
                redis.maxmemory = maxmemory,
                "Redis memory settings are safe for buckets"
            ),
        }
    }
}

/// Returns the problem with a Redis memory policy for bucket keys, if any.
/// Every bucket key has a TTL, so any `volatile-*` or `allkeys-*` policy can
/// evict it (the bucket then starts full again). `noeviction` with a memory
/// limit instead fails every write once Redis is full.
pub fn assess_memory_policy(policy: &str, maxmemory: u64) -> Option<String> {
    if policy == "noeviction" && maxmemory > 0 {
        Some(format!(
            "maxmemory-policy is noeviction: once Redis holds maxmemory ({maxmemory} bytes) every bucket \
             write fails and checks get the failure mode; set maxmemory-policy to volatile-ttl, volatile-lru \
             or allkeys-lru"
        ))
    } else {
        None
    }
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
}
