//! An established session (src/peer/session.rs `Transport`) fed a sequence of messages.
//!
//! Each run opens one real session: the harness dials Bob with a valid message 1 and
//! keeps the dialer's Noise transport, so it can encrypt any plaintext; Bob's side is
//! the real `Answer::read` → `Answer::accept` → `Transport`. The input is then a
//! sequence of operations on Bob's transport, each checked against a model:
//!
//! 0. arbitrary plaintext, validly encrypted: `open` returns exactly what
//!    `decode_message` makes of it, or `Malformed` (and the session ends);
//! 1. a well-formed `PeerMessage`: `open` returns it;
//! 2. arbitrary bytes as a transport frame: `Decrypt`, or `TooLarge` over the cap;
//! 3. a sealed message with one bit flipped: `Decrypt`;
//! 4. the last delivered message again (replay): `Decrypt`;
//! 5. a message skipped or reordered: `Decrypt`;
//! 6. Bob seals a message (`seal`) and the harness opens it: the same message;
//! 7. a sealed message cut short: `Decrypt`.
//!
//! Each frame Bob opens is handed over one of three ways, chosen by a byte of input:
//! as a slice (`open`, which copies it), or as `Bytes` to `open_frame`, either alone
//! (decrypted where it lies) or with another holder (copied first; the holder's bytes
//! must come out untouched).
//!
//! Any error ends the session, as it does in the node. The message counters follow.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::peer::session::{Answer, DialerHello, PeerMessage, SessionError, Transport, MAX_NOISE_MESSAGE, MAX_PLAINTEXT};
use sotto::wire::{decode_message, encode_message};
use sotto_fuzz::{
    alice_to_bob_preamble, decode_heap_bound, fixtures, open_raw, peak_heap, raw_handshake, seal_raw, write_handshake, Input,
};

const NOW_NS: u64 = 1_800_000_000 * 1_000_000_000;

/// Opens a session from the harness (Alice's side, raw) to Bob (real).
fn session() -> (snow::TransportState, Transport) {
    let fx = fixtures();
    let preamble = alice_to_bob_preamble();
    let mut dialer = raw_handshake(true, fx.alice.noise().as_bytes(), Some(fx.bob.noise().public().as_bytes()), &preamble);
    let hello = DialerHello { identity_key: fx.alice.public(), noise_binding: fx.alice_binding, timestamp: NOW_NS };
    let msg1 = write_handshake(&mut dialer, &postcard::to_stdvec(&hello).expect("encodes"));
    let answer = Answer::read(&fx.bob, &fx.bob_name, &preamble, &msg1).expect("a valid initiation is read");
    let (bob, msg2) = answer.accept(&fx.alice.public(), Some(NOW_NS - 1), NOW_NS).expect("a valid initiation is accepted");
    let mut empty = [0u8; 64];
    assert_eq!(dialer.read_message(&msg2, &mut empty).expect("message 2 reads"), 0);
    (dialer.into_transport_mode().expect("transport"), bob)
}

fn message(input: &mut Input) -> PeerMessage {
    let id = input.array();
    if input.u8() & 1 == 0 {
        PeerMessage::Ack { id }
    } else {
        PeerMessage::Chat { id, sent_at: input.u64(), body: String::from_utf8_lossy(input.chunk()).into_owned() }
    }
}

fn open(bob: &mut Transport, frame: &[u8], how: u8) -> Result<PeerMessage, SessionError> {
    let bytes = bytes::Bytes::copy_from_slice(frame);
    let other = bytes.clone();
    let (result, heap) = match how % 3 {
        0 => peak_heap(|| bob.open(frame)),
        1 => {
            drop(other);
            peak_heap(|| bob.open_frame(bytes, &mut Vec::new()))
        }
        _ => {
            let result = peak_heap(|| bob.open_frame(bytes, &mut Vec::new()));
            assert_eq!(&other[..], frame, "a frame someone else holds is left as it was");
            result
        }
    };
    assert!(heap <= frame.len() + decode_heap_bound(frame.len()), "open held {heap} bytes for {} bytes", frame.len());
    if let Ok(PeerMessage::Chat { body, .. }) = &result {
        assert!(body.len() <= MAX_PLAINTEXT);
    }
    result
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let (mut alice, mut bob) = session();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut last: Option<Vec<u8>> = None;
    while !input.is_empty() {
        match input.u8() % 8 {
            0 => {
                let plain = input.chunk();
                let plain = &plain[..plain.len().min(MAX_PLAINTEXT)];
                let sealed = seal_raw(&mut alice, plain);
                match (open(&mut bob, &sealed, input.u8()), decode_message::<PeerMessage>(plain)) {
                    (Ok(got), Ok(model)) => assert_eq!(got, model),
                    (Err(SessionError::Malformed), Err(_)) => return,
                    (got, model) => panic!("open gave {got:?}, decode_message {model:?}"),
                }
                received += 1;
                last = Some(sealed);
            }
            1 => {
                let msg = message(&mut input);
                let plain = encode_message(&msg);
                if plain.len() > MAX_PLAINTEXT {
                    continue;
                }
                let sealed = seal_raw(&mut alice, &plain);
                assert_eq!(open(&mut bob, &sealed, input.u8()), Ok(msg));
                received += 1;
                last = Some(sealed);
            }
            2 => {
                let frame = input.chunk();
                let expected = if frame.len() > MAX_NOISE_MESSAGE { SessionError::TooLarge } else { SessionError::Decrypt };
                assert_eq!(open(&mut bob, frame, input.u8()), Err(expected));
                return;
            }
            3 => {
                let mut sealed = seal_raw(&mut alice, &encode_message(&message(&mut input)));
                let at = input.u16() as usize % sealed.len();
                sealed[at] ^= 1 << (input.u8() % 8);
                assert_eq!(open(&mut bob, &sealed, input.u8()), Err(SessionError::Decrypt));
                return;
            }
            4 => {
                if let Some(again) = &last {
                    assert_eq!(open(&mut bob, again, input.u8()), Err(SessionError::Decrypt));
                    return;
                }
            }
            5 => {
                let _lost = seal_raw(&mut alice, &encode_message(&PeerMessage::Ack { id: [1; 16] }));
                let next = seal_raw(&mut alice, &encode_message(&message(&mut input)));
                assert_eq!(open(&mut bob, &next, input.u8()), Err(SessionError::Decrypt));
                return;
            }
            6 => {
                let msg = message(&mut input);
                match bob.seal(&msg) {
                    Ok(sealed) => {
                        assert!(sealed.len() <= MAX_NOISE_MESSAGE);
                        assert_eq!(decode_message::<PeerMessage>(&open_raw(&mut alice, &sealed)), Ok(msg));
                        sent += 1;
                    }
                    Err(e) => {
                        assert_eq!(e, SessionError::TooLarge);
                        assert!(encode_message(&msg).len() > MAX_PLAINTEXT);
                    }
                }
            }
            _ => {
                let sealed = seal_raw(&mut alice, &encode_message(&message(&mut input)));
                let cut = input.u16() as usize % sealed.len();
                assert_eq!(open(&mut bob, &sealed[..cut], input.u8()), Err(SessionError::Decrypt));
                return;
            }
        }
        assert_eq!(bob.counts(), (sent, received));
    }
});
