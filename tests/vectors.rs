//! Replays the public test vectors in keys/test-vectors/ (formats in keys/README.md):
//! the code must reproduce every value exactly, and every negative vector must fail
//! with the error it names.
//!
//! The vector files hold only public data. The fixture secrets are built here from the
//! fixed seeds that keys/README.md publishes.

use std::net::SocketAddr;
use std::path::PathBuf;

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::{Signature, VerifyingKey};
use serde_json::Value;
use sha2::{Digest, Sha512};
use sotto::address::ServerAddress;
use sotto::idfile::{self, Header, KdfParams};
use sotto::keys::{
    safety_number, safety_number_matches, Identity, IdentityKey, IdentitySecret, NoiseBinding, NoiseKey, NoiseSecret, DOMAIN_FINGERPRINT,
    DOMAIN_NOISE_BINDING,
};
use sotto::peer::session::{Answer, Dial, DialerHello, PeerMessage, Preamble, NOISE_PARAMS, PREAMBLE_VERSION, PROLOGUE_DOMAIN};
use sotto::presence::{PresenceRecord, SignedPresence, DOMAIN_PRESENCE};
use sotto::rendezvous::auth::{self, Binding, Purpose, DOMAIN_AUTH};
use sotto::rendezvous::proto::{Refusal, Request, Response};
use sotto::username::Username;
use sotto::wire::{decode_message, decode_single_frame, encode_frame, encode_message, Message};

// Fixture seeds, as published in keys/README.md ("Fixture identities").
const ALICE_IDENTITY_SEED: [u8; 32] = [0x01; 32];
const ALICE_NOISE_SECRET: [u8; 32] = [0x02; 32];
const BOB_IDENTITY_SEED: [u8; 32] = [0x03; 32];
const BOB_NOISE_SECRET: [u8; 32] = [0x04; 32];

/// Every file in keys/test-vectors/, each replayed by a test below.
const VECTOR_FILES: [&str; 9] = [
    "fingerprint.json",
    "fixtures.json",
    "identity-file.json",
    "noise-binding.json",
    "peer.json",
    "presence.json",
    "rendezvous-proof.json",
    "server-address.json",
    "wire.json",
];

fn alice() -> Identity {
    Identity::new(IdentitySecret::from_seed(&ALICE_IDENTITY_SEED), NoiseSecret::from_bytes(&ALICE_NOISE_SECRET))
}

fn bob() -> Identity {
    Identity::new(IdentitySecret::from_seed(&BOB_IDENTITY_SEED), NoiseSecret::from_bytes(&BOB_NOISE_SECRET))
}

fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("keys")
}

fn vector(name: &str) -> Value {
    let path = keys_dir().join("test-vectors").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn field<'a>(v: &'a Value, key: &str) -> &'a Value {
    v.get(key).unwrap_or_else(|| panic!("vector has no {key:?}: {v}"))
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    field(v, key).as_str().unwrap_or_else(|| panic!("{key:?} is not a string"))
}

fn number(v: &Value, key: &str) -> u64 {
    field(v, key).as_u64().unwrap_or_else(|| panic!("{key:?} is not an unsigned integer"))
}

/// A non-empty list, so that no loop over a vector list passes by having nothing to check.
fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    let items = field(v, key).as_array().unwrap_or_else(|| panic!("{key:?} is not a list"));
    assert!(!items.is_empty(), "{key:?} is empty");
    items
}

fn bytes(v: &Value, key: &str) -> Vec<u8> {
    hex::decode(text(v, key)).unwrap_or_else(|e| panic!("{key:?} is not hex: {e}"))
}

fn array<const N: usize>(v: &Value, key: &str) -> [u8; N] {
    bytes(v, key).try_into().unwrap_or_else(|b: Vec<u8>| panic!("{key:?} has {} bytes, not {N}", b.len()))
}

fn identity_key(v: &Value, key: &str) -> IdentityKey {
    IdentityKey::from_bytes(array(v, key)).expect("a valid Ed25519 public key")
}

fn username(v: &Value, key: &str) -> Username {
    Username::parse(text(v, key)).expect("a valid username")
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).unwrap()
}

fn case(v: &Value) -> &str {
    v.get("case").and_then(Value::as_str).unwrap_or("(no case)")
}

/// Checks `signature` over `domain ‖ message` with ed25519-dalek directly, so the
/// documented signed bytes are checked independently of `sotto::keys`.
fn assert_signed_bytes(key: &IdentityKey, domain: &[u8], message: &[u8], signature: &[u8; 64]) {
    let key = VerifyingKey::from_bytes(key.as_bytes()).unwrap();
    key.verify_strict(&[domain, message].concat(), &Signature::from_bytes(signature)).expect("signature over domain ‖ message");
}

#[test]
fn vector_directory_holds_exactly_the_replayed_files() {
    let mut found: Vec<String> = std::fs::read_dir(keys_dir().join("test-vectors"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    found.sort();
    assert_eq!(found, VECTOR_FILES);
}

#[test]
fn keys_directory_holds_no_fixture_secret() {
    let alice = alice();
    let bob = bob();
    let secrets = [*alice.secret().seed(), *alice.noise().as_bytes(), *bob.secret().seed(), *bob.noise().as_bytes()];
    let mut pending = vec![keys_dir()];
    let mut files = 0;
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let content = std::fs::read_to_string(&path).unwrap().to_lowercase();
            for secret in &secrets {
                assert!(!content.contains(&hex::encode(secret)), "{} holds a fixture secret", path.display());
            }
            files += 1;
        }
    }
    assert!(files > VECTOR_FILES.len(), "README.md and the vector files were read");
}

#[test]
fn fixture_seeds_give_the_published_public_keys() {
    let v = vector("fixtures.json");
    for (name, id) in [("alice", alice()), ("bob", bob())] {
        let published = &field(field(&v, "identities"), name);
        assert_eq!(id.public().to_hex(), text(published, "identity_key"), "{name}");
        assert_eq!(id.noise().public().to_hex(), text(published, "noise_key"), "{name}");
    }
}

#[test]
fn fingerprints_follow_the_documented_algorithm() {
    let v = vector("fingerprint.json");
    let entries = list(&v, "fingerprints");
    for entry in entries {
        let key = identity_key(entry, "identity_key");
        assert_eq!(bytes(entry, "hash_input"), [DOMAIN_FINGERPRINT, key.as_bytes()].concat());
        let digest = Sha512::digest(bytes(entry, "hash_input"));
        assert_eq!(digest[..30], bytes(entry, "sha512_first_30_bytes"));
        let numbers: Vec<u64> = list(entry, "numbers").iter().map(|n| n.as_u64().unwrap()).collect();
        let read: Vec<u64> = digest[..30].chunks(5).map(|c| c.iter().fold(0, |acc, b| (acc << 8) | u64::from(*b))).collect();
        assert_eq!(numbers, read);
        let digits: String = numbers.iter().map(|n| format!("{:05}", n % 100_000)).collect();
        assert_eq!(digits, text(entry, "digits"));
        let fingerprint = key.fingerprint();
        assert_eq!(fingerprint.digits(), text(entry, "digits"));
        assert_eq!(fingerprint.to_string(), text(entry, "display"));
    }
}

#[test]
fn safety_number_is_the_same_in_either_order_and_refuses_near_misses() {
    let v = vector("fingerprint.json");
    for entry in list(&v, "safety_numbers") {
        let (a, b) = (identity_key(entry, "a"), identity_key(entry, "b"));
        let expected = text(entry, "safety_number");
        assert_eq!(safety_number(&a, &b), expected);
        assert_eq!(safety_number(&b, &a), expected);
        let first = if a.as_bytes() <= b.as_bytes() { a } else { b };
        assert!(expected.replace(' ', "").starts_with(first.fingerprint().digits()));
        assert!(safety_number_matches(&expected.replace(' ', ""), &a, &b));
        assert!(safety_number_matches(expected, &b, &a));
        for miss in list(entry, "must_not_match") {
            assert!(!safety_number_matches(miss.as_str().unwrap(), &a, &b), "{miss}");
        }
    }
}

#[test]
fn invalid_identity_keys_are_refused() {
    let v = vector("fingerprint.json");
    for entry in list(&v, "invalid_identity_keys") {
        assert!(IdentityKey::from_bytes(array(entry, "identity_key")).is_err(), "{}", case(entry));
    }
}

#[test]
fn noise_binding_is_reproduced_and_signs_the_documented_bytes() {
    let v = vector("noise-binding.json");
    let alice = alice();
    assert_eq!(text(&v, "domain").as_bytes(), DOMAIN_NOISE_BINDING);
    assert_eq!(alice.public(), identity_key(&v, "identity_key"));
    let noise_key = NoiseKey(array(&v, "noise_key"));
    assert_eq!(alice.noise().public(), noise_key);
    let binding = alice.binding();
    assert_eq!(binding, NoiseBinding { noise_key, signature: array(&v, "signature") });
    assert_eq!(binding.verify(&alice.public()), Ok(()));
    assert_eq!(bytes(&v, "signed_bytes"), [DOMAIN_NOISE_BINDING, noise_key.as_bytes()].concat());
    assert_signed_bytes(&alice.public(), DOMAIN_NOISE_BINDING, noise_key.as_bytes(), &binding.signature);
}

#[test]
fn noise_binding_negative_vectors_fail() {
    let v = vector("noise-binding.json");
    let cases = list(&v, "must_fail");
    for c in cases {
        let binding = NoiseBinding { noise_key: NoiseKey(array(c, "noise_key")), signature: array(c, "signature") };
        assert!(binding.verify(&identity_key(c, "identity_key")).is_err(), "{}", case(c));
    }
}

fn presence_record(r: &Value) -> PresenceRecord {
    PresenceRecord {
        version: number(r, "version").try_into().unwrap(),
        username: username(r, "username"),
        identity_key: identity_key(r, "identity_key"),
        noise: NoiseBinding { noise_key: NoiseKey(array(r, "noise_key")), signature: array(r, "noise_signature") },
        addrs: list(r, "addrs").iter().map(|a| a.as_str().unwrap().parse::<SocketAddr>().unwrap()).collect(),
        cert_sha256: array(r, "cert_sha256"),
        seq: number(r, "seq"),
        issued_at: number(r, "issued_at"),
        expires_at: number(r, "expires_at"),
    }
}

#[test]
fn presence_record_is_signed_and_decoded_exactly() {
    let v = vector("presence.json");
    let alice = alice();
    assert_eq!(text(&v, "domain").as_bytes(), DOMAIN_PRESENCE);
    assert_eq!(alice.public(), identity_key(&v, "signer_identity_key"));
    let record = presence_record(field(&v, "record"));
    let signed = SignedPresence::sign(&record, alice.secret());
    assert_eq!(hex::encode(&signed.payload), text(&v, "payload"));
    assert_eq!(hex::encode(signed.signature), text(&v, "signature"));
    let received = SignedPresence { payload: bytes(&v, "payload"), signature: array(&v, "signature") };
    assert_eq!(received.verify(&alice.public()), Ok(record));
    assert_signed_bytes(&alice.public(), DOMAIN_PRESENCE, &received.payload, &received.signature);
}

#[test]
fn presence_payload_is_the_documented_field_encoding() {
    let v = vector("presence.json");
    let record = presence_record(field(&v, "record"));
    let fields = list(&v, "payload_fields");
    let parts: Vec<(&str, Vec<u8>)> = fields.iter().map(|f| (text(f, "field"), bytes(f, "hex"))).collect();
    assert_eq!(parts.iter().flat_map(|(_, b)| b.clone()).collect::<Vec<u8>>(), bytes(&v, "payload"));
    let expected: Vec<(&str, Vec<u8>)> = vec![
        ("version", encode(&record.version)),
        ("username", encode(&record.username)),
        ("identity_key", encode(&record.identity_key)),
        ("noise.noise_key", encode(&record.noise.noise_key)),
        ("noise.signature", record.noise.signature.to_vec()),
        ("addrs (count)", encode(&(record.addrs.len() as u64))),
        ("addrs[0]", encode(&record.addrs[0])),
        ("addrs[1]", encode(&record.addrs[1])),
        ("cert_sha256", encode(&record.cert_sha256)),
        ("seq", encode(&record.seq)),
        ("issued_at", encode(&record.issued_at)),
        ("expires_at", encode(&record.expires_at)),
    ];
    assert_eq!(parts, expected);
}

#[test]
fn presence_negative_vectors_fail_with_their_error() {
    let v = vector("presence.json");
    let cases = list(&v, "must_fail");
    for c in cases {
        let signed = SignedPresence { payload: bytes(c, "payload"), signature: array(c, "signature") };
        let err = signed.verify(&identity_key(c, "signer_identity_key")).expect_err(case(c));
        assert_eq!(format!("{err:?}"), text(c, "error"), "{}", case(c));
    }
}

fn kdf(v: &Value) -> KdfParams {
    let k = field(v, "kdf");
    KdfParams {
        memory_kib: number(k, "memory_kib").try_into().unwrap(),
        iterations: number(k, "iterations").try_into().unwrap(),
        parallelism: number(k, "parallelism").try_into().unwrap(),
    }
}

#[test]
fn identity_file_is_sealed_byte_for_byte() {
    let v = vector("identity-file.json");
    let alice = alice();
    let header = Header {
        kdf: kdf(&v),
        salt: array(&v, "salt"),
        nonce: array(&v, "nonce"),
        identity_key: array(&v, "identity_key"),
        noise_key: array(&v, "noise_key"),
    };
    let file = idfile::seal_with(&alice, text(&v, "passphrase").as_bytes(), &header).unwrap();
    assert_eq!(hex::encode(&file), text(&v, "file"));
    assert_eq!(file.len(), idfile::FILE_LEN);
    assert_eq!(Header::parse(&file), Ok(header));
    let mut offset = 0;
    for f in list(&v, "fields") {
        assert_eq!(number(f, "offset"), offset as u64, "{}", text(f, "field"));
        let len = number(f, "length") as usize;
        assert_eq!(file[offset..offset + len], bytes(f, "hex"), "{}", text(f, "field"));
        offset += len;
    }
    assert_eq!(offset, file.len());
}

#[test]
fn identity_file_opens_to_the_published_keys() {
    let v = vector("identity-file.json");
    let opened = idfile::open(&bytes(&v, "file"), text(&v, "passphrase").as_bytes()).unwrap();
    assert_eq!(opened.public(), identity_key(&v, "identity_key"));
    assert_eq!(opened.noise().public(), NoiseKey(array(&v, "noise_key")));
}

/// Decrypts the vector file as keys/README.md describes, without `sotto::idfile`.
#[test]
fn identity_file_decrypts_as_documented() {
    let v = vector("identity-file.json");
    let file = bytes(&v, "file");
    let k = kdf(&v);
    let params = Params::new(k.memory_kib, k.iterations, k.parallelism, Some(32)).unwrap();
    let mut key = [0u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(text(&v, "passphrase").as_bytes(), &array::<16>(&v, "salt"), &mut key)
        .unwrap();
    let plaintext = XChaCha20Poly1305::new(&key.into())
        .decrypt(XNonce::from_slice(&file[38..62]), Payload { msg: &file[126..], aad: &file[..126] })
        .unwrap();
    let alice = alice();
    assert_eq!(plaintext, [alice.secret().seed().as_slice(), alice.noise().as_bytes()].concat());
}

#[test]
fn identity_file_negative_vectors_fail_with_their_error() {
    let v = vector("identity-file.json");
    let cases = list(&v, "must_fail");
    for c in cases {
        let err = idfile::open(&bytes(c, "file"), text(c, "passphrase").as_bytes()).expect_err(case(c));
        assert_eq!(format!("{err:?}"), text(c, "error"), "{}", case(c));
    }
}

fn purpose(name: &str) -> Purpose {
    match name {
        "Register" => Purpose::Register,
        "Login" => Purpose::Login,
        "Authenticate" => Purpose::Authenticate,
        other => panic!("unknown purpose {other:?}"),
    }
}

/// The fixture secret whose public key is `key`.
fn fixture_secret(key: &IdentityKey) -> IdentitySecret {
    let id = [alice(), bob()].into_iter().find(|id| id.public() == *key).expect("a fixture identity key");
    IdentitySecret::from_seed(&id.secret().seed())
}

#[test]
fn rendezvous_proofs_follow_the_documented_layout() {
    let v = vector("rendezvous-proof.json");
    assert_eq!(text(&v, "domain").as_bytes(), DOMAIN_AUTH);
    let binding = Binding { challenge: array(&v, "challenge"), channel: array(&v, "channel") };
    let proofs = list(&v, "proofs");
    assert_eq!(proofs.len(), 3);
    for p in proofs {
        let purpose = purpose(text(p, "purpose"));
        assert_eq!(purpose as u8 as u64, number(p, "purpose_byte"));
        let user = username(p, "username");
        let key = identity_key(p, "identity_key");
        let name = user.as_str().as_bytes();
        let message = [&[purpose as u8][..], &binding.challenge, &binding.channel, &[name.len() as u8], name].concat();
        assert_eq!(hex::encode(&message), text(p, "message"));
        let proof = auth::prove(&fixture_secret(&key), purpose, &binding, &user);
        assert_eq!(hex::encode(proof), text(p, "signature"));
        assert_eq!(auth::check(&key, &proof, purpose, &binding, &user), Ok(()));
        assert_signed_bytes(&key, DOMAIN_AUTH, &message, &proof);
    }
}

#[test]
fn rendezvous_proof_negative_vectors_fail() {
    let v = vector("rendezvous-proof.json");
    let cases = list(&v, "must_fail");
    for c in cases {
        let binding = Binding { challenge: array(c, "challenge"), channel: array(c, "channel") };
        let result = auth::check(
            &identity_key(c, "identity_key"),
            &array(c, "signature"),
            purpose(text(c, "purpose")),
            &binding,
            &username(c, "username"),
        );
        assert!(result.is_err(), "{}", case(c));
    }
}

#[test]
fn frames_are_big_endian_length_and_payload() {
    let v = vector("wire.json");
    for f in list(&v, "frames") {
        let payload = bytes(f, "payload");
        assert_eq!(encode_frame(&payload), bytes(f, "frame"));
        assert_eq!(decode_single_frame(&bytes(f, "frame"), 16_384), Ok(&payload[..]));
    }
}

#[test]
fn frame_negative_vectors_fail_with_their_error() {
    let v = vector("wire.json");
    for c in list(&v, "frame_must_fail") {
        let err = decode_single_frame(&bytes(c, "frame"), number(c, "cap") as usize).expect_err(case(c));
        assert_eq!(format!("{err:?}"), text(c, "error"), "{}", case(c));
    }
}

fn request(r: &Value) -> Request {
    match text(r, "kind") {
        "Hello" => Request::Hello,
        "Authenticate" => Request::Authenticate {
            username: username(r, "username"),
            identity_key: identity_key(r, "identity_key"),
            proof: array(r, "proof"),
        },
        "Publish" => Request::Publish(SignedPresence { payload: bytes(r, "payload"), signature: array(r, "signature") }),
        "Withdraw" => Request::Withdraw,
        "Lookup" => Request::Lookup { username: username(r, "username") },
        "ListOnline" => Request::ListOnline,
        other => panic!("no request kind {other:?} in this test"),
    }
}

fn response(r: &Value) -> Response {
    match text(r, "kind") {
        "Challenge" => Response::Challenge {
            challenge: array(r, "challenge"),
            server_time: number(r, "server_time"),
            max_ttl: number(r, "max_ttl"),
            max_skew: number(r, "max_skew"),
        },
        "LoggedIn" => Response::LoggedIn { key_changed: field(r, "key_changed").as_bool().unwrap() },
        "Published" => Response::Published { observed: text(r, "observed").parse().unwrap() },
        "Refused" => Response::Refused(match text(r, "refusal") {
            "RateLimited" => Refusal::RateLimited { retry_after_secs: number(r, "retry_after_secs") },
            "NotFound" => Refusal::NotFound,
            other => panic!("no refusal {other:?} in this test"),
        }),
        other => panic!("no response kind {other:?} in this test"),
    }
}

fn assert_round_trip<M: Message + PartialEq + std::fmt::Debug>(value: M, message: &[u8]) {
    assert_eq!(encode_message(&value), message, "{value:?}");
    assert_eq!(decode_message::<M>(message), Ok(value));
}

#[test]
fn rendezvous_messages_encode_and_decode_exactly() {
    let v = vector("wire.json");
    let requests = list(&v, "requests");
    let responses = list(&v, "responses");
    for r in requests {
        assert_round_trip(request(r), &bytes(r, "message"));
    }
    for r in responses {
        assert_round_trip(response(r), &bytes(r, "message"));
    }
}

#[test]
fn published_request_carries_the_presence_vector() {
    let wire = vector("wire.json");
    let presence = vector("presence.json");
    let publish = list(&wire, "requests").iter().find(|r| text(r, "kind") == "Publish").unwrap();
    assert_eq!(text(publish, "payload"), text(&presence, "payload"));
    assert_eq!(text(publish, "signature"), text(&presence, "signature"));
}

#[test]
fn unknown_variants_from_a_newer_peer_decode_as_unknown() {
    let v = vector("wire.json");
    for c in list(&v, "unknown") {
        let message = bytes(c, "message");
        let decoded = match text(c, "direction") {
            "request" => format!("{:?}", decode_message::<Request>(&message).unwrap_or_else(|e| panic!("{}: {e:?}", case(c)))),
            "response" => format!("{:?}", decode_message::<Response>(&message).unwrap_or_else(|e| panic!("{}: {e:?}", case(c)))),
            other => panic!("no direction {other:?}"),
        };
        assert_eq!(decoded, text(c, "decodes_as"), "{}", case(c));
    }
}

#[test]
fn message_negative_vectors_fail_with_their_error() {
    let v = vector("wire.json");
    for c in list(&v, "message_must_fail") {
        assert_eq!(text(c, "direction"), "request");
        let err = decode_message::<Request>(&bytes(c, "message")).expect_err(case(c));
        assert_eq!(format!("{err:?}"), text(c, "error"), "{}", case(c));
    }
}

#[test]
fn peer_preamble_hello_and_messages_are_reproduced() {
    let v = vector("peer.json");
    let (alice, bob) = (alice(), bob());
    assert_eq!(text(&v, "noise_protocol"), NOISE_PARAMS);

    let p = field(&v, "preamble");
    let preamble =
        Preamble { version: number(p, "version").try_into().unwrap(), dialer: username(p, "dialer"), callee: username(p, "callee") };
    assert_eq!(preamble.version, PREAMBLE_VERSION);
    assert_eq!(encode(&preamble), bytes(p, "bytes"));
    assert_eq!(bytes(&v, "prologue"), [PROLOGUE_DOMAIN, &bytes(p, "bytes")].concat());

    let h = field(&v, "dialer_hello");
    let hello = DialerHello {
        identity_key: identity_key(h, "identity_key"),
        noise_binding: array(h, "noise_binding"),
        timestamp: number(h, "timestamp"),
    };
    assert_eq!(encode(&hello), bytes(h, "bytes"));
    assert_eq!(hello.identity_key, alice.public());
    assert_eq!(NoiseBinding { noise_key: alice.noise().public(), signature: hello.noise_binding }.verify(&alice.public()), Ok(()));

    // The real handshake sends exactly these preamble bytes and this hello.
    let (_, sent_preamble, msg1) = Dial::start(&alice, &preamble.dialer, &preamble.callee, &bob.noise().public(), hello.timestamp).unwrap();
    assert_eq!(sent_preamble, bytes(p, "bytes"));
    let answer = Answer::read(&bob, &preamble.callee, &sent_preamble, &msg1).unwrap();
    assert_eq!(answer.hello, hello);

    for m in list(&v, "messages") {
        let value = match text(m, "kind") {
            "Chat" => PeerMessage::Chat { id: array(m, "id"), sent_at: number(m, "sent_at"), body: text(m, "body").to_string() },
            "Ack" => PeerMessage::Ack { id: array(m, "id") },
            other => panic!("no peer message {other:?} in this test"),
        };
        assert_round_trip(value, &bytes(m, "message"));
    }
}

#[test]
fn server_addresses_round_trip() {
    let v = vector("server-address.json");
    for a in list(&v, "addresses") {
        let parsed: ServerAddress = text(a, "address").parse().unwrap();
        let expected = ServerAddress {
            host: text(a, "host").to_string(),
            port: number(a, "port").try_into().unwrap(),
            cert_sha256: array(a, "cert_sha256"),
        };
        assert_eq!(parsed, expected);
        assert_eq!(expected.to_string(), text(a, "address"));
    }
}

#[test]
fn malformed_server_addresses_fail_with_their_error() {
    let v = vector("server-address.json");
    for c in list(&v, "must_fail") {
        let err = text(c, "address").parse::<ServerAddress>().expect_err(case(c));
        assert_eq!(format!("{err:?}"), text(c, "error"), "{}", case(c));
    }
}
