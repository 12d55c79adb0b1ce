//! fikra-ratelimit: an Envoy rate-limit service with exact token buckets.
#![forbid(unsafe_code)]

pub mod clock;
pub mod limiter;
pub mod store;
pub mod config;
