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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBounds {
    pub max_descriptors: usize,
    pub max_entries: usize,
    /// Longest entry key in bytes.
    pub max_key_len: usize,
    /// Longest entry value in bytes; a longer value is denied, not rejected,
    /// because clients control values.
    pub max_value_len: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        Self { max_descriptors: 64, max_entries: 32, max_key_len: 256, max_value_len: 16 * 1024 }
    }
}

/// A call the gateway built wrongly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("domain is empty; set the rate-limit filter's `domain`")]
    EmptyDomain,
    #[error("descriptors is empty; a call needs at least one descriptor")]
    NoDescriptors,
    #[error("descriptors has {count} entries, more than the bound of {max}")]
    TooManyDescriptors { count: usize, max: usize },
    #[error("descriptors[{index}].entries has {count} entries, more than the bound of {max}")]
    TooManyEntries { index: usize, count: usize, max: usize },
    #[error("descriptors[{index}].entries[{entry}].key is empty; every entry needs a key")]
    EmptyKey { index: usize, entry: usize },
    #[error("descriptors[{index}].entries[{entry}].key is {len} bytes, more than the bound of {max}")]
    KeyTooLong { index: usize, entry: usize, len: usize, max: usize },
}

impl CheckRequest {
    /// Checks the gateway's own faults. Over-long values are not checked
    /// here: they are the client's, and get a denial instead.
    pub fn validate(&self, bounds: &RequestBounds) -> Result<(), InvalidRequest> {
        if self.domain.is_empty() {
            return Err(InvalidRequest::EmptyDomain);
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
