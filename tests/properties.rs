//! Properties of every decoder of untrusted bytes: each format survives an encode/decode
//! round trip, and no decoder panics, or holds more heap than the bytes it was given pay
//! for, or returns anything over its caps, whatever the input. The fuzz targets in fuzz/
//! check the same properties much longer (docs/FUZZING.md).

mod heap;

use std::net::{IpAddr, SocketAddr};

use heap::{heap_bound, peak_heap, record_heap_bound};
use proptest::prelude::*;
use sotto::address::ServerAddress;
use sotto::config::Config;
use sotto::idfile::{self, Header, IdFileError, KdfParams, FILE_LEN};
use sotto::keys::{Identity, IdentityKey, IdentitySecret, NoiseBinding, NoiseKey, NoiseSecret};
use sotto::peer::session::{
    Answer, Dial, DialerHello, PeerMessage, Preamble, SessionError, Transport, MAX_HANDSHAKE_MESSAGE, MAX_NOISE_MESSAGE, MAX_PLAINTEXT,
    PREAMBLE_VERSION,
};
use sotto::presence::{PresenceError, PresenceRecord, SignedPresence, DOMAIN_PRESENCE, MAX_ADDRS, MAX_RECORD_BYTES, RECORD_VERSION};
use sotto::rendezvous::proto::{AccountInfo, Credentials, Refusal, Request, Response, MAX_FRAME};
use sotto::username::Username;
use sotto::wire::{decode_message, decode_single_frame, encode_frame, encode_message, frame_len, Message, WireError, HEADER_LEN};

/// Heap of one handshake step besides its input: snow's state and two message buffers.
const HANDSHAKE_HEAP: usize = 16 * 1024;

// ---------------------------------------------------------------------------------------
// Fixtures and strategies

fn alice() -> Identity {
    Identity::new(IdentitySecret::from_seed(&[0x01; 32]), NoiseSecret::from_bytes(&[0x02; 32]))
}

fn bob() -> Identity {
    Identity::new(IdentitySecret::from_seed(&[0x03; 32]), NoiseSecret::from_bytes(&[0x04; 32]))
}

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

const NOW_NS: u64 = 1_800_000_000 * 1_000_000_000;

/// Cheapest parameters argon2 accepts; real files use `KdfParams::DEFAULT`.
const FAST: KdfParams = KdfParams { memory_kib: 8, iterations: 1, parallelism: 1 };

fn username() -> impl Strategy<Value = Username> {
    "[a-z0-9_-]{3,32}".prop_map(|s| Username::parse(&s).unwrap())
}

fn identity_key() -> impl Strategy<Value = IdentityKey> {
    any::<[u8; 32]>().prop_map(|seed| IdentitySecret::from_seed(&seed).public())
}

fn bytes64() -> impl Strategy<Value = [u8; 64]> {
    prop::collection::vec(any::<u8>(), 64).prop_map(|v| v.try_into().unwrap())
}

fn binding() -> impl Strategy<Value = NoiseBinding> {
    (any::<[u8; 32]>(), bytes64()).prop_map(|(key, signature)| NoiseBinding { noise_key: NoiseKey(key), signature })
}

/// Postcard carries no IPv6 flow info or scope id (keys/README.md), so none is made.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

fn signed_presence() -> impl Strategy<Value = SignedPresence> {
    (prop::collection::vec(any::<u8>(), 0..300), bytes64()).prop_map(|(payload, signature)| SignedPresence { payload, signature })
}

fn credentials() -> impl Strategy<Value = Credentials> {
    (username(), "\\PC{0,40}", identity_key(), binding(), bytes64())
        .prop_map(|(username, password, identity_key, noise, proof)| Credentials { username, password, identity_key, noise, proof })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Hello),
        credentials().prop_map(Request::Register),
        credentials().prop_map(Request::Login),
        (username(), identity_key(), bytes64()).prop_map(|(username, identity_key, proof)| Request::Authenticate {
            username,
            identity_key,
            proof
        }),
        signed_presence().prop_map(Request::Publish),
        Just(Request::Withdraw),
        username().prop_map(|username| Request::Lookup { username }),
        Just(Request::ListOnline),
        prop::collection::vec(username(), 0..20).prop_map(|usernames| Request::Watch { usernames }),
    ]
}

fn refusal() -> impl Strategy<Value = Refusal> {
    (0u8..18, any::<u64>()).prop_map(|(which, retry_after_secs)| match which {
        0 => Refusal::Malformed,
        1 => Refusal::UnknownRequest,
        2 => Refusal::NeedHello,
        3 => Refusal::NotAuthenticated,
        4 => Refusal::InvalidCredentials,
        5 => Refusal::UsernameTaken,
        6 => Refusal::WeakPassword,
        7 => Refusal::BadProof,
        8 => Refusal::RateLimited { retry_after_secs },
        9 => Refusal::Busy,
        10 => Refusal::BadRecord,
        11 => Refusal::StaleRecord,
        12 => Refusal::ClockSkew,
        13 => Refusal::RecordExpired,
        14 => Refusal::TtlTooLong,
        15 => Refusal::NotFound,
        16 => Refusal::KeyChanged,
        _ => Refusal::Internal,
    })
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        (any::<[u8; 32]>(), any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(challenge, server_time, max_ttl, max_skew)| { Response::Challenge { challenge, server_time, max_ttl, max_skew } }),
        Just(Response::Registered),
        any::<bool>().prop_map(|key_changed| Response::LoggedIn { key_changed }),
        Just(Response::Authenticated),
        socket_addr().prop_map(|observed| Response::Published { observed }),
        Just(Response::Withdrawn),
        (username(), identity_key(), binding(), prop::option::of(signed_presence())).prop_map(
            |(username, identity_key, noise, presence)| { Response::Account(AccountInfo { username, identity_key, noise, presence }) }
        ),
        (prop::collection::vec(username(), 0..20), any::<bool>())
            .prop_map(|(usernames, truncated)| Response::Online { usernames, truncated }),
        refusal().prop_map(Response::Refused),
        prop::collection::vec(username(), 0..20).prop_map(|online| Response::Watching { online }),
        (username(), any::<bool>()).prop_map(|(username, online)| Response::PresenceChanged { username, online }),
    ]
}

fn peer_message() -> impl Strategy<Value = PeerMessage> {
    prop_oneof![
        (any::<[u8; 16]>(), any::<u64>(), "\\PC{0,200}").prop_map(|(id, sent_at, body)| PeerMessage::Chat { id, sent_at, body }),
        any::<[u8; 16]>().prop_map(|id| PeerMessage::Ack { id }),
    ]
}

/// Bytes a decoder may meet: anything, or a valid message's bytes with some changed.
fn mangled(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (valid, prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4), prop::option::of(any::<prop::sample::Index>()))
            .prop_map(|(mut bytes, edits, cut)| {
                for (at, b) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
                if let Some(cut) = cut {
                    bytes.truncate(cut.index(bytes.len() + 1));
                }
                bytes
            }),
    ]
}

// ---------------------------------------------------------------------------------------
// Checks shared by the properties

/// Decodes `bytes` as a message: the heap stays within the bound, an error is the one
/// the first bytes call for, and a decoded value re-encodes to a fixed point no longer
/// than the input.
fn decodes_within_bounds<M: Message + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Result<Option<M>, TestCaseError> {
    let (decoded, heap) = peak_heap(|| decode_message::<M>(bytes));
    prop_assert!(heap <= heap_bound(bytes.len()), "{} bytes held {heap} bytes of heap", bytes.len());
    let value = match decoded {
        Ok(value) => value,
        Err(e) => {
            match bytes.first() {
                None => prop_assert_eq!(e, WireError::Empty),
                Some(&1) => prop_assert!(matches!(e, WireError::Malformed | WireError::TrailingBytes), "{:?}", e),
                Some(&v) => prop_assert_eq!(e, WireError::UnsupportedVersion(v)),
            }
            return Ok(None);
        }
    };
    let again = encode_message(&value);
    prop_assert!(again.len() <= bytes.len());
    let back = decode_message::<M>(&again).map_err(|e| TestCaseError::fail(format!("re-encoded value does not decode: {e}")))?;
    prop_assert_eq!(&back, &value);
    prop_assert_eq!(encode_message(&back), again);
    Ok(Some(value))
}

fn canonical(name: &Username) -> Result<(), TestCaseError> {
    prop_assert!((3..=32).contains(&name.as_str().len()));
    prop_assert_eq!(&Username::parse(name.as_str()).unwrap(), name);
    Ok(())
}

/// One whole handshake in memory: Alice dials Bob.
fn session() -> (Transport, Transport) {
    let (alice, bob) = (alice(), bob());
    let (dial, preamble, msg1) = Dial::start(&alice, &name("alice"), &name("bob"), &bob.noise().public(), NOW_NS).unwrap();
    let (callee, msg2) = Answer::read(&bob, &name("bob"), &preamble, &msg1).unwrap().accept(&alice.public(), None, NOW_NS).unwrap();
    (dial.finish(&msg2).unwrap(), callee)
}

#[test]
fn the_heap_meter_sees_what_is_held() {
    let (v, heap) = peak_heap(|| vec![7u8; 10_000]);
    assert!(heap >= 10_000, "{heap}");
    let ((), heap) = peak_heap(|| drop(v));
    assert_eq!(heap, 0);
}

// ---------------------------------------------------------------------------------------
// Round trips

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn frames_round_trip_within_their_cap(payload in prop::collection::vec(any::<u8>(), 0..2048), cap in 0usize..4096) {
        let frame = encode_frame(&payload);
        prop_assert_eq!(frame.len(), HEADER_LEN + payload.len());
        let expected = if payload.len() <= cap { Ok(&payload[..]) } else { Err(WireError::Oversized { len: payload.len(), cap }) };
        prop_assert_eq!(decode_single_frame(&frame, cap), expected);
    }

    #[test]
    fn requests_round_trip(request in request()) {
        let bytes = encode_message(&request);
        prop_assert_eq!(decode_message::<Request>(&bytes), Ok(request));
        prop_assert!(bytes.len() <= MAX_FRAME);
    }

    #[test]
    fn responses_round_trip(response in response()) {
        let bytes = encode_message(&response);
        prop_assert_eq!(decode_message::<Response>(&bytes), Ok(response));
    }

    #[test]
    fn peer_messages_round_trip(message in peer_message()) {
        let bytes = encode_message(&message);
        prop_assert_eq!(decode_message::<PeerMessage>(&bytes), Ok(message));
    }

    #[test]
    fn preambles_and_hellos_round_trip(
        version in any::<u8>(), dialer in username(), callee in username(),
        identity_key in identity_key(), noise_binding in bytes64(), timestamp in any::<u64>(),
    ) {
        let preamble = Preamble { version, dialer, callee };
        prop_assert_eq!(postcard::from_bytes::<Preamble>(&postcard::to_stdvec(&preamble).unwrap()), Ok(preamble));
        let hello = DialerHello { identity_key, noise_binding, timestamp };
        prop_assert_eq!(postcard::from_bytes::<DialerHello>(&postcard::to_stdvec(&hello).unwrap()), Ok(hello));
    }

    #[test]
    fn usernames_and_server_addresses_round_trip(name in username(), ip in any::<IpAddr>(), port in 1u16.., pin in any::<[u8; 32]>()) {
        prop_assert_eq!(postcard::from_bytes::<Username>(&postcard::to_stdvec(&name).unwrap()), Ok(name.clone()));
        prop_assert_eq!(Username::parse(&name.as_str().to_ascii_uppercase()), Ok(name));
        let address = ServerAddress::new(SocketAddr::new(ip, port), pin);
        prop_assert_eq!(address.to_string().parse::<ServerAddress>(), Ok(address));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn presence_records_round_trip_through_signing(
        seed in any::<[u8; 32]>(), noise in any::<[u8; 32]>(), username in username(),
        addrs in prop::collection::vec(socket_addr(), 0..=MAX_ADDRS), cert_sha256 in any::<[u8; 32]>(),
        seq in any::<u64>(), issued_at in any::<u64>(), expires_at in any::<u64>(),
    ) {
        let id = Identity::new(IdentitySecret::from_seed(&seed), NoiseSecret::from_bytes(&noise));
        let record = PresenceRecord {
            version: RECORD_VERSION, username, identity_key: id.public(), noise: id.binding(), addrs, cert_sha256, seq, issued_at, expires_at,
        };
        let signed = SignedPresence::sign(&record, id.secret());
        prop_assert!(signed.payload.len() <= MAX_RECORD_BYTES);
        prop_assert_eq!(signed.verify(&id.public()), Ok(record));
        prop_assert_eq!(signed.verify(&alice().public()), Err(PresenceError::BadSignature));
        let wire = postcard::to_stdvec(&signed).unwrap();
        prop_assert_eq!(postcard::from_bytes::<SignedPresence>(&wire), Ok(signed));
    }

    #[test]
    fn transport_messages_round_trip_both_ways(messages in prop::collection::vec(peer_message(), 1..8)) {
        let (mut dialer, mut callee) = session();
        for (i, message) in messages.into_iter().enumerate() {
            let (from, to) = if i % 2 == 0 { (&mut dialer, &mut callee) } else { (&mut callee, &mut dialer) };
            let sealed = from.seal(&message).unwrap();
            prop_assert!(sealed.len() <= MAX_NOISE_MESSAGE);
            prop_assert_eq!(to.open(&sealed), Ok(message));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn identity_files_round_trip(seed in any::<[u8; 32]>(), noise in any::<[u8; 32]>(), passphrase in "[ -~]{1,40}") {
        let id = Identity::new(IdentitySecret::from_seed(&seed), NoiseSecret::from_bytes(&noise));
        let file = idfile::seal(&id, passphrase.as_bytes(), FAST).unwrap();
        prop_assert_eq!(file.len(), FILE_LEN);
        let header = Header::parse(&file).unwrap();
        prop_assert_eq!(header.kdf, FAST);
        prop_assert_eq!(header.identity_key(), Ok(id.public()));
        prop_assert_eq!(header.noise_key(), id.noise().public());
        let back = idfile::open(&file, passphrase.as_bytes()).unwrap();
        prop_assert_eq!(back.public(), id.public());
        prop_assert_eq!(back.noise().public(), id.noise().public());
        prop_assert_eq!(idfile::open(&file, format!("{passphrase}!").as_bytes()).err(), Some(IdFileError::WrongPassphrase));
    }
}

// ---------------------------------------------------------------------------------------
// Any input: no panic, bounded heap, results within caps

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    #[test]
    fn frame_len_refuses_every_length_over_the_cap(header in any::<[u8; 4]>(), cap in prop_oneof![0usize..70_000, Just(u32::MAX as usize)]) {
        let len = u32::from_be_bytes(header) as usize;
        let (result, heap) = peak_heap(|| frame_len(header, cap));
        prop_assert_eq!(heap, 0);
        if len <= cap {
            prop_assert_eq!(result, Ok(len));
        } else {
            prop_assert_eq!(result, Err(WireError::Oversized { len, cap }));
        }
    }

    #[test]
    fn any_frame_is_refused_or_exact(bytes in prop::collection::vec(any::<u8>(), 0..64), cap in 0usize..64) {
        let (result, heap) = peak_heap(|| decode_single_frame(&bytes, cap));
        prop_assert_eq!(heap, 0);
        if let Ok(payload) = result {
            prop_assert!(payload.len() <= cap);
            prop_assert_eq!(encode_frame(payload), bytes);
        }
    }

    #[test]
    fn any_bytes_as_a_request(bytes in mangled(request().prop_map(|r| encode_message(&r)))) {
        if let Some(request) = decodes_within_bounds::<Request>(&bytes)? {
            match &request {
                Request::Watch { usernames } => {
                    prop_assert!(usernames.len() * 4 < bytes.len());
                    for u in usernames {
                        canonical(u)?;
                    }
                }
                Request::Lookup { username } | Request::Authenticate { username, .. } => canonical(username)?,
                Request::Register(c) | Request::Login(c) => {
                    canonical(&c.username)?;
                    prop_assert!(c.password.len() < bytes.len());
                }
                Request::Publish(p) => prop_assert!(p.payload.len() + 64 < bytes.len()),
                Request::Hello | Request::Withdraw | Request::ListOnline | Request::Unknown => {}
            }
        }
    }

    #[test]
    fn any_bytes_as_a_response(bytes in mangled(response().prop_map(|r| encode_message(&r)))) {
        if let Some(response) = decodes_within_bounds::<Response>(&bytes)? {
            match &response {
                Response::Online { usernames: list, .. } | Response::Watching { online: list } => {
                    prop_assert!(list.len() * 4 < bytes.len());
                    for u in list {
                        canonical(u)?;
                    }
                }
                Response::Account(info) => canonical(&info.username)?,
                Response::PresenceChanged { username, .. } => canonical(username)?,
                _ => {}
            }
        }
    }

    #[test]
    fn any_bytes_as_a_peer_message(bytes in mangled(peer_message().prop_map(|m| encode_message(&m)))) {
        if let Some(PeerMessage::Chat { body, .. }) = decodes_within_bounds::<PeerMessage>(&bytes)? {
            prop_assert!(body.len() < bytes.len());
        }
    }

    /// A length field claiming far more than follows reserves nothing it was not sent.
    #[test]
    fn claimed_lengths_reserve_only_what_arrived(
        which in 0usize..5, claimed in prop_oneof![Just(u64::MAX), Just(1u64 << 32), 0u64..100_000], tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut count = Vec::new();
        let mut n = claimed;
        while n >= 0x80 {
            count.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        count.push(n as u8);
        // Watch names, an Online list, a Publish payload, a chat body, a record's addresses.
        let prefix: &[u8] = match which {
            0 => &[1, 8],
            1 => &[1, 7],
            2 => &[1, 4],
            3 => &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            _ => &[],
        };
        let bytes = [prefix, &count, &tail].concat();
        let len = bytes.len();
        match which {
            0 | 2 => { decodes_within_bounds::<Request>(&bytes)?; }
            1 => { decodes_within_bounds::<Response>(&bytes)?; }
            3 => { decodes_within_bounds::<PeerMessage>(&bytes)?; }
            _ => {
                let record = postcard::to_stdvec(&PresenceRecord {
                    version: RECORD_VERSION, username: name("alice"), identity_key: alice().public(), noise: alice().binding(),
                    addrs: vec![], cert_sha256: [0; 32], seq: 0, issued_at: 0, expires_at: 0,
                }).unwrap();
                // Up to the address count, then the claimed count.
                let head = &record[..record.len() - 1 - 32 - 3];
                let payload = [head, &bytes].concat();
                let (decoded, heap) = peak_heap(|| postcard::from_bytes::<PresenceRecord>(&payload));
                prop_assert!(heap <= record_heap_bound(payload.len()), "{} bytes held {heap}", payload.len());
                if let Ok(record) = decoded {
                    prop_assert!(record.addrs.len() * 6 <= len);
                }
            }
        }
    }

    #[test]
    fn any_signed_presence_is_checked_before_it_is_decoded(payload in prop::collection::vec(any::<u8>(), 0..1500), signature in bytes64()) {
        let signed = SignedPresence { payload, signature };
        let (result, heap) = peak_heap(|| signed.verify(&alice().public()));
        prop_assert!(heap <= heap_bound(signed.payload.len()) + signed.payload.len());
        let expected = if signed.payload.len() > MAX_RECORD_BYTES { PresenceError::Oversized } else { PresenceError::BadSignature };
        prop_assert_eq!(result, Err(expected));
    }

    #[test]
    fn any_payload_signed_by_its_owner_verifies_only_within_caps(payload in prop::collection::vec(any::<u8>(), 0..1200)) {
        let alice = alice();
        let signed = SignedPresence { signature: alice.secret().sign(DOMAIN_PRESENCE, &payload), payload };
        let (result, heap) = peak_heap(|| signed.verify(&alice.public()));
        prop_assert!(heap <= record_heap_bound(signed.payload.len()) + signed.payload.len() + 1024);
        if signed.payload.len() > MAX_RECORD_BYTES {
            prop_assert_eq!(result, Err(PresenceError::Oversized));
        } else if let Ok(record) = result {
            prop_assert!(record.addrs.len() <= MAX_ADDRS);
            prop_assert_eq!(record.identity_key, alice.public());
            canonical(&record.username)?;
        }
    }

    #[test]
    fn any_text_as_a_username_address_or_config(text in "\\PC{0,80}", ascii in "[a-zA-Z0-9_:#/.\\[\\] =\"-]{0,120}") {
        for text in [&text, &ascii] {
            if let Ok(u) = Username::parse(text) {
                canonical(&u)?;
            }
            if let Ok(a) = text.parse::<ServerAddress>() {
                prop_assert!(a.port != 0 && !a.host.is_empty());
                prop_assert_eq!(a.to_string().parse::<ServerAddress>(), Ok(a));
            }
            if let Ok(c) = Config::parse(text) {
                if let Some(server) = c.server {
                    prop_assert!(server.parse::<ServerAddress>().is_ok());
                }
            }
        }
    }

    #[test]
    fn any_identity_file_header(bytes in prop::collection::vec(any::<u8>(), 0..300), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 10 {
            bytes[..10].copy_from_slice(b"sotto-id\x01\x01");
        }
        let (parsed, heap) = peak_heap(|| Header::parse(&bytes));
        prop_assert!(heap <= 1024);
        if parsed.is_ok() {
            prop_assert_eq!(bytes.len(), FILE_LEN);
        }
    }

    /// Key derivation parameters over the caps are refused before argon2 allocates.
    #[test]
    fn hostile_kdf_parameters_are_refused_before_any_work(
        memory_kib in prop_oneof![(1u32 << 20) + 1.., 8u32..64], iterations in prop_oneof![65u32.., 1u32..3], parallelism in prop_oneof![17u32.., 1u32..2],
    ) {
        prop_assume!(memory_kib > 1 << 20 || iterations > 64 || parallelism > 16);
        let file = idfile::seal(&alice(), b"pw", FAST).unwrap();
        let header = Header { kdf: KdfParams { memory_kib, iterations, parallelism }, ..Header::parse(&file).unwrap() };
        let mut hostile = file.clone();
        hostile[10..14].copy_from_slice(&memory_kib.to_be_bytes());
        hostile[14..18].copy_from_slice(&iterations.to_be_bytes());
        hostile[18..22].copy_from_slice(&parallelism.to_be_bytes());
        prop_assert_eq!(Header::parse(&hostile), Ok(header));
        let (opened, heap) = peak_heap(|| idfile::open(&hostile, b"pw"));
        prop_assert_eq!(opened.err(), Some(IdFileError::BadKdfParams));
        prop_assert!(heap <= 4096, "refusing held {heap} bytes");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_preamble_and_message_1(
        preamble in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (any::<u8>(), username(), prop_oneof![Just(name("bob")), username()])
                .prop_map(|(version, dialer, callee)| postcard::to_stdvec(&Preamble { version, dialer, callee }).unwrap()),
        ],
        msg1 in prop_oneof![prop::collection::vec(any::<u8>(), 0..300), prop::collection::vec(any::<u8>(), 1000..1100)],
    ) {
        let bob = bob();
        let (result, heap) = peak_heap(|| Answer::read(&bob, &name("bob"), &preamble, &msg1));
        prop_assert!(heap <= heap_bound(preamble.len()) + HANDSHAKE_HEAP, "Answer::read held {heap} bytes");
        let exact = match postcard::take_from_bytes::<Preamble>(&preamble) {
            Ok((p, [])) => Some(p),
            _ => None,
        };
        let expected = match exact {
            Some(p) if p.version == PREAMBLE_VERSION && p.callee == name("bob") => {
                if msg1.len() > MAX_HANDSHAKE_MESSAGE { SessionError::TooLarge } else { SessionError::Handshake }
            }
            Some(p) if p.version == PREAMBLE_VERSION => SessionError::NotForMe,
            _ => SessionError::BadPreamble,
        };
        prop_assert_eq!(result.err(), Some(expected));
    }

    #[test]
    fn any_message_2(msg2 in prop_oneof![prop::collection::vec(any::<u8>(), 0..300), prop::collection::vec(any::<u8>(), 1000..1100)]) {
        let (alice, bob) = (alice(), bob());
        let (dial, _, _) = Dial::start(&alice, &name("alice"), &name("bob"), &bob.noise().public(), NOW_NS).unwrap();
        let (result, heap) = peak_heap(|| dial.finish(&msg2));
        prop_assert!(heap <= HANDSHAKE_HEAP, "Dial::finish held {heap} bytes");
        let expected = if msg2.len() > MAX_HANDSHAKE_MESSAGE { SessionError::TooLarge } else { SessionError::Handshake };
        prop_assert_eq!(result.err(), Some(expected));
    }

    #[test]
    fn any_transport_frame_ends_the_session(
        frames in prop::collection::vec(prop_oneof![
            prop::collection::vec(any::<u8>(), 0..200),
            (MAX_NOISE_MESSAGE - 2..MAX_NOISE_MESSAGE + 3).prop_map(|n| vec![0u8; n]),
        ], 1..4),
        good_first in any::<bool>(),
    ) {
        let (mut dialer, mut callee) = session();
        if good_first {
            let ack = PeerMessage::Ack { id: [9; 16] };
            prop_assert_eq!(callee.open(&dialer.seal(&ack).unwrap()), Ok(ack));
        }
        for frame in &frames {
            let (result, heap) = peak_heap(|| callee.open(frame));
            prop_assert!(heap <= frame.len() + heap_bound(frame.len()));
            let expected = if frame.len() > MAX_NOISE_MESSAGE { SessionError::TooLarge } else { SessionError::Decrypt };
            prop_assert_eq!(result, Err(expected));
        }
        prop_assert_eq!(callee.counts(), (0, u64::from(good_first)));
    }
}

/// Every plaintext that fits one transport message is sealed; one byte more is refused.
#[test]
fn the_largest_chat_fits_one_transport_message() {
    let (mut dialer, mut callee) = session();
    let overhead = encode_message(&PeerMessage::Chat { id: [0; 16], sent_at: 0, body: String::new() }).len() + 2;
    let body = "x".repeat(MAX_PLAINTEXT - overhead);
    let chat = PeerMessage::Chat { id: [0; 16], sent_at: 0, body };
    assert_eq!(encode_message(&chat).len(), MAX_PLAINTEXT);
    let sealed = dialer.seal(&chat).unwrap();
    assert_eq!(sealed.len(), MAX_NOISE_MESSAGE);
    assert_eq!(callee.open(&sealed), Ok(chat));
    let too_long = PeerMessage::Chat { id: [0; 16], sent_at: 0, body: "x".repeat(MAX_PLAINTEXT - overhead + 1) };
    assert_eq!(dialer.seal(&too_long), Err(SessionError::TooLarge));
}
