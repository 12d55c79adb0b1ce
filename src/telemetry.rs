//! Logging setup and log throttling.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber; `RUST_LOG` overrides `default_level`.
pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only on a terminal, so log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests starting several servers) keeps the first.
    drop(result);
}

/// Formats a listener's local address for a log line, or `unknown` when
/// the socket could not report it.
pub fn address_text(address: Option<std::net::SocketAddr>) -> String {
    address.map_or_else(|| "unknown".to_owned(), |address| address.to_string())
}

/// How often a throttled log line may repeat.
const THROTTLE_INTERVAL: Duration = Duration::from_secs(10);

/// Lets a repeated log line through at most once per interval and counts
/// the lines it held back.
#[derive(Debug, Default)]
pub struct Throttle {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    pub fn new() -> Self {
        Self::default()
    }

    /// `Some(held back since the last line)` when the line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Ordering::Relaxed);
        let interval = THROTTLE_INTERVAL.as_millis() as u64;
        if last != 0 && now.saturating_sub(last) < interval
            || self.last_ms.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}
