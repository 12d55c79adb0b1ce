//! TLS on the gRPC port with client-certificate checks, against the real
//! binary: a client without the right certificate is refused, and Envoy
//! configured with mutual TLS to the service works end to end. The
//! certificates are made at test time.

#[path = "support/envoy.rs"]
mod envoy;
#[path = "support/ops.rs"]
mod ops;
#[path = "support/service.rs"]
mod service;

use std::path::{Path, PathBuf};
use std::time::Duration;

use envoy::{Envoy, EnvoyOptions, Upstream};
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ops::{Binary, value};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use service::{descriptor, rls_request};
use tempfile::TempDir;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A certificate and its key, in PEM.
struct Pem {
    cert: String,
    key: String,
}

/// A CA that signs leaf certificates.
struct Authority {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a self-signed CA");
        Authority { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// Signs a leaf certificate for `names` (DNS names or IP addresses).
    fn leaf(&self, common_name: &str, names: &[&str]) -> Pem {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).expect("leaf parameters");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("a leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("a signed leaf");
        Pem { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// The test PKI on disk: one CA signs the server's and the gateway's
/// certificates; a second, unrelated CA signs an intruder's.
struct Pki {
    dir: TempDir,
    ca: Authority,
    client: Pem,
    intruder: Pem,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::Builder::new().prefix("fikra-pki-").tempdir().expect("a PKI directory");
        let ca = Authority::new("fikra test CA");
        let server = ca.leaf("fikra-ratelimit", &["localhost", "127.0.0.1"]);
        let client = ca.leaf("envoy-gateway", &["envoy-gateway"]);
        let intruder = Authority::new("another CA").leaf("intruder", &["intruder"]);
        let pki = Pki { dir, ca, client, intruder };
        pki.write("ca.pem", &pki.ca.pem);
        pki.write("server.pem", &server.cert);
        pki.write("server-key.pem", &server.key);
        pki.write("client.pem", &pki.client.cert);
        pki.write("client-key.pem", &pki.client.key);
        pki
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).expect("write a PEM file");
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn path_text(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// Returns the serve arguments for TLS with client certificates.
    fn serve_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path_text("server.pem"),
            "--tls-key".into(),
            self.path_text("server-key.pem"),
            "--tls-client-ca".into(),
            self.path_text("ca.pem"),
        ]
    }
}

fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/fikra.yaml")
}

async fn start_tls_service(pki: &Pki) -> Binary {
    let mut args = pki.serve_args();
    args.extend(["--log-format".to_owned(), "json".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Binary::start(&shipped_config(), &args).await
}

/// Sends one check over TLS with `identity` as the client certificate and
/// returns the code, or the error text when the call fails.
async fn check_over_tls(service: &Binary, ca: &str, identity: Option<&Pem>) -> Result<i32, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(pem) = identity {
        tls = tls.identity(Identity::from_pem(&pem.cert, &pem.key));
    }
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{}", service.grpc_port))
        .expect("a URL")
        .tls_config(tls)
        .expect("client TLS settings")
        .timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await.map_err(|error| format!("connect: {error:?}"))?;
    let request = rls_request("fikra", vec![descriptor(&[("api_key", "tls-key"), ("meter", "requests")], None)]);
    let answer = RateLimitServiceClient::new(channel).should_rate_limit(request).await.map_err(|status| format!("{status:?}"))?;
    Ok(answer.into_inner().overall_code)
}

#[tokio::test]
async fn tls_refuses_clients_without_the_right_certificate() {
    let pki = Pki::new();
    let service = start_tls_service(&pki).await;

    let allowed = check_over_tls(&service, &pki.ca.pem, Some(&pki.client)).await;
    assert_eq!(allowed, Ok(Code::Ok as i32), "a client with a certificate from the CA is served");

    let without = check_over_tls(&service, &pki.ca.pem, None).await;
    assert!(without.is_err(), "a client without a certificate is refused: {without:?}");

    let intruder = check_over_tls(&service, &pki.ca.pem, Some(&pki.intruder)).await;
    assert!(intruder.is_err(), "a certificate from another CA is refused: {intruder:?}");

    // Plain text (h2c) to the TLS port gets no answer either.
    let plain = async {
        let channel = Endpoint::from_shared(service.grpc_url()).ok()?.timeout(Duration::from_secs(5)).connect().await.ok()?;
        let request = rls_request("fikra", vec![descriptor(&[("api_key", "plain"), ("meter", "requests")], None)]);
        RateLimitServiceClient::new(channel).should_rate_limit(request).await.ok()
    };
    assert!(plain.await.is_none(), "a plain-text client is refused");

    // Only the one good call reached the limiter.
    let text = service.metrics().await;
    assert_eq!(value(&text, "fikra_calls_total", &[("domain", "fikra"), ("code", "ok")]), 1.0);
}

/// Runs `serve` with the certificate and key files `cert` and `key` of
/// `pki`, and returns its exit status and output.
fn start_with_files(pki: &Pki, cert: &str, key: &str) -> (std::process::ExitStatus, String) {
    ops::run_binary(&[
        "serve",
        "--config",
        &shipped_config().display().to_string(),
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pki.path_text(cert),
        "--tls-key",
        &pki.path_text(key),
    ])
}

#[tokio::test]
async fn shutdown_drops_unfinished_tls_handshakes() {
    let pki = Pki::new();
    let mut service = start_tls_service(&pki).await;
    // A client that connects and never starts its handshake.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", service.grpc_port)).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    service.terminate();
    let status = service.wait_exit(Duration::from_secs(5)).await;
    assert!(status.is_some(), "the service waited for a handshake that never started: {}", service.log());
}

#[tokio::test]
async fn tls_start_errors_name_the_file_and_fix() {
    let pki = Pki::new();
    let start = |cert: &str, key: &str| start_with_files(&pki, cert, key);
    let (status, output) = start("server-key.pem", "server-key.pem");
    assert!(!status.success(), "{output}");
    assert!(output.contains("--tls-cert"), "a key given as the certificate: {output}");
    assert!(output.contains("no CERTIFICATE block"), "a key given as the certificate: {output}");

    let (status, output) = start("server.pem", "server.pem");
    assert!(!status.success(), "{output}");
    assert!(output.contains("--tls-key"), "a certificate given as the key: {output}");
    assert!(output.contains("not a key"), "a certificate given as the key: {output}");

    let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n-----END ENCRYPTED PRIVATE KEY-----\n";
    pki.write("encrypted-key.pem", encrypted);
    let (status, output) = start("server.pem", "encrypted-key.pem");
    assert!(!status.success(), "{output}");
    assert!(output.contains("encrypted"), "an encrypted key: {output}");
    assert!(output.contains("openssl pkey"), "an encrypted key: {output}");
}

#[tokio::test]
async fn tls_start_fails_on_unreadable_certificate() {
    let pki = Pki::new();
    pki.write("not-pem.pem", "not a certificate");
    let (status, output) = start_with_files(&pki, "not-pem.pem", "server-key.pem");
    assert!(!status.success(), "{output}");
    assert!(output.contains("--tls-cert"), "{output}");
    assert!(output.contains("not-pem.pem"), "{output}");

    let (status, output) = ops::run_binary(&["serve", "--config", "x.yaml", "--tls-cert", "a.pem"]);
    assert!(!status.success());
    assert!(output.contains("--tls-key"), "a certificate needs its key: {output}");
}

/// Renders the test Envoy configuration with mutual TLS on the fikra_ratelimit
/// cluster: Envoy checks the service's certificate against the CA and the
/// name `localhost`, and presents its own.
fn envoy_config_with_tls(options: &EnvoyOptions, pki: &Pki) -> String {
    let config = envoy::render_envoy_config(options, 0, 0);
    let cluster = "  - name: fikra_ratelimit\n    type: STATIC\n    connect_timeout: 1s\n";
    assert!(config.contains(cluster), "the test template's fikra_ratelimit cluster changed");
    let tls = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{filename: "{client}"}}
            private_key: {{filename: "{client_key}"}}
          validation_context:
            trusted_ca: {{filename: "{ca}"}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: localhost}}
"#,
        client = pki.path_text("client.pem"),
        client_key = pki.path_text("client-key.pem"),
        ca = pki.path_text("ca.pem"),
    );
    config.replace(cluster, &format!("{cluster}{tls}"))
}

#[tokio::test]
async fn envoy_calls_the_service_over_mutual_tls() {
    let pki = Pki::new();
    let (upstream, service) = tokio::join!(Upstream::start(), start_tls_service(&pki));
    let options = EnvoyOptions::new(upstream.port(), service.grpc_port);
    let config = envoy_config_with_tls(&options, &pki);
    let envoy = Envoy::start_with_config(config).await;

    let headers = [("x-api-key", "tls-e2e-key"), ("x-test-usage-tokens", "none"), ("content-type", "application/json")];
    let response = envoy.request("POST", "/v1/chat/completions", &headers, br#"{"max_tokens":0}"#).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-ratelimit-limit-requests"), Some("30"));
    assert_eq!(response.header("x-ratelimit-remaining-requests"), Some("29"));
    assert_eq!(envoy.stat("cluster.fikra_ratelimit.ssl.handshake").await, Some(1));

    let text = service.metrics().await;
    assert_eq!(value(&text, "fikra_calls_total", &[("domain", "fikra"), ("code", "ok")]), 1.0);

    // The service logged the decision at debug level, as JSON, without the key.
    let log = service.log();
    assert!(log.contains("Decided"), "{log}");
    for line in log.lines() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "not a JSON log line: {line}");
        assert!(!line.contains("tls-e2e-key"), "a log line carries the API key: {line}");
    }
}
