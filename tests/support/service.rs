//! The real server, started in-process on a free loopback port.
#![allow(dead_code)]

use std::net::SocketAddr;

use fikra_ratelimit::config::{self, Limits};
use fikra_ratelimit::limiter::{Limiter, LimiterSettings};
use fikra_ratelimit::proto::envoy::extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor};
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::RateLimitRequest;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::server;
use fikra_ratelimit::store::Store;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// A running server; dropping it shuts it down.
pub struct Service {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Service {
    pub async fn start(limits: Limits, store: Store) -> Self {
        Self::start_with(limits, store, LimiterSettings::default()).await
    }

    /// Starts the server with `settings`, such as smaller request bounds.
    pub async fn start_with(limits: Limits, store: Store, settings: LimiterSettings) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound address");
        let limiter = Limiter::new(limits, store, settings);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server::run(listener, limiter, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        Self { addr, stop: Some(stop), task: Some(task) }
    }

    pub async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://{}", self.addr)).await.expect("connect to the service")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await.expect("connect")
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

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Limits from one YAML text.
pub fn limits(yaml: &str) -> Limits {
    let domain = config::parse(yaml, "test.yaml").unwrap_or_else(|problems| panic!("test config is invalid: {problems:?}"));
    Limits { domains: [(domain.name.clone(), std::sync::Arc::new(domain))].into_iter().collect() }
}

/// A protocol descriptor from `key=value` pairs.
pub fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(key, value)| rate_limit_descriptor::Entry { key: (*key).to_owned(), value: (*value).to_owned() })
            .collect(),
        limit: None,
        hits_addend: hits,
        is_negative_hits: false,
    }
}

pub fn rls_request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest { domain: domain.to_owned(), descriptors, hits_addend: 0 }
}
