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

use ring::aead;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use crate::keys::{Identity, IdentityKey, NoiseBinding, NoiseKey};
use crate::username::Username;
use crate::wire::{Message, HEADER_LEN};

pub const ALPN: &[u8] = b"sotto-peer/1";
pub const NOISE_PARAMS: &str = "Noise_IK_25519_AESGCM_BLAKE2s";
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
    #[error("this session has used every nonce; dial again")]
    Exhausted,
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

/// Appends the encoded `PeerMessage::Chat { id, sent_at, body }` to `out`: byte for
/// byte what [`encode_message`](crate::wire::encode_message) makes of it, without first
/// copying the body into a message.
fn encode_chat_into(id: &[u8; 16], sent_at: u64, body: &str, out: &mut Vec<u8>) {
    out.reserve(CHAT_OVERHEAD + body.len());
    out.push(crate::wire::WIRE_VERSION);
    // postcard extends a collection it owns; the buffer is lent to it and comes back.
    let lent = std::mem::take(out);
    *out = postcard::to_extend(&ChatRef::Chat { id, sent_at, body }, lent).expect("postcard encodes into a Vec");
}

/// The most a chat's encoding adds to its body: the wire version, the variant, the id,
/// and `sent_at` and the body's length as varints.
pub const CHAT_OVERHEAD: usize = 1 + 1 + 16 + 10 + 3;

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

/// An established session: one Noise CipherState (§5.1) for each direction, with
/// AESGCM (§12.4: AES-256-GCM), sealing and opening in place.
///
/// snow carries the handshake; its `TransportState` takes separate input and output
/// buffers, so each message would be copied into a zeroed buffer before it is sealed and
/// copied out again before it is opened. These cipher states start from the keys of
/// the handshake's Split() and follow the spec's rules: the nonce is 32 zero bits then
/// the 64-bit counter `n`, big-endian; `n` advances only on success and never reaches
/// 2^64 − 1, which is reserved; a rekey (§4.2, every [`REKEY_INTERVAL`] messages as
/// §11.3 suggests) replaces the key with the first 32 bytes of ENCRYPT(k, 2^64 − 1, "",
/// 32 zero bytes) and leaves `n` as it is. Tests hold them to snow's own transport
/// across rekeys in both directions, from a fresh session and from counters near the
/// end of their range.
pub struct Transport {
    send: CipherState,
    recv: CipherState,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("sent", &self.send.n).field("received", &self.recv.n).finish_non_exhaustive()
    }
}

impl Transport {
    fn new(mut hs: snow::HandshakeState) -> Result<Self, SessionError> {
        if !hs.is_handshake_finished() {
            return Err(SessionError::Handshake);
        }
        // Split(): the first key carries the initiator's messages, the second the
        // responder's.
        let (mut first, mut second) = hs.dangerously_get_raw_split();
        let (first_state, second_state) = (CipherState::new(&first), CipherState::new(&second));
        first.zeroize();
        second.zeroize();
        Ok(if hs.is_initiator() { Self { send: first_state, recv: second_state } } else { Self { send: second_state, recv: first_state } })
    }

    /// Encrypts one message into one Noise transport message.
    pub fn seal(&mut self, msg: &PeerMessage) -> Result<Vec<u8>, SessionError> {
        let mut out = Vec::new();
        self.seal_frame(&crate::wire::encode_message(msg), &mut out)?;
        Ok(out.split_off(HEADER_LEN))
    }

    /// Encrypts an encoded message ([`encode_message`](crate::wire::encode_message)) and
    /// appends it to `out` as one frame: the length, then the Noise
    /// transport message. Frames for one write can share a buffer, and the message is
    /// sealed where it is sent from.
    pub fn seal_frame(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), SessionError> {
        if plain.len() > MAX_PLAINTEXT {
            return Err(SessionError::TooLarge);
        }
        self.seal_written(out, plain.len(), |out| out.extend_from_slice(plain))
    }

    /// Encodes `PeerMessage::Chat { id, sent_at, body }` straight into `out`, where it
    /// is sealed, as one frame: what [`seal_frame`](Self::seal_frame) makes of the
    /// encoded message, without encoding it anywhere else first.
    pub fn seal_chat(&mut self, id: &[u8; 16], sent_at: u64, body: &str, out: &mut Vec<u8>) -> Result<(), SessionError> {
        if body.len() > MAX_PLAINTEXT {
            return Err(SessionError::TooLarge);
        }
        self.seal_written(out, CHAT_OVERHEAD + body.len(), |out| encode_chat_into(id, sent_at, body, out))
    }

    /// Appends one frame to `out`: a header, the plaintext `write` appends (about
    /// `size` bytes), sealed where it lies, and its tag. A plaintext over
    /// [`MAX_PLAINTEXT`] is refused and leaves `out` as it was.
    fn seal_written(&mut self, out: &mut Vec<u8>, size: usize, write: impl FnOnce(&mut Vec<u8>)) -> Result<(), SessionError> {
        self.send.usable()?;
        let start = out.len();
        out.reserve(HEADER_LEN + size + NOISE_TAG_LEN);
        out.extend_from_slice(&[0; HEADER_LEN]);
        write(out);
        let plain = out.len() - start - HEADER_LEN;
        let sealed = match plain {
            too_large if too_large > MAX_PLAINTEXT => Err(SessionError::TooLarge),
            _ => self.send.seal(&mut out[start + HEADER_LEN..]),
        };
        match sealed {
            Ok(tag) => {
                // plain + tag ≤ MAX_NOISE_MESSAGE, so it fits the header.
                out[start..start + HEADER_LEN].copy_from_slice(&((plain + NOISE_TAG_LEN) as u32).to_be_bytes());
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(e) => {
                // No plaintext stays behind in the buffer's spare room.
                out[start..].zeroize();
                out.truncate(start);
                Err(e)
            }
        }
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
        scratch.clear();
        scratch.extend_from_slice(bytes);
        self.open_in_place(scratch)
    }

    /// [`open`](Self::open) for a frame as it came off the stream: decrypted where it
    /// lies when nothing else holds its buffer (a frame gathered from several pieces,
    /// or the last one left of a piece that held several), else copied into `scratch`
    /// first.
    pub fn open_frame(&mut self, frame: bytes::Bytes, scratch: &mut Vec<u8>) -> Result<PeerMessage, SessionError> {
        match frame.try_into_mut() {
            Ok(mut own) if own.len() <= MAX_NOISE_MESSAGE => self.open_in_place(&mut own),
            Ok(own) => self.open_with(&own, scratch),
            Err(shared) => self.open_with(&shared, scratch),
        }
    }

    fn open_in_place(&mut self, message: &mut [u8]) -> Result<PeerMessage, SessionError> {
        let plain = self.recv.open(message)?;
        crate::wire::decode_message(plain).map_err(|_| SessionError::Malformed)
    }

    /// Messages sealed and opened so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.send.n, self.recv.n)
    }
}

/// One direction's Noise CipherState: the key and the message counter `n`.
struct CipherState {
    key: aead::LessSafeKey,
    n: u64,
}

impl CipherState {
    fn new(key: &[u8; 32]) -> Self {
        Self { key: Self::key(key), n: 0 }
    }

    fn key(key: &[u8; 32]) -> aead::LessSafeKey {
        aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("a 32-byte AES-256-GCM key"))
    }

    /// AESGCM's nonce for counter `n`: 32 zero bits, then `n` big-endian.
    fn nonce(n: u64) -> aead::Nonce {
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce[4..].copy_from_slice(&n.to_be_bytes());
        aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Refuses once the counter has reached 2^64 − 1, a nonce no message may use.
    fn usable(&self) -> Result<(), SessionError> {
        if self.n == u64::MAX {
            return Err(SessionError::Exhausted);
        }
        Ok(())
    }

    /// Encrypts `in_out` where it lies; returns the tag that follows it.
    fn seal(&mut self, in_out: &mut [u8]) -> Result<[u8; NOISE_TAG_LEN], SessionError> {
        self.usable()?;
        let tag =
            self.key.seal_in_place_separate_tag(Self::nonce(self.n), aead::Aad::empty(), in_out).map_err(|_| SessionError::TooLarge)?;
        self.advance();
        Ok(tag.as_ref().try_into().expect("a 16-byte tag"))
    }

    /// Decrypts a transport message (ciphertext, then tag) where it lies; returns the
    /// plaintext, a prefix of it.
    fn open<'a>(&mut self, message: &'a mut [u8]) -> Result<&'a [u8], SessionError> {
        self.usable()?;
        let plain = self.key.open_in_place(Self::nonce(self.n), aead::Aad::empty(), message).map_err(|_| SessionError::Decrypt)?;
        self.advance();
        Ok(plain)
    }

    /// Counts a message; every [`REKEY_INTERVAL`] messages, rekeys (both sides count
    /// alike, so they rekey at the same message).
    fn advance(&mut self) {
        self.n += 1;
        if self.n % REKEY_INTERVAL == 0 {
            let mut next = [0u8; 32];
            // REKEY(k): the first 32 bytes of ENCRYPT(k, 2^64 − 1, "", zeros); the tag
            // is dropped.
            let _tag =
                self.key.seal_in_place_separate_tag(Self::nonce(u64::MAX), aead::Aad::empty(), &mut next).expect("32 bytes always seal");
            self.key = Self::key(&next);
            next.zeroize();
        }
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

    /// A Noise IK handshake run by snow alone, between fresh keys: both sides finished.
    /// snow's own resolver (RustCrypto's AES-GCM), not ring's: our transport seals with
    /// ring, so the tests against snow hold it to a second implementation.
    fn snow_handshake() -> (snow::HandshakeState, snow::HandshakeState) {
        let builder = || snow::Builder::with_resolver(params(), Box::new(snow::resolvers::DefaultResolver));
        let (dialer, callee) = (builder().generate_keypair().unwrap(), builder().generate_keypair().unwrap());
        let mut i = builder()
            .local_private_key(&dialer.private)
            .and_then(|b| b.remote_public_key(&callee.public))
            .and_then(|b| b.build_initiator())
            .unwrap();
        let mut r = builder().local_private_key(&callee.private).and_then(|b| b.build_responder()).unwrap();
        let (mut msg, mut payload) = ([0u8; MAX_HANDSHAKE_MESSAGE], [0u8; MAX_HANDSHAKE_MESSAGE]);
        let n = i.write_message(&[], &mut msg).unwrap();
        r.read_message(&msg[..n], &mut payload).unwrap();
        let n = r.write_message(&[], &mut msg).unwrap();
        i.read_message(&msg[..n], &mut payload).unwrap();
        (i, r)
    }

    /// Our transport on one end of a session, snow's on the other, each side's
    /// counters kept by the harness and handed to snow explicitly.
    struct AgainstSnow {
        ours: Transport,
        theirs: snow::StatelessTransportState,
        to_them: u64,
        to_us: u64,
        buf: Vec<u8>,
    }

    impl AgainstSnow {
        fn new(we_dial: bool) -> Self {
            let (i, r) = snow_handshake();
            let (ours, theirs) = if we_dial { (i, r) } else { (r, i) };
            let (ours, theirs) = (Transport::new(ours).unwrap(), theirs.into_stateless_transport_mode().unwrap());
            Self { ours, theirs, to_them: 0, to_us: 0, buf: vec![0u8; MAX_NOISE_MESSAGE] }
        }

        /// Both directions' counters jump to `n` on both sides (no rekey in between).
        fn skip_to(&mut self, n: u64) {
            (self.ours.send.n, self.ours.recv.n, self.to_them, self.to_us) = (n, n, n, n);
        }

        /// We seal `plain`; snow opens it with the nonce the spec gives it.
        fn we_send(&mut self, plain: &[u8]) {
            let mut frame = Vec::new();
            self.ours.seal_frame(plain, &mut frame).unwrap();
            assert_eq!(frame[..HEADER_LEN], ((plain.len() + NOISE_TAG_LEN) as u32).to_be_bytes());
            let n = self.theirs.read_message(self.to_them, &frame[HEADER_LEN..], &mut self.buf);
            assert_eq!(n.map(|n| &self.buf[..n]).ok(), Some(plain), "ours → snow, n = {}", self.to_them);
            self.to_them += 1;
            if self.to_them % REKEY_INTERVAL == 0 {
                self.theirs.rekey_incoming();
            }
        }

        /// snow seals `plain` with the nonce the spec gives it; we open it.
        fn they_send(&mut self, plain: &[u8]) {
            let n = self.theirs.write_message(self.to_us, plain, &mut self.buf).unwrap();
            assert_eq!(self.ours.recv.open(&mut self.buf[..n]).ok(), Some(plain), "snow → ours, n = {}", self.to_us);
            self.to_us += 1;
            if self.to_us % REKEY_INTERVAL == 0 {
                self.theirs.rekey_outgoing();
            }
        }
    }

    /// The `Noise_IK_25519_AESGCM_BLAKE2s` vector of cacophony, the Noise reference
    /// implementation (its published test vectors): snow runs the handshake from the
    /// vector's fixed keys, and our transport must produce and open the vector's
    /// transport messages byte for byte. This ties the cipher, the nonce's layout and
    /// the Split() order to an implementation other than snow.
    #[test]
    fn the_transport_reproduces_the_reference_vector() {
        let hex = |s: &str| hex::decode(s).unwrap();
        assert_eq!(NOISE_PARAMS, "Noise_IK_25519_AESGCM_BLAKE2s", "the vector below is for this protocol");
        let prologue = hex("4a6f686e2047616c74");
        let (init_static, init_ephemeral) = (
            hex("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1"),
            hex("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a"),
        );
        let (resp_static, resp_ephemeral) = (
            hex("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893"),
            hex("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b"),
        );
        let resp_public = hex("31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62");
        // (payload, ciphertext): the two handshake messages, then transport messages,
        // dialer and callee taking turns.
        let messages = [
            ("4c756477696720766f6e204d69736573", "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944fc16af5edc066c93c77be147f8e6785cd6bd7b27e0f660d02a6a566ceb61b22af4d0dcc8560bce79b2a1fb55f68bc34017319936516ae9ce0862fe172c77a883f241700cb26d145dc8f8c9fe80a29008"),
            ("4d757272617920526f746862617264", "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f14480884319679a2f2fae0ee3700b9d1f532eb77fcf485567e810eaf95b2f9eeca858fe"),
            ("462e20412e20486179656b", "daf849a4f4bd8b0276f120b017b9dfdbc9ed667ee98316e95de1cc"),
            ("4361726c204d656e676572", "cdf2321b9584498d0ce313cb0c995c3ee2d679c1f3c22576ff1e90"),
            ("4a65616e2d426170746973746520536179", "abc41aa7b17f5d7c5b8454c203668718a15020b72729f1243490ab54150338293a"),
            ("457567656e2042f6686d20766f6e2042617765726b", "59bafe529215e376187e06fcfb6772d6ca7f0946877e77aafb4a90a5fc6c4cf82344d5c949"),
        ];
        let mut dialer = snow::Builder::new(params())
            .prologue(&prologue)
            .and_then(|b| b.local_private_key(&init_static))
            .and_then(|b| b.remote_public_key(&resp_public))
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&init_ephemeral)
            .build_initiator()
            .unwrap();
        let mut callee = snow::Builder::new(params())
            .prologue(&prologue)
            .and_then(|b| b.local_private_key(&resp_static))
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(&resp_ephemeral)
            .build_responder()
            .unwrap();
        let (mut buf, mut payload) = ([0u8; MAX_HANDSHAKE_MESSAGE], [0u8; MAX_HANDSHAKE_MESSAGE]);
        for (i, (plain, cipher)) in messages[..2].iter().enumerate() {
            let (from, to) = if i == 0 { (&mut dialer, &mut callee) } else { (&mut callee, &mut dialer) };
            let n = from.write_message(&hex(plain), &mut buf).unwrap();
            assert_eq!(hex::encode(&buf[..n]), *cipher, "handshake message {i}");
            let read = to.read_message(&buf[..n], &mut payload).unwrap();
            assert_eq!(payload[..read], hex(plain), "handshake message {i}");
        }
        let hash = "af51ccef548b5277ae7120c78750de6ad146ead3565b67ae43551ca4dfa962a3";
        assert_eq!(hex::encode(dialer.get_handshake_hash()), hash);
        assert_eq!(hex::encode(callee.get_handshake_hash()), hash);
        let (mut dialer, mut callee) = (Transport::new(dialer).unwrap(), Transport::new(callee).unwrap());
        for (i, (plain, cipher)) in messages[2..].iter().enumerate() {
            let (from, to) = if i % 2 == 0 { (&mut dialer, &mut callee) } else { (&mut callee, &mut dialer) };
            let mut frame = Vec::new();
            from.seal_frame(&hex(plain), &mut frame).unwrap();
            assert_eq!(hex::encode(&frame[HEADER_LEN..]), *cipher, "transport message {i}");
            assert_eq!(to.recv.open(&mut frame[HEADER_LEN..]).unwrap(), hex(plain), "transport message {i}");
        }
    }

    #[test]
    fn the_transport_speaks_noise_as_snow_does_across_rekeys() {
        let largest = vec![0xa5u8; MAX_PLAINTEXT];
        for we_dial in [true, false] {
            let mut s = AgainstSnow::new(we_dial);
            // Uneven bursts each way, past two rekeys in each direction; now and then an
            // empty message and one of the largest size.
            let mut k = 0u64;
            while s.to_them < 2 * REKEY_INTERVAL + 3 || s.to_us < 2 * REKEY_INTERVAL + 3 {
                let size = |j: u64| match j % 25_000 {
                    0 => MAX_PLAINTEXT,
                    1 => 0,
                    j => (j % 40) as usize,
                };
                for j in 0..1 + k % 3 {
                    s.we_send(&largest[..size(k + j)]);
                }
                for j in 0..1 + (k / 5) % 2 {
                    s.they_send(&largest[..size(k + j + 1)]);
                }
                k += 1;
            }
            assert_eq!(s.ours.counts(), (s.to_them, s.to_us));
        }
    }

    #[test]
    fn nonces_near_the_end_of_the_counter_match_snow_and_the_last_is_never_used() {
        let mut s = AgainstSnow::new(true);
        // Every byte of the counter differs, and a rekey falls in the middle.
        s.skip_to(0x0102_0304_0506_0000 - 3);
        for _ in 0..6 {
            s.we_send(b"high");
            s.they_send(b"high");
        }
        s.skip_to(u64::MAX - 2);
        for _ in 0..2 {
            s.we_send(b"last");
            s.they_send(b"last");
        }
        let mut out = b"kept".to_vec();
        assert_eq!(s.ours.seal_frame(b"over", &mut out).unwrap_err(), SessionError::Exhausted);
        assert_eq!(out, b"kept", "nothing is written with the reserved nonce");
        let mut sealed = [0u8; 32];
        sealed[..4].copy_from_slice(b"over");
        assert_eq!(s.ours.recv.open(&mut sealed).unwrap_err(), SessionError::Exhausted);
        assert_eq!(s.ours.counts(), (u64::MAX, u64::MAX));
    }

    #[test]
    fn a_message_that_fails_to_open_uses_no_nonce() {
        let (mut a, mut b) = pair(1);
        let mut scratch = Vec::new();
        for in_place in [false, true] {
            let sealed = a.seal(&chat("one")).unwrap();
            let mut forged = sealed.clone();
            *forged.last_mut().unwrap() ^= 1;
            let before = b.counts().1;
            let failed = match in_place {
                false => b.open(&forged),
                true => b.open_frame(bytes::Bytes::from(forged), &mut scratch),
            };
            assert_eq!(failed.unwrap_err(), SessionError::Decrypt);
            assert_eq!(b.counts().1, before);
            let genuine = match in_place {
                false => b.open(&sealed),
                true => b.open_frame(bytes::Bytes::from(sealed), &mut scratch),
            };
            assert_eq!(genuine.unwrap(), chat("one"), "the genuine message still opens with the same nonce");
        }
    }

    #[test]
    fn a_frame_someone_else_holds_is_not_decrypted_where_it_lies() {
        let (mut a, mut b) = pair(1);
        let mut scratch = Vec::new();
        let held = bytes::Bytes::from(a.seal(&chat("shared")).unwrap());
        let kept = held.clone();
        assert_eq!(b.open_frame(held, &mut scratch).unwrap(), chat("shared"));
        assert!(!kept.windows(6).any(|w| w == b"shared"), "the other holder still sees ciphertext");
        let own = bytes::Bytes::from(a.seal(&chat("own")).unwrap());
        assert_eq!(b.open_frame(own, &mut scratch).unwrap(), chat("own"));
        // Two frames cut from one piece of the stream: the first is shared with the
        // second, the second is alone once the first is done.
        let (one, two) = (a.seal(&chat("first")).unwrap(), a.seal(&chat("second")).unwrap());
        let piece = bytes::Bytes::from([one.as_slice(), two.as_slice()].concat());
        let (first, second) = (piece.slice(..one.len()), piece.slice(one.len()..));
        drop(piece);
        assert_eq!(b.open_frame(first, &mut scratch).unwrap(), chat("first"));
        assert_eq!(b.open_frame(second, &mut scratch).unwrap(), chat("second"));
        assert_eq!(b.counts().1, 4);
    }

    #[test]
    fn an_oversized_frame_is_refused_unopened_however_it_is_held() {
        let (_, mut b) = pair(1);
        let mut scratch = Vec::new();
        let big = bytes::Bytes::from(vec![0u8; MAX_NOISE_MESSAGE + 1]);
        let held = big.clone();
        assert_eq!(b.open_frame(big, &mut scratch).unwrap_err(), SessionError::TooLarge);
        assert_eq!(b.open_frame(held, &mut scratch).unwrap_err(), SessionError::TooLarge);
        assert_eq!(b.counts().1, 0);
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
    fn a_chat_sealed_where_it_is_encoded_fits_one_message_or_is_refused_untouched() {
        let (mut a, mut b) = pair(1);
        // The largest encoding: a `sent_at` of ten varint bytes and a three-byte length.
        let largest = MAX_PLAINTEXT - CHAT_OVERHEAD;
        let mut out = b"kept".to_vec();
        for body in ["x".repeat(largest + 1), "x".repeat(MAX_PLAINTEXT + 1)] {
            assert_eq!(a.seal_chat(&[1; 16], u64::MAX, &body, &mut out).unwrap_err(), SessionError::TooLarge);
            assert_eq!(out, b"kept", "a refused chat leaves the buffer as it was");
        }
        assert_eq!(a.counts().0, 0, "a refused chat uses no nonce");
        let body = "x".repeat(largest);
        a.seal_chat(&[1; 16], u64::MAX, &body, &mut out).unwrap();
        assert_eq!(out.len(), 4 + HEADER_LEN + MAX_NOISE_MESSAGE);
        let opened = b.open_frame(bytes::Bytes::copy_from_slice(&out[4 + HEADER_LEN..]), &mut Vec::new()).unwrap();
        assert_eq!(opened, PeerMessage::Chat { id: [1; 16], sent_at: u64::MAX, body });
    }

    #[test]
    fn frames_sealed_into_one_buffer_open_in_order() {
        let (mut a, mut b) = pair(NOW_NS);
        let mut out = Vec::new();
        let bodies = ["one", "two", &"three".repeat(5000)];
        for (i, body) in bodies.iter().enumerate() {
            a.seal_chat(&[i as u8; 16], 7, body, &mut out).unwrap();
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
    fn a_chat_encoded_in_place_is_the_chat_message_encoding() {
        for body in ["", "hi", &"é".repeat(300), &"x".repeat(MAX_BODY)] {
            for sent_at in [0, 127, 128, u64::MAX] {
                let id = [sent_at as u8; 16];
                let owned = PeerMessage::Chat { id, sent_at, body: body.to_string() };
                let mut out = b"before".to_vec();
                encode_chat_into(&id, sent_at, body, &mut out);
                assert_eq!(out, [&b"before"[..], &crate::wire::encode_message(&owned)].concat());
                assert!(out.len() - b"before".len() <= CHAT_OVERHEAD + body.len());
            }
        }
    }
}
