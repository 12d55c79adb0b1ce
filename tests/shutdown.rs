//! Graceful shutdown of the real binary: SIGTERM while clients stream
//! checks loses none of them. Every check either gets an answer or is
//! never accepted: its fresh connection is refused, the server's HTTP/2
//! GOAWAY tells the client the stream was not processed, or the client
//! never sent it because its connection was closing.

#[path = "support/ops.rs"]
mod ops;
#[path = "support/service.rs"]
mod service;

use std::error::Error as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use ops::{Binary, ConfigMapDir, get};
use service::{descriptor, rls_request};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const CONFIG: &str = "
domain: llm
descriptors:
  - key: api_key
    rate_limit: {unit: second, requests_per_unit: 1000000000}
";

/// Clients streaming checks, each on its own HTTP/2 connection, as Envoy
/// workers do.
const CLIENTS: usize = 4;

/// How a check ended.
#[derive(Debug, Default)]
struct Tally {
    answered: AtomicU64,
    answered_after_signal: AtomicU64,
    not_accepted: AtomicU64,
    lost: std::sync::Mutex<Vec<String>>,
}

/// Returns whether an error means the server never took the call: a refused
/// connection, a stream the server's GOAWAY excluded, or a request the
/// client's connection canceled before sending it.
fn never_accepted(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = status.source();
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        if error.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_canceled) {
            return true;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            if h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
        }
        source = error.source();
    }
    false
}

async fn stream_checks(channel: Channel, worker: usize, signalled: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut client = RateLimitServiceClient::new(channel);
    let key = format!("worker-{worker}");
    loop {
        let request = rls_request("llm", vec![descriptor(&[("api_key", &key)], None)]);
        match client.should_rate_limit(request).await {
            Ok(answer) => {
                assert_eq!(answer.into_inner().overall_code, Code::Ok as i32);
                tally.answered.fetch_add(1, Ordering::Relaxed);
                if signalled.load(Ordering::Relaxed) {
                    tally.answered_after_signal.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(status) if never_accepted(&status) => {
                tally.not_accepted.fetch_add(1, Ordering::Relaxed);
                // Once the listener is closed, every new connection is refused.
                if status.source().is_some() && signalled.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(status) => {
                tally.lost.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{status:?}"));
                return;
            }
        }
    }
}

async fn health(url: &str) -> Option<i32> {
    let channel = Endpoint::from_shared(url.to_owned()).ok()?.connect().await.ok()?;
    let answer = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
    Some(answer.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_loses_no_check() {
    let config = ConfigMapDir::new(&[("llm.yaml", CONFIG)]);
    let mut service = Binary::start(config.path(), &["--shutdown-delay", "1s", "--shutdown-grace", "5s"]).await;
    let signalled = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());

    let mut workers = Vec::new();
    for worker in 0..CLIENTS {
        let channel = Endpoint::from_shared(service.grpc_url()).expect("a URL").connect().await.expect("connect");
        workers.push(tokio::spawn(stream_checks(channel, worker, signalled.clone(), tally.clone())));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tally.answered.load(Ordering::Relaxed) > 0, "checks flow before the signal");

    signalled.store(true, Ordering::Relaxed);
    let signal_at = Instant::now();
    service.terminate();

    // During the delay: not ready, NOT_SERVING, alive, and still answering.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(service.metrics_port, "/readyz").await.0, 503);
    assert_eq!(get(service.metrics_port, "/healthz").await.0, 200);
    assert_eq!(health(&service.grpc_url()).await, Some(ServingStatus::NotServing as i32));

    let status = service.wait_exit(Duration::from_secs(10)).await.expect("the service exits");
    let took = signal_at.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(5), "exit took {took:?}, beyond the grace period");
    assert!(took >= Duration::from_secs(1), "exit took {took:?}, before the shutdown delay ended");

    for worker in workers {
        tokio::time::timeout(Duration::from_secs(10), worker).await.expect("a client stops").expect("a client task");
    }
    eprintln!("checks: {tally:?}");
    let lost = tally.lost.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(lost.is_empty(), "checks lost in flight: {lost:?}");
    assert!(tally.answered_after_signal.load(Ordering::Relaxed) > 0, "checks were answered during the delay");
    assert!(tally.not_accepted.load(Ordering::Relaxed) >= CLIENTS as u64, "every client ends on a refused connection");

    // New connections are refused once the process is gone.
    let refused = Endpoint::from_shared(service.grpc_url()).expect("a URL").connect().await;
    assert!(refused.is_err(), "nothing listens after exit");
    let log = service.log();
    assert!(log.contains("Shutting down: health is NOT_SERVING"), "{log}");
    assert!(log.contains("Server stopped"), "{log}");
}
