//! Options that bound what one request and the in-memory store may hold.

use clap::Args;

use crate::limiter::RequestBounds;
use crate::store::memory::MemoryBounds;

/// Request and memory bounds of `serve`.
#[derive(Debug, Clone, Args)]
pub struct BoundsArgs {
    /// Maximum domain length in bytes; a longer domain is rejected with INVALID_ARGUMENT.
    #[arg(long, env = "FIKRA_MAX_DOMAIN_BYTES", default_value_t = RequestBounds::DEFAULT_MAX_DOMAIN_LEN, value_parser = at_least_one)]
    pub max_domain_bytes: usize,
    /// Maximum number of descriptors in one request; more are rejected with INVALID_ARGUMENT.
    #[arg(long, env = "FIKRA_MAX_DESCRIPTORS", default_value_t = RequestBounds::DEFAULT_MAX_DESCRIPTORS, value_parser = at_least_one)]
    pub max_descriptors: usize,
    /// Maximum number of entries in one descriptor; more are rejected with INVALID_ARGUMENT.
    #[arg(long, env = "FIKRA_MAX_ENTRIES", default_value_t = RequestBounds::DEFAULT_MAX_ENTRIES, value_parser = at_least_one)]
    pub max_entries: usize,
    /// Maximum entry key length in bytes; a longer key is rejected with INVALID_ARGUMENT.
    #[arg(long, env = "FIKRA_MAX_KEY_BYTES", default_value_t = RequestBounds::DEFAULT_MAX_KEY_LEN, value_parser = at_least_one)]
    pub max_key_bytes: usize,
    /// Maximum entry value length in bytes; a longer value is denied (OVER_LIMIT
    /// with x-should-retry: false), because clients choose values.
    #[arg(long, env = "FIKRA_MAX_VALUE_BYTES", default_value_t = RequestBounds::DEFAULT_MAX_VALUE_LEN, value_parser = at_least_one)]
    pub max_value_bytes: usize,
    /// Maximum request message size in bytes; gRPC rejects a larger message
    /// with OUT_OF_RANGE before decoding it.
    #[arg(long, env = "FIKRA_MAX_MESSAGE_BYTES", default_value_t = RequestBounds::DEFAULT_MAX_MESSAGE_BYTES, value_parser = at_least_one)]
    pub max_message_bytes: usize,
    /// Maximum number of buckets in the in-memory store; past it, the least
    /// used are evicted and their callers regain those units.
    #[arg(long, env = "FIKRA_MAX_BUCKETS", default_value_t = MemoryBounds::DEFAULT_MAX_BUCKETS, value_parser = at_least_one)]
    pub max_buckets: usize,
    /// Maximum number of token estimates the in-memory store remembers; past
    /// it, the oldest are evicted and their reports are charged in full.
    #[arg(long, env = "FIKRA_MAX_ESTIMATES", default_value_t = MemoryBounds::DEFAULT_MAX_ESTIMATES, value_parser = at_least_one)]
    pub max_estimates: usize,
}

impl BoundsArgs {
    pub fn request_bounds(&self) -> RequestBounds {
        RequestBounds {
            max_domain_len: self.max_domain_bytes,
            max_descriptors: self.max_descriptors,
            max_entries: self.max_entries,
            max_key_len: self.max_key_bytes,
            max_value_len: self.max_value_bytes,
            max_message_bytes: self.max_message_bytes,
        }
    }

    pub fn memory_bounds(&self) -> MemoryBounds {
        MemoryBounds { max_buckets: self.max_buckets, max_estimates: self.max_estimates }
    }
}

fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(value) => Ok(value),
        Err(error) => Err(format!("{error}; expected a whole number")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        bounds: BoundsArgs,
    }

    #[test]
    fn defaults_match_the_library() {
        let command = Command::try_parse_from(["serve"]).expect("defaults parse");
        assert_eq!(command.bounds.request_bounds(), RequestBounds::default());
        assert_eq!(command.bounds.memory_bounds(), MemoryBounds::default());
    }

    #[test]
    fn flags_set_every_bound() {
        let command = Command::try_parse_from([
            "serve",
            "--max-domain-bytes=10",
            "--max-descriptors=2",
            "--max-entries=3",
            "--max-key-bytes=4",
            "--max-value-bytes=5",
            "--max-message-bytes=4096",
            "--max-buckets=6",
            "--max-estimates=7",
        ])
        .expect("flags parse");
        let request = command.bounds.request_bounds();
        assert_eq!(request.max_domain_len, 10);
        assert_eq!(request.max_descriptors, 2);
        assert_eq!(request.max_entries, 3);
        assert_eq!(request.max_key_len, 4);
        assert_eq!(request.max_value_len, 5);
        assert_eq!(request.max_message_bytes, 4096);
        assert_eq!(command.bounds.memory_bounds(), MemoryBounds { max_buckets: 6, max_estimates: 7 });
    }

    #[test]
    fn zero_bound_is_rejected() {
        let error = Command::try_parse_from(["serve", "--max-descriptors=0"]).expect_err("zero is invalid");
        assert!(error.to_string().contains("must be at least 1"), "{error}");
    }
}
