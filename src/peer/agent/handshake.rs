//! Making sessions: dialling a peer from its verified presence record, and answering
//! a dialer (the Noise IK handshake, the dialer's identity checked against the pinned
//! contact or the rendezvous account, and the replay guard). SECURITY.md, "Peer
//! sessions", steps 2 to 4.

use super::*;
use crate::rendezvous::proto::AccountInfo;

fn next_timestamp(inner: &Inner) -> u64 {
    let now = unix_now_ns();
    let prev = inner.last_timestamp.fetch_max(now, Ordering::SeqCst);
    if prev >= now {
        inner.last_timestamp.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        now
    }
}

pub(super) async fn dial(inner: &Arc<Inner>, peer: &Username, record: &PresenceRecord) -> Result<SessionHandle, String> {
    let (config, mismatch) = tls::client_config(record.cert_sha256, ALPN).map_err(|e| e.to_string())?;
    // Message 1 needs nothing from the connection: it is made on a blocking thread (three
    // X25519 operations) while QUIC connects, which mostly waits on the network. The
    // record it uses was verified before this call; if the connection fails, it is
    // dropped unsent.
    let first = {
        let (identity, me, peer, key, ts) =
            (inner.identity.clone(), inner.config.username.clone(), peer.clone(), record.noise.noise_key, next_timestamp(inner));
        tokio::task::spawn_blocking(move || Dial::start(&identity, &me, &peer, &key, ts))
    };
    let mut last_error = "the presence record lists no address".to_string();
    let mut connection = None;
    for addr in &record.addrs {
        let connecting = match inner.endpoint.connect_with(config.clone(), *addr, "sotto-peer") {
            Ok(c) => c,
            Err(e) => {
                last_error = e.to_string();
                continue;
            }
        };
        match tokio::time::timeout(DIAL_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => {
                connection = Some(conn);
                break;
            }
            Ok(Err(_)) if mismatch.load(Ordering::SeqCst) => {
                last_error = format!("{addr} presented a certificate other than the one {peer} signed")
            }
            Ok(Err(e)) => last_error = format!("{addr}: {e}"),
            Err(_) => last_error = format!("{addr}: no answer"),
        }
    }
    let conn = connection.ok_or(last_error)?;
    let handshake = async {
        let (dial, preamble, msg1) = first.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        // Both frames in one write: one packet, one wake-up of the connection.
        write_frames(&mut send, &[&preamble, &msg1]).await?;
        let msg2 = read_frame(&mut recv, MAX_HANDSHAKE_MESSAGE).await?.ok_or("the peer closed the stream during the handshake")?;
        let transport = dial.finish(&msg2).map_err(|e| e.to_string())?;
        Ok::<_, String>((transport, send, recv))
    };
    let (transport, send, recv) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => {
            conn.close(1u32.into(), b"handshake failed");
            return Err(format!("handshake failed: {e}"));
        }
        Err(_) => {
            conn.close(1u32.into(), b"handshake timed out");
            return Err("handshake timed out".into());
        }
    };
    Ok(start_session(inner, peer.clone(), conn, transport, send, recv, true))
}

pub(super) async fn accept_loop(inner: Arc<Inner>) {
    use crate::rendezvous::limit::{Admission, ConnectionGate, ConnectionPolicy};
    // Tickets last until the Noise handshake is done, so `total` counts incoming
    // handshakes in progress (QUIC or Noise) and `handshakes` the QUIC part.
    let gate =
        ConnectionGate::new(ConnectionPolicy { per_source: MAX_HANDSHAKES_PER_ADDRESS, total: MAX_HANDSHAKES, handshakes: MAX_HANDSHAKES });
    while let Some(incoming) = inner.endpoint.accept().await {
        let remote = incoming.remote_address();
        let mut ticket = match gate.admit(remote.ip(), incoming.remote_address_validated()) {
            Admission::Accept(ticket) => ticket,
            Admission::Retry => {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Admission::Refuse(crowded) => {
                debug!(%remote, ?crowded, "too many handshakes in progress; refused");
                incoming.refuse();
                continue;
            }
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            if let Err(e) = accept(&inner, incoming, &mut ticket).await {
                info!(%remote, reason = %e, "refused a peer session");
            }
            drop(ticket);
        });
    }
}

async fn accept(inner: &Arc<Inner>, incoming: quinn::Incoming, ticket: &mut crate::rendezvous::limit::Ticket) -> Result<(), String> {
    let conn =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await.map_err(|_| "QUIC handshake timed out")?.map_err(|e| e.to_string())?;
    if ticket.handshake_done().is_err() {
        conn.close(1u32.into(), b"too many handshakes from this address");
        return Err("too many handshakes from this address".into());
    }
    if tls::negotiated_alpn(&conn).as_deref() != Some(ALPN) {
        conn.close(1u32.into(), b"wrong ALPN");
        return Err("wrong ALPN".into());
    }
    let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, answer(inner, &conn)).await.unwrap_or_else(|_| Err("handshake timed out".into()));
    match result {
        Ok((peer, transport, send, recv)) => {
            start_session(inner, peer, conn, transport, send, recv, false);
            Ok(())
        }
        Err(e) => {
            conn.close(1u32.into(), b"refused");
            Err(e)
        }
    }
}

type Accepted = (Username, Transport, quinn::SendStream, quinn::RecvStream);

async fn answer(inner: &Arc<Inner>, conn: &quinn::Connection) -> Result<Accepted, String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
    let preamble = read_frame(&mut recv, MAX_PREAMBLE).await?.ok_or("no preamble")?;
    let msg1 = read_frame(&mut recv, MAX_HANDSHAKE_MESSAGE).await?.ok_or("no handshake")?;
    let answer = Answer::read(&inner.identity, &inner.config.username, &preamble, &msg1).map_err(|e| e.to_string())?;
    let dialer = answer.dialer.clone();
    let presented = answer.hello.identity_key;
    let timestamp = answer.hello.timestamp;
    let binding = NoiseBinding { noise_key: answer.dialer_noise, signature: answer.hello.noise_binding };
    let pinned = inner.store.contact(&dialer).map_err(|e| e.to_string())?;
    if !pinned.as_ref().is_some_and(|c| c.identity_key.ct_eq(&presented)) {
        // Not pinned under this key: a first contact, a changed key, or a claim the node
        // does not back (anyone can claim a username). The rendezvous account is looked
        // up while message 2 goes out and the dialer finishes the handshake; the session
        // starts, and reads what the dialer sent, only once the account holds the key.
        // Every such dialer is answered alike, so the answer shows nobody whom we have
        // pinned. Only a key the account holds is pinned or raises a key-change warning
        // (SECURITY.md, step 4).
        let mut lookup = AbortOnDrop(tokio::spawn(look_up_dialer(inner.clone(), dialer.clone())));
        let (transport, msg2) = answer.accept(&presented, None, unix_now_ns()).map_err(|e: SessionError| e.to_string())?;
        write_frame(&mut send, &msg2).await?;
        let account = (&mut lookup.0).await.map_err(|e| e.to_string())??;
        vouch(&account, &dialer, &presented, &binding)?;
        check_trust(inner, &dialer, &presented, &binding, None).map_err(|e| e.to_string())?;
        record_handshake(inner, &dialer, &presented, &binding, timestamp)?;
        return Ok((dialer, transport, send, recv));
    }
    let last = pinned.and_then(|c| (c.last_handshake > 0).then_some(c.last_handshake));
    let (transport, msg2) = answer.accept(&presented, last, unix_now_ns()).map_err(|e: SessionError| e.to_string())?;
    record_handshake(inner, &dialer, &presented, &binding, timestamp)?;
    write_frame(&mut send, &msg2).await?;
    // Let the connection's driver, woken onto this worker, send message 2 before the
    // session is set up.
    tokio::task::yield_now().await;
    Ok((dialer, transport, send, recv))
}

/// Aborts the task when dropped (a refused handshake leaves no lookup running).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn look_up_dialer(inner: Arc<Inner>, dialer: Username) -> Result<AccountInfo, String> {
    let agent = Agent { inner };
    let lookup = agent.with_node(|node| {
        let dialer = dialer.clone();
        async move { node.lookup(&dialer).await }
    });
    lookup.await.map_err(|e| format!("cannot check {dialer} with the rendezvous node: {e}"))
}

/// The dialer's account must hold the key it presented, and have bound its Noise key.
/// `presented_binding` was verified under `presented` when message 1 was read: when the
/// account holds that key and that very binding, the binding is not verified again.
fn vouch(account: &AccountInfo, dialer: &Username, presented: &IdentityKey, presented_binding: &NoiseBinding) -> Result<(), String> {
    let holds_key = account.identity_key.ct_eq(presented);
    // The skip is sound only for the key the binding was verified under.
    let already_verified = holds_key && account.noise == *presented_binding;
    if !holds_key || !(already_verified || account.noise.verify(&account.identity_key).is_ok()) {
        return Err(format!("a dialer claimed to be {dialer} with a key that is not their account's"));
    }
    Ok(())
}

/// Records the initiation's timestamp atomically, so a replay (now or concurrently)
/// fails. It reaches the disk with the session's first flush (or the flusher's
/// linger), before anything in the session is acknowledged, so a replay after a restart
/// fails too. Only a crash before that flush forgets it; an initiation replayed then
/// gets a message 2 nobody can use (finishing the handshake takes the dialer's
/// ephemeral key), though its session replaces a live one with the dialer (SECURITY.md,
/// step 4). Not waiting for the disk here saves a flush on every first message.
fn record_handshake(
    inner: &Inner,
    dialer: &Username,
    presented: &IdentityKey,
    binding: &NoiseBinding,
    timestamp: u64,
) -> Result<(), String> {
    let mut refused = false;
    inner
        .store
        .update_contact(dialer, &mut |current| {
            let mut c = current?;
            refused = c.last_handshake >= timestamp || !c.identity_key.ct_eq(presented);
            if refused {
                return None;
            }
            c.last_handshake = timestamp;
            c.noise = *binding;
            c.last_seen = unix_now();
            Some(c)
        })
        .map_err(|e| e.to_string())?;
    if refused {
        return Err(SessionError::Replayed.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{IdentitySecret, NoiseSecret};
    use crate::presence::tests::identity;

    fn account(identity_key: IdentityKey, noise: NoiseBinding) -> AccountInfo {
        AccountInfo { username: Username::parse("carol").unwrap(), identity_key, noise, presence: None }
    }

    #[test]
    fn vouch_needs_the_presented_key_and_a_valid_binding() {
        let (carol, mallory) = (identity(3), identity(4));
        let dialer = Username::parse("carol").unwrap();
        let presented = carol.binding();
        // The account holds the key and the very binding the dialer presented.
        assert!(vouch(&account(carol.public(), presented), &dialer, &carol.public(), &presented).is_ok());
        // Another binding of the same key is checked, and a valid one passes.
        let rebound = Identity::new(IdentitySecret::from_seed(&[3; 32]), NoiseSecret::from_bytes(&[9; 32]));
        assert_ne!(rebound.binding(), presented);
        assert!(vouch(&account(carol.public(), rebound.binding()), &dialer, &carol.public(), &presented).is_ok());
        // A binding the account's key did not make is refused, and so is the presented
        // Noise key with another signature.
        assert!(vouch(&account(carol.public(), mallory.binding()), &dialer, &carol.public(), &presented).is_err());
        let mut resigned = presented;
        resigned.signature[0] ^= 1;
        assert!(vouch(&account(carol.public(), resigned), &dialer, &carol.public(), &presented).is_err());
        // An account holding another key is refused, whatever binding it holds.
        for noise in [presented, mallory.binding()] {
            assert!(vouch(&account(mallory.public(), noise), &dialer, &carol.public(), &presented).is_err());
        }
    }
}
