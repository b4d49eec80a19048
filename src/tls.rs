//! QUIC/TLS set-up: self-signed certificates (rcgen), the pinned-certificate verifier,
//! and the quinn endpoint configurations. rustls runs with the ring provider only.
//!
//! Nothing here trusts a certificate authority: a client accepts exactly the
//! certificate whose SHA-256 it was given, and still checks the TLS 1.3 handshake
//! signature made with that certificate's key.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Idle timeout of every sotto QUIC connection.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Keep-alive interval clients use so an idle but live connection never times out.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A certificate and its private key (PKCS#8 DER). The key is wiped when the `CertKey`
/// is dropped and never shown by `Debug`; the copies rustls and ring make from it are
/// theirs (SECURITY.md, "Secrets in memory").
pub struct CertKey {
    pub cert: CertificateDer<'static>,
    key: zeroize::Zeroizing<PrivatePkcs8KeyDer<'static>>,
}

impl std::fmt::Debug for CertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertKey(sha256:{})", hex::encode(self.sha256()))
    }
}

impl CertKey {
    /// Makes a fresh self-signed certificate for `name` (the name is informative only).
    pub fn generate(name: &str) -> Result<Self, rcgen::Error> {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
        let key = zeroize::Zeroizing::new(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        Ok(Self { cert: certified.cert.der().clone(), key })
    }

    /// Loads `cert.der` and `key.der` from `dir`, or makes and saves both (key mode
    /// 0600, created so). `dir` is created 0700, or narrowed to 0700 (its parent is
    /// checked private by the caller). Refuses a key readable by others and a directory
    /// holding only one half.
    pub fn load_or_create(dir: &Path, name: &str) -> io::Result<Self> {
        crate::profile::private_subdir(dir)?;
        let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let mode = fs::metadata(&key_path)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{} is readable by other users (mode {mode:o}); run `chmod 600 {}`",
                            key_path.display(),
                            key_path.display()
                        ),
                    ));
                }
                let cert = fs::read(&cert_path)?;
                let key = zeroize::Zeroizing::new(PrivatePkcs8KeyDer::from(fs::read(&key_path)?));
                Ok(Self { cert: CertificateDer::from(cert), key })
            }
            (false, false) => {
                let fresh = Self::generate(name).map_err(io::Error::other)?;
                // The key first: a crash in between leaves a key without a certificate,
                // which the next start reports instead of pairing it with a new key.
                write_new(&key_path, fresh.key.secret_pkcs8_der(), 0o600)?;
                write_new(&cert_path, fresh.cert.as_ref(), 0o644)?;
                Ok(fresh)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds only one of cert.der and key.der; restore the missing one, or remove both to make a new certificate",
                    dir.display()
                ),
            )),
        }
    }

    pub fn sha256(&self) -> [u8; 32] {
        cert_sha256(&self.cert)
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Writes a new file with `mode`, flushed to disk; refuses to replace an existing one.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

pub fn cert_sha256(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Bytes the other side may send on one stream ahead of what we have read (quinn's
/// default, enough for 100 Mbit/s at 100 ms).
const STREAM_WINDOW: u32 = 1_250_000;

fn transport_config(server: bool, max_bidi: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // The timeout is always below 2^62 µs, so the conversion cannot fail.
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout in range")));
    t.stream_receive_window(STREAM_WINDOW.into());
    // A peer session moves its data on one stream and rendezvous answers are small, so
    // one stream's window serves as the connection's: streams the other side opens and
    // we never read cannot make us buffer more (quinn's default is no connection limit).
    t.receive_window(STREAM_WINDOW.into());
    t.max_concurrent_bidi_streams(max_bidi.into());
    t.max_concurrent_uni_streams(0u32.into());
    if !server {
        t.keep_alive_interval(Some(KEEP_ALIVE));
    }
    t
}

fn transport(server: bool, max_bidi: u32) -> Arc<quinn::TransportConfig> {
    Arc::new(transport_config(server, max_bidi))
}

/// Server transport for small requests of at most `request` bytes each: a client may
/// have one whole request in flight per stream window and two in all per connection
/// before it must wait for the server to read; the server buffers at most
/// `max_bidi` answers of that size per connection for a client that does not take them.
/// quinn's defaults (1.25 MB per stream, unbounded per connection, 10 MB of send buffer)
/// suit bulk transfer, not a server holding thousands of connections.
pub fn request_transport(max_bidi: u32, request: u32) -> Arc<quinn::TransportConfig> {
    let mut t = transport_config(true, max_bidi);
    t.stream_receive_window(request.into());
    t.receive_window((2 * request).into());
    t.send_window(u64::from(max_bidi) * u64::from(request));
    Arc::new(t)
}

/// Server configuration for `alpn`, serving `cert`, with at most `max_bidi`
/// concurrent streams per connection.
pub fn server_config(cert: &CertKey, alpn: &[u8], max_bidi: u32) -> Result<quinn::ServerConfig, rustls::Error> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(cert, alpn)?).map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(true, max_bidi));
    Ok(config)
}

/// TLS 1.3 only, no early data, and no session resumption: no tickets are issued and
/// no session is kept (no client of ours would present one: each connection gets a
/// client configuration of its own, so every handshake is a full one, with the
/// certificate checked against its pin). A ticket would cost a handshake the work of
/// making and sending it, and keep a resumption secret in memory for nothing.
fn server_tls(cert: &CertKey, alpn: &[u8]) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.clone()], cert.key())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(tls)
}

/// Set when a server presented a certificate other than the pinned one.
pub type PinMismatch = Arc<AtomicBool>;

/// Client configuration that accepts only the certificate whose SHA-256 is `pin`.
pub fn client_config(pin: [u8; 32], alpn: &[u8]) -> Result<(quinn::ClientConfig, PinMismatch), rustls::Error> {
    let (tls, mismatch) = client_tls(pin, alpn)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(false, 16));
    Ok((config, mismatch))
}

/// TLS 1.3 only, the pinned certificate only, and no session resumption: every
/// handshake shows the certificate and checks it against the pin (a resumed one would
/// skip it), and no ticket is kept.
fn client_tls(pin: [u8; 32], alpn: &[u8]) -> Result<(rustls::ClientConfig, PinMismatch), rustls::Error> {
    let provider = provider();
    let mismatch = PinMismatch::default();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert { pin, provider, mismatch: mismatch.clone() }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok((tls, mismatch))
}

/// Accepts exactly one certificate, identified by its SHA-256.
#[derive(Debug)]
struct PinnedCert {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    mismatch: PinMismatch,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if bool::from(cert_sha256(end_entity).ct_eq(&self.pin)) {
            Ok(ServerCertVerified::assertion())
        } else {
            self.mismatch.store(true, Ordering::SeqCst);
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Derives 32 bytes bound to this TLS session (RFC 5705/8446 exporter), identical on
/// both ends of one connection and different on every other.
pub fn channel_binding(conn: &quinn::Connection, label: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, label, b"").ok()?;
    Some(out)
}

/// The ALPN protocol the connection agreed on, if any.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_is_made_once_and_half_pairs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = CertKey::load_or_create(dir.path(), "t").unwrap();
        assert_eq!(fs::metadata(dir.path().join("key.der")).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(CertKey::load_or_create(dir.path(), "t").unwrap().sha256(), first.sha256());
        fs::set_permissions(dir.path().join("key.der"), fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(CertKey::load_or_create(dir.path(), "t").unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        fs::remove_file(dir.path().join("cert.der")).unwrap();
        assert_eq!(CertKey::load_or_create(dir.path(), "t").unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    /// Runs a TLS handshake in memory, and everything either side sends after it (a
    /// session ticket comes then), until both have nothing left to send.
    fn converse(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        let mut wire = Vec::new();
        for _ in 0..16 {
            wire.clear();
            client.write_tls(&mut wire).unwrap();
            let to_server = wire.len();
            let mut from_client = &wire[..];
            while !from_client.is_empty() {
                server.read_tls(&mut from_client).unwrap();
                server.process_new_packets().unwrap();
            }
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            let mut from_server = &wire[..];
            while !from_server.is_empty() {
                client.read_tls(&mut from_server).unwrap();
                client.process_new_packets().unwrap();
            }
            if to_server == 0 && wire.is_empty() && !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
        panic!("the handshake did not settle");
    }

    /// The kind of each of `n` handshakes between one client and one server configuration.
    fn handshakes(client: rustls::ClientConfig, server: rustls::ServerConfig, n: usize) -> Vec<rustls::HandshakeKind> {
        let (client, server) = (Arc::new(client), Arc::new(server));
        (0..n)
            .map(|_| {
                let mut c = rustls::ClientConnection::new(client.clone(), ServerName::try_from("sotto-peer").unwrap()).unwrap();
                let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
                converse(&mut c, &mut s);
                assert_eq!(c.handshake_kind(), s.handshake_kind());
                c.handshake_kind().unwrap()
            })
            .collect()
    }

    #[test]
    fn every_connection_is_a_full_handshake_against_the_pin() {
        use rustls::HandshakeKind::Full;
        let cert = CertKey::generate("t").unwrap();
        // A client that would keep tickets, and a server that would issue them.
        let keeping = || {
            let mut tls = client_tls(cert.sha256(), b"t").unwrap().0;
            tls.resumption = rustls::client::Resumption::in_memory_sessions(8);
            tls
        };
        let issuing = || {
            let mut tls = server_tls(&cert, b"t").unwrap();
            tls.send_tls13_tickets = 2;
            tls.session_storage = rustls::server::ServerSessionMemoryCache::new(8);
            tls
        };
        // One client configuration for several connections, the most a ticket could need.
        let (client, mismatch) = client_tls(cert.sha256(), b"t").unwrap();
        assert_eq!(handshakes(client, server_tls(&cert, b"t").unwrap(), 3), [Full; 3]);
        assert!(!mismatch.load(Ordering::SeqCst));
        // Each side on its own: our server issues no ticket to a client that would keep
        // one, and our client keeps none from a server that issues them.
        assert_eq!(handshakes(keeping(), server_tls(&cert, b"t").unwrap(), 3), [Full; 3]);
        assert_eq!(handshakes(client_tls(cert.sha256(), b"t").unwrap().0, issuing(), 3), [Full; 3]);
        // Both at once resume, which shows the check above can see a resumption.
        assert_eq!(handshakes(keeping(), issuing(), 2)[1], rustls::HandshakeKind::Resumed);
        // The pin is what decides: another certificate is refused.
        let (other, mismatch) = client_tls([0; 32], b"t").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(other), ServerName::try_from("sotto-peer").unwrap()).unwrap();
        let mut s = rustls::ServerConnection::new(Arc::new(server_tls(&cert, b"t").unwrap())).unwrap();
        let mut wire = Vec::new();
        c.write_tls(&mut wire).unwrap();
        s.read_tls(&mut &wire[..]).unwrap();
        s.process_new_packets().unwrap();
        wire.clear();
        s.write_tls(&mut wire).unwrap();
        let (mut from_server, mut refused) = (&wire[..], false);
        while !from_server.is_empty() && !refused {
            c.read_tls(&mut from_server).unwrap();
            refused = c.process_new_packets().is_err();
        }
        assert!(refused && mismatch.load(Ordering::SeqCst));
    }
}
