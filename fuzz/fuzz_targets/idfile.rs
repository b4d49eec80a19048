//! The identity file (src/idfile.rs): `Header::parse` on any bytes, `open` with the
//! published vector passphrase, and `seal_with` → `open` round trips for every header
//! the fuzzer finds. Key derivation runs only for cheap parameters (the fuzzer would
//! otherwise spend its time in argon2); out-of-range parameters must be refused before
//! any work, with almost no heap.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::idfile::{open, seal_with, Header, IdFileError, FILE_LEN, FORMAT_VERSION, HEADER_LEN, KDF_ARGON2ID, MAGIC};
use sotto_fuzz::{fixtures, peak_heap};

/// The passphrase of keys/test-vectors/identity-file.json.
const PASSPHRASE: &[u8] = b"correct horse battery staple";

/// The limits keys/README.md gives for reading a file.
const MAX_MEMORY_KIB: u32 = 1 << 20;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 16;

fn expected_parse_error(data: &[u8]) -> Option<IdFileError> {
    if data.len() < 9 || &data[..8] != MAGIC {
        Some(IdFileError::NotAnIdentityFile)
    } else if data[8] != FORMAT_VERSION {
        Some(IdFileError::UnsupportedVersion(data[8]))
    } else if data.len() != FILE_LEN {
        Some(IdFileError::NotAnIdentityFile)
    } else if data[9] != KDF_ARGON2ID {
        Some(IdFileError::UnsupportedKdf(data[9]))
    } else {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let (parsed, heap) = peak_heap(|| Header::parse(data));
    assert!(heap <= 1024, "Header::parse held {heap} bytes");
    let header = match (parsed, expected_parse_error(data)) {
        (Err(e), Some(expected)) => {
            assert_eq!(e, expected);
            assert_eq!(open(data, PASSPHRASE).err(), Some(expected), "open and Header::parse disagree");
            return;
        }
        (Ok(header), None) => header,
        (parsed, expected) => panic!("Header::parse gave {parsed:?}, expected {expected:?}"),
    };
    let u32_at = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().expect("four bytes"));
    assert_eq!((header.kdf.memory_kib, header.kdf.iterations, header.kdf.parallelism), (u32_at(10), u32_at(14), u32_at(18)));
    assert_eq!(&header.salt[..], &data[22..38]);
    assert_eq!(&header.nonce[..], &data[38..62]);
    assert_eq!(&header.identity_key[..], &data[62..94]);
    assert_eq!(&header.noise_key[..], &data[94..126]);

    let kdf = header.kdf;
    if kdf.memory_kib > MAX_MEMORY_KIB || kdf.iterations > MAX_ITERATIONS || kdf.parallelism > MAX_PARALLELISM {
        let (opened, heap) = peak_heap(|| open(data, PASSPHRASE));
        assert_eq!(opened.err(), Some(IdFileError::BadKdfParams));
        assert!(heap <= 4096, "refusing hostile parameters held {heap} bytes");
        return;
    }
    if kdf.memory_kib > 64 || kdf.iterations > 2 || kdf.parallelism > 2 {
        return;
    }
    // Argon2 itself refuses t = 0, p = 0 and m < 8p.
    let argon2_ok = kdf.iterations >= 1 && kdf.parallelism >= 1 && kdf.memory_kib >= 8 * kdf.parallelism;
    let (opened, heap) = peak_heap(|| open(data, PASSPHRASE));
    assert!(heap <= kdf.memory_kib as usize * 1024 + 16 * 1024, "open held {heap} bytes for m = {} KiB", kdf.memory_kib);
    match opened {
        Ok(identity) => {
            assert_eq!(identity.public().as_bytes(), &header.identity_key);
            assert_eq!(identity.noise().public().as_bytes(), &header.noise_key);
            assert_eq!(open(data, b"correct horse battery stapler").err(), Some(IdFileError::WrongPassphrase));
        }
        Err(IdFileError::BadKdfParams) => assert!(!argon2_ok),
        Err(e) => assert!(argon2_ok && matches!(e, IdFileError::WrongPassphrase | IdFileError::Inconsistent), "{e:?}"),
    }

    // Sealing under this header and opening again gives the header and the keys back,
    // or Inconsistent when the header names keys other than the sealed identity's.
    let alice = &fixtures().alice;
    match seal_with(alice, PASSPHRASE, &header) {
        Ok(file) => {
            assert!(argon2_ok);
            assert_eq!(file.len(), FILE_LEN);
            assert_eq!(&file[..HEADER_LEN], &data[..HEADER_LEN]);
            assert_eq!(Header::parse(&file), Ok(header));
            let names_alice = header.identity_key == *alice.public().as_bytes() && header.noise_key == *alice.noise().public().as_bytes();
            match open(&file, PASSPHRASE) {
                Ok(back) => assert!(names_alice && back.public() == alice.public()),
                Err(e) => assert!(!names_alice && e == IdFileError::Inconsistent, "{e:?}"),
            }
        }
        Err(e) => assert!(!argon2_ok && e == IdFileError::BadKdfParams, "{e:?}"),
    }
});
