//! The answer to a decided call, written as protobuf bytes straight from the
//! [`Decision`].
//!
//! Building a [`RateLimitResponse`] first copies every header name, value
//! and limit name into owned strings, only to encode and drop them. This
//! writes the same bytes, field by field in tag order as prost does, from
//! the decision and its [`answer::build`] headers. A decision with shadowed
//! denials carries dynamic metadata, and goes through [`respond`](super::respond) instead.
//!
//! [`RateLimitResponse`]: crate::proto::envoy::service::ratelimit::v3::RateLimitResponse
//! Field numbers: `envoy.service.ratelimit.v3.RateLimitResponse` and
//! `envoy.config.core.v3.HeaderValue`.

use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use super::{code, saturate, unit};
use crate::answer;
use crate::limiter::{Decision, DescriptorStatus};

/// Returns the encoded length of the answer to `decision` whose headers and
/// body are `answer`.
pub fn encoded_len(decision: &Decision, answer: &answer::Answer) -> usize {
    let mut length = varint_field_len(1, code(decision.outcome) as u64);
    for status in &decision.statuses {
        length += message_len(2, status_len(status));
    }
    for (name, value) in &answer.headers {
        length += message_len(3, header_len(name, value));
    }
    if let Some(body) = &answer.body {
        length += bytes_field_len(5, body.len());
    }
    length
}

/// Writes the answer to `decision` whose headers and body are `answer`
/// (from [`answer::build`]): the bytes of
/// [`respond`](super::respond)`(decision)`. The caller
/// checks that the decision has no shadowed denials.
pub fn encode(decision: &Decision, answer: &answer::Answer, buffer: &mut impl BufMut) {
    varint_field(1, code(decision.outcome) as u64, buffer);
    for status in &decision.statuses {
        encode_key(2, WireType::LengthDelimited, buffer);
        encode_varint(status_len(status) as u64, buffer);
        encode_status(status, buffer);
    }
    for (name, value) in &answer.headers {
        encode_key(3, WireType::LengthDelimited, buffer);
        encode_varint(header_len(name, value) as u64, buffer);
        bytes_field(1, name.as_bytes(), buffer);
        bytes_field(2, value.as_bytes(), buffer);
    }
    if let Some(body) = &answer.body {
        bytes_field(5, body.as_bytes(), buffer);
    }
}

fn status_len(status: &DescriptorStatus) -> usize {
    let mut length = varint_field_len(1, code(status.outcome) as u64);
    if status.limit.is_none() {
        return length;
    }
    length += message_len(2, limit_len(status));
    length += varint_field_len(3, u64::from(saturate(status.remaining)));
    let (seconds, nanos) = reset_parts(status.reset_ms);
    length += message_len(4, varint_field_len(1, seconds) + varint_field_len(2, nanos));
    length
}

fn encode_status(status: &DescriptorStatus, buffer: &mut impl BufMut) {
    varint_field(1, code(status.outcome) as u64, buffer);
    let Some(limit) = &status.limit else { return };
    encode_key(2, WireType::LengthDelimited, buffer);
    encode_varint(limit_len(status) as u64, buffer);
    varint_field(1, u64::from(saturate(limit.per_window)), buffer);
    varint_field(2, unit(limit.unit) as u64, buffer);
    bytes_field(3, limit.name.as_bytes(), buffer);
    if limit.multiplier != 1 {
        encode_key(4, WireType::LengthDelimited, buffer);
        encode_varint(varint_field_len(1, u64::from(limit.multiplier)) as u64, buffer);
        varint_field(1, u64::from(limit.multiplier), buffer);
    }
    varint_field(3, u64::from(saturate(status.remaining)), buffer);
    let (seconds, nanos) = reset_parts(status.reset_ms);
    encode_key(4, WireType::LengthDelimited, buffer);
    encode_varint((varint_field_len(1, seconds) + varint_field_len(2, nanos)) as u64, buffer);
    varint_field(1, seconds, buffer);
    varint_field(2, nanos, buffer);
}

fn limit_len(status: &DescriptorStatus) -> usize {
    let Some(limit) = &status.limit else { return 0 };
    let mut length = varint_field_len(1, u64::from(saturate(limit.per_window)));
    length += varint_field_len(2, unit(limit.unit) as u64);
    length += bytes_field_len(3, limit.name.len());
    if limit.multiplier != 1 {
        length += message_len(4, varint_field_len(1, u64::from(limit.multiplier)));
    }
    length
}

/// Returns the `google.protobuf.Duration` fields of a reset time, as
/// `respond` writes them: seconds, and the milliseconds left as nanoseconds.
fn reset_parts(ms: u64) -> (u64, u64) {
    let seconds = i64::try_from(ms / 1000).unwrap_or(i64::MAX) as u64;
    (seconds, ms % 1000 * 1_000_000)
}

fn header_len(name: &str, value: &str) -> usize {
    bytes_field_len(1, name.len()) + bytes_field_len(2, value.len())
}

/// Writes a varint field; proto3 leaves a zero out.
fn varint_field(tag: u32, value: u64, buffer: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buffer);
        encode_varint(value, buffer);
    }
}

fn varint_field_len(tag: u32, value: u64) -> usize {
    if value == 0 { 0 } else { key_len(tag) + encoded_len_varint(value) }
}

/// Writes a string or bytes field; proto3 leaves an empty one out.
fn bytes_field(tag: u32, bytes: &[u8], buffer: &mut impl BufMut) {
    if !bytes.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buffer);
        encode_varint(bytes.len() as u64, buffer);
        buffer.put_slice(bytes);
    }
}

fn bytes_field_len(tag: u32, length: usize) -> usize {
    if length == 0 { 0 } else { key_len(tag) + encoded_len_varint(length as u64) + length }
}

/// Returns the length of a message field whose message takes `length` bytes.
fn message_len(tag: u32, length: usize) -> usize {
    key_len(tag) + encoded_len_varint(length as u64) + length
}
