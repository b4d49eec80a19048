//! The identity file: one profile's secret keys, encrypted at rest with a passphrase.
//!
//! Layout (all integers big-endian), documented byte for byte in keys/README.md:
//!
//! ```text
//! 0    8  magic "sotto-id"
//! 8    1  format version (1)
//! 9    1  KDF (1 = argon2id v0x13)
//! 10   4  argon2 memory, KiB
//! 14   4  argon2 iterations
//! 18   4  argon2 parallelism
//! 22  16  salt
//! 38  24  XChaCha20-Poly1305 nonce
//! 62  32  identity public key (Ed25519)
//! 94  32  Noise public key (X25519)
//! 126 80  ciphertext of identity seed ‖ Noise secret (64 bytes) + 16-byte tag;
//!         associated data = bytes 0..126
//! ```
//!
//! This module encodes and decodes bytes; reading and writing the file is the caller's.
//!
//! Secrets in memory: the derived key, argon2's working memory (from which the key can
//! be recomputed) and the 64 plaintext bytes live in buffers wiped on drop; the AEAD
//! runs in place on a stack buffer, so no heap copy of the plaintext is ever made.

use argon2::{Algorithm, Argon2, Block, Params, Version};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::keys::{Identity, IdentityKey, IdentitySecret, NoiseKey, NoiseSecret};

pub const MAGIC: &[u8; 8] = b"sotto-id";
pub const FORMAT_VERSION: u8 = 1;
pub const KDF_ARGON2ID: u8 = 1;
pub const HEADER_LEN: usize = 126;
pub const FILE_LEN: usize = HEADER_LEN + SECRETS_LEN + TAG_LEN;

/// Upper bounds accepted when reading a file, so a crafted header cannot make the
/// reader allocate gigabytes or spin for minutes.
const MAX_MEMORY_KIB: u32 = 1 << 20;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdFileError {
    #[error("not a sotto identity file")]
    NotAnIdentityFile,
    #[error("identity file format version {0} is not supported by this sotto")]
    UnsupportedVersion(u8),
    #[error("identity file uses unknown key derivation {0}")]
    UnsupportedKdf(u8),
    #[error("identity file key-derivation parameters are out of range")]
    BadKdfParams,
    #[error("wrong passphrase, or the identity file is damaged")]
    WrongPassphrase,
    #[error("identity file keys do not match its header")]
    Inconsistent,
    #[error("the passphrase must not be empty")]
    EmptyPassphrase,
}

/// Argon2id cost parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// The default for identity files: 64 MiB, 3 passes, 1 lane (RFC 9106's second
    /// recommendation with one lane). An identity file may be stolen with the disk,
    /// so it gets more than the node's per-login cost.
    pub const DEFAULT: KdfParams = KdfParams { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 };

    fn argon2(&self) -> Result<Argon2<'static>, IdFileError> {
        if self.memory_kib > MAX_MEMORY_KIB || self.iterations > MAX_ITERATIONS || self.parallelism > MAX_PARALLELISM {
            return Err(IdFileError::BadKdfParams);
        }
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32)).map_err(|_| IdFileError::BadKdfParams)?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// The public part of an identity file, readable without the passphrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kdf: KdfParams,
    pub salt: [u8; 16],
    pub nonce: [u8; 24],
    pub identity_key: [u8; 32],
    pub noise_key: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(MAGIC);
        out[8] = FORMAT_VERSION;
        out[9] = KDF_ARGON2ID;
        out[10..14].copy_from_slice(&self.kdf.memory_kib.to_be_bytes());
        out[14..18].copy_from_slice(&self.kdf.iterations.to_be_bytes());
        out[18..22].copy_from_slice(&self.kdf.parallelism.to_be_bytes());
        out[22..38].copy_from_slice(&self.salt);
        out[38..62].copy_from_slice(&self.nonce);
        out[62..94].copy_from_slice(&self.identity_key);
        out[94..126].copy_from_slice(&self.noise_key);
        out
    }

    /// Parses the header of a whole identity file.
    pub fn parse(file: &[u8]) -> Result<Header, IdFileError> {
        if file.len() < 9 || &file[0..8] != MAGIC {
            return Err(IdFileError::NotAnIdentityFile);
        }
        if file[8] != FORMAT_VERSION {
            return Err(IdFileError::UnsupportedVersion(file[8]));
        }
        if file.len() != FILE_LEN {
            return Err(IdFileError::NotAnIdentityFile);
        }
        if file[9] != KDF_ARGON2ID {
            return Err(IdFileError::UnsupportedKdf(file[9]));
        }
        let u32_at = |i: usize| u32::from_be_bytes([file[i], file[i + 1], file[i + 2], file[i + 3]]);
        let array = |range: std::ops::Range<usize>| file[range].to_vec();
        Ok(Header {
            kdf: KdfParams { memory_kib: u32_at(10), iterations: u32_at(14), parallelism: u32_at(18) },
            salt: array(22..38).try_into().map_err(|_| IdFileError::NotAnIdentityFile)?,
            nonce: array(38..62).try_into().map_err(|_| IdFileError::NotAnIdentityFile)?,
            identity_key: array(62..94).try_into().map_err(|_| IdFileError::NotAnIdentityFile)?,
            noise_key: array(94..126).try_into().map_err(|_| IdFileError::NotAnIdentityFile)?,
        })
    }

    pub fn identity_key(&self) -> Result<IdentityKey, IdFileError> {
        IdentityKey::from_bytes(self.identity_key).map_err(|_| IdFileError::Inconsistent)
    }

    pub fn noise_key(&self) -> NoiseKey {
        NoiseKey(self.noise_key)
    }
}

/// Length of the encrypted secrets: identity seed ‖ Noise secret.
const SECRETS_LEN: usize = 64;
const TAG_LEN: usize = 16;

fn derive_key(passphrase: &[u8], header: &Header) -> Result<Zeroizing<[u8; 32]>, IdFileError> {
    let argon2 = header.kdf.argon2()?;
    let mut key = Zeroizing::new([0u8; 32]);
    // argon2's own allocation would be freed unwiped; this one is zeroized on drop.
    let mut memory = Zeroizing::new(vec![Block::new(); argon2.params().block_count()]);
    argon2
        .hash_password_into_with_memory(passphrase, &header.salt, key.as_mut(), memory.as_mut_slice())
        .map_err(|_| IdFileError::BadKdfParams)?;
    Ok(key)
}

/// Encrypts an identity under `passphrase` with fresh salt and nonce.
pub fn seal(identity: &Identity, passphrase: &[u8], kdf: KdfParams) -> Result<Vec<u8>, IdFileError> {
    let mut header = Header {
        kdf,
        salt: [0; 16],
        nonce: [0; 24],
        identity_key: *identity.public().as_bytes(),
        noise_key: *identity.noise().public().as_bytes(),
    };
    OsRng.fill_bytes(&mut header.salt);
    OsRng.fill_bytes(&mut header.nonce);
    seal_with(identity, passphrase, &header)
}

/// Encrypts with a given header; the test vectors use it with fixed salt and nonce.
/// Salt and nonce must be fresh for every real file: use [`seal`]. The header's public
/// keys are written as given (a vector uses this to make an inconsistent file).
pub fn seal_with(identity: &Identity, passphrase: &[u8], header: &Header) -> Result<Vec<u8>, IdFileError> {
    if passphrase.is_empty() {
        return Err(IdFileError::EmptyPassphrase);
    }
    let key = derive_key(passphrase, header)?;
    let aad = header.encode();
    // Encrypted in place: the buffer holds the plaintext, then the ciphertext, and is
    // wiped when dropped either way.
    let mut buffer = Zeroizing::new([0u8; SECRETS_LEN]);
    buffer[..32].copy_from_slice(identity.secret().seed().as_ref());
    buffer[32..].copy_from_slice(identity.noise().as_bytes());
    let cipher = XChaCha20Poly1305::new(key.as_ref().into());
    let tag = cipher
        .encrypt_in_place_detached(XNonce::from_slice(&header.nonce), &aad, buffer.as_mut())
        .map_err(|_| IdFileError::Inconsistent)?;
    let mut out = Vec::with_capacity(FILE_LEN);
    out.extend_from_slice(&aad);
    out.extend_from_slice(buffer.as_ref());
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Decrypts an identity file and checks that its keys match the header.
pub fn open(file: &[u8], passphrase: &[u8]) -> Result<Identity, IdFileError> {
    let header = Header::parse(file)?;
    let key = derive_key(passphrase, &header)?;
    let cipher = XChaCha20Poly1305::new(key.as_ref().into());
    // Decrypted in place into a buffer wiped on drop; the tag is checked before any
    // plaintext is produced.
    let mut plaintext = Zeroizing::new([0u8; SECRETS_LEN]);
    plaintext.copy_from_slice(&file[HEADER_LEN..HEADER_LEN + SECRETS_LEN]);
    let tag = Tag::from_slice(&file[HEADER_LEN + SECRETS_LEN..HEADER_LEN + SECRETS_LEN + TAG_LEN]);
    cipher
        .decrypt_in_place_detached(XNonce::from_slice(&header.nonce), &file[..HEADER_LEN], plaintext.as_mut(), tag)
        .map_err(|_| IdFileError::WrongPassphrase)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    seed.copy_from_slice(&plaintext[..32]);
    let mut noise = Zeroizing::new([0u8; 32]);
    noise.copy_from_slice(&plaintext[32..]);
    let identity = Identity::new(IdentitySecret::from_seed(&seed), NoiseSecret::from_bytes(&noise));
    if identity.public().as_bytes() != &header.identity_key || identity.noise().public().as_bytes() != &header.noise_key {
        return Err(IdFileError::Inconsistent);
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };

    #[test]
    fn round_trip_with_default_params() {
        let id = Identity::generate();
        let file = seal(&id, b"correct horse", KdfParams::DEFAULT).unwrap();
        assert_eq!(file.len(), FILE_LEN);
        let back = open(&file, b"correct horse").unwrap();
        assert_eq!(back.public(), id.public());
        assert_eq!(back.noise().public(), id.noise().public());
        assert_eq!(Header::parse(&file).unwrap().kdf, KdfParams::DEFAULT);
    }

    #[test]
    fn wrong_passphrase_fails() {
        let file = seal(&Identity::generate(), b"right", FAST).unwrap();
        assert_eq!(open(&file, b"wrong").unwrap_err(), IdFileError::WrongPassphrase);
    }

    #[test]
    fn tampered_header_or_body_fails() {
        let file = seal(&Identity::generate(), b"pw", FAST).unwrap();
        for i in [22, 40, 70, 100, 130, FILE_LEN - 1] {
            let mut bad = file.clone();
            bad[i] ^= 1;
            assert_eq!(open(&bad, b"pw").unwrap_err(), IdFileError::WrongPassphrase, "byte {i}");
        }
    }

    #[test]
    fn hostile_headers_are_refused_before_any_work() {
        let file = seal(&Identity::generate(), b"pw", FAST).unwrap();
        let mut huge = file.clone();
        huge[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(open(&huge, b"pw").unwrap_err(), IdFileError::BadKdfParams);
        let mut version = file.clone();
        version[8] = 9;
        assert_eq!(open(&version, b"pw").unwrap_err(), IdFileError::UnsupportedVersion(9));
        assert_eq!(open(&file[..100], b"pw").unwrap_err(), IdFileError::NotAnIdentityFile);
        assert_eq!(open(b"hello", b"pw").unwrap_err(), IdFileError::NotAnIdentityFile);
    }

    #[test]
    fn empty_passphrase_is_refused() {
        assert_eq!(seal(&Identity::generate(), b"", FAST).unwrap_err(), IdFileError::EmptyPassphrase);
    }
}
