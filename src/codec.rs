//! The gRPC codec of the generated services: prost encoding and decoding,
//! except that a `RateLimitRequest` whose entry values are not UTF-8 is
//! still decided instead of failing to decode.
//!
//! HTTP allows the bytes 0x80 to 0xFF in header values, and Envoy fills
//! descriptor entries from request headers, so a client may be able to put
//! bytes that are not UTF-8 into an entry value. prost rejects those in a
//! proto3 `string`, and tonic would answer INTERNAL, leaving the call to
//! Envoy's failure mode uncounted. Here such a value keeps its valid text
//! and writes each invalid byte as U+FFFD followed by the byte in two hex
//! digits, so different byte strings still name different buckets.
//! A domain or entry key that is not UTF-8, and bytes that are not a
//! protobuf message at all, are gateway faults: INVALID_ARGUMENT.
//!
//! NOTE: no test shows Envoy 1.40 sending such bytes; this path only runs
//! when the strict decoding fails, so it costs nothing otherwise.

use std::any::{Any, TypeId};
use std::fmt::Write as _;
use std::marker::PhantomData;

use prost::Message;
use prost::bytes::{Buf, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;

/// A prost codec whose decoder takes `RateLimitRequest` values that are not UTF-8.
#[derive(Debug, Clone)]
pub struct LenientCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for LenientCodec<T, U> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

impl<T, U> Codec for LenientCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LenientDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        LenientDecoder { _type: PhantomData }
    }
}

/// Decodes `U` with prost, and a `RateLimitRequest` leniently when prost fails.
#[derive(Debug, Clone)]
pub struct LenientDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for LenientDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let bytes = buf.copy_to_bytes(buf.remaining());
        match U::decode(bytes.clone()) {
            Ok(item) => Ok(Some(item)),
            Err(error) if TypeId::of::<U>() == TypeId::of::<RateLimitRequest>() => {
                let request: Box<dyn Any> = Box::new(decode_request_leniently(bytes, &error)?);
                Ok(Some(*request.downcast::<U>().expect("U is RateLimitRequest")))
            }
            Err(error) => Err(not_a_message(&error)),
        }
    }

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }
}

/// Returns the buffer settings of a call's messages. tonic allocates the
/// buffer size for every call in each direction and grows a buffer in steps
/// of it. A check and its response take a few hundred bytes, so 1 KiB fits
/// them, where tonic's default of 8 KiB costs a large allocation per call.
fn buffer_settings() -> BufferSettings {
    BufferSettings::new(CALL_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

const CALL_BUFFER_BYTES: usize = 1024;
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

pub mod common;

/// Decodes a `RateLimitRequest` as the server does: its common shape
/// directly, anything else with prost, strictly, then leniently.
pub fn decode_request(bytes: Bytes) -> Result<RateLimitRequest, Status> {
    if let Some(request) = common::decode(&bytes) {
        return Ok(request);
    }
    match RateLimitRequest::decode(bytes.clone()) {
        Ok(request) => Ok(request),
        Err(error) => decode_request_leniently(bytes, &error),
    }
}

fn not_a_message(error: &prost::DecodeError) -> Status {
    Status::invalid_argument(format!("the request is not a valid protobuf message: {error}"))
}

/// Decodes with `bytes` fields where the protocol has strings, after strict
/// decoding failed with `strict_error`.
fn decode_request_leniently(bytes: Bytes, strict_error: &prost::DecodeError) -> Result<RateLimitRequest, Status> {
    // The strict error names the field, so it is the one to report when the
    // bytes are not a message at all.
    let raw = RawRequest::decode(bytes).map_err(|_| not_a_message(strict_error))?;
    let domain = String::from_utf8(raw.domain).map_err(|_| Status::invalid_argument("domain is not valid UTF-8"))?;

    let mut descriptors = Vec::with_capacity(raw.descriptors.len());
    for (index, descriptor) in raw.descriptors.into_iter().enumerate() {
        let mut entries = Vec::with_capacity(descriptor.entries.len());
        for (entry, RawEntry { key, value }) in descriptor.entries.into_iter().enumerate() {
            let key = String::from_utf8(key).map_err(|_| {
                Status::invalid_argument(format!("descriptors[{index}].entries[{entry}].key is not valid UTF-8"))
            })?;
            entries.push(Entry { key, value: escape_invalid_utf8(&value) });
        }
        descriptors.push(RateLimitDescriptor {
            entries,
            limit: descriptor.limit,
            hits_addend: descriptor.hits_addend,
            is_negative_hits: descriptor.is_negative_hits,
        });
    }
    Ok(RateLimitRequest { domain, descriptors, hits_addend: raw.hits_addend })
}

/// Keeps the valid UTF-8 of `bytes` and writes each invalid byte as U+FFFD
/// followed by its two lowercase hex digits.
pub fn escape_invalid_utf8(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            let _ = write!(out, "\u{FFFD}{byte:02x}");
        }
    }
    out
}

/// `RateLimitRequest` with its strings read as bytes.
#[derive(Clone, PartialEq, Message)]
struct RawRequest {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(message, repeated, tag = "2")]
    descriptors: Vec<RawDescriptor>,
    #[prost(uint32, tag = "3")]
    hits_addend: u32,
}

/// `RateLimitDescriptor` with its entries read as bytes.
#[derive(Clone, PartialEq, Message)]
struct RawDescriptor {
    #[prost(message, repeated, tag = "1")]
    entries: Vec<RawEntry>,
    #[prost(message, optional, tag = "2")]
    limit: Option<RateLimitOverride>,
    #[prost(message, optional, tag = "3")]
    hits_addend: Option<u64>,
    #[prost(bool, tag = "4")]
    is_negative_hits: bool,
}

#[derive(Clone, PartialEq, Message)]
struct RawEntry {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(domain: &[u8], key: &[u8], value: &[u8]) -> Bytes {
        let raw = RawRequest {
            domain: domain.to_vec(),
            descriptors: vec![RawDescriptor {
                entries: vec![RawEntry { key: key.to_vec(), value: value.to_vec() }],
                limit: None,
                hits_addend: Some(0),
                is_negative_hits: true,
            }],
            hits_addend: 7,
        };
        Bytes::from(raw.encode_to_vec())
    }

    #[test]
    fn valid_request_decodes_unchanged() {
        let request = decode_request(encode(b"edge", b"k", "é 日本 \u{0}".as_bytes())).expect("valid");
        assert_eq!(request.domain, "edge");
        assert_eq!(request.hits_addend, 7);
        let descriptor = &request.descriptors[0];
        assert_eq!(descriptor.entries[0].value, "é 日本 \u{0}");
        assert_eq!(descriptor.hits_addend, Some(0), "present with 0 stays present");
        assert!(descriptor.is_negative_hits);
    }

    #[test]
    fn invalid_value_is_escaped() {
        let request = decode_request(encode(b"edge", b"k", b"a\xff\xfeb\xc3")).expect("decided, not rejected");
        assert_eq!(request.descriptors[0].entries[0].value, "a\u{FFFD}ff\u{FFFD}feb\u{FFFD}c3");
        assert_eq!(request.hits_addend, 7);
        assert_eq!(request.descriptors[0].hits_addend, Some(0));
        assert!(request.descriptors[0].is_negative_hits);
    }

    #[test]
    fn distinct_invalid_bytes_stay_distinct() {
        assert_ne!(escape_invalid_utf8(b"k\xff"), escape_invalid_utf8(b"k\xfe"));
        assert_ne!(escape_invalid_utf8(b"k\xff"), escape_invalid_utf8(b"k"));
    }

    #[test]
    fn invalid_domain_or_key_is_invalid_argument() {
        let domain = decode_request(encode(b"ed\xffge", b"k", b"v")).expect_err("gateway fault");
        assert_eq!(domain.code(), tonic::Code::InvalidArgument);
        assert_eq!(domain.message(), "domain is not valid UTF-8");

        let key = decode_request(encode(b"edge", b"k\xff", b"v")).expect_err("gateway fault");
        assert_eq!(key.code(), tonic::Code::InvalidArgument);
        assert_eq!(key.message(), "descriptors[0].entries[0].key is not valid UTF-8");
    }

    #[test]
    fn garbage_is_invalid_argument() {
        let status = decode_request(Bytes::from_static(b"\x0a\xff\xff\xff\xff\x0f")).expect_err("not a message");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("the request is not a valid protobuf message"), "{}", status.message());
    }
}
