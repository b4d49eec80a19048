//! Usernames (src/username.rs) from text, as the command line and the control socket
//! take them, and from postcard, as every message carries them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sotto::username::Username;
use sotto_fuzz::{assert_canonical, decode_heap_bound, peak_heap};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Username::parse(&text) {
        Ok(name) => {
            assert_canonical(&name);
            assert_eq!(name.as_str(), text.to_ascii_lowercase());
            let wire = postcard::to_stdvec(&name).expect("encodes");
            assert_eq!(postcard::from_bytes::<Username>(&wire).as_ref(), Ok(&name));
        }
        Err(e) => {
            // The error quotes at most 40 characters of the input, none of them control.
            let shown = e.to_string();
            assert!(shown.chars().count() <= 120 + 40 * 10, "{} characters", shown.chars().count());
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
        }
    }

    // On the wire only the canonical form is accepted.
    let (decoded, heap) = peak_heap(|| postcard::take_from_bytes::<Username>(data));
    assert!(heap <= decode_heap_bound(data.len()));
    if let Ok((name, _)) = decoded {
        assert_canonical(&name);
        let raw: String = postcard::take_from_bytes::<String>(data).expect("a username is a string").0;
        assert_eq!(raw, name.as_str());
    }
});
