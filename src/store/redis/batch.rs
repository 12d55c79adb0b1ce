//! Groups the script calls that are ready at the same moment into one
//! Redis command.
//!
//! `fred` flushes the socket after every `EVALSHA`, so each check sent on
//! its own costs a write system call here and a command dispatch in Redis.
//! Calls handed to a [`Batcher`] queue up while the previous command is on
//! the wire. A dispatcher task takes every queued call at once and sends
//! them as one call of the batch script. That script runs the bucket script
//! for each call in turn and replies with one reply per call. Under light load a
//! batch has one call and goes out at once as a plain bucket-script call,
//! so nothing waits for a batch to fill.
//!
//! Each call keeps its own outcome: the batch script catches an error of
//! one call (an unreadable stored value) and replies with it in that call's
//! place, so the others still count. Each call's writes are atomic as
//! before, and so is the whole batch. Batching is for one primary
//! (standalone or Sentinel); in a cluster the calls of one batch would span
//! hash slots.

use std::sync::Arc;
use std::time::Duration;

use fred::bytes_utils::Str;
use fred::interfaces::{ClientLike, LuaInterface};
use fred::prelude::{Error as RedisError, ErrorKind, Key, Options, Pool, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::script::{BUCKET_SCRIPT, integer};
use crate::telemetry::Throttle;

/// Maximum calls in one batch, which bounds how long one script runs in Redis
/// (tens of microseconds per call).
pub const MAX_BATCH: usize = 64;

/// The prefix of a reply that is one call's error.
const CALL_ERROR: &str = "FRLERR ";

/// Judges every call packed into KEYS and ARGV: `ARGV[1]` is the call count
/// m, `ARGV[2 .. 2m+1]` the key and argument counts of each call, then
/// every call's arguments in order; KEYS contains every call's keys in
/// order. The plain path reads each call in place. A call it does not take
/// is copied out and judged by the whole bucket script. Replies with one
/// entry per call: the bucket script's reply, or `FRLERR <message>` when
/// that call raised an error.
const DRIVER: &str = r"
local count = tonumber(ARGV[1])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local replies = {}
local key_at = 1
local arg_at = 2 + 2 * count
for c = 1, count do
  local key_count = tonumber(ARGV[2 * c])
  local arg_count = tonumber(ARGV[2 * c + 1])
  local ok, reply = pcall(judge_plain, now, KEYS, ARGV, key_at - 1, arg_at - 1, key_count, arg_count)
  if ok and reply == nil then
    local keys, argv = {}, {}
    for i = 1, key_count do
      keys[i] = KEYS[key_at + i - 1]
    end
    for i = 1, arg_count do
      argv[i] = ARGV[arg_at + i - 1]
    end
    ok, reply = pcall(bucket_call, keys, argv)
  end
  key_at = key_at + key_count
  arg_at = arg_at + arg_count
  if ok then
    replies[c] = reply
  elseif type(reply) == 'table' and reply.err then
    replies[c] = 'FRLERR ' .. reply.err
  else
    replies[c] = 'FRLERR ' .. tostring(reply)
  end
end
return replies
";

/// The line of the bucket script where its main part starts, after the
/// plain path's definition.
const MAIN_PART: &str = "\nlocal time = redis.call('TIME')";

/// The batch script: the bucket script's plain path, its main part as a
/// function of KEYS and ARGV, then the driver that judges each packed call.
pub fn batch_script() -> String {
    let (plain, main) = BUCKET_SCRIPT.split_at(BUCKET_SCRIPT.find(MAIN_PART).expect("the bucket script has a main part"));
    format!("{plain}\nlocal function bucket_call(KEYS, ARGV)\n{main}\nend\n{DRIVER}")
}

/// The scripts a batch is sent with, by SHA-1, and the batch script's text
/// for a node that has lost its script cache.
pub struct Scripts {
    pub bucket_sha: Str,
    pub batch_sha: Str,
    pub batch_text: Arc<str>,
    pub noscript_log: Throttle,
}

/// One script call waiting for its batch.
struct Pending {
    keys: Vec<Key>,
    args: Vec<Value>,
    deadline: Instant,
    reply: oneshot::Sender<Result<Value, RedisError>>,
}

/// Hands script calls to the dispatcher task. Dropping every clone ends it.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Starts the dispatcher on the current runtime.
    pub fn start(pool: Pool, scripts: Scripts) -> Self {
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(dispatch(receiver, pool, Arc::new(scripts)));
        Self { queue }
    }

    /// Queues one bucket-script call and waits for its reply. The batch it
    /// joins gives up at the latest deadline of its calls; the caller
    /// stops waiting at its own.
    pub async fn call(&self, keys: Vec<Key>, args: Vec<Value>, remaining: Duration) -> Result<Value, RedisError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { keys, args, deadline: Instant::now() + remaining, reply };
        if self.queue.send(pending).is_err() {
            return Err(RedisError::new(ErrorKind::Canceled, "the Redis batch dispatcher has stopped"));
        }
        match answer.await {
            Ok(reply) => reply,
            Err(_) => Err(RedisError::new(ErrorKind::Canceled, "the Redis batch was dropped before its reply")),
        }
    }
}

/// Takes every queued call, up to [`MAX_BATCH`], and sends them as one
/// command on a task of its own, so the next batch can form while this one
/// is on the wire.
async fn dispatch(mut receiver: mpsc::UnboundedReceiver<Pending>, pool: Pool, scripts: Arc<Scripts>) {
    let mut calls = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut calls, MAX_BATCH).await > 0 {
        let batch = std::mem::replace(&mut calls, Vec::with_capacity(MAX_BATCH));
        tokio::spawn(send(pool.clone(), scripts.clone(), batch));
    }
}

/// Sends one batch and hands each call its reply.
async fn send(pool: Pool, scripts: Arc<Scripts>, calls: Vec<Pending>) {
    // A call whose own deadline has passed is never sent, whatever the
    // deadlines of the others.
    let now = Instant::now();
    let (late, mut calls): (Vec<Pending>, Vec<Pending>) = calls.into_iter().partition(|call| call.deadline <= now);
    if !late.is_empty() {
        fail_all(late, &RedisError::new(ErrorKind::Timeout, "the deadline passed before the command was sent"));
    }
    let Some(deadline) = calls.iter().map(|call| call.deadline).max() else { return };
    let remaining = deadline.saturating_duration_since(now);
    let client = pool.next_connected();
    if !client.is_connected() {
        let error = RedisError::new(ErrorKind::IO, "no Redis connection is up; the clients are reconnecting");
        return fail_all(calls, &error);
    }
    let options = Options { timeout: Some(remaining), max_attempts: Some(1), fail_fast: true, ..Options::default() };
    let client = client.with_options(&options);

    if let [_] = calls.as_slice() {
        // A call of its own: its caller handles a NOSCRIPT reply.
        let call = calls.pop().expect("one call");
        let reply = client.evalsha::<Value, _, _, _>(scripts.bucket_sha.clone(), call.keys, call.args).await;
        let _ = call.reply.send(reply);
        return;
    }

    let (keys, args) = pack(&mut calls);
    let reply = client.evalsha::<Value, _, _, _>(scripts.batch_sha.clone(), keys, args).await;
    if let Err(error) = &reply {
        if is_noscript(error) {
            // Load the batch script again for the next batches. The calls of
            // this one fail with NOSCRIPT, and each caller sends the bucket
            // script text itself.
            let loaded = client.script_load::<Str, _>(&*scripts.batch_text).await;
            if let Some(suppressed) = scripts.noscript_log.allow() {
                match loaded {
                    Ok(_) => tracing::warn!(suppressed, "Redis replied NOSCRIPT (restarted or promoted node); loaded the batch script again"),
                    Err(error) => tracing::warn!(%error, suppressed, "Redis replied NOSCRIPT and loading the batch script failed; retrying at the next NOSCRIPT"),
                }
            }
        }
    }
    match reply {
        Ok(Value::Array(replies)) if replies.len() == calls.len() => {
            for (call, reply) in calls.into_iter().zip(replies) {
                let _ = call.reply.send(unpack(reply));
            }
        }
        Ok(other) => {
            let error = RedisError::new(
                ErrorKind::Parse,
                format!("the batch script replied {other:?} for {} calls instead of one reply each", calls.len()),
            );
            fail_all(calls, &error);
        }
        Err(error) => fail_all(calls, &error),
    }
}

/// Packs the calls into the batch script's KEYS and ARGV, leaving each
/// call's own vectors empty.
fn pack(calls: &mut [Pending]) -> (Vec<Key>, Vec<Value>) {
    let key_total = calls.iter().map(|call| call.keys.len()).sum();
    let arg_total: usize = calls.iter().map(|call| call.args.len()).sum();
    let mut keys = Vec::with_capacity(key_total);
    let mut args = Vec::with_capacity(1 + 2 * calls.len() + arg_total);
    args.push(integer(calls.len() as u64));
    for call in calls.iter() {
        args.push(integer(call.keys.len() as u64));
        args.push(integer(call.args.len() as u64));
    }
    for call in calls.iter_mut() {
        keys.append(&mut call.keys);
        args.append(&mut call.args);
    }
    (keys, args)
}

/// Turns one call's entry of the batch reply into its result: the
/// bucket-script reply, or the error that call raised, as a call of its
/// own would have returned it.
fn unpack(reply: Value) -> Result<Value, RedisError> {
    if let Value::String(text) = &reply {
        if let Some(message) = text.strip_prefix(CALL_ERROR) {
            return Err(RedisError::new(ErrorKind::Unknown, message.to_owned()));
        }
    }
    Ok(reply)
}

fn fail_all(calls: Vec<Pending>, error: &RedisError) {
    for call in calls {
        let _ = call.reply.send(Err(error.clone()));
    }
}

fn is_noscript(error: &RedisError) -> bool {
    error.details().starts_with("NOSCRIPT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_script_splits_the_bucket_script_once() {
        assert_eq!(BUCKET_SCRIPT.matches(MAIN_PART).count(), 1);
        let script = batch_script();
        assert!(script.contains("local function judge_plain("));
        assert!(script.contains("local function bucket_call(KEYS, ARGV)"));
    }

    #[test]
    fn pack_puts_counts_then_arguments_in_call_order() {
        let (first, _) = oneshot::channel();
        let (second, _) = oneshot::channel();
        let now = Instant::now();
        let mut calls = vec![
            Pending { keys: vec!["a".into()], args: vec![Value::Integer(1), Value::Integer(2)], deadline: now, reply: first },
            Pending { keys: vec!["b".into(), "c".into()], args: vec![Value::Integer(3)], deadline: now, reply: second },
        ];
        let (keys, args) = pack(&mut calls);
        assert_eq!(keys, vec![Key::from("a"), Key::from("b"), Key::from("c")]);
        let ints: Vec<i64> = args.iter().map(|value| value.as_i64().expect("integer")).collect();
        assert_eq!(ints, vec![2, 1, 2, 2, 1, 1, 2, 3]);
    }

    #[test]
    fn unpack_error_entry_fails_its_call() {
        let error = unpack(Value::String("FRLERR FRLSCRIPT unreadable bucket value at k".into())).unwrap_err();
        assert_eq!(error.details(), "FRLSCRIPT unreadable bucket value at k");
        assert!(unpack(Value::Array(vec![Value::Integer(1)])).is_ok());
    }
}
