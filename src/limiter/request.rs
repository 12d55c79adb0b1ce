//! A rate-limit call in domain terms, checked against the request bounds.

/// One `ShouldRateLimit` call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckRequest {
    pub domain: String,
    pub descriptors: Vec<Descriptor>,
    /// The request-level cost; 0 means 1.
    pub hits: u32,
}

/// One descriptor of a call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub entries: Vec<Entry>,
    /// A limit chosen by Envoy for this descriptor only.
    pub limit: Option<LimitOverride>,
    /// The descriptor's own cost; `Some(0)` means check only.
    pub hits: Option<u64>,
    /// Credit the cost back instead of charging it.
    pub negative: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: String,
}

/// A per-descriptor limit from Envoy, as sent (the unit is the raw enum
/// number, so an unknown one can be counted instead of rejected).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitOverride {
    pub requests_per_unit: u32,
    pub unit: i32,
    /// Absent means 1.
    pub multiplier: Option<u32>,
}

/// Bounds on a call, checked before any store work.
///
/// Faults of the gateway's own request (the domain, the number of
/// descriptors and entries, entry keys) are rejected with a message naming
/// the field, its size and the bound. Entry values come from clients, so an
/// over-long value is denied instead (see [`RequestBounds::max_value_len`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBounds {
    /// Maximum domain length in bytes.
    pub max_domain_len: usize,
    pub max_descriptors: usize,
    /// Maximum number of entries in one descriptor.
    pub max_entries: usize,
    /// Maximum entry key length in bytes.
    pub max_key_len: usize,
    /// Maximum entry value length in bytes. A longer value is denied, not
    /// rejected, because clients control values.
    pub max_value_len: usize,
    /// Maximum encoded request size in bytes. The gRPC server rejects a larger
    /// request with OUT_OF_RANGE before it decodes it.
    pub max_message_bytes: usize,
}

impl RequestBounds {
    pub const DEFAULT_MAX_DOMAIN_LEN: usize = 256;
    pub const DEFAULT_MAX_DESCRIPTORS: usize = 64;
    pub const DEFAULT_MAX_ENTRIES: usize = 32;
    pub const DEFAULT_MAX_KEY_LEN: usize = 256;
    pub const DEFAULT_MAX_VALUE_LEN: usize = 16 * 1024;
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
}

impl Default for RequestBounds {
    fn default() -> Self {
        Self {
            max_domain_len: Self::DEFAULT_MAX_DOMAIN_LEN,
            max_descriptors: Self::DEFAULT_MAX_DESCRIPTORS,
            max_entries: Self::DEFAULT_MAX_ENTRIES,
            max_key_len: Self::DEFAULT_MAX_KEY_LEN,
            max_value_len: Self::DEFAULT_MAX_VALUE_LEN,
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

/// A call the gateway built wrongly. Each message names the field, and for
/// a bound, the size found, the maximum and the option that sets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("domain is empty; set the rate-limit filter's `domain`")]
    EmptyDomain,
    #[error("domain is {len} bytes, more than the maximum of {max} (--max-domain-bytes)")]
    DomainTooLong { len: usize, max: usize },
    #[error("descriptors is empty; a call needs at least one descriptor")]
    NoDescriptors,
    #[error("descriptors has {count} descriptors, more than the maximum of {max} (--max-descriptors)")]
    TooManyDescriptors { count: usize, max: usize },
    #[error("descriptors[{index}].entries has {count} entries, more than the maximum of {max} (--max-entries)")]
    TooManyEntries { index: usize, count: usize, max: usize },
    #[error("descriptors[{index}].entries[{entry}].key is empty; every entry needs a key")]
    EmptyKey { index: usize, entry: usize },
    #[error("descriptors[{index}].entries[{entry}].key is {len} bytes, more than the maximum of {max} (--max-key-bytes)")]
    KeyTooLong { index: usize, entry: usize, len: usize, max: usize },
}

impl CheckRequest {
    /// Checks the gateway's own faults. Over-long values are not checked
    /// here: they are the client's, and get a denial instead.
    pub fn validate(&self, bounds: &RequestBounds) -> Result<(), InvalidRequest> {
        if self.domain.is_empty() {
            return Err(InvalidRequest::EmptyDomain);
        }
        if self.domain.len() > bounds.max_domain_len {
            return Err(InvalidRequest::DomainTooLong { len: self.domain.len(), max: bounds.max_domain_len });
        }
        if self.descriptors.is_empty() {
            return Err(InvalidRequest::NoDescriptors);
        }
        if self.descriptors.len() > bounds.max_descriptors {
            return Err(InvalidRequest::TooManyDescriptors { count: self.descriptors.len(), max: bounds.max_descriptors });
        }
        for (index, descriptor) in self.descriptors.iter().enumerate() {
            let count = descriptor.entries.len();
            if count > bounds.max_entries {
                return Err(InvalidRequest::TooManyEntries { index, count, max: bounds.max_entries });
            }
            for (entry, Entry { key, .. }) in descriptor.entries.iter().enumerate() {
                if key.is_empty() {
                    return Err(InvalidRequest::EmptyKey { index, entry });
                }
                if key.len() > bounds.max_key_len {
                    return Err(InvalidRequest::KeyTooLong { index, entry, len: key.len(), max: bounds.max_key_len });
                }
            }
        }
        Ok(())
    }
}
