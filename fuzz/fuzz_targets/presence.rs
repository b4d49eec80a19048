//! Signed presence records (src/presence.rs): `SignedPresence` as it travels, verified
//! under the fixture's key; payloads the harness signs itself, so the fuzzer reaches the
//! record decoder and every check after the signature; and the time rules of the node
//! (`Freshness::check_publish`) and the client (`check_current`) against a model.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::presence::{
    check_current, Freshness, PresenceError, PresenceRecord, SignedPresence, DOMAIN_PRESENCE, MAX_ADDRS, MAX_RECORD_BYTES, RECORD_VERSION,
};
use sotto_fuzz::{decode_heap_bound, fixtures, peak_heap, record_heap_bound, Input};

/// Verification concatenates the domain and the payload once more for the signature,
/// then decodes the record.
fn verify_heap_bound(len: usize) -> usize {
    record_heap_bound(len) + len + 1024
}

fn check_record(record: &PresenceRecord, payload: &[u8]) {
    let fx = fixtures();
    assert_eq!(record.version, RECORD_VERSION);
    assert_eq!(record.identity_key, fx.alice.public());
    assert!(record.noise.verify(&fx.alice.public()).is_ok());
    assert!(record.addrs.len() <= MAX_ADDRS);
    assert!(payload.len() <= MAX_RECORD_BYTES);
    sotto_fuzz::assert_canonical(&record.username);
    let again = postcard::to_stdvec(record).expect("encodes");
    assert!(again.len() <= payload.len());
    assert_eq!(postcard::from_bytes::<PresenceRecord>(&again).as_ref(), Ok(record));
}

fn check_times(record: &PresenceRecord, clock: &mut Input) {
    let now = clock.u64();
    let freshness = Freshness { max_ttl: u64::from(clock.u16()), max_skew: u64::from(clock.u16()) };
    let last_seq = (clock.u8() & 1 == 1).then(|| clock.u64());
    let (issued, expires) = (record.issued_at, record.expires_at);
    let expected = if last_seq.is_some_and(|last| record.seq <= last) {
        Err(PresenceError::StaleSeq)
    } else if issued > now.saturating_add(freshness.max_skew) {
        Err(PresenceError::FromTheFuture)
    } else if issued < now.saturating_sub(freshness.max_skew) {
        Err(PresenceError::TooOld)
    } else if expires <= issued || expires - issued > freshness.max_ttl {
        Err(PresenceError::TtlTooLong)
    } else if expires <= now {
        Err(PresenceError::Expired)
    } else {
        Ok(())
    };
    assert_eq!(freshness.check_publish(record, now, last_seq), expected);

    let skew = u64::from(clock.u16());
    let highest = (clock.u8() & 1 == 1).then(|| clock.u64());
    let current = check_current(record, now, skew, highest);
    match current {
        Ok(()) => {
            assert!(expires.saturating_add(skew) > now && issued <= now.saturating_add(skew) && highest.is_none_or(|h| record.seq >= h))
        }
        Err(PresenceError::Expired) => assert!(expires.saturating_add(skew) <= now),
        Err(PresenceError::FromTheFuture) => assert!(issued > now.saturating_add(skew)),
        Err(PresenceError::StaleSeq) => assert!(highest.is_some_and(|h| record.seq < h)),
        Err(e) => panic!("check_current gave {e:?}"),
    }
}

fn verify(signed: &SignedPresence) -> Result<PresenceRecord, PresenceError> {
    let (result, heap) = peak_heap(|| signed.verify(&fixtures().alice.public()));
    assert!(heap <= verify_heap_bound(signed.payload.len()), "verify held {heap} bytes for {} bytes", signed.payload.len());
    result
}

/// The verdict `verify` must give, from the signature and an independent decode.
fn check_verdict(signed: &SignedPresence, result: Result<PresenceRecord, PresenceError>, clock: &mut Input) {
    let alice = fixtures().alice.public();
    let payload = &signed.payload;
    if payload.len() > MAX_RECORD_BYTES {
        assert_eq!(result, Err(PresenceError::Oversized));
        return;
    }
    if alice.verify(DOMAIN_PRESENCE, payload, &signed.signature).is_err() {
        // Refused before anything is decoded.
        assert_eq!(result, Err(PresenceError::BadSignature));
        return;
    }
    // Bob's key never verifies Alice's signature.
    assert_eq!(signed.verify(&fixtures().bob.public()), Err(PresenceError::BadSignature));
    let exact = match postcard::take_from_bytes::<PresenceRecord>(payload) {
        Ok((record, [])) => Some(record),
        _ => None,
    };
    match (result, exact) {
        (Err(PresenceError::Malformed), None) => {}
        (Ok(record), Some(exact)) => {
            assert_eq!(record, exact);
            check_record(&record, payload);
            check_times(&record, clock);
        }
        (Err(PresenceError::UnsupportedVersion), Some(r)) => assert_ne!(r.version, RECORD_VERSION),
        (Err(PresenceError::WrongKey), Some(r)) => assert!(r.version == RECORD_VERSION && r.identity_key != alice),
        (Err(PresenceError::BadBinding), Some(r)) => assert!(r.identity_key == alice && r.noise.verify(&alice).is_err()),
        (Err(PresenceError::TooManyAddrs), Some(r)) => assert!(r.addrs.len() > MAX_ADDRS && r.noise.verify(&alice).is_ok()),
        (result, exact) => panic!("payload {exact:?} verified as {result:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mode = input.u8();
    let mut clock = Input(input.bytes(32));
    let bytes = input.rest();
    let signed = if mode & 1 == 0 {
        // As it travels, inside Publish and Account: the signature is whatever came.
        let (decoded, heap) = peak_heap(|| postcard::take_from_bytes::<SignedPresence>(bytes));
        assert!(heap <= decode_heap_bound(bytes.len()));
        let Ok((signed, _)) = decoded else { return };
        signed
    } else {
        // Signed here, so everything after the signature check is reachable.
        SignedPresence { payload: bytes.to_vec(), signature: fixtures().alice.secret().sign(DOMAIN_PRESENCE, bytes) }
    };
    let result = verify(&signed);
    check_verdict(&signed, result, &mut clock);
});
