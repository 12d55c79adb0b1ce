//! The command line: `serve`, `check-config` and `admin`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing::{error, info};

use crate::clock::Clock;
use crate::config;
use crate::limiter::{Limiter, LimiterSettings};
use crate::metrics::Metrics;
use crate::reload;
use crate::server::{self, ServerOptions};
use crate::store::{MemoryStore, RedisStore, Store};
use crate::telemetry::{self, LogFormat};

pub mod admin;
mod bounds;
mod ops;
mod store_options;

pub use bounds::BoundsArgs;
pub use ops::{OpsArgs, parse_duration};
pub use store_options::StoreArgs;

/// The gRPC address served when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8081";

/// Envoy rate-limit service with exact token buckets on Redis or in memory.
#[derive(Debug, Parser)]
#[command(name = "fikra-ratelimit", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve ShouldRateLimit over gRPC.
    Serve(ServeArgs),
    /// Change account tiers and overrides through the admin port.
    Admin(admin::AdminArgs),
    /// Validate configuration files and print every problem.
    CheckConfig {
        /// YAML files or directories of them.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration: a YAML file or a directory of YAML files.
    #[arg(long, env = "FIKRA_CONFIG")]
    pub config: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, env = "FIKRA_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Redis URL; without it buckets live in this process's memory (one
    /// replica only). Forms: redis://[[user]:password@]host:port[/db],
    /// rediss:// for TLS, redis-cluster://host:port?node=host:port and
    /// redis-sentinel://host:port?sentinelServiceName=NAME&node=host:port
    /// (the hosts are Sentinels). Passwords are never logged.
    #[arg(long, env = "FIKRA_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Log line format.
    #[arg(long, env = "FIKRA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Address of the admin gRPC port (accounts and overrides); off
    /// without it. Needs --token-file.
    #[arg(long, env = "FIKRA_ADMIN_LISTEN", requires = "token_file")]
    pub admin_listen: Option<SocketAddr>,
    /// File holding the bearer token every admin call must present.
    #[arg(long, env = "FIKRA_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Milliseconds a bucket known to be empty or in debt is denied
    /// locally, without a store round trip; 0 turns this off. A credit or
    /// promotion made through another replica can be missed for this long.
    #[arg(long, env = "FIKRA_DENY_CACHE_MS", default_value_t = 0)]
    pub deny_cache_ms: u64,
    /// Threads that serve calls, at most 1024; 0 starts one per CPU. One
    /// thread (the default) spends the least CPU per decision and batches
    /// store writes best. It serves tens of thousands of decisions per
    /// second, and replicas on Redis add more. The in-memory store runs as
    /// one replica, so there use 0 to use every core.
    #[arg(long, env = "FIKRA_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub worker_threads: u16,
    #[command(flatten)]
    pub bounds: BoundsArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// Builds the async runtime for a command line: the serving threads of
/// `serve`, one thread for the short-lived commands.
pub fn runtime(cli: &Cli) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = match &cli.command {
        Command::Serve(args) => usize::from(args.worker_threads),
        Command::Admin(_) | Command::CheckConfig { .. } => 1,
    };
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            builder.worker_threads(threads);
        }
        builder
    };
    builder.enable_all().build()
}

/// Runs a parsed command line and returns the process's exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::CheckConfig { paths } => check_config(&paths),
        Command::Admin(args) => admin::run(args).await,
        Command::Serve(args) => {
            telemetry::init(args.log_format, "info");
            match serve(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    error!(%error, "Service stopped on an error");
                    eprintln!("fikra-ratelimit: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(paths: &[PathBuf]) -> ExitCode {
    match config::load(paths) {
        Ok(limits) => {
            let mut names: Vec<&String> = limits.domains.keys().collect();
            names.sort();
            println!("configuration is valid: {} domain(s): {}", names.len(), names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", "));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    args.ops.validate()?;
    let metrics = Metrics::new();
    let config_paths = vec![args.config.clone()];
    let (limits, loaded) = reload::load_initial(&config_paths, &metrics)?;
    let tls = args.ops.tls_files().map(|files| files.server_config()).transpose()?;

    let store = match &args.redis_url {
        None => Store::Memory(MemoryStore::with_bounds(Clock::monotonic(), args.bounds.memory_bounds())),
        Some(url) => {
            let store = RedisStore::connect_with(url, &args.store.redis_options()).await?;
            info!(
                redis.url = %redact(url),
                store.timeout = ?args.store.store_timeout,
                store.failure_mode = ?args.store.failure_mode,
                store.max_in_flight = args.store.max_in_flight,
                "Using the Redis store"
            );
            Store::Redis(store)
        }
    };
    let settings = LimiterSettings {
        bounds: args.bounds.request_bounds(),
        failure_mode: args.store.failure_mode,
        deny_cache_max_age: std::time::Duration::from_millis(args.deny_cache_ms),
        ..LimiterSettings::default()
    };
    let limiter = Limiter::new(limits, store, settings);

    let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|error| {
        anyhow::anyhow!("cannot listen on {}: {error}; choose a free address with --listen", args.listen)
    })?;
    let metrics_listener = tokio::net::TcpListener::bind(args.ops.metrics_listen).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot listen on {} for metrics: {error}; choose a free address with --metrics-listen",
            args.ops.metrics_listen
        )
    })?;

    let admin = match (args.admin_listen, &args.token_file) {
        (Some(address), Some(token_file)) => {
            let token = crate::admin::read_token(token_file)?;
            let listener = tokio::net::TcpListener::bind(address).await.map_err(|error| {
                anyhow::anyhow!("cannot listen on {address} for the admin service: {error}; choose a free address with --admin-listen")
            })?;
            let service = crate::admin::AdminService::new(limiter.clone());
            Some(tokio::spawn(async move {
                if let Err(error) = crate::admin::serve(listener, service, token, shutdown_signal()).await {
                    error!(%error, "Admin service failed");
                }
            }))
        }
        _ => None,
    };

    let reload = tokio::spawn(reload::watch(config_paths, limiter.clone(), metrics.clone(), loaded, reload::DEFAULT_INTERVAL));
    let options = ServerOptions {
        metrics,
        metrics_listener: Some(metrics_listener),
        tls,
        shutdown_delay: args.ops.shutdown_delay,
        shutdown_grace: args.ops.shutdown_grace,
        // Under fail-open every call is answered while the store is lost.
        ready_follows_store: args.store.failure_mode != crate::store::FailureMode::Allow,
    };
    let result = server::run_with(listener, limiter, options, shutdown_signal()).await;
    reload.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    result?;
    Ok(())
}

/// A Redis URL with its passwords replaced by `***`: the one before the
/// host and a `sentinelPassword` query parameter. A URL that does not parse
/// is not shown at all, since a password could be anywhere in it.
pub fn redact(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else { return "<invalid URL>".to_owned() };
    if parsed.password().is_some() && parsed.set_password(Some("***")).is_err() {
        return "<invalid URL>".to_owned();
    }
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(name, value)| {
            let value = if name.eq_ignore_ascii_case("sentinelPassword") { "***".into() } else { value.into_owned() };
            (name.into_owned(), value)
        })
        .collect();
    if !pairs.is_empty() {
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            error!(%error, "Cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "Cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => info!(signal = "SIGINT", "Shutdown requested"),
        () = terminate => info!(signal = "SIGTERM", "Shutdown requested"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(redact("redis://:s3cret@127.0.0.1:6379/1"), "redis://:***@127.0.0.1:6379/1");
        assert_eq!(redact("rediss://user:s3cret@cache.example:6380"), "rediss://user:***@cache.example:6380");
        let sentinel = redact("redis-sentinel://u:p1@s1:26379?sentinelServiceName=main&sentinelPassword=p2&node=s2:26379");
        assert!(!sentinel.contains("p1") && !sentinel.contains("p2"), "{sentinel}");
        assert!(sentinel.contains("sentinelServiceName=main"), "{sentinel}");
        assert!(sentinel.contains("node=s2%3A26379") || sentinel.contains("node=s2:26379"), "{sentinel}");
        assert_eq!(redact("redis-cluster://127.0.0.1:7000?node=127.0.0.1:7001"), "redis-cluster://127.0.0.1:7000?node=127.0.0.1%3A7001");
    }

    #[test]
    fn redact_hides_unparsable_urls() {
        assert_eq!(redact("not a url with s3cret"), "<invalid URL>");
    }
}
