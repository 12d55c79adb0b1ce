//! Helpers for the operations tests: the binary as a child process with any
//! arguments, the in-process server with its metrics port, a configuration
//! directory laid out like a mounted Kubernetes ConfigMap, a small HTTP
//! client and a metrics parser.
//!
//! Include it with `#[path = "support/ops.rs"] mod ops;`. Every child
//! process is killed by its PID when its handle drops.

#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use fikra_ratelimit::config::Limits;
use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::metrics::Metrics;
use fikra_ratelimit::server::{self, ServerOptions};
use fikra_ratelimit::store::Store;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// Maximum wait for the binary to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts with new ports when another process takes a chosen one.
const START_ATTEMPTS: usize = 5;

// === The binary ===

/// A `fikra-ratelimit serve` process on loopback ports, killed on drop.
pub struct Binary {
    child: Option<Child>,
    pub grpc_port: u16,
    pub metrics_port: u16,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Binary {
    /// Starts `serve --config CONFIG` with `args`, on free loopback ports
    /// and the in-memory store, and waits until `/readyz` answers 200.
    pub async fn start(config: &Path, args: &[&str]) -> Binary {
        for attempt in 1..=START_ATTEMPTS {
            let mut binary = Binary::spawn(config, args);
            match binary.wait_until_ready().await {
                Ok(()) => return binary,
                Err(_) if attempt < START_ATTEMPTS && binary.log().contains("cannot listen on") => {
                    eprintln!("a port was taken, retrying on other ports");
                }
                Err(reason) => panic!("fikra-ratelimit did not start: {reason}\n{}", binary.log()),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Spawns the process without waiting for it.
    pub fn spawn(config: &Path, args: &[&str]) -> Binary {
        let dir = tempfile::Builder::new().prefix("fikra-ops-").tempdir().expect("create a temporary directory");
        let log_path = dir.path().join("service.log");
        let log = fs::File::create(&log_path).expect("create the log file");
        let grpc_port = free_port();
        let metrics_port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_fikra-ratelimit"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(args)
            .env("RUST_LOG", "debug,h2=info,hyper=info,tower=info,rustls=info,tonic=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .expect("start fikra-ratelimit");
        Binary { child: Some(child), grpc_port, metrics_port, log_path, _dir: dir }
    }

    async fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(format!("it exited with {status}"));
            }
            if Instant::now() > deadline {
                return Err(format!("/readyz was not 200 after {STARTUP_TIMEOUT:?}"));
            }
            if let Ok((200, _)) = try_get(self.metrics_port, "/readyz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM by PID.
    pub fn terminate(&self) {
        let status = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().expect("running").try_wait().expect("check the process")
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub async fn metrics(&self) -> String {
        scrape(self.metrics_port).await
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("End of the fikra-ratelimit log:\n{}", lines[lines.len().saturating_sub(60)..].join("\n"));
        }
        if let Some(mut child) = self.child.take() {
            // kill fails only when the process has exited; wait reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `fikra-ratelimit ARGS` to completion and returns its status and
/// combined output.
pub fn run_binary(args: &[&str]) -> (ExitStatus, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_fikra-ratelimit")).args(args).output().expect("run fikra-ratelimit");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status, text)
}

// === The in-process server ===

/// The real server in-process, on free loopback ports, with its metrics port.
pub struct InProcess {
    pub grpc: SocketAddr,
    pub metrics_port: u16,
    pub metrics: Metrics,
    pub limiter: Limiter,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcess {
    pub async fn start(limits: Limits, store: Store) -> InProcess {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let grpc = listener.local_addr().expect("bound address");
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let metrics_port = metrics_listener.local_addr().expect("bound address").port();
        let limiter = Limiter::new(limits, store, LimiterSettings::default());
        let metrics = Metrics::new();
        let options = ServerOptions { metrics: metrics.clone(), metrics_listener: Some(metrics_listener), ..ServerOptions::default() };
        let (stop, stopped) = oneshot::channel::<()>();
        let server_limiter = limiter.clone();
        let task = tokio::spawn(async move {
            server::run_with(listener, server_limiter, options, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        let service = InProcess { grpc, metrics_port, metrics, limiter, stop: Some(stop), task: Some(task) };
        service.wait_until_ready().await;
        service
    }

    async fn wait_until_ready(&self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok((200, _)) = try_get(self.metrics_port, "/readyz").await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the in-process server was not ready after {STARTUP_TIMEOUT:?}");
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Shuts down and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// === A ConfigMap-like directory ===

/// A configuration directory laid out the way the kubelet writes a mounted
/// ConfigMap: the files live in a timestamped directory, `..data` links to
/// it, and each visible name links to `..data/NAME`. An update writes a
/// new timestamped directory and swaps `..data` with one rename.
pub struct ConfigMapDir {
    dir: TempDir,
    generation: u32,
    names: Vec<String>,
}

impl ConfigMapDir {
    pub fn new(files: &[(&str, &str)]) -> ConfigMapDir {
        let dir = tempfile::Builder::new().prefix("fikra-configmap-").tempdir().expect("create the directory");
        let mut config = ConfigMapDir { dir, generation: 0, names: Vec::new() };
        config.update(files);
        config
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces every file at once, as a ConfigMap update does.
    pub fn update(&mut self, files: &[(&str, &str)]) {
        use std::os::unix::fs::symlink;

        self.generation += 1;
        let root = self.dir.path();
        let old_target = fs::read_link(root.join("..data")).ok();
        let target = format!("..2026_01_01_00_00_{:02}.{}", self.generation, 1000 + self.generation);
        fs::create_dir(root.join(&target)).expect("create the timestamped directory");
        for (name, text) in files {
            fs::write(root.join(&target).join(name), text).expect("write a file");
        }

        // The swap: a new link under a temporary name, renamed over ..data.
        let _ = fs::remove_file(root.join("..data_tmp"));
        symlink(&target, root.join("..data_tmp")).expect("create ..data_tmp");
        fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap ..data");

        let new_names: Vec<String> = files.iter().map(|(name, _)| (*name).to_owned()).collect();
        for name in &new_names {
            if !self.names.contains(name) {
                symlink(format!("..data/{name}"), root.join(name)).expect("link a file");
            }
        }
        for name in &self.names {
            if !new_names.contains(name) {
                fs::remove_file(root.join(name)).expect("unlink a removed file");
            }
        }
        self.names = new_names;
        if let Some(old) = old_target {
            fs::remove_dir_all(root.join(old)).expect("remove the old timestamped directory");
        }
    }
}

// === HTTP and metrics ===

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// GETs `path` on 127.0.0.1:`port` over HTTP/1.1 and returns the status
/// and body.
pub async fn try_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
        let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
        let body = if chunked { dechunk(body) } else { body.to_owned() };
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("HTTP request timed out")))
}

pub async fn get(port: u16, path: &str) -> (u16, String) {
    try_get(port, path).await.unwrap_or_else(|error| panic!("GET {path} on port {port}: {error}"))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

pub async fn scrape(port: u16) -> String {
    let (status, body) = get(port, "/metrics").await;
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body
}

/// The value of the sample `name{labels}` in a scrape, where `labels` must
/// be exactly the sample's labels; `None` when there is no such sample.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    wanted.sort();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (sample_name, sample_labels) = match series.split_once('{') {
            Some((sample_name, rest)) => (sample_name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if sample_name != name {
            continue;
        }
        let mut found: Vec<String> =
            if sample_labels.is_empty() { Vec::new() } else { sample_labels.split(',').map(str::to_owned).collect() };
        found.sort();
        if found == wanted {
            return value.parse().ok();
        }
    }
    None
}

/// Like [`sample`], with a missing sample read as 0.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}
