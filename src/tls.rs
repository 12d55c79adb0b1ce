//! TLS for the gRPC port, with optional client-certificate checks.
//!
//! Certificates and keys are PEM files, read once at start; a rotated
//! certificate takes effect on the next restart (a rolling restart in
//! Kubernetes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// The PEM files of the gRPC port's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; without it
    /// clients are not asked for a certificate.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {flag} file {path}: {error}")]
    Read { flag: &'static str, path: String, error: std::io::Error },
    #[error("{flag} file {path} holds no PEM block (-----BEGIN ...); give a PEM-encoded {what}")]
    NotPem { flag: &'static str, path: String, what: &'static str },
    #[error("{flag} file {path} is not a valid PEM-encoded {what}: {error}")]
    BadPem { flag: &'static str, path: String, what: &'static str, error: String },
    #[error("TLS settings rejected: {0}")]
    Settings(String),
    #[error("--tls-cert and --tls-key do not make a usable identity: {0}; check that --tls-key is the key of --tls-cert's first certificate")]
    KeyMismatch(String),
}

impl TlsFiles {
    /// Reads the files into the server's TLS settings: HTTP/2 by ALPN, and
    /// client certificates required when a client CA is given.
    pub fn server_config(&self) -> Result<TlsAcceptor, TlsError> {
        let certs = certificates(&self.cert, "--tls-cert", "certificate chain")?;
        let key = read_pem(&self.key, "--tls-key", "private key")?;
        let what = "unencrypted private key (PKCS#8, PKCS#1 or SEC1)";
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|error| {
            let text = String::from_utf8_lossy(&key);
            if text.contains("ENCRYPTED") {
                bad_pem(&self.key, "--tls-key", what, "the key is encrypted; decrypt it, for example with `openssl pkey -in KEY -out PLAIN`")
            } else if text.contains("-----BEGIN CERTIFICATE-----") {
                bad_pem(&self.key, "--tls-key", what, "it holds a certificate, not a key (are --tls-cert and --tls-key swapped?)")
            } else {
                bad_pem(&self.key, "--tls-key", what, error)
            }
        })?;
        // ring, as for the Redis connections: it builds without cmake. It
        // has no post-quantum key exchange, which rustls now marks.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| TlsError::Settings(error.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in certificates(ca, "--tls-client-ca", "CA certificate")? {
                    roots.add(cert).map_err(|error| bad_pem(ca, "--tls-client-ca", "CA certificate", error))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|error| bad_pem(ca, "--tls-client-ca", "CA certificate", error))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|error| TlsError::KeyMismatch(error.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn certificates(path: &Path, flag: &'static str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read_pem(path, flag, what)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| bad_pem(path, flag, what, error))?;
    if certs.is_empty() {
        return Err(bad_pem(path, flag, what, "it holds no CERTIFICATE block (is it a key?)"));
    }
    Ok(certs)
}

fn bad_pem(path: &Path, flag: &'static str, what: &'static str, error: impl std::fmt::Display) -> TlsError {
    TlsError::BadPem { flag, path: path.display().to_string(), what, error: error.to_string() }
}

fn read_pem(path: &Path, flag: &'static str, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let text = std::fs::read(path).map_err(|error| TlsError::Read { flag, path: path.display().to_string(), error })?;
    if !text.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(TlsError::NotPem { flag, path: path.display().to_string(), what });
    }
    Ok(text)
}
