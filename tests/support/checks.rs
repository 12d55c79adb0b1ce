//! Fikra checks, answers and health probes for the store fault tests.
//!
//! Include it next to `support/service.rs` under the module name `service`:
//! `#[path = "support/checks.rs"] mod checks;`.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_response::Code;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use fikra_ratelimit::proto::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::service::{descriptor, rls_request};

/// The shipped Fikra configuration: 30 requests and 40,000 tokens per
/// minute for the default tier.
pub const FIKRA: &str = include_str!("../../deploy/config/fikra.yaml");

/// Builds a Fikra check for `api_key`: one request and `tokens` estimated
/// tokens, in domain `fikra`.
pub fn fikra_check(api_key: &str, tokens: u64) -> RateLimitRequest {
    rls_request(
        "fikra",
        vec![
            descriptor(&[("api_key", api_key), ("meter", "requests")], None),
            descriptor(&[("api_key", api_key), ("meter", "tokens")], Some(tokens)),
        ],
    )
}

/// Builds a check of the requests bucket of `api_key` only.
pub fn requests_check(api_key: &str) -> RateLimitRequest {
    rls_request("fikra", vec![descriptor(&[("api_key", api_key), ("meter", "requests")], None)])
}

/// Wraps `request` with a gRPC deadline (`grpc-timeout`), as Envoy sends.
pub fn with_deadline(request: RateLimitRequest, deadline: Duration) -> tonic::Request<RateLimitRequest> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(deadline);
    request
}

/// The value of response header `name`, if the answer carries it.
pub fn header<'a>(answer: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    answer.response_headers_to_add.iter().find(|header| header.key == name).map(|header| header.value.as_str())
}

/// What one call returned, and how long it took.
#[derive(Debug)]
pub struct Timed {
    pub elapsed: Duration,
    pub result: Result<RateLimitResponse, tonic::Status>,
}

impl Timed {
    /// Whether the answer is allowed with rate-limit headers: a real
    /// decision, not the failure mode.
    pub fn is_decided_ok(&self) -> bool {
        matches!(&self.result, Ok(answer) if answer.overall_code == Code::Ok as i32 && header(answer, "x-ratelimit-remaining-requests").is_some())
    }

    /// Whether the answer follows the failure mode `unavailable`.
    pub fn is_unavailable(&self) -> bool {
        matches!(&self.result, Err(status) if status.code() == tonic::Code::Unavailable)
    }

    /// Whether tonic cancelled the call at its gRPC deadline, before the
    /// service's answer was out. Envoy treats it like any gRPC error.
    pub fn is_cancelled_at_deadline(&self) -> bool {
        matches!(&self.result, Err(status) if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired")
    }

    /// Whether the answer follows the failure mode `allow`: allowed, with no
    /// rate-limit headers and no limit in any status.
    pub fn is_fail_open(&self) -> bool {
        matches!(&self.result, Ok(answer)
            if answer.overall_code == Code::Ok as i32
                && answer.response_headers_to_add.is_empty()
                && answer.statuses.iter().all(|status| status.current_limit.is_none()))
    }

    /// The `x-ratelimit-remaining-requests` header as a number.
    pub fn remaining_requests(&self) -> Option<u64> {
        let answer = self.result.as_ref().ok()?;
        header(answer, "x-ratelimit-remaining-requests")?.parse().ok()
    }
}

/// Sends `request` with `deadline` and times the answer.
pub async fn timed_call(client: &mut RateLimitServiceClient<Channel>, request: RateLimitRequest, deadline: Duration) -> Timed {
    let started = Instant::now();
    let result = client.should_rate_limit(with_deadline(request, deadline)).await.map(tonic::Response::into_inner);
    Timed { elapsed: started.elapsed(), result }
}

/// Sends `request` every 100 ms until the answer is a real decision or
/// `timeout` passes, and returns that answer and when it came.
pub async fn first_decided(
    client: &mut RateLimitServiceClient<Channel>,
    request: impl Fn() -> RateLimitRequest,
    timeout: Duration,
) -> Option<(Timed, Instant)> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let answer = timed_call(client, request(), Duration::from_millis(500)).await;
        if let Ok(answer_body) = &answer.result {
            assert_ne!(answer_body.overall_code, Code::Unknown as i32, "never an UNKNOWN code");
        }
        if answer.is_decided_ok() || matches!(&answer.result, Ok(body) if body.overall_code == Code::OverLimit as i32) {
            return Some((answer, Instant::now()));
        }
        assert!(
            answer.is_unavailable() || answer.is_fail_open(),
            "an answer during a store fault follows the failure mode: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The overall health status of the server behind `channel`, or -1 when
/// the check fails.
pub async fn health_status(channel: Channel) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map(|answer| answer.into_inner().status)
        .unwrap_or(-1)
}

/// Polls health every 100 ms until it is `expected`; returns when, or
/// `None` after `timeout`.
pub async fn wait_for_health(channel: &Channel, expected: ServingStatus, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if health_status(channel.clone()).await == expected as i32 {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
