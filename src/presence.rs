//! Signed presence records: where a user can be reached now, signed by their identity.
//!
//! The signature covers `"sotto/presence/v1" ‖ payload`, where the payload is the exact
//! postcard bytes of a [`PresenceRecord`]. Verification checks the signature first and
//! only then decodes. The freshness rules take `now` (Unix seconds) as an argument.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::keys::{IdentityKey, IdentitySecret, NoiseBinding};
use crate::username::Username;

pub const DOMAIN_PRESENCE: &[u8] = b"sotto/presence/v1";
pub const RECORD_VERSION: u8 = 1;
/// Largest encoded record accepted; a real one is about 250 bytes.
pub const MAX_RECORD_BYTES: usize = 1024;
/// Most addresses one record may list.
pub const MAX_ADDRS: usize = 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
#[non_exhaustive]
pub enum PresenceError {
    #[error("presence record is too large")]
    Oversized,
    #[error("presence record signature does not verify")]
    BadSignature,
    #[error("presence record is malformed")]
    Malformed,
    #[error("presence record version is not supported")]
    UnsupportedVersion,
    #[error("presence record names a different identity key than the one that signed it")]
    WrongKey,
    #[error("presence record is for a different user")]
    WrongUser,
    #[error("presence record's Noise key binding does not verify")]
    BadBinding,
    #[error("presence record is not newer than one already seen (replayed or reordered)")]
    StaleSeq,
    #[error("presence record has expired")]
    Expired,
    #[error("presence record was issued in the future (check the clock)")]
    FromTheFuture,
    #[error("presence record was issued too long ago (check the clock)")]
    TooOld,
    #[error("presence record asks to live longer than allowed")]
    TtlTooLong,
    #[error("presence record lists too many addresses")]
    TooManyAddrs,
}

/// Where and how to reach a user, as they signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub version: u8,
    pub username: Username,
    pub identity_key: IdentityKey,
    pub noise: NoiseBinding,
    pub addrs: Vec<SocketAddr>,
    /// SHA-256 of the DER certificate of the user's peer QUIC endpoint.
    pub cert_sha256: [u8; 32],
    pub seq: u64,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// A record's exact bytes and the identity signature over them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPresence {
    pub payload: Vec<u8>,
    #[serde(with = "crate::wire::bytes64")]
    pub signature: [u8; 64],
}

impl SignedPresence {
    pub fn sign(record: &PresenceRecord, secret: &IdentitySecret) -> Self {
        // Encoding plain data into a Vec cannot fail.
        let payload = postcard::to_stdvec(record).expect("postcard encodes into a Vec");
        let signature = secret.sign(DOMAIN_PRESENCE, &payload);
        Self { payload, signature }
    }

    /// Checks the signature with `signer`, then decodes, then checks that the record
    /// speaks for `signer` (key and Noise binding). Freshness is checked separately.
    pub fn verify(&self, signer: &IdentityKey) -> Result<PresenceRecord, PresenceError> {
        self.verify_knowing(signer, None)
    }

    /// [`verify`](Self::verify), where `verified` is a Noise binding the caller has
    /// already verified under `signer`: a record carrying that very binding (byte for
    /// byte) is not checked for it twice, as an Ed25519 verification depends on nothing
    /// but the key, the message and the signature. Any other binding is checked.
    pub(crate) fn verify_knowing(&self, signer: &IdentityKey, verified: Option<&NoiseBinding>) -> Result<PresenceRecord, PresenceError> {
        if self.payload.len() > MAX_RECORD_BYTES {
            return Err(PresenceError::Oversized);
        }
        signer.verify(DOMAIN_PRESENCE, &self.payload, &self.signature).map_err(|_| PresenceError::BadSignature)?;
        let (record, rest) = postcard::take_from_bytes::<PresenceRecord>(&self.payload).map_err(|_| PresenceError::Malformed)?;
        if !rest.is_empty() {
            return Err(PresenceError::Malformed);
        }
        if record.version != RECORD_VERSION {
            return Err(PresenceError::UnsupportedVersion);
        }
        if !record.identity_key.ct_eq(signer) {
            return Err(PresenceError::WrongKey);
        }
        if verified != Some(&record.noise) {
            record.noise.verify(signer).map_err(|_| PresenceError::BadBinding)?;
        }
        if record.addrs.len() > MAX_ADDRS {
            return Err(PresenceError::TooManyAddrs);
        }
        Ok(record)
    }
}

/// The time rules a rendezvous node applies to a record it is asked to publish.
#[derive(Clone, Copy, Debug)]
pub struct Freshness {
    /// Longest `expires_at - issued_at` accepted.
    pub max_ttl: u64,
    /// How far `issued_at` may be from the node's clock, either way.
    pub max_skew: u64,
}

impl Freshness {
    pub const DEFAULT: Freshness = Freshness { max_ttl: 300, max_skew: 60 };

    /// Accepts a verified record for publishing, given the last accepted `seq`.
    pub fn check_publish(&self, record: &PresenceRecord, now: u64, last_seq: Option<u64>) -> Result<(), PresenceError> {
        if last_seq.is_some_and(|last| record.seq <= last) {
            return Err(PresenceError::StaleSeq);
        }
        if record.issued_at > now.saturating_add(self.max_skew) {
            return Err(PresenceError::FromTheFuture);
        }
        if record.issued_at < now.saturating_sub(self.max_skew) {
            return Err(PresenceError::TooOld);
        }
        if record.expires_at <= record.issued_at || record.expires_at - record.issued_at > self.max_ttl {
            return Err(PresenceError::TtlTooLong);
        }
        if record.expires_at <= now {
            return Err(PresenceError::Expired);
        }
        Ok(())
    }
}

/// What a client checks of a record it looked up: unexpired (allowing `skew` for the
/// clocks) and newer than or equal to the highest `seq` it has seen for this user.
pub fn check_current(record: &PresenceRecord, now: u64, skew: u64, highest_seen: Option<u64>) -> Result<(), PresenceError> {
    if record.expires_at.saturating_add(skew) <= now {
        return Err(PresenceError::Expired);
    }
    if record.issued_at > now.saturating_add(skew) {
        return Err(PresenceError::FromTheFuture);
    }
    if highest_seen.is_some_and(|h| record.seq < h) {
        return Err(PresenceError::StaleSeq);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::{Identity, IdentitySecret, NoiseSecret};

    pub(crate) fn identity(seed: u8) -> Identity {
        Identity::new(IdentitySecret::from_seed(&[seed; 32]), NoiseSecret::from_bytes(&[seed.wrapping_add(100); 32]))
    }

    pub(crate) fn record(id: &Identity, name: &str, seq: u64, issued_at: u64, ttl: u64) -> PresenceRecord {
        PresenceRecord {
            version: RECORD_VERSION,
            username: Username::parse(name).unwrap(),
            identity_key: id.public(),
            noise: id.binding(),
            addrs: vec!["127.0.0.1:4433".parse().unwrap()],
            cert_sha256: [7; 32],
            seq,
            issued_at,
            expires_at: issued_at + ttl,
        }
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn sign_then_verify() {
        let alice = identity(1);
        let rec = record(&alice, "alice", 1, NOW, 60);
        let signed = SignedPresence::sign(&rec, alice.secret());
        assert_eq!(signed.verify(&alice.public()), Ok(rec));
    }

    #[test]
    fn forged_signature_is_refused() {
        let alice = identity(1);
        let mut signed = SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), alice.secret());
        signed.signature[10] ^= 0x40;
        assert_eq!(signed.verify(&alice.public()), Err(PresenceError::BadSignature));
    }

    #[test]
    fn tampered_payload_is_refused() {
        let alice = identity(1);
        let mut signed = SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), alice.secret());
        let last = signed.payload.len() - 1;
        signed.payload[last] ^= 1;
        assert_eq!(signed.verify(&alice.public()), Err(PresenceError::BadSignature));
    }

    #[test]
    fn record_signed_by_another_key_is_refused() {
        let (alice, mallory) = (identity(1), identity(2));
        // Mallory signs a record that claims Alice's key: Alice's key does not verify it.
        let claim = SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), mallory.secret());
        assert_eq!(claim.verify(&alice.public()), Err(PresenceError::BadSignature));
        // Mallory signs a record naming Alice's key with her own signature: wrong key.
        assert_eq!(claim.verify(&mallory.public()), Err(PresenceError::WrongKey));
    }

    #[test]
    fn foreign_noise_binding_is_refused() {
        let (alice, mallory) = (identity(1), identity(2));
        let mut rec = record(&alice, "alice", 1, NOW, 60);
        rec.noise = mallory.binding();
        let signed = SignedPresence::sign(&rec, alice.secret());
        assert_eq!(signed.verify(&alice.public()), Err(PresenceError::BadBinding));
    }

    #[test]
    fn only_the_binding_already_verified_goes_unchecked() {
        let (alice, mallory) = (identity(1), identity(2));
        let rec = record(&alice, "alice", 1, NOW, 60);
        let signed = SignedPresence::sign(&rec, alice.secret());
        assert_eq!(signed.verify_knowing(&alice.public(), Some(&alice.binding())), Ok(rec.clone()));
        // A record whose binding is not the one the caller verified is checked as ever:
        // a foreign binding is refused whatever the caller knows.
        let mut foreign = rec;
        foreign.noise = mallory.binding();
        let signed = SignedPresence::sign(&foreign, alice.secret());
        for known in [None, Some(&alice.binding())] {
            assert_eq!(signed.verify_knowing(&alice.public(), known), Err(PresenceError::BadBinding));
        }
        // So is a binding with the same Noise key and another signature.
        let mut resigned = record(&alice, "alice", 1, NOW, 60);
        resigned.noise.signature[0] ^= 1;
        let signed = SignedPresence::sign(&resigned, alice.secret());
        assert_eq!(signed.verify_knowing(&alice.public(), Some(&alice.binding())), Err(PresenceError::BadBinding));
        // The record's signature is checked either way.
        let mut forged = SignedPresence::sign(&record(&alice, "alice", 1, NOW, 60), alice.secret());
        forged.signature[3] ^= 1;
        assert_eq!(forged.verify_knowing(&alice.public(), Some(&alice.binding())), Err(PresenceError::BadSignature));
    }

    #[test]
    fn oversized_and_trailing_payloads_are_refused() {
        let alice = identity(1);
        let mut rec = record(&alice, "alice", 1, NOW, 60);
        rec.addrs = vec!["127.0.0.1:1".parse().unwrap(); 200];
        assert_eq!(SignedPresence::sign(&rec, alice.secret()).verify(&alice.public()), Err(PresenceError::Oversized));
        rec.addrs = vec!["127.0.0.1:1".parse().unwrap(); MAX_ADDRS + 1];
        assert_eq!(SignedPresence::sign(&rec, alice.secret()).verify(&alice.public()), Err(PresenceError::TooManyAddrs));
        let mut payload = postcard::to_stdvec(&record(&alice, "alice", 1, NOW, 60)).unwrap();
        payload.push(0);
        let signature = alice.secret().sign(DOMAIN_PRESENCE, &payload);
        assert_eq!(SignedPresence { payload, signature }.verify(&alice.public()), Err(PresenceError::Malformed));
    }

    #[test]
    fn seq_must_strictly_increase() {
        let alice = identity(1);
        let f = Freshness::DEFAULT;
        assert_eq!(f.check_publish(&record(&alice, "alice", 5, NOW, 60), NOW, None), Ok(()));
        assert_eq!(f.check_publish(&record(&alice, "alice", 5, NOW, 60), NOW, Some(5)), Err(PresenceError::StaleSeq));
        assert_eq!(f.check_publish(&record(&alice, "alice", 4, NOW, 60), NOW, Some(5)), Err(PresenceError::StaleSeq));
        assert_eq!(f.check_publish(&record(&alice, "alice", 6, NOW, 60), NOW, Some(5)), Ok(()));
    }

    #[test]
    fn time_rules() {
        let alice = identity(1);
        let f = Freshness { max_ttl: 300, max_skew: 60 };
        let check = |issued: u64, ttl: u64| f.check_publish(&record(&alice, "alice", 1, issued, ttl), NOW, None);
        assert_eq!(check(NOW + 60, 60), Ok(()));
        assert_eq!(check(NOW + 61, 60), Err(PresenceError::FromTheFuture));
        assert_eq!(check(NOW - 60, 300), Ok(()));
        assert_eq!(check(NOW - 61, 300), Err(PresenceError::TooOld));
        assert_eq!(check(NOW - 30, 20), Err(PresenceError::Expired));
        assert_eq!(check(NOW, 301), Err(PresenceError::TtlTooLong));
        assert_eq!(check(NOW, 0), Err(PresenceError::TtlTooLong));
    }

    #[test]
    fn client_side_currency() {
        let alice = identity(1);
        let rec = record(&alice, "alice", 9, NOW, 60);
        assert_eq!(check_current(&rec, NOW + 30, 5, Some(9)), Ok(()));
        assert_eq!(check_current(&rec, NOW + 65, 5, None), Err(PresenceError::Expired));
        assert_eq!(check_current(&rec, NOW + 1, 5, Some(10)), Err(PresenceError::StaleSeq));
        assert_eq!(check_current(&rec, NOW - 10, 5, None), Err(PresenceError::FromTheFuture));
    }
}
