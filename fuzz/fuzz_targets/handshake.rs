//! The Noise_IK handshake state machine (src/peer/session.rs) fed arbitrary messages,
//! with the fixture identities: Bob answers, Alice dials.
//!
//! Modes (first byte):
//! 0. arbitrary preamble and message 1 into `Answer::read`;
//! 1. a valid Noise message 1 that the harness writes itself, with a fuzzed static key,
//!    preamble and payload, into `Answer::read`, then `Answer::accept` with fuzzed
//!    expectations and clock, checked against a model, and the session it opens;
//! 2. arbitrary message 2 into `Dial::finish`;
//! 3. a valid Noise message 2 with a fuzzed payload (or one flipped bit) into
//!    `Dial::finish`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::keys::{NoiseBinding, NoiseSecret};
use sotto::peer::session::{
    Answer, Dial, DialerHello, PeerMessage, Preamble, SessionError, Transport, MAX_HANDSHAKE_MESSAGE, MAX_TIMESTAMP_AHEAD_NS,
    PREAMBLE_VERSION,
};
use sotto::wire::{decode_message, encode_message};
use sotto_fuzz::{
    alice_to_bob_preamble, assert_canonical, decode_heap_bound, fixtures, open_raw, peak_heap, raw_handshake, seal_raw, write_handshake,
    Input,
};

/// Heap one handshake step may hold: snow's state, two message buffers, the prologue.
const HANDSHAKE_HEAP: usize = 16 * 1024;

fn exact_preamble(bytes: &[u8]) -> Option<Preamble> {
    match postcard::take_from_bytes::<Preamble>(bytes) {
        Ok((p, [])) => Some(p),
        _ => None,
    }
}

/// What `Answer::read` must say before Noise runs, if anything.
fn refused_early(preamble: &[u8], msg1: &[u8]) -> Option<SessionError> {
    match exact_preamble(preamble) {
        None => Some(SessionError::BadPreamble),
        Some(p) if p.version != PREAMBLE_VERSION => Some(SessionError::BadPreamble),
        Some(p) if p.callee != fixtures().bob_name => Some(SessionError::NotForMe),
        Some(_) if msg1.len() > MAX_HANDSHAKE_MESSAGE => Some(SessionError::TooLarge),
        Some(_) => None,
    }
}

fn read(preamble: &[u8], msg1: &[u8]) -> Result<Answer, SessionError> {
    let fx = fixtures();
    let (result, heap) = peak_heap(|| Answer::read(&fx.bob, &fx.bob_name, preamble, msg1));
    assert!(heap <= decode_heap_bound(preamble.len()) + HANDSHAKE_HEAP, "Answer::read held {heap} bytes");
    if let Some(early) = refused_early(preamble, msg1) {
        assert_eq!(result.as_ref().err(), Some(&early));
    }
    if let Ok(answer) = &result {
        let p = exact_preamble(preamble).expect("accepted a bad preamble");
        assert_eq!(answer.dialer, p.dialer);
        assert_canonical(&answer.dialer);
        let binding = NoiseBinding { noise_key: answer.dialer_noise, signature: answer.hello.noise_binding };
        assert!(binding.verify(&answer.hello.identity_key).is_ok(), "accepted an unbound Noise key");
    }
    result
}

/// One message each way between a real transport and the harness's.
fn round_trip(real: &mut Transport, raw: &mut snow::TransportState, id: [u8; 16]) {
    let ack = PeerMessage::Ack { id };
    let sealed = real.seal(&ack).expect("seals");
    assert_eq!(decode_message::<PeerMessage>(&open_raw(raw, &sealed)), Ok(ack));
    let chat = PeerMessage::Chat { id, sent_at: 1, body: "hello".into() };
    let sealed = seal_raw(raw, &encode_message(&chat));
    assert_eq!(real.open(&sealed), Ok(chat));
}

fn raw_message_1(input: &mut Input) {
    let split = input.u8() as usize;
    let preamble = input.bytes(split);
    let msg1 = input.rest();
    if let Ok(answer) = read(preamble, msg1) {
        // Only a replayed real initiation gets here; accepting it opens a session.
        let key = answer.hello.identity_key;
        assert!(answer.accept(&key, None, u64::MAX).is_ok());
    }
}

fn crafted_message_1(input: &mut Input) {
    let fx = fixtures();
    let flags = input.u8();
    let local: [u8; 32] = if flags & 1 == 0 { *fx.alice.noise().as_bytes() } else { input.array() };
    let local_public = NoiseSecret::from_bytes(&local).public();
    let preamble = if flags & 2 == 0 { alice_to_bob_preamble() } else { input.chunk().to_vec() };
    let mut payload = Vec::new();
    if flags & 4 == 0 {
        let hello = DialerHello { identity_key: fx.alice.public(), noise_binding: fx.alice_binding, timestamp: input.u64() };
        payload.extend(postcard::to_stdvec(&hello).expect("encodes"));
        if flags & 8 != 0 {
            payload.extend_from_slice(input.chunk());
        }
    } else {
        payload.extend_from_slice(input.chunk());
    }
    payload.truncate(2000);

    let mut dialer = raw_handshake(true, &local, Some(fx.bob.noise().public().as_bytes()), &preamble);
    let msg1 = write_handshake(&mut dialer, &payload);
    let result = read(&preamble, &msg1);
    if refused_early(&preamble, &msg1).is_some() {
        return;
    }
    // A valid Noise message for Bob under this prologue always passes Noise.
    let hello = match postcard::take_from_bytes::<DialerHello>(&payload) {
        Ok((hello, [])) => hello,
        _ => {
            assert_eq!(result.err(), Some(SessionError::Malformed));
            return;
        }
    };
    let bound = NoiseBinding { noise_key: local_public, signature: hello.noise_binding }.verify(&hello.identity_key).is_ok();
    let answer = match result {
        Ok(answer) => answer,
        Err(e) => {
            assert!(!bound && e == SessionError::BadBinding, "{e:?}");
            return;
        }
    };
    assert!(bound);
    assert_eq!(answer.hello, hello);
    assert_eq!(answer.dialer_noise, local_public);

    // Accepting: the model of identity, replay and clock rules.
    let expected = if input.u8() & 1 == 0 { hello.identity_key } else { fx.bob.public() };
    let last = (input.u8() & 1 == 1).then(|| input.u64());
    let now = input.u64();
    let model = if !hello.identity_key.ct_eq(&expected) {
        Err(SessionError::UnexpectedIdentity)
    } else if last.is_some_and(|l| hello.timestamp <= l) {
        Err(SessionError::Replayed)
    } else if hello.timestamp > now.saturating_add(MAX_TIMESTAMP_AHEAD_NS) {
        Err(SessionError::FromTheFuture)
    } else {
        Ok(())
    };
    match (answer.accept(&expected, last, now), model) {
        (Ok((mut callee, msg2)), Ok(())) => {
            assert!(msg2.len() <= MAX_HANDSHAKE_MESSAGE);
            let mut payload = [0u8; 64];
            assert_eq!(dialer.read_message(&msg2, &mut payload).expect("message 2 reads"), 0, "message 2 carries a payload");
            let mut raw = dialer.into_transport_mode().expect("transport");
            round_trip(&mut callee, &mut raw, input.array());
        }
        (Err(e), Err(m)) => assert_eq!(e, m),
        (got, model) => panic!("accept gave {:?}, the model {model:?}", got.map(|_| ())),
    }
}

fn start() -> (Dial, Vec<u8>, Vec<u8>) {
    let fx = fixtures();
    Dial::start(&fx.alice, &fx.alice_name, &fx.bob_name, &fx.bob.noise().public(), 1).expect("dial starts")
}

fn raw_message_2(input: &mut Input) {
    let (dial, _, _) = start();
    let msg2 = input.rest();
    let (result, heap) = peak_heap(|| dial.finish(msg2));
    assert!(heap <= HANDSHAKE_HEAP, "Dial::finish held {heap} bytes");
    let expected = if msg2.len() > MAX_HANDSHAKE_MESSAGE { SessionError::TooLarge } else { SessionError::Handshake };
    assert_eq!(result.err(), Some(expected));
}

fn crafted_message_2(input: &mut Input) {
    let fx = fixtures();
    let (dial, preamble, msg1) = start();
    let mut callee = raw_handshake(false, fx.bob.noise().as_bytes(), None, &preamble);
    let mut hello = vec![0u8; msg1.len()];
    callee.read_message(&msg1, &mut hello).expect("message 1 reads");
    let flags = input.u8();
    let payload = if flags & 1 == 0 { &[][..] } else { input.chunk() };
    let payload = &payload[..payload.len().min(4096)];
    let mut msg2 = write_handshake(&mut callee, payload);
    let flip = flags & 2 != 0;
    if flip {
        let at = input.u16() as usize % msg2.len();
        msg2[at] ^= 1 << (input.u8() % 8);
    }
    let result = dial.finish(&msg2);
    match result {
        Ok(mut dialer) => {
            assert!(!flip && payload.is_empty());
            let mut raw = callee.into_transport_mode().expect("transport");
            round_trip(&mut dialer, &mut raw, input.array());
        }
        Err(e) => {
            let expected = if msg2.len() > MAX_HANDSHAKE_MESSAGE {
                SessionError::TooLarge
            } else if flip {
                SessionError::Handshake
            } else {
                SessionError::Malformed
            };
            assert_eq!(e, expected);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    match input.u8() % 4 {
        0 => raw_message_1(&mut input),
        1 => crafted_message_1(&mut input),
        2 => raw_message_2(&mut input),
        _ => crafted_message_2(&mut input),
    }
});
