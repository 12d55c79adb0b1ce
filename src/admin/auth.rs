//! Bearer-token authentication of the admin port.

use tonic::{Request, Status};

/// The admin token, kept as its BLAKE3 hash. `blake3::Hash` compares in
/// constant time, so a wrong token's timing reveals nothing of the right one.
#[derive(Clone)]
pub struct AdminToken {
    hash: blake3::Hash,
    identity: String,
}

/// Who made an admin call, for the audit log.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl AdminToken {
    /// A token; `None` when it is empty.
    pub fn new(token: &str) -> Option<Self> {
        if token.is_empty() {
            return None;
        }
        let hash = blake3::hash(token.as_bytes());
        let identity = format!("token:{}", &hash.to_hex()[..12]);
        Some(Self { hash, identity })
    }

    /// Accepts a request with `authorization: Bearer TOKEN` and records the
    /// caller's identity; rejects any other with UNAUTHENTICATED.
    pub fn check(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer TOKEN`; pass the admin token"))?;
        if blake3::hash(presented.trim().as_bytes()) != self.hash {
            return Err(Status::unauthenticated("invalid admin token"));
        }
        request.extensions_mut().insert(Caller(self.identity.clone()));
        Ok(request)
    }
}
