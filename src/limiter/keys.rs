//! Store key names.
//!
//! A key never contains an API key or any other entry value in clear text.
//! Entries are hashed with BLAKE3, so a key's length is fixed whatever the
//! values, and each value is hashed once, so an 8 KiB value costs little
//! more than a short one. The layout is versioned (`frl1`), so a service
//! that reads another layout never misreads it. All keys of one
//! descriptor's first entry (in the Fikra configuration, the API key) share
//! one Redis Cluster hash tag, so one script judges a key's requests and
//! tokens buckets and its estimates together, while different API keys
//! spread over the cluster.
//!
//! A bucket key names a field of a Redis hash: `frl1:{T}:c:F` is field `F`
//! of the hash `frl1:{T}:c`, and `frl1:{T}:c:M:F` field `F` of
//! `frl1:{T}:c:M` (see [`redis_location`]). One hash per hash tag and
//! per middle entries costs less memory than a key per bucket. The field
//! is named by the last entry only when the configuration matched that
//! entry's value exactly, so a hash contains at most as many fields as the
//! configuration has exact values at one place. Every value a client chooses
//! freely (a model name, say) is part of the hash's name, and its field is
//! `-`, so such buckets never pile up in one hash. So a configuration
//! change that moves the last entry between an exact value and any value
//! renames its bucket, which then starts full.

use std::cell::RefCell;

/// Prefix and layout version of every key.
pub const PREFIX: &str = "frl1";

/// Base64url characters of the hash tag (96 bits).
const TAG_CHARS: usize = 16;
/// Base64url characters of an estimate id or of the middle entries of a
/// bucket hash's name (96 bits), unique within their tag.
const ID_CHARS: usize = 16;
/// Base64url characters of a bucket's field (48 bits). A field is named by
/// a value the configuration lists, never by a client's choice, and a hash
/// contains few fields, so 48 bits keep a collision out of reach.
const FIELD_CHARS: usize = 8;
/// The field of a bucket whose hash name covers all of its entries.
const WHOLE_FIELD: &str = "-";

/// Builds the key of the bucket named by `domain` and `entries` (the
/// identity entries, in order). `exact_last` is true when the
/// configuration matched the last entry's value exactly. Only then does
/// that entry name the bucket's field instead of its hash.
pub fn bucket_key(domain: &str, entries: &[(&str, &str)], exact_last: bool) -> String {
    let (first, rest) = match entries.split_first() {
        Some((first, rest)) => (Some(*first), rest),
        None => (None, entries),
    };
    // The tag covers the domain and the first entry; the middle id extends
    // the tag's digest with the entries between the first and the field.
    let tag = tag_digest(domain, first);
    let (middle, last) = match (exact_last, entries.last()) {
        (true, Some(last)) => (&rest[..rest.len().saturating_sub(1)], Some(*last)),
        _ => (rest, None),
    };

    let mut out = String::with_capacity(PREFIX.len() + TAG_CHARS + ID_CHARS + FIELD_CHARS + 8);
    out.push_str(PREFIX);
    out.push_str(":{");
    push_base64(&mut out, tag.as_bytes(), TAG_CHARS);
    out.push_str("}:c");
    // The digest, the entry count and the two length-prefixed texts of each
    // hashed entry; nothing when no entry is hashed.
    let hashed = middle.iter().chain(last.as_ref());
    let input_bytes = match hashed.map(|(key, value)| 16 + key.len() + value.len()).sum::<usize>() {
        0 => 0,
        texts => 32 + 8 + texts,
    };
    let mut input = Vec::with_capacity(input_bytes);
    if !middle.is_empty() {
        input.extend_from_slice(tag.as_bytes());
        for (key, value) in middle {
            field(&mut input, key);
            field(&mut input, value);
        }
        out.push(':');
        push_base64(&mut out, blake3::hash(&input).as_bytes(), ID_CHARS);
    }
    out.push(':');
    match last {
        Some((key, value)) => {
            // The entry count separates `[k=v]` from `[k=v, k=v]`, which
            // have no middle entries and the same last entry.
            input.clear();
            input.extend_from_slice(tag.as_bytes());
            input.extend_from_slice(&(entries.len() as u64).to_le_bytes());
            field(&mut input, key);
            field(&mut input, value);
            push_base64(&mut out, blake3::hash(&input).as_bytes(), FIELD_CHARS);
        }
        None => out.push_str(WHOLE_FIELD),
    }
    out
}

/// Builds the hash tag of `domain` and an API key's entry, `{T}` with its
/// braces, which the key's record and buckets share.
pub fn hash_tag(domain: &str, key: &str, value: &str) -> String {
    let mut out = String::with_capacity(TAG_CHARS + 2);
    out.push('{');
    push_base64(&mut out, tag_digest(domain, Some((key, value))).as_bytes(), TAG_CHARS);
    out.push('}');
    out
}

/// Returns the digest a hash tag is made of. A call's bucket keys and its
/// account record hash the same domain and API key in turn, so each thread
/// keeps the last input and its digest.
fn tag_digest(domain: &str, first: Option<(&str, &str)>) -> blake3::Hash {
    thread_local! {
        static MEMO: RefCell<TagMemo> = RefCell::new(TagMemo::default());
    }
    MEMO.with(|memo| {
        let memo = &mut *memo.borrow_mut();
        memo.input.clear();
        field(&mut memo.input, domain);
        if let Some((key, value)) = first {
            field(&mut memo.input, key);
            field(&mut memo.input, value);
        }
        if memo.input.capacity() > MEMO_MAX_BYTES {
            // A rare long value does not keep its buffer for good. An empty
            // input never matches, since it always contains a length.
            let digest = blake3::hash(&memo.input);
            *memo = TagMemo::default();
            return digest;
        }
        if memo.input == memo.last {
            return blake3::Hash::from_bytes(memo.digest);
        }
        let digest = blake3::hash(&memo.input);
        std::mem::swap(&mut memo.input, &mut memo.last);
        memo.digest = *digest.as_bytes();
        digest
    })
}

/// The last tag input of a thread and its digest. `input` is the buffer
/// the next input is written to.
#[derive(Default)]
struct TagMemo {
    input: Vec<u8>,
    last: Vec<u8>,
    digest: [u8; 32],
}

/// The maximum capacity in bytes of a tag input buffer the memo keeps.
const MEMO_MAX_BYTES: usize = 1024;

/// Builds the key under which an estimate charged to `bucket_key` for
/// `request_id` is remembered, in the bucket's hash slot.
pub fn estimate_key(bucket_key: &str, request_id: &str) -> String {
    let tag_end = bucket_key.find("}:").map_or(bucket_key.len(), |i| i + 1);
    let mut input = Vec::with_capacity(bucket_key.len() + request_id.len() + 16);
    field(&mut input, bucket_key);
    field(&mut input, request_id);

    let mut out = String::with_capacity(tag_end + ID_CHARS + 3);
    out.push_str(&bucket_key[..tag_end]);
    out.push_str(":e:");
    push_base64(&mut out, blake3::hash(&input).as_bytes(), ID_CHARS);
    out
}

/// Splits a bucket key into the Redis hash that contains the bucket and the
/// bucket's field in it: the field is the part after the last `:`. A key
/// without a `:` before a non-empty last part is field `-` of a hash named
/// as the key itself.
pub fn redis_location(bucket_key: &str) -> (&str, &str) {
    match bucket_key.rsplit_once(':') {
        Some((hash, field)) if !field.is_empty() => (hash, field),
        _ => (bucket_key, "-"),
    }
}

/// Feeds a length-prefixed field, so ("ab", "c") and ("a", "bc") differ.
fn field(input: &mut Vec<u8>, value: &str) {
    input.extend_from_slice(&(value.len() as u64).to_le_bytes());
    input.extend_from_slice(value.as_bytes());
}

/// Appends the first `chars` base64url characters of `bytes` (`chars` a
/// multiple of 4, so every character encodes six whole bits).
fn push_base64(out: &mut String, bytes: &[u8], chars: usize) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    // The characters are gathered first and appended in one step, which
    // costs less than pushing them one `char` at a time. 40 characters
    // encode the whole groups of a 32-byte digest.
    let mut text = [0u8; 40];
    let mut length = 0;
    for group in bytes.chunks(3).take(chars / 4) {
        let bits = (u32::from(group[0]) << 16) | (u32::from(group[1]) << 8) | u32::from(group[2]);
        for shift in [18, 12, 6, 0] {
            text[length] = ALPHABET[(bits >> shift & 0x3f) as usize];
            length += 1;
        }
    }
    out.push_str(std::str::from_utf8(&text[..length]).expect("the base64url alphabet is ASCII"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_share_tag_per_first_entry() {
        let requests = bucket_key("fikra", &[("api_key", "k1"), ("meter", "requests")], true);
        let tokens = bucket_key("fikra", &[("api_key", "k1"), ("meter", "tokens")], true);
        let other = bucket_key("fikra", &[("api_key", "k2"), ("meter", "tokens")], true);

        assert_ne!(requests, tokens);
        assert_eq!(requests[..23], tokens[..23]);
        assert_ne!(requests[..23], other[..23]);
        assert_eq!(requests.len(), 34);
    }

    #[test]
    fn keys_hide_values_and_stay_bounded() {
        let secret = "sk-live-0123456789{abc}";
        let long = "x".repeat(8192);
        for exact_last in [false, true] {
            let key = bucket_key("fikra", &[("api_key", secret), ("note", long.as_str())], exact_last);
            let estimate = estimate_key(&key, "req-1");

            assert!(!key.contains("sk-live"), "{key}");
            assert!(key.len() <= 44, "{key}");
            assert_eq!(estimate.len(), 42);
            assert_eq!(key[..23], estimate[..23]);
        }
        let three = bucket_key("fikra", &[("api_key", secret), ("model", &long), ("meter", "tokens")], true);
        assert_eq!(three.len(), 51, "{three}");
    }

    #[test]
    fn exact_last_entries_share_a_hash() {
        let requests = bucket_key("fikra", &[("api_key", "k1"), ("meter", "requests")], true);
        let tokens = bucket_key("fikra", &[("api_key", "k1"), ("meter", "tokens")], true);
        let (hash, field) = redis_location(&requests);

        assert_eq!(hash, &requests[..25]);
        assert!(hash.ends_with("}:c"), "{hash}");
        assert_eq!(field.len(), FIELD_CHARS);
        assert_eq!(redis_location(&tokens).0, hash);
        assert_ne!(redis_location(&tokens).1, field);
        assert_eq!(redis_location("odd"), ("odd", "-"));
        assert_eq!(redis_location("odd:"), ("odd:", "-"));
    }

    #[test]
    fn client_chosen_entries_name_their_own_hash() {
        let model = |name| bucket_key("fikra", &[("api_key", "k1"), ("model", name)], false);
        let (m1, m2) = (model("m-1"), model("m-2"));
        let (first, first_field) = redis_location(&m1);
        let (second, second_field) = redis_location(&m2);
        assert_ne!(first, second);
        assert_eq!((first_field, second_field), (WHOLE_FIELD, WHOLE_FIELD));

        let alone = bucket_key("fikra", &[("api_key", "k1")], false);
        assert_eq!(redis_location(&alone), (&alone[..25], WHOLE_FIELD));
        let per_model_meter = bucket_key("fikra", &[("api_key", "k1"), ("model", "m-1"), ("meter", "tokens")], true);
        assert_ne!(redis_location(&per_model_meter).0, redis_location(&alone).0);
        assert_eq!(redis_location(&per_model_meter).0, first);
        assert_ne!(redis_location(&per_model_meter).1, WHOLE_FIELD);
    }

    #[test]
    fn names_stay_those_already_stored() {
        // Renaming a key would make its stored bucket start full, so the
        // names are pinned.
        let requests = bucket_key("fikra", &[("api_key", "k1"), ("meter", "requests")], true);
        let model = bucket_key("fikra", &[("api_key", "k1"), ("model", "m-1"), ("meter", "tokens")], true);
        let whole = bucket_key("fikra", &[("api_key", "k1"), ("model", "m-1")], false);
        assert_eq!(requests, "frl1:{68AE7x38-JfksXdW}:c:dG0fvkp_");
        assert_eq!(model, "frl1:{68AE7x38-JfksXdW}:c:9LlaHDQtYA_wQCf4:Ua6rfhvU");
        assert_eq!(whole, "frl1:{68AE7x38-JfksXdW}:c:9LlaHDQtYA_wQCf4:-");
        assert_eq!(estimate_key(&requests, "req-1"), "frl1:{68AE7x38-JfksXdW}:e:Kfg8dFvXgUpr9DPm");
        assert_eq!(hash_tag("fikra", "api_key", "k1"), "{68AE7x38-JfksXdW}");
        // Another key in between, and a long one that the memo drops.
        let long = "k".repeat(2000);
        assert_ne!(hash_tag("fikra", "api_key", &long), hash_tag("fikra", "api_key", "k2"));
        assert_eq!(hash_tag("fikra", "api_key", &long), hash_tag("fikra", "api_key", &long));
        assert_eq!(bucket_key("fikra", &[("api_key", "k1"), ("meter", "requests")], true), requests);
    }

    #[test]
    fn field_boundaries_change_the_key() {
        let a = bucket_key("d", &[("ab", "c")], false);
        let b = bucket_key("d", &[("a", "bc")], false);
        assert_ne!(a, b);
        let c = bucket_key("d", &[("k", "v"), ("ab", "c")], true);
        let d = bucket_key("d", &[("k", "v"), ("a", "bc")], true);
        assert_ne!(c, d);
    }

    #[test]
    fn repeated_entry_names_another_bucket() {
        let once = bucket_key("d", &[("generic_key", "global")], true);
        let twice = bucket_key("d", &[("generic_key", "global"), ("generic_key", "global")], true);
        assert_eq!(redis_location(&once).0, redis_location(&twice).0);
        assert_ne!(once, twice);
    }
}
