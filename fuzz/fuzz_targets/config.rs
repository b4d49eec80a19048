//! The TOML config file (src/config.rs): unknown keys are refused, and a `server` value
//! is accepted only if it is a valid server address.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::address::ServerAddress;
use sotto::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text) {
        Ok(config) => {
            if let Some(server) = &config.server {
                assert!(server.parse::<ServerAddress>().is_ok(), "accepted server {server:?}");
            }
            assert_eq!(Config::parse(text).as_ref(), Ok(&config));
        }
        Err(message) => assert!(!message.is_empty()),
    }
});
