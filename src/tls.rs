//! TLS for the gRPC port, with optional client-certificate checks.
//!
//! Certificates and keys are PEM files, read once at start; a rotated
//! certificate takes effect on the next restart (a rolling restart in
//! Kubernetes).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

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
}

impl TlsFiles {
    /// Reads the files into tonic's server TLS settings.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let cert = read_pem(&self.cert, "--tls-cert", "certificate chain")?;
        let key = read_pem(&self.key, "--tls-key", "private key")?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.client_ca {
            let ca = read_pem(ca, "--tls-client-ca", "CA certificate")?;
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }
}

fn read_pem(path: &Path, flag: &'static str, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let text = std::fs::read(path).map_err(|error| TlsError::Read { flag, path: path.display().to_string(), error })?;
    if !text.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(TlsError::NotPem { flag, path: path.display().to_string(), what });
    }
    Ok(text)
}
