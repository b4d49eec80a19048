//! Identity and Noise keys, the signature domains, fingerprints and safety numbers.
//!
//! Owns every signing and verification done with an identity key. It does no I/O and
//! never serialises a secret; secrets are zeroized on drop and their `Debug` is opaque.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;
use zeroize::{ZeroizeOnDrop, Zeroizing};

/// Domain of the identity signature that binds a Noise static key to an identity.
pub const DOMAIN_NOISE_BINDING: &[u8] = b"sotto/noise-key/v1";
/// Domain of the hash that a fingerprint is read from.
pub const DOMAIN_FINGERPRINT: &[u8] = b"sotto/fingerprint/v1";

/// Errors of key parsing and signature checks. Deliberately coarse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    #[error("not a valid Ed25519 public key")]
    BadPublicKey,
    #[error("signature does not verify")]
    BadSignature,
}

/// An Ed25519 public identity key: who a user is. Always a valid curve point: decoding
/// checks it like [`IdentityKey::from_bytes`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct IdentityKey([u8; 32]);

impl<'de> serde::Deserialize<'de> for IdentityKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        IdentityKey::from_bytes(<[u8; 32]>::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl IdentityKey {
    /// Parses 32 bytes, refusing encodings that are not a valid curve point.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<Self, KeyError> {
        VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::BadPublicKey)?;
        Ok(Self(bytes))
    }

    /// Takes 32 bytes as a key without checking them again: only for bytes that
    /// [`from_bytes`](Self::from_bytes) accepted before this process's own database
    /// stored them (the node's account table, read on every lookup, where checking
    /// would decompress the point each time: about 5 µs). Whoever is sent the key checks
    /// it on receipt, and [`verify`](Self::verify) checks it before any use.
    pub(crate) fn from_stored_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies `signature` over `domain ‖ message` (strict Ed25519: no malleable
    /// signatures, no small-order keys).
    pub fn verify(&self, domain: &[u8], message: &[u8], signature: &[u8; 64]) -> Result<(), KeyError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::BadPublicKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        let signed = [domain, message].concat();
        key.verify_strict(&signed, &sig).map_err(|_| KeyError::BadSignature)
    }

    /// Constant-time equality, for comparing a presented key with a pinned one.
    pub fn ct_eq(&self, other: &IdentityKey) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdentityKey({})", hex::encode(self.0))
    }
}

/// The Ed25519 secret identity key. Zeroized on drop: ed25519-dalek's `SigningKey`
/// wipes its secret on drop (its `zeroize` feature). `Debug` prints no key material.
pub struct IdentitySecret(SigningKey);

// `SigningKey` implements `ZeroizeOnDrop` (checked by `secrets_are_zeroize_on_drop`).
impl ZeroizeOnDrop for IdentitySecret {}

impl IdentitySecret {
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut OsRng))
    }

    /// Rebuilds the key from its 32-byte seed (the identity file holds the seed).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    pub fn public(&self) -> IdentityKey {
        IdentityKey(self.0.verifying_key().to_bytes())
    }

    /// Signs `domain ‖ message`. Every identity signature in sotto goes through here.
    pub fn sign(&self, domain: &[u8], message: &[u8]) -> [u8; 64] {
        let signed = [domain, message].concat();
        self.0.sign(&signed).to_bytes()
    }
}

impl fmt::Debug for IdentitySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentitySecret(..)")
    }
}

/// An X25519 public key used as a Noise static key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct NoiseKey(pub [u8; 32]);

impl NoiseKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NoiseKey({})", hex::encode(self.0))
    }
}

/// The X25519 Noise static secret. Zeroized on drop; `Debug` prints no key material.
pub struct NoiseSecret(Zeroizing<[u8; 32]>);

impl ZeroizeOnDrop for NoiseSecret {}

impl NoiseSecret {
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(bytes.as_mut());
        Self(bytes)
    }

    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        Self(Zeroizing::new(*bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn public(&self) -> NoiseKey {
        // `StaticSecret` wipes its copy on drop (x25519-dalek's `zeroize`).
        let secret = x25519_dalek::StaticSecret::from(*self.0);
        NoiseKey(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl fmt::Debug for NoiseSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NoiseSecret(..)")
    }
}

/// A Noise static key together with the identity signature that binds it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize, serde::Deserialize)]
pub struct NoiseBinding {
    pub noise_key: NoiseKey,
    #[serde(with = "crate::wire::bytes64")]
    pub signature: [u8; 64],
}

impl NoiseBinding {
    pub fn sign(identity: &IdentitySecret, noise_key: NoiseKey) -> Self {
        let signature = identity.sign(DOMAIN_NOISE_BINDING, noise_key.as_bytes());
        Self { noise_key, signature }
    }

    pub fn verify(&self, identity: &IdentityKey) -> Result<(), KeyError> {
        identity.verify(DOMAIN_NOISE_BINDING, self.noise_key.as_bytes(), &self.signature)
    }
}

/// Everything secret a profile holds, unlocked from the identity file. Both halves wipe
/// themselves on drop, and `Debug` shows `IdentitySecret(..)` and `NoiseSecret(..)`.
pub struct Identity {
    secret: IdentitySecret,
    noise: NoiseSecret,
    /// The binding of the two, made once: every dial sends it, and making it takes a
    /// signature and a scalar multiplication (Ed25519 signatures are deterministic, so
    /// it never changes).
    binding: std::sync::OnceLock<NoiseBinding>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("secret", &self.secret).field("noise", &self.noise).finish()
    }
}

impl ZeroizeOnDrop for Identity {}

impl Identity {
    pub fn new(secret: IdentitySecret, noise: NoiseSecret) -> Self {
        Self { secret, noise, binding: std::sync::OnceLock::new() }
    }

    pub fn generate() -> Self {
        Self::new(IdentitySecret::generate(), NoiseSecret::generate())
    }

    pub fn secret(&self) -> &IdentitySecret {
        &self.secret
    }

    pub fn noise(&self) -> &NoiseSecret {
        &self.noise
    }

    pub fn public(&self) -> IdentityKey {
        self.secret.public()
    }

    pub fn binding(&self) -> NoiseBinding {
        *self.binding.get_or_init(|| NoiseBinding::sign(&self.secret, self.noise.public()))
    }
}

/// A human-comparable rendering of a domain-separated hash of an identity key:
/// 30 decimal digits in six groups of five.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Fingerprint(String);

impl Fingerprint {
    pub fn of(key: &IdentityKey) -> Self {
        let mut hash = Sha512::new();
        hash.update(DOMAIN_FINGERPRINT);
        hash.update(key.as_bytes());
        let digest = hash.finalize();
        Self(digits(&digest[..30]))
    }

    /// The digits without spaces.
    pub fn digits(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&group(&self.0))
    }
}

/// Renders bytes as decimal digits: each 5-byte chunk, big-endian, modulo 100000.
fn digits(bytes: &[u8]) -> String {
    bytes
        .chunks_exact(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

fn group(digits: &str) -> String {
    digits.as_bytes().chunks(5).map(|c| String::from_utf8_lossy(c)).collect::<Vec<_>>().join(" ")
}

/// The safety number of a pair: both fingerprints, the one of the smaller key
/// (bytewise) first, so both sides compute the same 60 digits.
pub fn safety_number(a: &IdentityKey, b: &IdentityKey) -> String {
    let (first, second) = if a.as_bytes() <= b.as_bytes() { (a, b) } else { (b, a) };
    group(&format!("{}{}", first.fingerprint().digits(), second.fingerprint().digits()))
}

/// Compares a typed safety number with the computed one, ignoring whitespace.
pub fn safety_number_matches(typed: &str, a: &IdentityKey, b: &IdentityKey) -> bool {
    let typed: String = typed.chars().filter(|c| !c.is_whitespace()).collect();
    let expected: String = safety_number(a, b).chars().filter(|c| !c.is_whitespace()).collect();
    typed.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(seed: u8) -> IdentitySecret {
        IdentitySecret::from_seed(&[seed; 32])
    }

    #[test]
    fn signature_covers_domain_and_message() {
        let id = identity(1);
        let sig = id.sign(b"sotto/test/v1", b"hello");
        assert_eq!(id.public().verify(b"sotto/test/v1", b"hello", &sig), Ok(()));
        assert_eq!(id.public().verify(b"sotto/test/v2", b"hello", &sig), Err(KeyError::BadSignature));
        assert_eq!(id.public().verify(b"sotto/test/v1", b"hellO", &sig), Err(KeyError::BadSignature));
        assert_eq!(identity(2).public().verify(b"sotto/test/v1", b"hello", &sig), Err(KeyError::BadSignature));
    }

    #[test]
    fn noise_binding_verifies_only_for_its_identity() {
        let id = Identity::new(identity(3), NoiseSecret::from_bytes(&[4; 32]));
        let binding = id.binding();
        assert!(binding.verify(&id.public()).is_ok());
        assert!(binding.verify(&identity(5).public()).is_err());
        let mut swapped = binding;
        swapped.noise_key = NoiseSecret::from_bytes(&[6; 32]).public();
        assert!(swapped.verify(&id.public()).is_err());
    }

    #[test]
    fn fingerprint_is_thirty_digits_in_groups() {
        let fp = identity(7).public().fingerprint();
        assert_eq!(fp.digits().len(), 30);
        assert!(fp.digits().bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(fp.to_string().split(' ').count(), 6);
        assert_ne!(fp, identity(8).public().fingerprint());
    }

    #[test]
    fn safety_number_is_symmetric() {
        let (a, b) = (identity(9).public(), identity(10).public());
        assert_eq!(safety_number(&a, &b), safety_number(&b, &a));
        assert!(safety_number_matches(&safety_number(&a, &b).replace(' ', ""), &b, &a));
        assert!(!safety_number_matches("12345", &a, &b));
        let c = identity(11).public();
        assert!(!safety_number_matches(&safety_number(&a, &c), &a, &b));
    }

    #[test]
    fn secrets_do_not_print() {
        let id = Identity::generate();
        for shown in [format!("{id:?}"), format!("{id:#?}"), format!("{:?}", id.secret), format!("{:?}", id.noise)] {
            for secret in [*id.secret.seed(), *id.noise.as_bytes()] {
                assert!(!shown.contains(&hex::encode(secret)), "{shown}");
                assert!(!shown.to_lowercase().contains(&hex::encode(&secret[..4])), "{shown}");
                // The `Debug` of a byte array: `[12, 34, ...`.
                assert!(!shown.contains(&format!("{:?}", &secret[..4]).trim_end_matches(']').to_string()), "{shown}");
            }
        }
        assert_eq!(format!("{:?}", id.secret), "IdentitySecret(..)");
        assert_eq!(format!("{:?}", id.noise), "NoiseSecret(..)");
        assert_eq!(format!("{id:?}"), "Identity { secret: IdentitySecret(..), noise: NoiseSecret(..) }");
    }

    #[test]
    fn secrets_are_zeroize_on_drop() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        // The types the markers above rely on really wipe themselves.
        wiped_on_drop::<SigningKey>();
        wiped_on_drop::<Zeroizing<[u8; 32]>>();
        wiped_on_drop::<Identity>();
    }

    /// The bytes of `value`'s own storage after running its destructor in place.
    fn bytes_after_drop<T>(value: T) -> Vec<u8> {
        let mut slot = std::mem::ManuallyDrop::new(value);
        // SAFETY: the value is dropped exactly once and never used as a `T` again; its
        // storage stays alive in `slot` (`ManuallyDrop` is `repr(transparent)`), and the
        // types read here (byte and u64 arrays) have no padding, so every byte is
        // initialised.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut slot);
            std::slice::from_raw_parts((&slot as *const std::mem::ManuallyDrop<T>).cast::<u8>(), std::mem::size_of::<T>()).to_vec()
        }
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn dropping_a_secret_wipes_its_bytes() {
        let seed = [0x5a; 32];
        let noise = [0xa5; 32];
        let identity = IdentitySecret::from_seed(&seed);
        let before = {
            // SAFETY: as in `bytes_after_drop`, reading initialised bytes of a live value.
            unsafe { std::slice::from_raw_parts((&identity as *const IdentitySecret).cast::<u8>(), std::mem::size_of::<IdentitySecret>()) }
                .to_vec()
        };
        assert!(contains(&before, &seed), "the seed is where this test looks for it");
        assert!(!contains(&bytes_after_drop(identity), &seed), "the identity seed survived its drop");
        let after = bytes_after_drop(NoiseSecret::from_bytes(&noise));
        assert!(after.iter().all(|b| *b == 0), "the Noise secret survived its drop");
        // `NoiseSecret::public` relies on this (x25519-dalek's `zeroize(drop)`).
        assert!(bytes_after_drop(x25519_dalek::StaticSecret::from(noise)).iter().all(|b| *b == 0));
        // The seed copy `seed()` hands out is wiped too.
        assert!(bytes_after_drop(IdentitySecret::from_seed(&seed).seed()).iter().all(|b| *b == 0));
    }

    #[test]
    fn invalid_public_key_is_refused() {
        // y = 2 does not decompress to a curve point.
        let mut bytes = [0u8; 32];
        bytes[0] = 2;
        assert_eq!(IdentityKey::from_bytes(bytes), Err(KeyError::BadPublicKey));
        // Decoding checks it too: a lookup answer holding it (say, from a node that
        // stores keys without checking them again) is refused where it is received.
        assert!(postcard::from_bytes::<IdentityKey>(&postcard::to_stdvec(&bytes).unwrap()).is_err());
        let good = identity(1).public();
        assert_eq!(postcard::from_bytes::<IdentityKey>(&postcard::to_stdvec(&good).unwrap()).unwrap(), good);
    }
}
