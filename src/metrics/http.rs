//! The HTTP port for Prometheus and Kubernetes: `/metrics`, `/healthz` and
//! `/readyz`.
//!
//! `/healthz` returns 200 while the process serves HTTP at all. It is the
//! liveness probe, so a store outage never restarts the pod. `/readyz`
//! returns 503 while the service should get no traffic: during shutdown,
//! and while the store is lost when store failures are answered with
//! UNAVAILABLE. Under fail-open the service stays ready through a store
//! outage, since it still answers every call.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use super::Metrics;
use crate::store::Store;

/// The content type of the OpenMetrics text that `/metrics` serves.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether the service should get traffic. Clones share the state.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<ReadinessState>,
}

struct ReadinessState {
    follow_store: bool,
    store_healthy: AtomicBool,
    draining: AtomicBool,
    metrics: Metrics,
}

impl Readiness {
    /// Creates the state: not ready until the store responds (when
    /// `follow_store`), and never after shutdown starts.
    pub fn new(follow_store: bool, metrics: Metrics) -> Self {
        let readiness = Self {
            inner: Arc::new(ReadinessState {
                follow_store,
                store_healthy: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                metrics,
            }),
        };
        readiness.publish();
        readiness
    }

    pub fn set_store_healthy(&self, healthy: bool) {
        self.inner.store_healthy.store(healthy, Ordering::SeqCst);
        self.publish();
    }

    pub fn start_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.publish();
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err("shutting down");
        }
        if !self.inner.store_healthy.load(Ordering::SeqCst) {
            if self.inner.follow_store {
                return Err("store unavailable");
            }
        }
        Ok(())
    }

    fn publish(&self) {
        self.inner.metrics.set_ready(self.check().is_ok());
    }
}

#[derive(Clone)]
struct Probes {
    metrics: Metrics,
    readiness: Readiness,
    store: Store,
}

/// Serves the HTTP port until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    store: Store,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Probes { metrics, readiness, store });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn scrape(State(probes): State<Probes>) -> Response {
    probes.metrics.observe_store(&probes.store);
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], probes.metrics.encode()).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(probes): State<Probes>) -> Response {
    match probes.readiness.check() {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")).into_response(),
    }
}
