//! The gRPC server: rate-limit service, health, reflection, TLS, the
//! metrics port and graceful shutdown.
//!
//! Health reports the store's state: NOT_SERVING until the store answers a ping,
//! NOT_SERVING again while it does not, and NOT_SERVING from the moment
//! shutdown starts, so load balancers drain the replica first.
//!
//! Shutdown, once its signal arrives: health turns NOT_SERVING and
//! `/readyz` 503 at once; the listener keeps accepting for the shutdown
//! delay, so that load balancers that have not yet seen the change still
//! reach a live server; then the listener closes (new connections are
//! refused), every connection is told to finish (HTTP/2 GOAWAY), and calls
//! in flight complete. If they have not completed when the grace period
//! (counted from the signal) ends, the server returns anyway.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::metrics::http::Readiness;
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::proto::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use crate::rls::RateLimitHandler;
use crate::store::Store;
use crate::unary::DecideService;

mod conn;

/// The service name health reports under, besides the empty overall name.
pub const SERVICE_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService";

/// How often the store's health is checked.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// The longest wait for the metrics port's connections after the gRPC
/// server has stopped.
const HTTP_DRAIN: Duration = Duration::from_secs(1);

/// The default time from the shutdown signal to exit.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Everything about serving that is not the limiter.
pub struct ServerOptions {
    pub metrics: Metrics,
    /// The HTTP port for `/metrics`, `/healthz` and `/readyz`; none without it.
    pub metrics_listener: Option<TcpListener>,
    /// TLS on the gRPC port; plain text (h2c) without it.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// How long the listener keeps accepting after the shutdown signal.
    pub shutdown_delay: Duration,
    /// How long after the shutdown signal the server returns at the latest.
    pub shutdown_grace: Duration,
    /// Whether readiness follows the store's health. False under fail-open,
    /// where every call gets a response while the store is lost.
    pub ready_follows_store: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            metrics: Metrics::new(),
            metrics_listener: None,
            tls: None,
            shutdown_delay: Duration::ZERO,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            ready_follows_store: true,
        }
    }
}

/// Serves on `listener` with default options until `shutdown` completes,
/// then drains in-flight calls and returns.
pub async fn run(listener: TcpListener, limiter: Limiter, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
    run_with(listener, limiter, ServerOptions::default(), shutdown).await
}

/// Serves on `listener` until `shutdown` completes, then shuts down as the
/// module documentation describes.
pub async fn run_with(
    listener: TcpListener,
    limiter: Limiter,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let address = listener.local_addr().ok();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::NotServing).await;
    let readiness = Readiness::new(options.ready_follows_store, options.metrics.clone());

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let handler = RateLimitHandler::new(limiter.clone(), options.metrics.clone());

    let (stop_health, stopped) = watch::channel(false);
    let health_task =
        tokio::spawn(watch_store(limiter.store().clone(), reporter.clone(), readiness.clone(), stopped));

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = options.metrics_listener.map(|listener| {
        let http_address = listener.local_addr().ok();
        info!(metrics.addr = %crate::telemetry::address_text(http_address), "Serving /metrics, /healthz and /readyz");
        let store = limiter.store().clone();
        let serve = crate::metrics::http::serve(listener, options.metrics.clone(), readiness.clone(), store, async {
            let _ = http_stopped.await;
        });
        tokio::spawn(async move {
            if let Err(error) = serve.await {
                warn!(%error, metrics.addr = %crate::telemetry::address_text(http_address), "Metrics server failed");
            }
        })
    });

    let (signalled, mut signal_seen) = watch::channel(false);
    let delay = options.shutdown_delay;
    let grace = options.shutdown_grace;
    let drain = {
        let reporter = reporter.clone();
        let readiness = readiness.clone();
        async move {
            shutdown.await;
            let _ = signalled.send(true);
            info!(shutdown.delay = ?delay, shutdown.grace = ?grace, "Shutting down: health is NOT_SERVING");
            let _ = stop_health.send(true);
            set_health(&reporter, ServingStatus::NotServing).await;
            readiness.start_draining();
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            info!("Closing the listener and draining in-flight calls");
        }
    };
    let deadline = async move {
        while !*signal_seen.borrow() {
            if signal_seen.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        tokio::time::sleep(grace).await;
    };

    let tls = options.tls;
    info!(listen.addr = %crate::telemetry::address_text(address), listen.tls = tls.is_some(), store = limiter.store().kind(), "Serving ShouldRateLimit");
    // The other methods of the service, health and reflection keep tonic's
    // routes; `ShouldRateLimit` itself goes to `DecideService`.
    let rls = RateLimitServiceServer::new(handler.clone()).max_decoding_message_size(limiter.settings().bounds.max_message_bytes);
    let mut routes = Routes::builder();
    routes.add_service(health_service).add_service(reflection).add_service(rls);
    let decide_path = format!("/{}/ShouldRateLimit", <RateLimitServiceServer<RateLimitHandler> as NamedService>::NAME);
    let decide = DecideService::new(handler, limiter.settings().bounds.max_message_bytes);
    let edge = conn::Edge::new(&decide_path, decide, routes.routes());
    let serve = async move {
        conn::serve(listener, tls, edge, drain).await;
        Ok::<(), ServerError>(())
    };

    let result = tokio::select! {
        result = serve => result,
        () = deadline => {
            warn!(shutdown.grace = ?grace, "Calls still in flight at the end of the grace period; stopping anyway");
            Ok(())
        }
    };
    health_task.abort();
    let _ = stop_http.send(());
    if let Some(task) = http_task {
        // An idle keep-alive connection from a scraper must not hold the exit.
        let _ = tokio::time::timeout(HTTP_DRAIN, task).await;
    }
    info!(listen.addr = %crate::telemetry::address_text(address), "Server stopped");
    Ok(result?)
}

/// Pings the store every [`HEALTH_INTERVAL`] and reports the result to the
/// gRPC health service and to readiness.
async fn watch_store(store: Store, reporter: HealthReporter, readiness: Readiness, mut stopped: watch::Receiver<bool>) {
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
            readiness.set_store_healthy(healthy);
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
