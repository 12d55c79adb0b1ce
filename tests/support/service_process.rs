//! Runs the `fikra-ratelimit` binary as a child process on loopback.
//!
//! Include it from an integration test with
//! `#[path = "support/service_process.rs"] mod service_process;`. The process is killed by its
//! PID when its handle is dropped, and a test that panics meanwhile prints the
//! end of the service's log.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Path of the shipped service configuration, relative to the repository root.
pub const SHIPPED_CONFIG: &str = "deploy/config/fikra.yaml";

/// Maximum wait for the service to listen and report SERVING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts with a new port when another process takes the chosen one.
const START_ATTEMPTS: usize = 5;

/// Number of log lines shown when a test fails while the service runs.
const LOG_TAIL_LINES: usize = 60;

/// A `fikra-ratelimit serve` process, killed on drop.
pub struct ServiceProcess {
    child: Child,
    port: u16,
    log_path: PathBuf,
    // Holds the log file until the process is gone.
    _dir: TempDir,
}

impl ServiceProcess {
    /// Starts `fikra-ratelimit serve` with the shipped configuration on a free
    /// loopback port, with buckets in the Redis at `redis_url`, and waits until
    /// its gRPC health check returns SERVING.
    ///
    /// The log level is `info`, or the value of `RUST_LOG`. Panics with the end
    /// of the service's log when it exits or is not SERVING within 30 s.
    pub async fn start(redis_url: &str) -> ServiceProcess {
        Self::start_with(redis_url, &[], &[]).await
    }

    /// Starts the service like [`ServiceProcess::start`], with extra
    /// command-line arguments and environment variables (such as `RUST_LOG`).
    pub async fn start_with(redis_url: &str, args: &[&str], env: &[(&str, &str)]) -> ServiceProcess {
        let config = repo_root().join(SHIPPED_CONFIG);
        for attempt in 1..=START_ATTEMPTS {
            let dir = tempfile::Builder::new()
                .prefix("fikra-service-")
                .tempdir()
                .expect("create a temporary directory for the service");
            let log_path = dir.path().join("service.log");
            let port = free_port();
            let child = spawn(&config, port, redis_url, &log_path, args, env);

            let mut service = ServiceProcess { child, port, log_path, _dir: dir };
            match service.wait_until_serving().await {
                Ok(()) => return service,
                // Another process took the port between free_port and the service's bind.
                Err(_) if attempt < START_ATTEMPTS && service.log().contains("cannot listen on") => {
                    eprintln!("fikra-ratelimit could not bind port {port}, retrying on another port");
                }
                // Drop prints the end of the log.
                Err(reason) => panic!("fikra-ratelimit did not start: {reason}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Port of the gRPC server on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the service's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Polls the health service until it returns SERVING. Returns the reason
    /// when the process exits or the timeout passes.
    async fn wait_until_serving(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let endpoint = format!("http://127.0.0.1:{}", self.port);
        loop {
            if let Some(status) = self.child.try_wait().expect("check whether the service runs") {
                return Err(format!("it exited with {status}"));
            }
            if Instant::now() > deadline {
                return Err(format!("its health was not SERVING after {STARTUP_TIMEOUT:?}"));
            }
            if health_is_serving(&endpoint).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("End of the fikra-ratelimit log:\n{}", self.log_tail());
        }
        stop_child(&mut self.child);
    }
}

fn spawn(config: &Path, port: u16, redis_url: &str, log_path: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    let log = fs::File::create(log_path).expect("create the service's log file");
    let log_for_stdout = log.try_clone().expect("clone the service's log file handle");
    Command::new(env!("CARGO_BIN_EXE_fikra-ratelimit"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", redis_url])
        // Several services run at once, so none takes the fixed metrics port.
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log_for_stdout)
        .stderr(log)
        .spawn()
        .expect("start fikra-ratelimit")
}

/// Returns whether the overall health status at `endpoint` is SERVING, and
/// false while nothing listens or the check fails.
async fn health_is_serving(endpoint: &str) -> bool {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .expect("a valid endpoint URL")
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    let request = HealthCheckRequest { service: String::new() };
    match HealthClient::new(channel).check(request).await {
        Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
        Err(_) => false,
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("local address of a bound listener").port()
}

/// Kills a child process by its PID and reaps it.
fn stop_child(child: &mut Child) {
    // kill fails only when the process has already exited, and wait reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}
