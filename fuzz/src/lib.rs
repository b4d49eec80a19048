//! Pieces the fuzz targets share: a heap meter (this crate's global allocator), the
//! fixture identities of keys/README.md, a reader over the fuzz input, and the checks
//! that every message decoder must pass.

use std::fmt::Debug;
use std::sync::OnceLock;

use sotto::keys::{Identity, IdentitySecret, NoiseSecret};
use sotto::peer::session::{NOISE_PARAMS, PROLOGUE_DOMAIN};
use sotto::username::Username;
use sotto::wire::{decode_message, encode_message, Message, WireError, WIRE_VERSION};

// ---------------------------------------------------------------------------------------
// Heap meter

// The meter is the one the property tests use (this crate's global allocator).
#[path = "../../tests/heap/mod.rs"]
mod heap;

pub use heap::{heap_bound as decode_heap_bound, peak_heap};

/// Decoding a presence record may also reserve room for as many addresses (32 bytes
/// each) as bytes remain; `SignedPresence::verify` caps the payload at 1 KiB first.
pub fn record_heap_bound(input_len: usize) -> usize {
    36 * input_len + 4096
}

// ---------------------------------------------------------------------------------------
// Fixtures

/// The fixture identities of keys/README.md (public seeds, public keys).
pub struct Fixtures {
    pub alice: Identity,
    pub bob: Identity,
    /// Alice's Noise-key binding signature, made once.
    pub alice_binding: [u8; 64],
    pub alice_name: Username,
    pub bob_name: Username,
}

pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let alice = Identity::new(IdentitySecret::from_seed(&[0x01; 32]), NoiseSecret::from_bytes(&[0x02; 32]));
        Fixtures {
            alice_binding: alice.binding().signature,
            alice,
            bob: Identity::new(IdentitySecret::from_seed(&[0x03; 32]), NoiseSecret::from_bytes(&[0x04; 32])),
            alice_name: Username::parse("alice").expect("valid name"),
            bob_name: Username::parse("bob").expect("valid name"),
        }
    })
}

/// The Noise protocol sotto speaks, for the harness's own side of a handshake.
pub fn noise_params() -> snow::params::NoiseParams {
    NOISE_PARAMS.parse().expect("valid Noise parameters")
}

/// `"sotto/peer/v1" ‖ preamble`, as both ends of a session compute it.
pub fn prologue(preamble: &[u8]) -> Vec<u8> {
    [PROLOGUE_DOMAIN, preamble].concat()
}

// ---------------------------------------------------------------------------------------
// Input

/// Takes values off the front of the fuzz input; short input reads as zeros.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.bytes(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }

    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let got = self.bytes(N);
        b[..got.len()].copy_from_slice(got);
        b
    }

    /// A length-prefixed (u16) slice.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.0.len())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// Checks

/// A decoded username is canonical: what `Username::parse` makes of its own text.
pub fn assert_canonical(name: &Username) {
    let s = name.as_str();
    assert!((3..=32).contains(&s.len()), "username length {} out of range", s.len());
    assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'), "{s:?}");
    assert_eq!(Username::parse(s).as_ref(), Ok(name));
}

/// Decodes `bytes` as a message and checks what every decoder must guarantee:
///
/// - the heap it holds stays within [`decode_heap_bound`];
/// - an error is the one the first bytes call for (empty, wrong version);
/// - a decoded value re-encodes to bytes that decode to the same value and are no longer
///   than the input (postcard's encoding is the shortest; what the decoder also accepts
///   is overlong varints and unknown variants, whose tails it ignores), and re-encoding
///   is a fixed point.
///
/// Returns the decoded value for type-specific checks.
pub fn check_message<M: Message + PartialEq + Debug>(bytes: &[u8]) -> Option<M> {
    let (decoded, peak) = peak_heap(|| decode_message::<M>(bytes));
    assert!(peak <= decode_heap_bound(bytes.len()), "decoding {} bytes held {peak} bytes of heap", bytes.len());
    let value = match decoded {
        Ok(value) => value,
        Err(e) => {
            match bytes.first() {
                None => assert_eq!(e, WireError::Empty),
                Some(&v) if v != WIRE_VERSION => assert_eq!(e, WireError::UnsupportedVersion(v)),
                Some(_) => assert!(matches!(e, WireError::Malformed | WireError::TrailingBytes), "{e:?}"),
            }
            return None;
        }
    };
    let again = encode_message(&value);
    assert!(again.len() <= bytes.len(), "re-encoding {value:?} grew from {} to {} bytes", bytes.len(), again.len());
    let back = decode_message::<M>(&again).unwrap_or_else(|e| panic!("re-encoded {value:?} does not decode: {e}"));
    assert_eq!(back, value, "re-encoded value decodes differently");
    assert_eq!(encode_message(&back), again, "re-encoding is not a fixed point");
    Some(value)
}

// ---------------------------------------------------------------------------------------
// The harness's own end of a session

/// The dialer's or callee's side of a handshake played by the harness with snow itself,
/// so it can put any payload in a valid Noise message.
pub fn raw_handshake(initiator: bool, local: &[u8; 32], remote: Option<&[u8; 32]>, preamble: &[u8]) -> snow::HandshakeState {
    let prologue = prologue(preamble);
    let mut builder = snow::Builder::new(noise_params()).local_private_key(local).expect("key").prologue(&prologue).expect("prologue");
    if let Some(remote) = remote {
        builder = builder.remote_public_key(remote).expect("remote key");
    }
    if initiator {
        builder.build_initiator().expect("initiator")
    } else {
        builder.build_responder().expect("responder")
    }
}

/// Writes one handshake message with `payload`.
pub fn write_handshake(hs: &mut snow::HandshakeState, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; payload.len() + 256];
    let n = hs.write_message(payload, &mut out).expect("handshake message");
    out.truncate(n);
    out
}

/// Encrypts `plain` as the next transport message.
pub fn seal_raw(t: &mut snow::TransportState, plain: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; plain.len() + 16];
    let n = t.write_message(plain, &mut out).expect("transport message");
    out.truncate(n);
    out
}

/// Decrypts the next transport message.
pub fn open_raw(t: &mut snow::TransportState, sealed: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; sealed.len()];
    let n = t.read_message(sealed, &mut out).expect("the real side's message decrypts");
    out.truncate(n);
    out
}

/// The preamble bytes of Alice dialling Bob.
pub fn alice_to_bob_preamble() -> Vec<u8> {
    let fx = fixtures();
    let preamble = sotto::peer::session::Preamble {
        version: sotto::peer::session::PREAMBLE_VERSION,
        dialer: fx.alice_name.clone(),
        callee: fx.bob_name.clone(),
    };
    postcard::to_stdvec(&preamble).expect("encodes")
}
