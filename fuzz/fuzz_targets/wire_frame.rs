//! Frame headers and single frames (src/wire.rs): the length is checked against the cap
//! from the header alone, nothing is allocated, and an accepted frame is exactly its
//! header and payload.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::peer::session::{MAX_HANDSHAKE_MESSAGE, MAX_NOISE_MESSAGE};
use sotto::rendezvous::proto::MAX_FRAME;
use sotto::wire::{decode_single_frame, encode_frame, frame_len, WireError, HEADER_LEN};
use sotto_fuzz::peak_heap;

/// The caps sotto reads frames with (preamble, handshake, rendezvous, transport), and
/// the edges.
const CAPS: [usize; 7] = [0, 1, 128, MAX_HANDSHAKE_MESSAGE, MAX_FRAME, MAX_NOISE_MESSAGE, u32::MAX as usize];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, frame)) = data.split_first() else { return };
    let cap = CAPS[pick as usize % CAPS.len()];

    let header: Option<[u8; HEADER_LEN]> = frame.get(..HEADER_LEN).map(|h| h.try_into().expect("four bytes"));
    let claimed = header.map(|h| u32::from_be_bytes(h) as usize);
    if let (Some(header), Some(claimed)) = (header, claimed) {
        match frame_len(header, cap) {
            Ok(len) => assert!(len == claimed && len <= cap, "frame_len({header:?}, {cap}) = {len}"),
            Err(e) => {
                assert!(claimed > cap, "refused a length within the cap: {e:?}");
                assert_eq!(e, WireError::Oversized { len: claimed, cap });
            }
        }
    }

    let (decoded, heap) = peak_heap(|| decode_single_frame(frame, cap));
    assert_eq!(heap, 0, "decoding a frame allocated");
    match decoded {
        Ok(payload) => {
            assert!(payload.len() <= cap);
            assert_eq!(Some(payload.len()), claimed);
            assert_eq!(encode_frame(payload), frame);
        }
        Err(WireError::Truncated) => assert!(claimed.is_none_or(|c| c <= cap && frame.len() - HEADER_LEN < c)),
        Err(WireError::TrailingFrameBytes) => assert!(claimed.is_some_and(|c| c <= cap && frame.len() - HEADER_LEN > c)),
        Err(WireError::Oversized { len, cap: reported }) => assert!(claimed == Some(len) && len > cap && reported == cap),
        Err(e) => panic!("unexpected frame error {e:?}"),
    }

    // Any payload within the cap survives framing.
    if frame.len() <= cap {
        assert_eq!(decode_single_frame(&encode_frame(frame), cap), Ok(frame));
    }
});
