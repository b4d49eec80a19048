//! Identity proofs for Register, Login and Authenticate.
//!
//! A proof is an identity signature over
//! `"sotto/rendezvous-auth/v1" ‖ purpose ‖ challenge ‖ channel ‖ len(username) ‖ username`
//! where `channel` is the TLS exporter value of this QUIC connection. A proof therefore
//! works once: for one purpose, one username, one node connection.

use crate::keys::{IdentityKey, IdentitySecret, KeyError};
use crate::username::Username;

pub const DOMAIN_AUTH: &[u8] = b"sotto/rendezvous-auth/v1";
/// TLS exporter label for the channel binding.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-sotto-rendezvous-channel-v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Purpose {
    Register = 1,
    Login = 2,
    Authenticate = 3,
}

/// What a connection's proofs are bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub challenge: [u8; 32],
    pub channel: [u8; 32],
}

fn message(purpose: Purpose, binding: &Binding, username: &Username) -> Vec<u8> {
    let name = username.as_str().as_bytes();
    let mut m = Vec::with_capacity(1 + 64 + 1 + name.len());
    m.push(purpose as u8);
    m.extend_from_slice(&binding.challenge);
    m.extend_from_slice(&binding.channel);
    // Usernames are at most 32 bytes, so the length fits in one byte.
    m.push(name.len() as u8);
    m.extend_from_slice(name);
    m
}

pub fn prove(secret: &IdentitySecret, purpose: Purpose, binding: &Binding, username: &Username) -> [u8; 64] {
    secret.sign(DOMAIN_AUTH, &message(purpose, binding, username))
}

pub fn check(key: &IdentityKey, proof: &[u8; 64], purpose: Purpose, binding: &Binding, username: &Username) -> Result<(), KeyError> {
    key.verify(DOMAIN_AUTH, &message(purpose, binding, username), proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_is_bound_to_purpose_user_challenge_and_channel() {
        let secret = IdentitySecret::from_seed(&[1; 32]);
        let key = secret.public();
        let alice = Username::parse("alice").unwrap();
        let b = Binding { challenge: [2; 32], channel: [3; 32] };
        let proof = prove(&secret, Purpose::Login, &b, &alice);
        assert!(check(&key, &proof, Purpose::Login, &b, &alice).is_ok());
        assert!(check(&key, &proof, Purpose::Authenticate, &b, &alice).is_err());
        assert!(check(&key, &proof, Purpose::Login, &b, &Username::parse("alicf").unwrap()).is_err());
        assert!(check(&key, &proof, Purpose::Login, &Binding { challenge: [4; 32], ..b }, &alice).is_err());
        assert!(check(&key, &proof, Purpose::Login, &Binding { channel: [4; 32], ..b }, &alice).is_err());
        assert!(check(&IdentitySecret::from_seed(&[5; 32]).public(), &proof, Purpose::Login, &b, &alice).is_err());
    }
}
