//! The gRPC server: rate-limit service, health, reflection, shutdown.
//!
//! Health tells the truth: NOT_SERVING until the store answers a ping,
//! NOT_SERVING again while it does not, and NOT_SERVING from the moment
//! shutdown starts, so load balancers drain the replica first.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::limiter::Limiter;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::rls::RateLimitHandler;
use crate::store::Store;

/// The service name health reports under, besides the empty overall name.
pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// How often the store's health is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves on `listener` until `shutdown` completes, then drains in-flight
/// calls and returns.
pub async fn run(listener: TcpListener, limiter: Limiter, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    let address = listener.local_addr().ok();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let handler = RateLimitHandler::new(limiter.clone());

    let (stop_health, stopped) = tokio::sync::watch::channel(false);
    let health_task = tokio::spawn(watch_store(limiter.store().clone(), reporter.clone(), stopped));

    let shutdown = {
        let reporter = reporter.clone();
        async move {
            shutdown.await;
            info!("Shutting down: health is NOT_SERVING, draining in-flight calls");
            let _ = stop_health.send(true);
            set_health(&reporter, ServingStatus::NotServing).await;
        }
    };

    info!(listen.addr = ?address, store = limiter.store().kind(), "Serving ShouldRateLimit");
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(RateLimitServiceServer::new(handler))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;
    health_task.abort();
    info!(listen.addr = ?address, "Server stopped");
    Ok(result?)
}

/// Accepted connections with Nagle's algorithm off: with it on, a small
/// answer waits for the peer's delayed ACK (about 40 ms on Linux), twice
/// Envoy's default 20 ms deadline.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

/// Pings the store every [`HEALTH_INTERVAL`] and reports the result.
async fn watch_store(store: Store, reporter: HealthReporter, mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut serving = None;
    loop {
        if *stopped.borrow() {
            return;
        }
        let healthy = match tokio::time::timeout(HEALTH_INTERVAL, store.ping()).await {
            Ok(Ok(())) => true,
            Ok(Err(error)) => {
                if serving != Some(false) {
                    warn!(store = store.kind(), %error, "Store lost; health is NOT_SERVING");
                }
                false
            }
            Err(_) => {
                if serving != Some(false) {
                    warn!(store = store.kind(), "Store ping timed out; health is NOT_SERVING");
                }
                false
            }
        };
        if serving != Some(healthy) && !*stopped.borrow() {
            if healthy {
                info!(store = store.kind(), "Store answers; health is SERVING");
            }
            let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
            set_health(&reporter, status).await;
            serving = Some(healthy);
        }
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = stopped.changed() => {}
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}
