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
    /// Options added after the defaults, such as `--cluster-enabled yes`.
    extra_args: Vec<String>,
    /// `Some(text)` runs the server as a Sentinel with this configuration.
    sentinel_config: Option<String>,
}

impl RedisServer {
    /// Starts `redis-server` from `PATH` on a free loopback port and waits
    /// until it replies.
    ///
    /// Panics with the end of the server's log when it does not start.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts `redis-server` like [`start`](Self::start), with `extra_args`
    /// after the defaults.
    pub fn start_with(extra_args: &[&str]) -> Self {
        let extra_args = extra_args.iter().map(|arg| (*arg).to_owned()).collect();
        Self::start_process(extra_args, None)
    }

    /// Starts a Sentinel monitoring the primary at `primary_port` under
    /// `name`, with a quorum of 2 and a down-after time of 1 s.
    pub fn start_sentinel(name: &str, primary_port: u16) -> Self {
        let config = format!(
            "sentinel monitor {name} 127.0.0.1 {primary_port} 2\n\
             sentinel down-after-milliseconds {name} 1000\n\
             sentinel failover-timeout {name} 4000\n\
             sentinel parallel-syncs {name} 1\n"
        );
        Self::start_process(Vec::new(), Some(config))
    }

    fn start_process(extra_args: Vec<String>, sentinel_config: Option<String>) -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory for redis-server");
        let mut server = Self { port: 0, dir, child: None, extra_args, sentinel_config };
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

    /// Calls of `command` (lower case, as `evalsha`) this server has served,
    /// from `INFO commandstats`; 0 before the first.
    pub fn command_calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:");
        self.cli(&["INFO", "commandstats"])
            .lines()
            .find(|line| line.starts_with(&prefix))
            .and_then(|line| line.split("calls=").nth(1)?.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Script round trips this server has served: EVALSHA, EVAL and SCRIPT
    /// calls from `INFO commandstats`. The commands a script runs inside
    /// Redis are not among them.
    pub fn script_calls(&self) -> u64 {
        let names = ["cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_script"];
        self.cli(&["INFO", "commandstats"])
            .lines()
            .filter(|line| names.iter().any(|name| line.starts_with(name)))
            .filter_map(|line| line.split("calls=").nth(1)?.split(',').next()?.parse::<u64>().ok())
            .sum()
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
        let mut command = Command::new("redis-server");
        match &self.sentinel_config {
            Some(config) => {
                // A Sentinel rewrites its configuration file, so it needs one.
                let path = self.dir.path().join("sentinel.conf");
                let text = format!(
                    "bind 127.0.0.1\nport {port}\ndir {}\nlogfile {}\n{config}",
                    self.dir.path().display(),
                    log.display()
                );
                std::fs::write(&path, text).map_err(|error| format!("cannot write {}: {error}", path.display()))?;
                command.arg(&path).arg("--sentinel");
            }
            None => {
                command
                    .args(["--bind", "127.0.0.1", "--port", &port])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(self.dir.path())
                    .arg("--logfile")
                    .arg(&log)
                    .args(&self.extra_args);
            }
        }
        let mut child = command
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

/// How long a cluster or Sentinel setup may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// A Redis Cluster of throwaway servers on loopback: `primaries` primaries,
/// each with `replicas` replicas, a node timeout of 1 s so failovers finish
/// in a few seconds, and no persistence.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the servers, joins them with `redis-cli --cluster create` and
    /// waits until every node reports the cluster state `ok`.
    pub fn start(primaries: usize, replicas: usize) -> Self {
        let count = primaries * (1 + replicas);
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-replica-validity-factor",
                    "0",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|node| format!("127.0.0.1:{}", node.port())).collect();

        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        let cluster = Self { nodes };
        cluster.wait_until(SETTLE_TIMEOUT, "every node reports cluster_state:ok with all replicas synced", |cluster| {
            cluster.nodes.iter().all(|node| node.cluster_ok())
                && cluster.primary_ports().len() == primaries
                && cluster.nodes.iter().all(|node| node.replica_synced())
        });
        cluster
    }

    /// Returns the URL clients connect with, naming every node.
    pub fn url(&self) -> String {
        let mut nodes = self.nodes.iter().map(|node| format!("127.0.0.1:{}", node.port()));
        let first = nodes.next().expect("a cluster has nodes");
        let rest: Vec<String> = nodes.map(|node| format!("node={node}")).collect();
        format!("redis-cluster://{first}?{}", rest.join("&"))
    }

    /// Ports of the running nodes that are primaries.
    pub fn primary_ports(&self) -> Vec<u16> {
        self.nodes.iter().filter(|node| node.is_running() && node.role() == "master").map(RedisServer::port).collect()
    }

    /// The running node at `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes.iter().find(|node| node.port() == port && node.is_running()).expect("a running node on that port")
    }

    pub fn node_mut(&mut self, port: u16) -> &mut RedisServer {
        self.nodes.iter_mut().find(|node| node.port() == port).expect("a node on that port")
    }

    /// The port of the primary that serves `slot`, from a running node's
    /// `CLUSTER NODES`.
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        let node = self.nodes.iter().find(|node| node.is_running()).expect("a running node");
        for line in node.cli(&["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let port = fields[1].split(['@', ':']).nth(1).and_then(|port| port.parse().ok()).expect("a node port");
            for range in &fields[8..] {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.parse::<u16>())
                    && (start..=end).contains(&slot)
                {
                    return port;
                }
            }
        }
        panic!("no primary serves slot {slot}");
    }

    /// Keys matching `pattern` on every running primary, sorted.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> =
            self.primary_ports().into_iter().flat_map(|port| self.node(port).keys(pattern)).collect();
        keys.sort();
        keys
    }

    /// Runs `redis-cli -c` (following redirections) against a running node.
    pub fn cli(&self, args: &[&str]) -> String {
        let node = self.nodes.iter().find(|node| node.is_running()).expect("a running node");
        node.cli(&[&["-c"], args].concat())
    }

    pub fn pttl(&self, key: &str) -> i64 {
        let output = self.cli(&["PTTL", key]);
        output.parse().unwrap_or_else(|_| panic!("PTTL {key} returned {output:?}"))
    }

    /// The port of a running replica of the primary at `primary_port`, if
    /// it has one.
    pub fn replica_of(&self, primary_port: u16) -> Option<u16> {
        let id = self.node(primary_port).cli(&["CLUSTER", "MYID"]);
        let node = self.nodes.iter().find(|node| node.is_running()).expect("a running node");
        for line in node.cli(&["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() >= 4 && fields[2].contains("slave") && !fields[2].contains("fail") && fields[3] == id {
                return fields[1].split(['@', ':']).nth(1).and_then(|port| port.parse().ok());
            }
        }
        None
    }

    /// Waits until at least half the running nodes are primaries (a replica
    /// took over from a stopped primary) and every running node reports
    /// `ok`. Returns when that happened.
    pub fn wait_for_failover(&self, timeout: Duration) -> Instant {
        self.wait_until(timeout, "a replica takes over and the cluster is ok", |cluster| {
            let running: Vec<&RedisServer> = cluster.nodes.iter().filter(|node| node.is_running()).collect();
            running.iter().all(|node| node.cluster_ok())
                && running.iter().filter(|node| node.role() == "master").count() * 2 >= running.len()
        });
        Instant::now()
    }

    fn wait_until(&self, timeout: Duration, what: &str, ready: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ready(self) {
            assert!(Instant::now() < deadline, "the cluster did not settle within {timeout:?}: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A Sentinel-managed primary on loopback: one primary, one replica and
/// three Sentinels (quorum 2, down-after 1 s), all throwaway processes.
pub struct RedisSentinel {
    pub name: String,
    pub data: Vec<RedisServer>,
    pub sentinels: Vec<RedisServer>,
}

impl RedisSentinel {
    /// Starts the servers and waits until the replica is synced and the
    /// Sentinels can reach a quorum.
    pub fn start() -> Self {
        let name = "fikra".to_owned();
        let primary = RedisServer::start();
        let replica_of = primary.port().to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &replica_of]);
        let sentinels: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_sentinel(&name, primary.port())).collect();
        let setup = Self { name, data: vec![primary, replica], sentinels };

        let replica_port = setup.data[1].port().to_string();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let synced = setup.data.iter().all(RedisServer::replica_synced);
            // Each Sentinel must know the replica and both other Sentinels.
            let quorum = setup.sentinels.iter().all(|sentinel| {
                let replicas = sentinel.cli(&["SENTINEL", "REPLICAS", &setup.name]);
                let peers = sentinel.cli(&["SENTINEL", "SENTINELS", &setup.name]);
                replicas.lines().any(|line| line == replica_port) && peers.lines().filter(|line| *line == "runid").count() >= 2
            });
            if synced && quorum {
                return setup;
            }
            assert!(Instant::now() < deadline, "the Sentinel setup did not settle within {SETTLE_TIMEOUT:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Returns the URL clients connect with: every Sentinel, and the
    /// service name.
    pub fn url(&self) -> String {
        let first = self.sentinels[0].port();
        let rest: Vec<String> = self.sentinels[1..].iter().map(|s| format!("&node=127.0.0.1:{}", s.port())).collect();
        format!("redis-sentinel://127.0.0.1:{first}?sentinelServiceName={}{}", self.name, rest.concat())
    }

    /// The port of the primary the Sentinels announce now.
    pub fn primary_port(&self) -> u16 {
        let sentinel = self.sentinels.iter().find(|sentinel| sentinel.is_running()).expect("a running Sentinel");
        let output = sentinel.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.name]);
        output.lines().nth(1).and_then(|port| port.parse().ok()).unwrap_or_else(|| panic!("no primary address in {output:?}"))
    }

    /// The data server on `port`.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.data.iter().find(|server| server.port() == port).expect("a data server on that port")
    }

    pub fn server_mut(&mut self, port: u16) -> &mut RedisServer {
        self.data.iter_mut().find(|server| server.port() == port).expect("a data server on that port")
    }

    /// The running data server that is a primary now, by its own `ROLE`.
    pub fn primary(&self) -> &RedisServer {
        self.data
            .iter()
            .find(|server| server.is_running() && server.role() == "master")
            .expect("a running primary")
    }

    /// Waits until the Sentinels announce a primary other than `old_port`
    /// and it replies as a primary. Returns its port.
    pub fn wait_for_new_primary(&self, old_port: u16, timeout: Duration) -> u16 {
        let deadline = Instant::now() + timeout;
        loop {
            let port = self.primary_port();
            if port != old_port && self.server(port).role() == "master" {
                return port;
            }
            assert!(Instant::now() < deadline, "no new primary within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl RedisServer {
    /// Whether the process runs (it may be paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The role this server replies to `ROLE` with: `master`, `slave` or
    /// `sentinel`.
    pub fn role(&self) -> String {
        self.cli(&["ROLE"]).lines().next().unwrap_or_default().to_owned()
    }

    /// Whether `CLUSTER INFO` reports the state `ok`.
    fn cluster_ok(&self) -> bool {
        !self.is_running() || self.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
    }

    /// Whether this server is a primary, or a replica whose link to its
    /// primary is up.
    fn replica_synced(&self) -> bool {
        if !self.is_running() {
            return true;
        }
        let info = self.cli(&["INFO", "replication"]);
        info.contains("role:master") || info.contains("master_link_status:up")
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
