//! Client-to-node messages (`Request`, src/rendezvous/proto.rs) as the node reads them:
//! one frame of at most `MAX_FRAME` bytes, then `01 ‖ postcard`. Checks the decoder's
//! heap, the round trip, and the validity of every decoded field (canonical usernames,
//! valid identity keys).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::keys::IdentityKey;
use sotto::presence::SignedPresence;
use sotto::rendezvous::proto::{Credentials, Request, MAX_FRAME};
use sotto::wire::{decode_single_frame, encode_frame};
use sotto_fuzz::{assert_canonical, check_message};

fn assert_valid_key(key: &IdentityKey) {
    assert_eq!(IdentityKey::from_bytes(*key.as_bytes()).as_ref(), Ok(key), "decoded an invalid identity key");
}

fn check_credentials(c: &Credentials, len: usize) {
    assert_canonical(&c.username);
    assert_valid_key(&c.identity_key);
    assert!(c.password.len() < len);
}

fn check_presence(p: &SignedPresence, len: usize) {
    assert!(p.payload.len() + 64 < len);
}

fuzz_target!(|data: &[u8]| {
    if data.len() <= MAX_FRAME {
        assert_eq!(decode_single_frame(&encode_frame(data), MAX_FRAME), Ok(data));
    }
    let Some(request) = check_message::<Request>(data) else { return };
    match &request {
        Request::Register(c) | Request::Login(c) => check_credentials(c, data.len()),
        Request::Authenticate { username, identity_key, .. } => {
            assert_canonical(username);
            assert_valid_key(identity_key);
        }
        Request::Publish(p) => check_presence(p, data.len()),
        Request::Lookup { username } => assert_canonical(username),
        Request::Watch { usernames } => {
            // Each name takes at least four bytes on the wire.
            assert!(usernames.len() * 4 < data.len());
            usernames.iter().for_each(assert_canonical);
        }
        Request::Hello | Request::Withdraw | Request::ListOnline | Request::Unknown => {}
    }
});
