//! The admin gRPC service: record top-ups, set and clear overrides, link
//! API keys to accounts, and show an account with its bucket levels.
//!
//! It runs on its own port, off unless `serve --admin-listen` is given, and
//! never on the decision port. Every call needs the bearer token read from
//! `--token-file` (compared in constant time). The caller's identity in the
//! audit log is `token:` and the first 12 hex digits of the token's BLAKE3
//! hash. NOTE: the admin port has no TLS of its own; keep it on loopback or
//! a private network, since the token travels in clear text.

mod auth;
mod convert;

use std::future::Future;
use std::path::Path;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::accounts::{AccountError, Accounts, Overrides};
use crate::config::{DomainLimits, Unit};
use crate::limiter::{CheckRequest, Descriptor, Entry, Limiter};
use crate::proto::ADMIN_DESCRIPTOR_SET;
use crate::proto::fikra::admin::v1 as pb;
use crate::proto::fikra::admin::v1::account_admin_server::{AccountAdmin, AccountAdminServer};

pub use auth::{AdminToken, Caller};

/// The admin service over a limiter's configuration and store.
#[derive(Clone)]
pub struct AdminService {
    limiter: Limiter,
}

impl AdminService {
    pub fn new(limiter: Limiter) -> Self {
        Self { limiter }
    }

    /// The accounts of the named domain, or of the only domain with accounts.
    fn accounts(&self, domain: &str) -> Result<(Accounts, std::sync::Arc<DomainLimits>), Status> {
        let limits = self.limiter.limits();
        let domain = if domain.is_empty() {
            let mut with_accounts = limits.domains.values().filter(|d| d.accounts.is_some());
            match (with_accounts.next(), with_accounts.next()) {
                (Some(domain), None) => domain.clone(),
                (None, _) => return Err(Status::failed_precondition("no domain has an `accounts` section in its configuration")),
                (Some(_), Some(_)) => return Err(Status::invalid_argument("several domains have accounts; set `domain`")),
            }
        } else {
            limits.domain(domain).cloned().ok_or_else(|| Status::not_found(format!("unknown domain `{domain}`")))?
        };
        let accounts = Accounts::new(self.limiter.store(), &domain).map_err(status)?;
        Ok((accounts, domain))
    }
}

fn status(error: AccountError) -> Status {
    match error {
        AccountError::Invalid(message) => Status::invalid_argument(message),
        AccountError::Contended(_) => Status::aborted(error.to_string()),
        AccountError::Store(store) if store.is_transient() => Status::unavailable(store.to_string()),
        AccountError::Store(_) | AccountError::Unreadable(_) => Status::internal(error.to_string()),
    }
}

fn api_key(value: &str) -> Result<&str, Status> {
    if value.is_empty() { Err(Status::invalid_argument("api_key is empty; give the API key")) } else { Ok(value) }
}

fn caller<T>(request: &Request<T>) -> String {
    request.extensions().get::<Caller>().map_or_else(|| "unknown".to_owned(), |caller| caller.0.clone())
}

#[tonic::async_trait]
impl AccountAdmin for AdminService {
    async fn record_top_up(&self, request: Request<pb::RecordTopUpRequest>) -> Result<Response<pb::ChangeResponse>, Status> {
        let who = caller(&request);
        let body = request.into_inner();
        let (accounts, _) = self.accounts(&body.domain)?;
        let change = accounts.record_top_up(api_key(&body.api_key)?, &who).await.map_err(status)?;
        self.limiter.forget_accounts();
        Ok(Response::new(convert::change(&change)))
    }

    async fn set_override(&self, request: Request<pb::SetOverrideRequest>) -> Result<Response<pb::ChangeResponse>, Status> {
        let who = caller(&request);
        let body = request.into_inner();
        let (accounts, _) = self.accounts(&body.domain)?;
        let unit = if body.unit.is_empty() {
            Unit::Minute
        } else {
            Unit::parse(&body.unit).ok_or_else(|| {
                Status::invalid_argument(format!("unknown unit `{}`; use second, minute, hour, day, week, month or year", body.unit))
            })?
        };
        let overrides = Overrides { requests: body.requests_per_unit, tokens: body.tokens_per_unit, unit };
        let change = accounts.set_override(api_key(&body.api_key)?, overrides, &who).await.map_err(status)?;
        self.limiter.forget_accounts();
        Ok(Response::new(convert::change(&change)))
    }

    async fn clear_override(&self, request: Request<pb::ClearOverrideRequest>) -> Result<Response<pb::ChangeResponse>, Status> {
        let who = caller(&request);
        let body = request.into_inner();
        let (accounts, _) = self.accounts(&body.domain)?;
        let change = accounts.clear_override(api_key(&body.api_key)?, &who).await.map_err(status)?;
        self.limiter.forget_accounts();
        Ok(Response::new(convert::change(&change)))
    }

    async fn link_key(&self, request: Request<pb::LinkKeyRequest>) -> Result<Response<pb::ChangeResponse>, Status> {
        let who = caller(&request);
        let body = request.into_inner();
        let (accounts, _) = self.accounts(&body.domain)?;
        let change = accounts.link_key(api_key(&body.api_key)?, &body.account_id, &who).await.map_err(status)?;
        self.limiter.forget_accounts();
        Ok(Response::new(convert::change(&change)))
    }

    async fn show(&self, request: Request<pb::ShowRequest>) -> Result<Response<pb::ShowResponse>, Status> {
        let body = request.into_inner();
        let (accounts, domain) = self.accounts(&body.domain)?;
        let key = api_key(&body.api_key)?;
        let view = accounts.show(key).await.map_err(status)?;

        // Check-only descriptors (a cost of 0) read every bucket of the key
        // under its current tier without charging it.
        let settings = domain.accounts.as_ref().expect("Accounts::new checked the domain");
        let descriptors = bucket_descriptors(&domain, &settings.key_entry, key);
        let check = CheckRequest { domain: domain.name.clone(), descriptors, hits: 0 };
        let decision = self.limiter.decide(&check).await.map_err(|error| Status::unavailable(error.to_string()))?;
        let buckets = decision.statuses.iter().filter_map(convert::bucket).collect();
        let effective_tier = decision.statuses.iter().find_map(|s| s.facts.tier.as_deref().map(str::to_owned)).unwrap_or_default();
        Ok(Response::new(pb::ShowResponse {
            known: view.account.is_some(),
            account: view.account.as_ref().map(convert::account),
            effective_tier,
            key_hash: view.record_key,
            buckets,
        }))
    }
}

/// One check-only descriptor per rule that limits `api_key` on its own or
/// with one more entry of an exact value, such as `[api_key=K, meter=requests]`.
fn bucket_descriptors(domain: &DomainLimits, key_entry: &str, api_key: &str) -> Vec<Descriptor> {
    let descriptor = |entries: Vec<(&str, &str)>| Descriptor {
        entries: entries.into_iter().map(|(key, value)| Entry { key: key.to_owned(), value: value.to_owned() }).collect(),
        limit: None,
        hits: Some(0),
        negative: false,
    };
    let Some((node, _)) = domain.root.children.get(key_entry).and_then(|slot| slot.find(api_key)) else { return Vec::new() };
    let mut descriptors = Vec::new();
    if node.rule.is_some() {
        descriptors.push(descriptor(vec![(key_entry, api_key)]));
    }
    let mut children: Vec<_> = node.children.iter().collect();
    children.sort_by(|a, b| a.0.cmp(b.0));
    for (key, slot) in children {
        let mut values: Vec<_> = slot.exact.iter().filter(|(_, child)| child.rule.is_some()).map(|(value, _)| value).collect();
        values.sort();
        for value in values {
            descriptors.push(descriptor(vec![(key_entry, api_key), (key.as_str(), value.as_str())]));
        }
    }
    descriptors
}

/// Reads the admin token from `path`: the file's content without
/// surrounding whitespace, which must not be empty.
pub fn read_token(path: &Path) -> anyhow::Result<AdminToken> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| anyhow::anyhow!("cannot read the admin token file {}: {error}", path.display()))?;
    AdminToken::new(text.trim()).ok_or_else(|| anyhow::anyhow!("the admin token file {} is empty; write a token into it", path.display()))
}

/// Serves the admin service on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    service: AdminService,
    token: AdminToken,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let address = listener.local_addr().ok();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ADMIN_DESCRIPTOR_SET)
        .build_v1()?;
    let admin = AccountAdminServer::with_interceptor(service, move |request| token.check(request));
    info!(admin.addr = %crate::telemetry::address_text(address), "Serving the admin service");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    info!(admin.addr = %crate::telemetry::address_text(address), "Admin service stopped");
    Ok(())
}
