//! The service binary as a child process on loopback, and its memory.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Maximum wait for the service to report SERVING.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A `fikra-ratelimit serve` process, killed by its PID on drop.
pub struct Server {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Server {
    /// Writes `configs` (file name, YAML text) to a temporary directory and
    /// starts `binary serve` on a free loopback port with `extra` arguments,
    /// then waits until its health check returns SERVING.
    pub async fn start(binary: &Path, configs: &[(&str, String)], redis_url: Option<&str>, extra: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("fikra-soak-").tempdir()?;
        let config_dir = dir.path().join("config");
        fs::create_dir(&config_dir)?;
        for (name, text) in configs {
            fs::write(config_dir.join(name), text)?;
        }

        let port = free_port()?;
        let log = fs::File::create(dir.path().join("service.log"))?;
        let mut command = Command::new(binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_dir)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(url) = redis_url {
            command.args(["--redis-url", url]);
        }
        let child = command.spawn().map_err(|error| anyhow::anyhow!("cannot run {}: {error}", binary.display()))?;

        let mut server = Self { child, port, dir };
        server.wait_until_serving().await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the service's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("service.log")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Opens a new HTTP/2 connection to the service.
    pub async fn client(&self) -> anyhow::Result<RateLimitServiceClient<Channel>> {
        let channel = Endpoint::from_shared(self.endpoint())?
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(10))
            .connect()
            .await?;
        Ok(RateLimitServiceClient::new(channel).max_decoding_message_size(usize::MAX))
    }

    /// Reads the process's resident memory and its peak from /proc.
    pub fn memory(&self) -> Memory {
        memory_of(self.child.id())
    }

    async fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("the service exited with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                anyhow::bail!("the service was not SERVING after {STARTUP_TIMEOUT:?}:\n{}", self.log());
            }
            if self.serving().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn serving(&self) -> bool {
        let Ok(channel) = Endpoint::from_shared(self.endpoint()).expect("a valid URL").connect().await else {
            return false;
        };
        let request = HealthCheckRequest { service: String::new() };
        match HealthClient::new(channel).check(request).await {
            Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
            Err(_) => false,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident and peak resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_kib: u64,
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmRSS {:.1} MiB (VmHWM {:.1} MiB)", self.rss_kib as f64 / 1024.0, self.peak_kib as f64 / 1024.0)
    }
}

/// Reads VmRSS and VmHWM from `/proc/PID/status`; zeros when unreadable.
pub fn memory_of(pid: u32) -> Memory {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    Memory { rss_kib: field("VmRSS:"), peak_kib: field("VmHWM:") }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
