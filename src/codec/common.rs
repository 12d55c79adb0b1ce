//! A decoder for the common shape of a `RateLimitRequest`, without prost's
//! generic merge code. Skipping that code cuts the decoding instructions
//! by about a quarter.
//!
//! It takes the fields the protocol defines, each with its own wire type,
//! in any order. A scalar or string field seen twice keeps the last value,
//! as protobuf requires. Anything else makes it return `None`: an unknown
//! field, a message field seen twice (protobuf merges those), invalid
//! UTF-8, or malformed bytes. prost then decodes the message, so every
//! input gets prost's result and prost's errors.

use crate::proto::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use crate::proto::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::proto::envoy::service::ratelimit::v3::RateLimitRequest;

const VARINT: u8 = 0;
const LENGTH_DELIMITED: u8 = 2;

/// The room reserved for a request's descriptors and for a descriptor's
/// entries: the capacity a vector's first push gives elements of this size,
/// reserved without going through the vector's growth path.
const FIRST_CAPACITY: usize = 4;

/// Decodes `bytes`, or returns `None` when prost has to.
pub fn decode(bytes: &[u8]) -> Option<RateLimitRequest> {
    let mut request = RateLimitRequest { descriptors: Vec::with_capacity(FIRST_CAPACITY), ..Default::default() };
    read_fields(bytes, |reader, key| {
        match key {
            (1, LENGTH_DELIMITED) => request.domain = reader.text()?,
            (2, LENGTH_DELIMITED) => request.descriptors.push(descriptor(reader.field()?)?),
            // A uint32 keeps the low 32 bits of its varint.
            (3, VARINT) => request.hits_addend = reader.varint()? as u32,
            _ => return None,
        }
        Some(())
    })?;
    Some(request)
}

fn descriptor(bytes: &[u8]) -> Option<RateLimitDescriptor> {
    let mut descriptor = RateLimitDescriptor { entries: Vec::with_capacity(FIRST_CAPACITY), ..Default::default() };
    read_fields(bytes, |reader, key| {
        match key {
            (1, LENGTH_DELIMITED) => descriptor.entries.push(entry(reader.field()?)?),
            (2, LENGTH_DELIMITED) if descriptor.limit.is_none() => descriptor.limit = Some(limit(reader.field()?)?),
            (3, LENGTH_DELIMITED) if descriptor.hits_addend.is_none() => descriptor.hits_addend = Some(wrapped(reader.field()?)?),
            (4, VARINT) => descriptor.is_negative_hits = reader.varint()? != 0,
            _ => return None,
        }
        Some(())
    })?;
    Some(descriptor)
}

fn entry(bytes: &[u8]) -> Option<Entry> {
    let mut entry = Entry::default();
    read_fields(bytes, |reader, key| {
        match key {
            (1, LENGTH_DELIMITED) => entry.key = reader.text()?,
            (2, LENGTH_DELIMITED) => entry.value = reader.text()?,
            _ => return None,
        }
        Some(())
    })?;
    Some(entry)
}

fn limit(bytes: &[u8]) -> Option<RateLimitOverride> {
    let mut limit = RateLimitOverride::default();
    read_fields(bytes, |reader, key| {
        match key {
            (1, VARINT) => limit.requests_per_unit = reader.varint()? as u32,
            // An enum keeps the low 32 bits of its varint, as a signed value.
            (2, VARINT) => limit.unit = reader.varint()? as i32,
            (3, LENGTH_DELIMITED) if limit.unit_multiplier.is_none() => {
                limit.unit_multiplier = Some(wrapped(reader.field()?)? as u32);
            }
            _ => return None,
        }
        Some(())
    })?;
    Some(limit)
}

/// Reads a `UInt64Value` or `UInt32Value` wrapper: its field 1, 0 when absent.
fn wrapped(bytes: &[u8]) -> Option<u64> {
    let mut value = 0;
    read_fields(bytes, |reader, key| {
        match key {
            (1, VARINT) => value = reader.varint()?,
            _ => return None,
        }
        Some(())
    })?;
    Some(value)
}

/// Hands each field key of a message to `read`, which reads the field's
/// value, or returns `None` to give up on the message.
fn read_fields<'a>(bytes: &'a [u8], mut read: impl FnMut(&mut Reader<'a>, (u64, u8)) -> Option<()>) -> Option<()> {
    let mut reader = Reader { bytes };
    while !reader.is_empty() {
        let key = reader.key()?;
        read(&mut reader, key)?;
    }
    Some(())
}

/// The unread part of a message.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Reads a varint of at most 10 bytes whose value fits in 64 bits.
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (index, &byte) in self.bytes.iter().enumerate().take(10) {
            if index == 9 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte < 0x80 {
                self.bytes = &self.bytes[index + 1..];
                return Some(value);
            }
        }
        None
    }

    /// Reads a field key: the field number and the wire type.
    fn key(&mut self) -> Option<(u64, u8)> {
        let key = self.varint()?;
        Some((key >> 3, (key & 7) as u8))
    }

    /// Reads a length-delimited field's bytes.
    fn field(&mut self) -> Option<&'a [u8]> {
        let length = usize::try_from(self.varint()?).ok()?;
        if length > self.bytes.len() {
            return None;
        }
        let (field, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Some(field)
    }

    fn text(&mut self) -> Option<String> {
        std::str::from_utf8(self.field()?).ok().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use proptest::prelude::*;

    use super::*;

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        (".{0,12}", ".{0,12}").prop_map(|(key, value)| Entry { key, value })
    }

    fn limit_strategy() -> impl Strategy<Value = RateLimitOverride> {
        (any::<u32>(), any::<i32>(), proptest::option::of(any::<u32>()))
            .prop_map(|(requests_per_unit, unit, unit_multiplier)| RateLimitOverride { requests_per_unit, unit, unit_multiplier })
    }

    fn descriptor_strategy() -> impl Strategy<Value = RateLimitDescriptor> {
        (
            proptest::collection::vec(entry_strategy(), 0..4),
            proptest::option::of(limit_strategy()),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
        )
            .prop_map(|(entries, limit, hits_addend, is_negative_hits)| RateLimitDescriptor {
                entries,
                limit,
                hits_addend,
                is_negative_hits,
            })
    }

    fn request_strategy() -> impl Strategy<Value = RateLimitRequest> {
        (".{0,16}", proptest::collection::vec(descriptor_strategy(), 0..4), any::<u32>())
            .prop_map(|(domain, descriptors, hits_addend)| RateLimitRequest { domain, descriptors, hits_addend })
    }

    proptest! {
        #[test]
        fn encoded_requests_decode_as_prost(request in request_strategy()) {
            let bytes = request.encode_to_vec();
            prop_assert_eq!(decode(&bytes), Some(request));
        }

        #[test]
        fn changed_bytes_decode_as_prost_or_not(
            request in request_strategy(),
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = request.encode_to_vec();
            if bytes.is_empty() {
                bytes.push(0);
            }
            for (at, byte) in changes {
                let index = at.index(bytes.len());
                bytes[index] = byte;
            }
            for candidate in [&bytes[..], &bytes[..cut.index(bytes.len())]] {
                if let Some(decoded) = decode(candidate) {
                    prop_assert_eq!(Some(decoded), RateLimitRequest::decode(candidate).ok());
                }
            }
        }

        #[test]
        fn random_bytes_decode_as_prost_or_not(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Some(decoded) = decode(&bytes) {
                prop_assert_eq!(Some(decoded), RateLimitRequest::decode(&bytes[..]).ok());
            }
        }
    }

    #[test]
    fn repeated_scalars_keep_the_last_value() {
        let mut bytes = RateLimitRequest { domain: "first".into(), hits_addend: 3, ..Default::default() }.encode_to_vec();
        bytes.extend(RateLimitRequest { domain: "second".into(), hits_addend: 4, ..Default::default() }.encode_to_vec());
        let decoded = decode(&bytes).expect("common shape");
        assert_eq!(decoded.domain, "second");
        assert_eq!(decoded.hits_addend, 4);
        assert_eq!(Some(decoded), RateLimitRequest::decode(&bytes[..]).ok());
    }

    #[test]
    fn other_shapes_are_left_to_prost() {
        // An unknown field (number 9, varint).
        assert_eq!(decode(&[0x48, 0x01]), None);
        // A domain that is not UTF-8.
        assert_eq!(decode(&[0x0a, 0x01, 0xff]), None);
        // A length past the end.
        assert_eq!(decode(&[0x0a, 0x05, b'a']), None);
        // A varint of 11 bytes.
        assert_eq!(decode(&[0x18, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]), None);
        // A descriptor with its limit twice, which protobuf merges.
        let limit = RateLimitDescriptor { limit: Some(RateLimitOverride::default()), ..Default::default() }.encode_to_vec();
        let descriptor = [limit.clone(), limit].concat();
        let mut bytes = vec![0x12, u8::try_from(descriptor.len()).expect("short")];
        bytes.extend(descriptor);
        assert_eq!(decode(&bytes), None);
    }
}
