//! The account store in Redis: plain string values without a TTL, changed
//! with compare-and-set scripts, and the audit log as a capped stream.

use fred::interfaces::{ClientLike, KeysInterface, LuaInterface};
use fred::prelude::{Key, Value};
use fred::types::{ClusterHash, CustomCommand};

use super::{AUDIT_STREAM, AuditEntry};
use crate::store::redis::RedisStore;
use crate::store::{RecordGuard, StoreError};

/// Approximate length the audit stream is trimmed to (`MAXLEN ~`).
pub const AUDIT_MAX_LEN: u64 = 100_000;

/// Sets KEYS[1] to ARGV[2] when it holds ARGV[1] (empty: absent).
const COMPARE_AND_SET: &str = r"
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
";

fn error(error: fred::error::Error) -> StoreError {
    StoreError::Unavailable(format!("Redis: {error}"))
}

pub async fn get(store: &RedisStore, key: &str) -> Result<Option<String>, StoreError> {
    store.pool().next().get::<Option<String>, _>(key).await.map_err(error)
}

pub async fn compare_and_set(store: &RedisStore, key: &str, expected: Option<&str>, value: &str) -> Result<bool, StoreError> {
    let args = vec![Value::from(expected.unwrap_or("")), Value::from(value)];
    let set: i64 = store.pool().next().eval(COMPARE_AND_SET, vec![Key::from(key)], args).await.map_err(error)?;
    Ok(set == 1)
}

/// Reads the records the guards name, one `GET` each.
pub async fn read_records(store: &RedisStore, guards: &[RecordGuard]) -> Result<Vec<Option<String>>, StoreError> {
    let mut records = Vec::with_capacity(guards.len());
    for guard in guards {
        records.push(get(store, &guard.key).await?);
    }
    Ok(records)
}

pub async fn append_audit(store: &RedisStore, entry: &AuditEntry) -> Result<(), StoreError> {
    let command = CustomCommand::new_static("XADD", ClusterHash::FirstKey, false);
    let mut args: Vec<Value> = vec![AUDIT_STREAM.into(), "MAXLEN".into(), "~".into(), Value::from(AUDIT_MAX_LEN as i64), "*".into()];
    for (field, value) in entry.fields() {
        args.push(field.into());
        args.push(value.into());
    }
    let _: Value = store.pool().next().custom(command, args).await.map_err(error)?;
    Ok(())
}

/// The newest `count` audit entries, oldest first.
pub async fn audit(store: &RedisStore, count: usize) -> Result<Vec<AuditEntry>, StoreError> {
    let command = CustomCommand::new_static("XREVRANGE", ClusterHash::FirstKey, false);
    let args: Vec<Value> = vec![AUDIT_STREAM.into(), "+".into(), "-".into(), "COUNT".into(), Value::from(count as i64)];
    let reply: Value = store.pool().next().custom(command, args).await.map_err(error)?;
    let Value::Array(items) = reply else { return Ok(Vec::new()) };
    let mut entries = Vec::with_capacity(items.len());
    for item in items.into_iter().rev() {
        let Value::Array(parts) = item else { continue };
        let Some(Value::Array(fields)) = parts.into_iter().nth(1) else { continue };
        let strings: Vec<String> = fields.iter().filter_map(Value::as_string).collect();
        let pairs = strings.chunks(2).filter_map(|pair| Some((pair.first()?.as_str(), pair.get(1)?.as_str())));
        entries.push(AuditEntry::from_fields(pairs));
    }
    Ok(entries)
}
