//! fikra-ratelimit: an Envoy rate-limit service with exact token buckets.
//!
//! Envoy calls `ShouldRateLimit` before it forwards a request (a *check*)
//! and may call again when the response has ended (a *report*) to settle
//! the tokens the response really used. The service answers from token
//! buckets kept in Redis, or in memory for a single replica.
//!
//! # Layout
//!
//! - [`accounts`]: account tiers and overrides, per API key.
//! - [`admin`]: the admin gRPC service that changes accounts.
//! - [`config`]: YAML files to validated [`config::Limits`].
//! - [`limiter`]: descriptors to buckets to a [`limiter::Decision`]; no
//!   tonic or Redis types, and the store's clock only.
//! - [`store`]: the in-memory store and the Redis store with its script.
//! - [`answer`]: a decision to the client's headers and denial body.
//! - [`rls`]: the gRPC handler, protocol to domain and back, and the one
//!   place errors become gRPC statuses.
//! - [`server`]: the gRPC port on HTTP/2 (h2), health, reflection, TLS, shutdown.
//! - [`unary`]: the decision call read from and written to HTTP/2 directly.
//! - [`metrics`]: Prometheus metrics and the HTTP port with the probes.
//! - [`reload`]: watching the configuration files and applying changes.
//! - [`tls`]: the gRPC port's certificates.
//! - [`cli`], [`telemetry`]: the command line and logging.
//!
//! # Terms
//!
//! - *domain*: a namespace of rules; one configuration file each.
//! - *descriptor*: an ordered list of *entries* (`key=value`) naming what a
//!   call is counted against.
//! - *hits_addend*: a call's cost, per request or per descriptor.
//! - *bucket*: the state of one limit for one descriptor identity: a
//!   *capacity* (the burst) refilled continuously at the limit per window.
//! - *level*: the amount of a bucket used; past capacity it is *debt*.
//! - *settlement*: a report charging the difference between the tokens used
//!   and the estimate a check charged under the same request id.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod answer;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod limiter;
pub mod metrics;
pub mod proto;
pub mod reload;
pub mod rls;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod unary;
