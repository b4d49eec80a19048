//! Server addresses `sotto://HOST:PORT#sha256:HEX` (src/address.rs), as typed by users,
//! read from the config file, and printed by nodes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::address::ServerAddress;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(address) = text.parse::<ServerAddress>() else { return };
    assert_ne!(address.port, 0);
    assert!(!address.host.is_empty() && address.host.len() <= 253);
    assert!(address.host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b)), "{:?}", address.host);
    // The printed form parses back to the same address, and printing is a fixed point.
    let shown = address.to_string();
    assert!(shown.starts_with("sotto://") && shown.ends_with(&hex::encode(address.cert_sha256)));
    let again: ServerAddress = shown.parse().unwrap_or_else(|e| panic!("{shown:?} does not parse: {e}"));
    assert_eq!(again, address);
    assert_eq!(again.to_string(), shown);
});
