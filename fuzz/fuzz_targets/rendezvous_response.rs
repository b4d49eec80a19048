//! Node-to-client messages (`Response`, src/rendezvous/proto.rs) as the client reads
//! them: heap, round trip, and the validity of every decoded field.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::keys::IdentityKey;
use sotto::rendezvous::proto::{Refusal, Response, MAX_FRAME};
use sotto::wire::{decode_single_frame, encode_frame};
use sotto_fuzz::{assert_canonical, check_message};

fuzz_target!(|data: &[u8]| {
    if data.len() <= MAX_FRAME {
        assert_eq!(decode_single_frame(&encode_frame(data), MAX_FRAME), Ok(data));
    }
    let Some(response) = check_message::<Response>(data) else { return };
    match &response {
        Response::Account(info) => {
            assert_canonical(&info.username);
            let key = &info.identity_key;
            assert_eq!(IdentityKey::from_bytes(*key.as_bytes()).as_ref(), Ok(key), "decoded an invalid identity key");
            if let Some(p) = &info.presence {
                assert!(p.payload.len() + 64 < data.len());
            }
        }
        Response::Online { usernames, .. } => {
            assert!(usernames.len() * 4 < data.len());
            usernames.iter().for_each(assert_canonical);
        }
        Response::Watching { online } => {
            assert!(online.len() * 4 < data.len());
            online.iter().for_each(assert_canonical);
        }
        Response::PresenceChanged { username, .. } => assert_canonical(username),
        Response::Refused(refusal) => {
            // A refusal always renders as a message for the user.
            assert!(!refusal.to_string().is_empty());
            if let Refusal::RateLimited { retry_after_secs } = refusal {
                assert!(refusal.to_string().contains(&retry_after_secs.to_string()));
            }
        }
        Response::Challenge { .. }
        | Response::Registered
        | Response::LoggedIn { .. }
        | Response::Authenticated
        | Response::Published { .. }
        | Response::Withdrawn
        | Response::Unknown => {}
    }
});
