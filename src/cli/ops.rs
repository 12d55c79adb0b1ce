//! Options for operating `serve`: the metrics port, TLS and shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::tls::TlsFiles;

/// The metrics and probe address served when none is given.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9102";

/// Metrics, TLS and shutdown options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    /// Address of the HTTP port with /metrics (Prometheus), /healthz
    /// (liveness) and /readyz (readiness).
    #[arg(long, env = "FIKRA_METRICS_LISTEN", default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// PEM certificate chain of the gRPC port; with --tls-key it serves TLS.
    #[arg(long, env = "FIKRA_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the gRPC port's certificate.
    #[arg(long, env = "FIKRA_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates; with it, every client must present a
    /// certificate that chains to one of them.
    #[arg(long, env = "FIKRA_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Time from SIGTERM to exit at the latest, such as 10s or 500ms. Calls
    /// in flight finish within it.
    #[arg(long, env = "FIKRA_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Time after SIGTERM during which new connections are still accepted
    /// while health reports NOT_SERVING, so load balancers can stop sending
    /// first. Must be shorter than --shutdown-grace.
    #[arg(long, env = "FIKRA_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
}

impl OpsArgs {
    /// Returns the TLS files, when TLS is on.
    pub fn tls_files(&self) -> Option<TlsFiles> {
        let (cert, key) = (self.tls_cert.clone()?, self.tls_key.clone()?);
        Some(TlsFiles { cert, key, client_ca: self.tls_client_ca.clone() })
    }

    /// Checks the options that depend on each other.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.shutdown_delay >= self.shutdown_grace {
            anyhow::bail!(
                "--shutdown-delay {:?} is not shorter than --shutdown-grace {:?}; lower the delay or raise the grace period",
                self.shutdown_delay,
                self.shutdown_grace
            );
        }
        Ok(())
    }
}

/// Parses a duration such as `10s`, `500ms`, `2m` or `1.5s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("invalid duration `{text}`; write a number and a unit, such as 10s or 500ms"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration `{text}`: unknown unit `{unit}`; use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("invalid duration `{text}`: out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_without_unit_are_refused() {
        assert!(parse_duration("10").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("ten").unwrap_err().contains("invalid duration"));
        assert!(parse_duration("5h").unwrap_err().contains("use ms, s or m"));
    }
}
