//! Staying online: authenticate to the node, publish a signed presence record,
//! republish before it expires, reconnect with backoff, withdraw on shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::watch;

use crate::address::ServerAddress;
use crate::clock::{unix_now, unix_now_ms};
use crate::keys::Identity;
use crate::presence::{PresenceRecord, SignedPresence, RECORD_VERSION};
use crate::rendezvous::client::{ClientError, RendezvousClient};
use crate::rendezvous::proto::Refusal;
use crate::username::Username;

/// What `stay_online` reports as it goes.
#[derive(Debug)]
pub enum Event {
    Online { observed: SocketAddr, expires_in: u64 },
    Republished { seq: u64 },
    Lost { reason: String, retry_in: Duration },
    Withdrawn,
}

/// What to publish and how often.
#[derive(Clone, Debug)]
pub struct Presence {
    pub server: ServerAddress,
    pub username: Username,
    pub addrs: Vec<SocketAddr>,
    pub cert_sha256: [u8; 32],
    /// Requested lifetime of each record, capped by the node's maximum.
    pub ttl: u64,
}

/// True for refusals that retrying cannot fix.
fn is_fatal(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::PinMismatch(_)
            | ClientError::WrongProtocol(_)
            | ClientError::Refused(
                Refusal::KeyChanged
                    | Refusal::InvalidCredentials
                    | Refusal::BadProof
                    | Refusal::BadRecord
                    | Refusal::TtlTooLong
                    | Refusal::ClockSkew
            )
    )
}

/// Runs until `shutdown` turns true (then withdraws and returns `Ok`) or a fatal error.
pub async fn stay_online(
    identity: &Identity,
    presence: &Presence,
    mut shutdown: watch::Receiver<bool>,
    on_event: impl Fn(Event),
) -> Result<(), ClientError> {
    let mut seq = 0u64;
    let mut backoff = Duration::from_millis(500);
    loop {
        match session(identity, presence, &mut seq, &mut shutdown, &on_event, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => {
                on_event(Event::Lost { reason: e.to_string(), retry_in: backoff });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One connection's life: sign in, publish, republish; `Ok` only on shutdown.
async fn session(
    identity: &Identity,
    presence: &Presence,
    seq: &mut u64,
    shutdown: &mut watch::Receiver<bool>,
    on_event: &impl Fn(Event),
    backoff: &mut Duration,
) -> Result<(), ClientError> {
    let client = RendezvousClient::connect(&presence.server).await?;
    client.authenticate(identity, &presence.username).await?;
    let ttl = presence.ttl.min(client.max_ttl).max(10);
    let mut first = true;
    loop {
        *seq = (*seq + 1).max(unix_now_ms());
        let now = unix_now();
        let record = PresenceRecord {
            version: RECORD_VERSION,
            username: presence.username.clone(),
            identity_key: identity.public(),
            noise: identity.binding(),
            addrs: presence.addrs.clone(),
            cert_sha256: presence.cert_sha256,
            seq: *seq,
            issued_at: now,
            expires_at: now + ttl,
        };
        let observed = client.publish(SignedPresence::sign(&record, identity.secret())).await?;
        if first {
            on_event(Event::Online { observed, expires_in: ttl });
            *backoff = Duration::from_millis(500);
            first = false;
        } else {
            on_event(Event::Republished { seq: *seq });
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(ttl / 3)) => {}
            reason = client.closed() => return Err(ClientError::Connection(reason)),
            _ = shutdown.changed() => {
                let _ = client.withdraw().await;
                client.close().await;
                on_event(Event::Withdrawn);
                return Ok(());
            }
        }
    }
}
