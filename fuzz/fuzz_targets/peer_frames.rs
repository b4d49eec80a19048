//! What one peer reads from another (src/peer/session.rs), decoder by decoder: the
//! preamble frame (through the callee's own `Answer::read`), the `DialerHello` payload
//! of Noise message 1, and `PeerMessage`, the plaintext of every transport message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::keys::{IdentityKey, NoiseBinding, NoiseKey};
use sotto::peer::session::{Answer, DialerHello, PeerMessage, Preamble, SessionError, MAX_PLAINTEXT, PREAMBLE_VERSION};
use sotto_fuzz::{assert_canonical, check_message, decode_heap_bound, fixtures, peak_heap};

/// Heap `Answer::read` may hold besides the preamble: the Noise handshake state and the
/// payload buffer of one handshake message.
const HANDSHAKE_HEAP: usize = 16 * 1024;

fn preamble(bytes: &[u8]) {
    let fx = fixtures();
    // The callee's real entry point: the preamble is checked before Noise runs, so an
    // empty message 1 tells the preamble's verdict apart from the handshake's.
    let (result, heap) = peak_heap(|| Answer::read(&fx.bob, &fx.bob_name, bytes, &[]));
    assert!(heap <= decode_heap_bound(bytes.len()) + HANDSHAKE_HEAP, "Answer::read held {heap} bytes");
    let exact = match postcard::take_from_bytes::<Preamble>(bytes) {
        Ok((p, [])) => Some(p),
        _ => None,
    };
    match (result, &exact) {
        (Err(SessionError::BadPreamble), None) => {}
        (Err(SessionError::BadPreamble), Some(p)) => assert_ne!(p.version, PREAMBLE_VERSION),
        (Err(SessionError::NotForMe), Some(p)) => assert!(p.version == PREAMBLE_VERSION && p.callee != fx.bob_name),
        (Err(SessionError::Handshake), Some(p)) => assert!(p.version == PREAMBLE_VERSION && p.callee == fx.bob_name),
        (other, exact) => panic!("preamble {exact:?} read as {other:?}"),
    }
    if let Some(p) = exact {
        assert_canonical(&p.dialer);
        assert_canonical(&p.callee);
        let again = postcard::to_stdvec(&p).expect("encodes");
        assert!(again.len() <= bytes.len());
        assert_eq!(postcard::from_bytes::<Preamble>(&again).ok(), Some(p));
    }
}

fn dialer_hello(bytes: &[u8]) {
    let (decoded, heap) = peak_heap(|| postcard::take_from_bytes::<DialerHello>(bytes));
    assert!(heap <= decode_heap_bound(bytes.len()));
    let Ok((hello, rest)) = decoded else { return };
    assert!(rest.len() + 96 < bytes.len());
    let key = &hello.identity_key;
    assert_eq!(IdentityKey::from_bytes(*key.as_bytes()).as_ref(), Ok(key), "decoded an invalid identity key");
    let again = postcard::to_stdvec(&hello).expect("encodes");
    assert_eq!(postcard::from_bytes::<DialerHello>(&again).ok(), Some(hello.clone()));
    // The binding is checked against the Noise key the handshake proved; a signature the
    // fixture did not make never binds the fixture's key.
    let fx = fixtures();
    let binding = NoiseBinding { noise_key: NoiseKey(*fx.alice.noise().public().as_bytes()), signature: hello.noise_binding };
    if binding.verify(key).is_ok() {
        assert_eq!(key, &fx.alice.public());
        assert_eq!(binding.signature, fx.alice_binding);
    }
}

fn peer_message(bytes: &[u8]) {
    if let Some(PeerMessage::Chat { body, .. }) = check_message::<PeerMessage>(bytes) {
        assert!(body.len() < bytes.len());
        // Within a transport message, the body can never exceed one plaintext.
        if bytes.len() <= MAX_PLAINTEXT {
            assert!(body.len() <= MAX_PLAINTEXT);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 3 {
        0 => preamble(rest),
        1 => dialer_hello(rest),
        _ => peer_message(rest),
    }
});
