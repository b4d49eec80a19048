//! The peer protocol core: the Noise_IK handshake between two sotto users and the
//! transport that carries application messages. No I/O; times are arguments.
//!
//! On one bidirectional QUIC stream (ALPN `sotto-peer/1`) the dialer sends:
//!
//! 1. a preamble frame: `postcard(Preamble { version, dialer, callee })`;
//! 2. Noise message 1 (`-> e, es, s, ss`) whose payload is a [`DialerHello`]: the
//!    dialer's identity key, the signature binding its Noise key, and a timestamp that
//!    must increase per dialer, so a replayed initiation is refused.
//!
//! The callee answers with Noise message 2 (`<- e, ee, se`, empty payload). Both sides
//! use `"sotto/peer/v1" ‖ preamble bytes` as the Noise prologue, so both usernames and
//! the protocol version are bound into the handshake hash. Message 1 is replayable and
//! not forward secret (Noise §7.7): it carries nothing but the hello. No application
//! data is sent before the handshake completes.
//!
//! Transport frames are Noise messages of at most 65535 bytes. Each direction rekeys
//! (Noise §11.3) after every [`REKEY_INTERVAL`] messages, counted identically by both
//! sides. A failed decrypt is fatal to the session: the caller must drop it.

use serde::{Deserialize, Serialize};

use crate::keys::{Identity, IdentityKey, NoiseBinding, NoiseKey};
use crate::username::Username;
use crate::wire::{Message, HEADER_LEN};

pub const ALPN: &[u8] = b"sotto-peer/1";
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
pub const PROLOGUE_DOMAIN: &[u8] = b"sotto/peer/v1";
pub const PREAMBLE_VERSION: u8 = 1;
/// Largest Noise message (the spec's limit).
pub const MAX_NOISE_MESSAGE: usize = 65_535;
/// Largest plaintext in one transport message.
pub const MAX_PLAINTEXT: usize = MAX_NOISE_MESSAGE - NOISE_TAG_LEN;
/// The authentication tag every transport message carries: none is shorter.
pub const NOISE_TAG_LEN: usize = 16;
/// Largest chat body, in bytes, so a `Chat` always fits one transport message.
pub const MAX_BODY: usize = 60_000;
/// Largest handshake message (Noise message 1 is about 200 bytes; 2 is 48).
pub const MAX_HANDSHAKE_MESSAGE: usize = 1024;
/// How far a dialer's timestamp may be ahead of the callee's clock: a dialer whose clock
/// runs ahead must not lock itself out for longer than this.
pub const MAX_TIMESTAMP_AHEAD_NS: u64 = 10 * 60 * 1_000_000_000;
/// Messages per direction between rekeys.
pub const REKEY_INTERVAL: u64 = 1 << 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[non_exhaustive]
pub enum SessionError {
    #[error("malformed preamble")]
    BadPreamble,
    #[error("this session is for another user")]
    NotForMe,
    #[error("handshake failed")]
    Handshake,
    #[error("the dialer's Noise key is not bound to the identity it claims")]
    BadBinding,
    #[error("the dialer's identity key is not the one expected for that user")]
    UnexpectedIdentity,
    #[error("replayed or stale handshake initiation")]
    Replayed,
    #[error("handshake initiation dated in the future (check the dialer's clock)")]
    FromTheFuture,
    #[error("message failed to decrypt; session closed")]
    Decrypt,
    #[error("malformed message")]
    Malformed,
    #[error("message too large")]
    TooLarge,
}

/// Who dials whom, sent before Noise message 1 and bound into the prologue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preamble {
    pub version: u8,
    pub dialer: Username,
    pub callee: Username,
}

/// The payload of Noise message 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialerHello {
    pub identity_key: IdentityKey,
    #[serde(with = "crate::wire::bytes64")]
    pub noise_binding: [u8; 64],
    /// Nanoseconds since the Unix epoch, strictly increasing per dialer.
    pub timestamp: u64,
}

/// What peers say to each other inside a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    Chat {
        id: [u8; 16],
        sent_at: u64,
        body: String,
    },
    Ack {
        id: [u8; 16],
    },
    #[serde(other)]
    Unknown,
}

impl Message for PeerMessage {
    fn is_unknown(&self) -> bool {
        matches!(self, PeerMessage::Unknown)
    }
}

/// `PeerMessage::Chat` with its body borrowed: it serialises to the same bytes.
#[derive(Serialize)]
enum ChatRef<'a> {
    Chat { id: &'a [u8; 16], sent_at: u64, body: &'a str },
}

/// The encoded `PeerMessage::Chat { id, sent_at, body }`, byte for byte what
/// [`encode_message`](crate::wire::encode_message) makes of it, without first copying
/// the body into a message.
pub fn encode_chat(id: &[u8; 16], sent_at: u64, body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 1 + 16 + 10 + 3 + body.len());
    out.push(crate::wire::WIRE_VERSION);
    postcard::to_extend(&ChatRef::Chat { id, sent_at, body }, out).expect("postcard encodes into a Vec")
}

fn prologue(preamble_bytes: &[u8]) -> Vec<u8> {
    [PROLOGUE_DOMAIN, preamble_bytes].concat()
}

fn params() -> snow::params::NoiseParams {
    // The constant names a protocol snow implements.
    NOISE_PARAMS.parse().expect("valid Noise parameters")
}

/// The dialer's side, between message 1 and message 2.
pub struct Dial {
    hs: snow::HandshakeState,
}

impl Dial {
    /// Starts a handshake to `callee`, whose Noise key came from their signed record.
    /// Returns the dialer state, the preamble frame payload and Noise message 1.
    pub fn start(
        me: &Identity,
        my_name: &Username,
        callee: &Username,
        callee_noise: &NoiseKey,
        timestamp: u64,
    ) -> Result<(Dial, Vec<u8>, Vec<u8>), SessionError> {
        let preamble = postcard::to_stdvec(&Preamble { version: PREAMBLE_VERSION, dialer: my_name.clone(), callee: callee.clone() })
            .map_err(|_| SessionError::Malformed)?;
        let prologue = prologue(&preamble);
        let mut hs = snow::Builder::new(params())
            .local_private_key(me.noise().as_bytes())
            .and_then(|b| b.remote_public_key(callee_noise.as_bytes()))
            .and_then(|b| b.prologue(&prologue))
            .and_then(|b| b.build_initiator())
            .map_err(|_| SessionError::Handshake)?;
        let hello = DialerHello { identity_key: me.public(), noise_binding: me.binding().signature, timestamp };
        let payload = postcard::to_stdvec(&hello).map_err(|_| SessionError::Malformed)?;
        let mut msg1 = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = hs.write_message(&payload, &mut msg1).map_err(|_| SessionError::Handshake)?;
        msg1.truncate(n);
        Ok((Dial { hs }, preamble, msg1))
    }

    /// Reads message 2 and enters transport mode.
    pub fn finish(mut self, msg2: &[u8]) -> Result<Transport, SessionError> {
        if msg2.len() > MAX_HANDSHAKE_MESSAGE {
            return Err(SessionError::TooLarge);
        }
        let mut payload = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = self.hs.read_message(msg2, &mut payload).map_err(|_| SessionError::Handshake)?;
        if n != 0 {
            return Err(SessionError::Malformed);
        }
        Transport::new(self.hs)
    }
}

/// The callee's side after reading message 1: who is calling, not yet accepted.
pub struct Answer {
    hs: snow::HandshakeState,
    pub dialer: Username,
    pub hello: DialerHello,
    pub dialer_noise: NoiseKey,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answer").field("dialer", &self.dialer).field("identity_key", &self.hello.identity_key).finish_non_exhaustive()
    }
}

impl Answer {
    /// Reads the preamble and message 1. Checks that the call is for `my_name` and that
    /// the dialer's Noise key is bound to the identity key it presents. Whether that
    /// identity is the right one for the dialer's username is the caller's to decide
    /// (pinned contact or rendezvous lookup), through [`Answer::accept`].
    pub fn read(me: &Identity, my_name: &Username, preamble_bytes: &[u8], msg1: &[u8]) -> Result<Answer, SessionError> {
        let (preamble, rest) = postcard::take_from_bytes::<Preamble>(preamble_bytes).map_err(|_| SessionError::BadPreamble)?;
        if !rest.is_empty() || preamble.version != PREAMBLE_VERSION {
            return Err(SessionError::BadPreamble);
        }
        if &preamble.callee != my_name {
            return Err(SessionError::NotForMe);
        }
        if msg1.len() > MAX_HANDSHAKE_MESSAGE {
            return Err(SessionError::TooLarge);
        }
        let prologue = prologue(preamble_bytes);
        let mut hs = snow::Builder::new(params())
            .local_private_key(me.noise().as_bytes())
            .and_then(|b| b.prologue(&prologue))
            .and_then(|b| b.build_responder())
            .map_err(|_| SessionError::Handshake)?;
        let mut payload = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = hs.read_message(msg1, &mut payload).map_err(|_| SessionError::Handshake)?;
        let (hello, rest) = postcard::take_from_bytes::<DialerHello>(&payload[..n]).map_err(|_| SessionError::Malformed)?;
        if !rest.is_empty() {
            return Err(SessionError::Malformed);
        }
        let remote: [u8; 32] = hs.get_remote_static().and_then(|k| k.try_into().ok()).ok_or(SessionError::Handshake)?;
        let dialer_noise = NoiseKey(remote);
        NoiseBinding { noise_key: dialer_noise, signature: hello.noise_binding }
            .verify(&hello.identity_key)
            .map_err(|_| SessionError::BadBinding)?;
        Ok(Answer { hs, dialer: preamble.dialer, hello, dialer_noise })
    }

    /// Accepts the call if the dialer's identity is `expected` and its timestamp is
    /// newer than `last_timestamp` and not far ahead of `now_ns`; returns the transport
    /// and message 2.
    pub fn accept(
        mut self,
        expected: &IdentityKey,
        last_timestamp: Option<u64>,
        now_ns: u64,
    ) -> Result<(Transport, Vec<u8>), SessionError> {
        if !self.hello.identity_key.ct_eq(expected) {
            return Err(SessionError::UnexpectedIdentity);
        }
        if last_timestamp.is_some_and(|last| self.hello.timestamp <= last) {
            return Err(SessionError::Replayed);
        }
        if self.hello.timestamp > now_ns.saturating_add(MAX_TIMESTAMP_AHEAD_NS) {
            return Err(SessionError::FromTheFuture);
        }
        let mut msg2 = vec![0u8; MAX_HANDSHAKE_MESSAGE];
        let n = self.hs.write_message(&[], &mut msg2).map_err(|_| SessionError::Handshake)?;
        msg2.truncate(n);
        Ok((Transport::new(self.hs)?, msg2))
    }
}

/// An established session's cipher state.
pub struct Transport {
    state: snow::TransportState,
    sent: u64,
    received: u64,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("sent", &self.sent).field("received", &self.received).finish_non_exhaustive()
    }
}

impl Transport {
    fn new(hs: snow::HandshakeState) -> Result<Self, SessionError> {
        Ok(Self { state: hs.into_transport_mode().map_err(|_| SessionError::Handshake)?, sent: 0, received: 0 })
    }

    /// Encrypts one message into one Noise transport message.
    pub fn seal(&mut self, msg: &PeerMessage) -> Result<Vec<u8>, SessionError> {
        let mut out = Vec::new();
        self.seal_frame(&crate::wire::encode_message(msg), &mut out)?;
        Ok(out.split_off(HEADER_LEN))
    }

    /// Encrypts an encoded message ([`encode_message`](crate::wire::encode_message) or
    /// [`encode_chat`]) and appends it to `out` as one frame: the length, then the Noise
    /// transport message. Frames for one write can share a buffer, and the ciphertext is
    /// written where it is sent from.
    pub fn seal_frame(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), SessionError> {
        if plain.len() > MAX_PLAINTEXT {
            return Err(SessionError::TooLarge);
        }
        let start = out.len();
        out.resize(start + HEADER_LEN + plain.len() + NOISE_TAG_LEN, 0);
        let sealed = self.state.write_message(plain, &mut out[start + HEADER_LEN..]);
        let Ok(n) = sealed else {
            out.truncate(start);
            return Err(SessionError::TooLarge);
        };
        // n ≤ MAX_NOISE_MESSAGE, so it fits the header.
        out[start..start + HEADER_LEN].copy_from_slice(&(n as u32).to_be_bytes());
        out.truncate(start + HEADER_LEN + n);
        self.sent += 1;
        if self.sent % REKEY_INTERVAL == 0 {
            self.state.rekey_outgoing();
        }
        Ok(())
    }

    /// Decrypts one Noise transport message. Any error means the session is over.
    pub fn open(&mut self, bytes: &[u8]) -> Result<PeerMessage, SessionError> {
        self.open_with(bytes, &mut Vec::new())
    }

    /// [`open`](Self::open), decrypting into `scratch`, a buffer reused from message to
    /// message.
    pub fn open_with(&mut self, bytes: &[u8], scratch: &mut Vec<u8>) -> Result<PeerMessage, SessionError> {
        if bytes.len() > MAX_NOISE_MESSAGE {
            return Err(SessionError::TooLarge);
        }
        scratch.resize(bytes.len(), 0);
        let n = self.state.read_message(bytes, scratch).map_err(|_| SessionError::Decrypt)?;
        self.received += 1;
        if self.received % REKEY_INTERVAL == 0 {
            self.state.rekey_incoming();
        }
        crate::wire::decode_message(&scratch[..n]).map_err(|_| SessionError::Malformed)
    }

    pub fn counts(&self) -> (u64, u64) {
        (self.sent, self.received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::tests::identity;

    const NOW_NS: u64 = 1_800_000_000 * 1_000_000_000;

    fn name(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    /// Runs a whole handshake in memory: alice dials bob.
    fn pair(ts: u64) -> (Transport, Transport) {
        let (alice, bob) = (identity(1), identity(2));
        let (dial, pre, m1) = Dial::start(&alice, &name("alice"), &name("bob"), &bob.noise().public(), ts).unwrap();
        let answer = Answer::read(&bob, &name("bob"), &pre, &m1).unwrap();
        assert_eq!(answer.dialer, name("alice"));
        assert_eq!(answer.dialer_noise, alice.noise().public());
        let (bob_t, m2) = answer.accept(&alice.public(), None, NOW_NS).unwrap();
        (dial.finish(&m2).unwrap(), bob_t)
    }

    fn chat(body: &str) -> PeerMessage {
        PeerMessage::Chat { id: [7; 16], sent_at: 1, body: body.into() }
    }

    #[test]
    fn handshake_then_messages_both_ways() {
        let (mut a, mut b) = pair(1);
        let sealed = a.seal(&chat("hi bob")).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"hi bob"), "plaintext must not appear on the wire");
        assert_eq!(b.open(&sealed).unwrap(), chat("hi bob"));
        let ack = b.seal(&PeerMessage::Ack { id: [7; 16] }).unwrap();
        assert_eq!(a.open(&ack).unwrap(), PeerMessage::Ack { id: [7; 16] });
    }

    #[test]
    fn prologue_mismatch_fails_the_handshake() {
        let (alice, bob) = (identity(1), identity(2));
        let (_, _, m1) = Dial::start(&alice, &name("alice"), &name("bob"), &bob.noise().public(), 1).unwrap();
        // Someone rewrites the preamble to claim another dialer: the prologue differs.
        let forged = postcard::to_stdvec(&Preamble { version: PREAMBLE_VERSION, dialer: name("carol"), callee: name("bob") }).unwrap();
        assert_eq!(Answer::read(&bob, &name("bob"), &forged, &m1).unwrap_err(), SessionError::Handshake);
    }

    #[test]
    fn call_for_someone_else_is_refused() {
        let (alice, bob) = (identity(1), identity(2));
        let (_, pre, m1) = Dial::start(&alice, &name("alice"), &name("bob"), &bob.noise().public(), 1).unwrap();
        assert_eq!(Answer::read(&bob, &name("bobby"), &pre, &m1).unwrap_err(), SessionError::NotForMe);
    }

    #[test]
    fn replayed_initiation_is_refused() {
        let (alice, bob) = (identity(1), identity(2));
        let (_, pre, m1) = Dial::start(&alice, &name("alice"), &name("bob"), &bob.noise().public(), 100).unwrap();
        let first = Answer::read(&bob, &name("bob"), &pre, &m1).unwrap();
        assert_eq!(first.hello.timestamp, 100);
        let (_, _) = first.accept(&alice.public(), None, NOW_NS).unwrap();
        // The same bytes again: the callee has recorded timestamp 100.
        let again = Answer::read(&bob, &name("bob"), &pre, &m1).unwrap();
        assert_eq!(again.accept(&alice.public(), Some(100), NOW_NS).unwrap_err(), SessionError::Replayed);
    }

    #[test]
    fn far_future_initiation_is_refused() {
        let (alice, bob) = (identity(1), identity(2));
        let ahead = NOW_NS + MAX_TIMESTAMP_AHEAD_NS + 1;
        let (_, pre, m1) = Dial::start(&alice, &name("alice"), &name("bob"), &bob.noise().public(), ahead).unwrap();
        let answer = Answer::read(&bob, &name("bob"), &pre, &m1).unwrap();
        assert_eq!(answer.accept(&alice.public(), None, NOW_NS).unwrap_err(), SessionError::FromTheFuture);
    }

    #[test]
    fn wrong_static_key_fails() {
        let (alice, bob, carol) = (identity(1), identity(2), identity(3));
        // alice dials bob using carol's Noise key (a stale or forged record).
        let (_, pre, m1) = Dial::start(&alice, &name("alice"), &name("bob"), &carol.noise().public(), 1).unwrap();
        assert_eq!(Answer::read(&bob, &name("bob"), &pre, &m1).unwrap_err(), SessionError::Handshake);
    }

    #[test]
    fn dialer_claiming_another_identity_is_refused() {
        let (alice, bob, mallory) = (identity(1), identity(2), identity(3));
        let (_, pre, m1) = Dial::start(&mallory, &name("alice"), &name("bob"), &bob.noise().public(), 1).unwrap();
        let answer = Answer::read(&bob, &name("bob"), &pre, &m1).unwrap();
        assert_eq!(answer.accept(&alice.public(), None, NOW_NS).unwrap_err(), SessionError::UnexpectedIdentity);
    }

    #[test]
    fn tampered_ciphertext_is_fatal() {
        let (mut a, mut b) = pair(1);
        let mut sealed = a.seal(&chat("hello")).unwrap();
        sealed[3] ^= 1;
        assert_eq!(b.open(&sealed).unwrap_err(), SessionError::Decrypt);
    }

    #[test]
    fn replayed_or_reordered_transport_message_fails() {
        let (mut a, mut b) = pair(1);
        let m1 = a.seal(&chat("one")).unwrap();
        let m2 = a.seal(&chat("two")).unwrap();
        assert_eq!(b.open(&m2).unwrap_err(), SessionError::Decrypt, "out of order");
        let (mut a, mut b) = pair(2);
        let m1b = a.seal(&chat("one")).unwrap();
        b.open(&m1b).unwrap();
        assert_eq!(b.open(&m1b).unwrap_err(), SessionError::Decrypt, "replayed");
        let _ = m1;
    }

    #[test]
    fn rekey_keeps_both_sides_in_step() {
        let (mut a, mut b) = pair(1);
        for i in 0..(REKEY_INTERVAL + 3) {
            let m = a.seal(&PeerMessage::Ack { id: [(i % 251) as u8; 16] }).unwrap();
            assert_eq!(b.open(&m).unwrap(), PeerMessage::Ack { id: [(i % 251) as u8; 16] });
        }
        assert_eq!(a.counts().0, REKEY_INTERVAL + 3);
    }

    #[test]
    fn oversized_body_is_refused_before_sealing() {
        let (mut a, _) = pair(1);
        assert_eq!(a.seal(&chat(&"x".repeat(MAX_PLAINTEXT))).unwrap_err(), SessionError::TooLarge);
        assert!(a.seal(&chat(&"x".repeat(MAX_BODY))).is_ok());
        let mut out = b"kept".to_vec();
        assert_eq!(a.seal_frame(&[0u8; MAX_PLAINTEXT + 1], &mut out).unwrap_err(), SessionError::TooLarge);
        assert_eq!(out, b"kept", "a refused message leaves the buffer as it was");
    }

    #[test]
    fn frames_sealed_into_one_buffer_open_in_order() {
        let (mut a, mut b) = pair(NOW_NS);
        let mut out = Vec::new();
        let bodies = ["one", "two", &"three".repeat(5000)];
        for (i, body) in bodies.iter().enumerate() {
            a.seal_frame(&encode_chat(&[i as u8; 16], 7, body), &mut out).unwrap();
        }
        a.seal_frame(&crate::wire::encode_message(&PeerMessage::Ack { id: [9; 16] }), &mut out).unwrap();
        let mut rest = &out[..];
        let mut scratch = Vec::new();
        let mut got = Vec::new();
        while !rest.is_empty() {
            let len = crate::wire::frame_len(rest[..HEADER_LEN].try_into().unwrap(), MAX_NOISE_MESSAGE).unwrap();
            got.push(b.open_with(&rest[HEADER_LEN..HEADER_LEN + len], &mut scratch).unwrap());
            rest = &rest[HEADER_LEN + len..];
        }
        let want: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(i, body)| PeerMessage::Chat { id: [i as u8; 16], sent_at: 7, body: body.to_string() })
            .chain([PeerMessage::Ack { id: [9; 16] }])
            .collect();
        assert_eq!(got, want);
        assert_eq!(a.counts().0, 4);
    }

    #[test]
    fn encode_chat_is_the_chat_message_encoding() {
        for body in ["", "hi", &"é".repeat(300), &"x".repeat(MAX_BODY)] {
            for sent_at in [0, 127, 128, u64::MAX] {
                let id = [sent_at as u8; 16];
                let owned = PeerMessage::Chat { id, sent_at, body: body.to_string() };
                assert_eq!(encode_chat(&id, sent_at, body), crate::wire::encode_message(&owned));
            }
        }
    }
}
