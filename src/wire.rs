//! Frames and message encoding shared by every sotto protocol.
//!
//! A frame is a 4-byte big-endian length and that many payload bytes; the length is
//! checked against the caller's cap before anything is allocated. A message payload is
//! one version byte followed by one postcard-encoded value, and decoding rejects
//! trailing bytes. This module does no I/O.

use serde::{de::DeserializeOwned, Serialize};

/// Version byte that prefixes every encoded message.
pub const WIRE_VERSION: u8 = 1;

/// Length of a frame header.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the {cap}-byte limit")]
    Oversized { len: usize, cap: usize },
    #[error("frame is truncated")]
    Truncated,
    #[error("bytes after the end of the frame")]
    TrailingFrameBytes,
    #[error("empty message")]
    Empty,
    #[error("unsupported wire version {0}")]
    UnsupportedVersion(u8),
    #[error("malformed message")]
    Malformed,
    #[error("bytes after the end of the message")]
    TrailingBytes,
}

/// Prefixes `payload` with its length. Panics only if the payload is over 4 GiB, which
/// every caller rules out by its own cap.
pub fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame payload fits in u32");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Reads a frame header and returns the payload length, refusing lengths over `cap`.
pub fn frame_len(header: [u8; HEADER_LEN], cap: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > cap {
        return Err(WireError::Oversized { len, cap });
    }
    Ok(len)
}

/// Decodes a buffer that must hold exactly one frame.
pub fn decode_single_frame(buf: &[u8], cap: usize) -> Result<&[u8], WireError> {
    let header: [u8; HEADER_LEN] = buf.get(..HEADER_LEN).ok_or(WireError::Truncated)?.try_into().map_err(|_| WireError::Truncated)?;
    let len = frame_len(header, cap)?;
    let body = &buf[HEADER_LEN..];
    match body.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(WireError::Truncated),
        std::cmp::Ordering::Greater => Err(WireError::TrailingFrameBytes),
        std::cmp::Ordering::Equal => Ok(body),
    }
}

/// A message type that has an explicit variant for anything a newer peer may send.
pub trait Message: Serialize + DeserializeOwned {
    /// True for the catch-all variant; its payload is not ours to check.
    fn is_unknown(&self) -> bool;
}

/// Encodes a message as `WIRE_VERSION ‖ postcard(value)`.
pub fn encode_message<M: Message>(msg: &M) -> Vec<u8> {
    // Serialising plain data into a Vec cannot fail.
    postcard::to_extend(msg, vec![WIRE_VERSION]).expect("postcard encodes into a Vec")
}

/// Decodes `WIRE_VERSION ‖ postcard(value)` strictly.
pub fn decode_message<M: Message>(bytes: &[u8]) -> Result<M, WireError> {
    let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    decode_exact(rest)
}

/// Decodes a postcard value and rejects trailing bytes (except after `Unknown`, whose
/// body belongs to a newer version).
pub fn decode_exact<M: Message>(bytes: &[u8]) -> Result<M, WireError> {
    let (value, rest) = postcard::take_from_bytes::<M>(bytes).map_err(|_| WireError::Malformed)?;
    if !rest.is_empty() && !value.is_unknown() {
        return Err(WireError::TrailingBytes);
    }
    Ok(value)
}

/// Serde for `[u8; 64]` as a fixed-size tuple (64 raw bytes in postcard).
pub mod bytes64 {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::ser::SerializeTuple;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(64)?;
        for b in bytes {
            t.serialize_element(b)?;
        }
        t.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = [u8; 64];
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("64 bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<[u8; 64], A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                Ok(out)
            }
        }
        d.deserialize_tuple(64, V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    enum Old {
        A(u32),
        B {
            name: String,
        },
        #[serde(other)]
        Unknown,
    }
    impl Message for Old {
        fn is_unknown(&self) -> bool {
            matches!(self, Old::Unknown)
        }
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    enum New {
        A(u32),
        B { name: String },
        Unknown,
        C(String, u64),
    }
    impl Message for New {
        fn is_unknown(&self) -> bool {
            false
        }
    }

    #[test]
    fn frame_cap_is_checked_from_the_header() {
        let header = (10_000u32).to_be_bytes();
        assert_eq!(frame_len(header, 9_999), Err(WireError::Oversized { len: 10_000, cap: 9_999 }));
        assert_eq!(frame_len(header, 10_000), Ok(10_000));
        assert_eq!(frame_len(u32::MAX.to_be_bytes(), 65_536), Err(WireError::Oversized { len: u32::MAX as usize, cap: 65_536 }));
    }

    #[test]
    fn single_frame_must_be_exact() {
        let frame = encode_frame(b"hello");
        assert_eq!(decode_single_frame(&frame, 16), Ok(&b"hello"[..]));
        assert_eq!(decode_single_frame(&frame[..7], 16), Err(WireError::Truncated));
        assert_eq!(decode_single_frame(&frame[..2], 16), Err(WireError::Truncated));
        let mut long = frame.clone();
        long.push(0);
        assert_eq!(decode_single_frame(&long, 16), Err(WireError::TrailingFrameBytes));
        assert!(matches!(decode_single_frame(&frame, 4), Err(WireError::Oversized { .. })));
    }

    #[test]
    fn message_pins_exact_bytes() {
        assert_eq!(encode_message(&Old::A(300)), vec![1, 0, 0xac, 0x02]);
        assert_eq!(encode_message(&Old::B { name: "ab".into() }), vec![1, 1, 2, b'a', b'b']);
    }

    #[test]
    fn unknown_variant_from_a_newer_peer_decodes_as_unknown() {
        let bytes = encode_message(&New::C("future".into(), 7));
        assert_eq!(decode_message::<Old>(&bytes), Ok(Old::Unknown));
    }

    #[test]
    fn version_and_trailing_bytes_are_checked() {
        let mut bytes = encode_message(&Old::A(1));
        bytes.push(0);
        assert_eq!(decode_message::<Old>(&bytes), Err(WireError::TrailingBytes));
        assert_eq!(decode_message::<Old>(&[2, 0, 1]), Err(WireError::UnsupportedVersion(2)));
        assert_eq!(decode_message::<Old>(&[]), Err(WireError::Empty));
        assert_eq!(decode_message::<Old>(&[1, 1, 200]), Err(WireError::Malformed));
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Sig(#[serde(with = "bytes64")] [u8; 64]);

    proptest! {
        #[test]
        fn bytes64_round_trips(v in proptest::collection::vec(any::<u8>(), 64)) {
            let arr: [u8; 64] = v.try_into().unwrap();
            let enc = postcard::to_stdvec(&Sig(arr)).unwrap();
            prop_assert_eq!(enc.len(), 64);
            prop_assert_eq!(postcard::from_bytes::<Sig>(&enc).unwrap(), Sig(arr));
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_message::<Old>(&bytes);
            let _ = decode_single_frame(&bytes, 32);
        }
    }
}
