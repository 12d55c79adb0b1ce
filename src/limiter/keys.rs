//! Store key names.
//!
//! A key never contains an API key or any other entry value in clear text.
//! Entries are hashed with BLAKE3, so every key has a fixed length of 42
//! bytes whatever the values, short enough for Redis to keep its name in a
//! 48-byte allocation. Each value is hashed once, so an 8 KiB value costs
//! little more than a short one. The layout is versioned (`frl1`), so a
//! service that reads another layout never misreads it. All keys of one
//! descriptor's first entry (in the Fikra configuration, the API key) share
//! one Redis Cluster hash tag, so one script judges a key's requests and
//! tokens buckets and its estimates together, while different API keys
//! spread over the cluster.

use blake3::Hasher;

/// Prefix and layout version of every key.
pub const PREFIX: &str = "frl1";

/// Base64url characters of the hash tag (96 bits).
const TAG_CHARS: usize = 16;
/// Base64url characters of a bucket or estimate id (96 bits), unique
/// within its tag.
const ID_CHARS: usize = 16;

/// Builds the key of the bucket named by `domain` and `entries` (the
/// identity entries, in order).
pub fn bucket_key<'a>(domain: &str, mut entries: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    // The tag covers the domain and the first entry; the id extends the
    // tag's digest with the other entries, so no value is hashed twice.
    let mut tag = Hasher::new();
    field(&mut tag, domain);
    if let Some((key, value)) = entries.next() {
        field(&mut tag, key);
        field(&mut tag, value);
    }
    let tag = tag.finalize();

    let mut id = Hasher::new();
    id.update(tag.as_bytes());
    for (key, value) in entries {
        field(&mut id, key);
        field(&mut id, value);
    }

    let mut out = String::with_capacity(PREFIX.len() + TAG_CHARS + ID_CHARS + 6);
    out.push_str(PREFIX);
    out.push_str(":{");
    push_base64(&mut out, tag.as_bytes(), TAG_CHARS);
    out.push_str("}:b:");
    push_base64(&mut out, id.finalize().as_bytes(), ID_CHARS);
    out
}

/// Builds the key under which an estimate charged to `bucket_key` for
/// `request_id` is remembered, in the bucket's hash slot.
pub fn estimate_key(bucket_key: &str, request_id: &str) -> String {
    let tag_end = bucket_key.find("}:").map_or(bucket_key.len(), |i| i + 1);
    let mut id = Hasher::new();
    field(&mut id, bucket_key);
    field(&mut id, request_id);

    let mut out = String::with_capacity(tag_end + ID_CHARS + 3);
    out.push_str(&bucket_key[..tag_end]);
    out.push_str(":e:");
    push_base64(&mut out, id.finalize().as_bytes(), ID_CHARS);
    out
}

/// Feeds a length-prefixed field, so ("ab", "c") and ("a", "bc") differ.
fn field(hasher: &mut Hasher, value: &str) {
    hasher.update(&(value.len() as u64).to_le_bytes());
    hasher.update(value.as_bytes());
}

/// Appends the first `chars` base64url characters of `bytes` (`chars` a
/// multiple of 4, so every character encodes six whole bits).
fn push_base64(out: &mut String, bytes: &[u8], chars: usize) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for group in bytes.chunks(3).take(chars / 4) {
        let bits = (u32::from(group[0]) << 16) | (u32::from(group[1]) << 8) | u32::from(group[2]);
        for shift in [18, 12, 6, 0] {
            out.push(char::from(ALPHABET[(bits >> shift & 0x3f) as usize]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_share_tag_per_first_entry() {
        let requests = bucket_key("fikra", [("api_key", "k1"), ("meter", "requests")].into_iter());
        let tokens = bucket_key("fikra", [("api_key", "k1"), ("meter", "tokens")].into_iter());
        let other = bucket_key("fikra", [("api_key", "k2"), ("meter", "tokens")].into_iter());

        assert_ne!(requests, tokens);
        assert_eq!(requests[..23], tokens[..23]);
        assert_ne!(requests[..23], other[..23]);
        assert_eq!(requests.len(), 42);
    }

    #[test]
    fn keys_hide_values_and_stay_bounded() {
        let secret = "sk-live-0123456789{abc}";
        let long = "x".repeat(8192);
        let key = bucket_key("fikra", [("api_key", secret), ("note", long.as_str())].into_iter());
        let estimate = estimate_key(&key, "req-1");

        assert!(!key.contains("sk-live"));
        assert_eq!(key.len(), 42);
        assert_eq!(estimate.len(), 42);
        assert_eq!(key[..23], estimate[..23]);
    }

    #[test]
    fn field_boundaries_change_the_key() {
        let a = bucket_key("d", [("ab", "c")].into_iter());
        let b = bucket_key("d", [("a", "bc")].into_iter());
        assert_ne!(a, b);
    }
}
