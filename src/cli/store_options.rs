//! Options of the Redis store: deadlines, the failure mode and bounds.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse_duration;
use crate::store::FailureMode;
use crate::store::redis::RedisOptions;

/// Store options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Upper bound of every store call, such as 250ms. The deadline the
    /// caller sends (gRPC grpc-timeout; Envoy sends 20ms unless configured
    /// otherwise), less a quarter of it for the rest of the call, wins
    /// when it is shorter.
    #[arg(long, env = "FIKRA_STORE_TIMEOUT", default_value = "250ms", value_parser = parse_positive_duration)]
    pub store_timeout: Duration,
    /// The answer when the store cannot judge a call in time: `unavailable`
    /// (gRPC UNAVAILABLE, so Envoy's failure_mode_deny decides) or `allow`
    /// (allowed without rate-limit headers, counted in metrics).
    #[arg(long, env = "FIKRA_FAILURE_MODE", value_enum, default_value_t = FailureMode::Unavailable)]
    pub failure_mode: FailureMode,
    /// Store calls allowed in flight at once; more get the failure mode at
    /// once instead of waiting.
    #[arg(long, env = "FIKRA_MAX_IN_FLIGHT", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Redis clients, which calls take in turn. In a cluster each client
    /// connects to every primary.
    #[arg(long, env = "FIKRA_REDIS_POOL_SIZE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub redis_pool_size: u32,
    /// Time allowed to connect to Redis, such as 2s, at start and on each
    /// reconnection attempt.
    #[arg(long, env = "FIKRA_REDIS_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_positive_duration)]
    pub redis_connect_timeout: Duration,
    /// PEM file of the CA certificates that Redis servers must chain to,
    /// for a rediss:// URL with a private CA. Without it the system's roots
    /// apply (SSL_CERT_FILE or SSL_CERT_DIR can replace them).
    #[arg(long, env = "FIKRA_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
}

impl StoreArgs {
    /// The Redis store settings these options set.
    pub fn redis_options(&self) -> RedisOptions {
        RedisOptions {
            connect_timeout: self.redis_connect_timeout,
            store_timeout: self.store_timeout,
            max_in_flight: self.max_in_flight as usize,
            pool_size: self.redis_pool_size as usize,
            ca_file: self.redis_ca_file.clone(),
            ..RedisOptions::default()
        }
    }
}

/// Parses a duration like [`parse_duration`], rejecting zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("invalid duration `{text}`: it must be longer than 0"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_duration_is_rejected() {
        assert!(parse_positive_duration("0ms").unwrap_err().contains("longer than 0"));
        assert_eq!(parse_positive_duration("20ms"), Ok(Duration::from_millis(20)));
    }
}
