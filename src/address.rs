//! The server address string: `sotto://HOST:PORT#sha256:HEX`.
//!
//! It carries the node's certificate fingerprint, so a client pins the node from the
//! one string it was given and trusts nothing else.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressError {
    #[error("a server address starts with sotto:// (for example sotto://127.0.0.1:7000#sha256:<64 hex digits>)")]
    Scheme,
    #[error("the server address has no #sha256:<fingerprint> part; copy the whole line the node printed")]
    MissingPin,
    #[error("the server address fingerprint must be 64 hex digits")]
    BadPin,
    #[error("the server address needs HOST:PORT")]
    BadHostPort,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerAddress {
    pub host: String,
    pub port: u16,
    pub cert_sha256: [u8; 32],
}

impl ServerAddress {
    pub fn new(addr: SocketAddr, cert_sha256: [u8; 32]) -> Self {
        Self { host: addr.ip().to_string(), port: addr.port(), cert_sha256 }
    }

    /// Resolves the host to socket addresses (an IP literal resolves without DNS).
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        Ok(tokio::net::lookup_host((host, self.port)).await?.collect())
    }
}

impl fmt::Display for ServerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') && !self.host.starts_with('[') {
            write!(f, "sotto://[{}]:{}#sha256:{}", self.host, self.port, hex::encode(self.cert_sha256))
        } else {
            write!(f, "sotto://{}:{}#sha256:{}", self.host, self.port, hex::encode(self.cert_sha256))
        }
    }
}

impl FromStr for ServerAddress {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, AddressError> {
        let rest = s.trim().strip_prefix("sotto://").ok_or(AddressError::Scheme)?;
        let (hostport, pin) = rest.split_once('#').ok_or(AddressError::MissingPin)?;
        let hex_pin = pin.strip_prefix("sha256:").ok_or(AddressError::MissingPin)?;
        let mut cert_sha256 = [0u8; 32];
        if hex_pin.len() != 64 {
            return Err(AddressError::BadPin);
        }
        hex::decode_to_slice(hex_pin, &mut cert_sha256).map_err(|_| AddressError::BadPin)?;
        let (host, port) = hostport.rsplit_once(':').ok_or(AddressError::BadHostPort)?;
        let port: u16 = port.parse().map_err(|_| AddressError::BadHostPort)?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let host_ok = !bare.is_empty() && bare.len() <= 253 && bare.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
        if !host_ok || port == 0 || (bare.contains(':') && !host.starts_with('[')) {
            return Err(AddressError::BadHostPort);
        }
        Ok(Self { host: bare.to_string(), port, cert_sha256 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a = ServerAddress::new("127.0.0.1:7000".parse().unwrap(), [0xab; 32]);
        let s = a.to_string();
        assert_eq!(s, format!("sotto://127.0.0.1:7000#sha256:{}", "ab".repeat(32)));
        assert_eq!(s.parse::<ServerAddress>(), Ok(a));
        let v6 = ServerAddress::new("[::1]:9".parse().unwrap(), [1; 32]);
        assert_eq!(v6.to_string().parse::<ServerAddress>(), Ok(v6));
    }

    #[test]
    fn malformed_addresses_say_why() {
        let pin = "00".repeat(32);
        assert_eq!("http://x:1#sha256:00".parse::<ServerAddress>(), Err(AddressError::Scheme));
        assert_eq!("sotto://x:1".parse::<ServerAddress>(), Err(AddressError::MissingPin));
        assert_eq!("sotto://x:1#sha256:abc".parse::<ServerAddress>(), Err(AddressError::BadPin));
        assert_eq!(format!("sotto://x#sha256:{pin}").parse::<ServerAddress>(), Err(AddressError::BadHostPort));
        assert_eq!(format!("sotto://x:0#sha256:{pin}").parse::<ServerAddress>(), Err(AddressError::BadHostPort));
        assert_eq!(format!("sotto://x/y:1#sha256:{pin}").parse::<ServerAddress>(), Err(AddressError::BadHostPort));
        assert_eq!(format!("sotto://::1:5#sha256:{pin}").parse::<ServerAddress>(), Err(AddressError::BadHostPort));
    }
}
