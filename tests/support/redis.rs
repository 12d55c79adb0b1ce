//! A throwaway `redis-server` for tests: loopback only, a free port, its own
//! temporary directory, no persistence. Dropping it kills the server.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to reply.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to find a free port when another process takes the chosen one.
const START_ATTEMPTS: usize = 5;

/// A `redis-server` child process on `127.0.0.1`.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` from `PATH` on a free loopback port and waits
    /// until it replies.
    ///
    /// Panics with the end of the server's log when it does not start.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory for redis-server");
        let mut server = Self { port: 0, dir, child: None };
        for attempt in 1..=START_ATTEMPTS {
            server.port = free_port();
            match server.launch() {
                Ok(()) => return server,
                Err(error) if attempt < START_ATTEMPTS => eprintln!("redis-server start failed, retrying: {error}"),
                Err(error) => panic!("redis-server did not start: {error}\n{}", server.log_tail()),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Returns the URL clients connect with.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Process id of the running server, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server with SIGTERM and waits for it to exit. A paused
    /// server is resumed first, so it can handle the signal.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed: {status}");
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        child.wait().expect("wait for redis-server to exit");
    }

    /// Freezes the server with SIGSTOP: connections stay open but nothing
    /// replies, as with a hung host.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again with SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let status = Command::new("kill").args([signal, &child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {} failed: {status}", child.id());
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with empty data (nothing is
    /// persisted).
    pub fn restart(&mut self) {
        self.stop();
        self.launch().unwrap_or_else(|error| panic!("redis-server did not restart: {error}\n{}", self.log_tail()));
    }

    /// Runs `redis-cli` with `args` against this server and returns its
    /// standard output without the trailing newline.
    ///
    /// Panics when redis-cli fails or prints an error reply.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        let stdout = String::from_utf8_lossy(&output.stdout).trim_end().to_owned();
        assert!(
            output.status.success() && !stdout.starts_with("ERR") && !stdout.starts_with("WRONGTYPE"),
            "redis-cli {args:?} failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// Lists the keys matching `pattern`, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let output = self.cli(&["--scan", "--pattern", pattern]);
        let mut keys: Vec<String> = output.lines().filter(|line| !line.is_empty()).map(str::to_owned).collect();
        keys.sort();
        keys
    }

    /// The remaining time to live of `key` in milliseconds, as PTTL returns
    /// it: -1 without a TTL, -2 when the key does not exist.
    pub fn pttl(&self, key: &str) -> i64 {
        let output = self.cli(&["PTTL", key]);
        output.parse().unwrap_or_else(|_| panic!("PTTL {key} returned {output:?}"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn launch(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let log = self.log_path();
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("cannot run redis-server from PATH: {error}"))?;

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match answering_pid(self.port) {
                Some(pid) if pid == child.id() => {
                    self.child = Some(child);
                    return Ok(());
                }
                Some(pid) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("port {port} is taken by another redis-server (pid {pid})"));
                }
                None => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server on port {port} exited with {status}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("redis-server on port {port} did not answer within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    listener.local_addr().expect("read the bound address").port()
}

/// Reads the process id of the Redis server on `port` from `INFO server`.
/// Returns `None` while nothing replies.
fn answering_pid(port: u16) -> Option<u32> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    stream.write_all(b"INFO server\r\n").ok()?;

    // The reply is one bulk string: "$<length>\r\n<text>\r\n".
    let mut reader = BufReader::new(stream);
    let mut header = String::new();
    reader.read_line(&mut header).ok()?;
    let length: usize = header.strip_prefix('$')?.trim_end().parse().ok()?;
    let mut text = vec![0_u8; length];
    reader.read_exact(&mut text).ok()?;

    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
}
