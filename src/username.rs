//! Usernames: 3–32 characters of `[a-z0-9_-]` after lower-casing.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid username {shown:?}: use 3 to 32 characters from a-z, 0-9, '_' and '-'")]
pub struct InvalidUsername {
    shown: String,
}

/// A validated, lower-cased username.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Username(String);

impl Username {
    pub fn parse(input: &str) -> Result<Self, InvalidUsername> {
        let lower = input.to_ascii_lowercase();
        let ok = (3..=32).contains(&lower.len())
            && lower.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(lower))
        } else {
            // Never echo unbounded or control-laden input back.
            let shown: String = input.chars().take(40).filter(|c| !c.is_control()).collect();
            Err(InvalidUsername { shown })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Username {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        let name = Username::parse(&raw).map_err(serde::de::Error::custom)?;
        if name.0 != raw {
            return Err(serde::de::Error::custom("username is not in canonical form"));
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names_are_lower_cased() {
        assert_eq!(Username::parse("Alice_01").unwrap().as_str(), "alice_01");
        assert_eq!(Username::parse("a-b").unwrap().as_str(), "a-b");
        assert!(Username::parse(&"x".repeat(32)).is_ok());
    }

    #[test]
    fn invalid_names_are_refused() {
        for bad in ["", "ab", &"x".repeat(33), "al ice", "alice!", "ålice", "bob\n", "../x"] {
            assert!(Username::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wire_form_must_be_canonical() {
        let enc = postcard::to_stdvec("Alice").unwrap();
        assert!(postcard::from_bytes::<Username>(&enc).is_err());
        let enc = postcard::to_stdvec("alice").unwrap();
        assert_eq!(postcard::from_bytes::<Username>(&enc).unwrap().as_str(), "alice");
    }
}
