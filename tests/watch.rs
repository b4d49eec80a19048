//! Pushed presence: a signed-in client watches users and hears them come and go.

mod common;

use std::time::Duration;

use common::node_in_process;
use sotto::clock::unix_now;
use sotto::keys::Identity;
use sotto::presence::{PresenceRecord, SignedPresence, RECORD_VERSION};
use sotto::rendezvous::client::{ClientError, RendezvousClient, WatchEvent};
use sotto::rendezvous::proto::Refusal;
use sotto::username::Username;

fn name(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn record(id: &Identity, user: &str, seq: u64) -> SignedPresence {
    let now = unix_now();
    let rec = PresenceRecord {
        version: RECORD_VERSION,
        username: name(user),
        identity_key: id.public(),
        noise: id.binding(),
        addrs: vec![],
        cert_sha256: [0; 32],
        seq,
        issued_at: now,
        expires_at: now + 60,
    };
    SignedPresence::sign(&rec, id.secret())
}

#[tokio::test]
async fn watchers_hear_users_come_and_go() {
    let dir = tempfile::tempdir().unwrap();
    let server = node_in_process(dir.path()).await;

    let (alice, bob, carol) = (Identity::generate(), Identity::generate(), Identity::generate());
    let mut clients = Vec::new();
    for (id, user) in [(&alice, "alice"), (&bob, "bob"), (&carol, "carol")] {
        let c = RendezvousClient::connect(&server).await.unwrap();
        c.register(id, &name(user), "password123").await.unwrap();
        clients.push(c);
    }
    let [alice_c, bob_c, carol_c]: [RendezvousClient; 3] = clients.try_into().ok().unwrap();

    // Not signed in: refused.
    let anonymous = RendezvousClient::connect(&server).await.unwrap();
    assert!(matches!(anonymous.watch(&[name("bob")]).await.err(), Some(ClientError::Refused(Refusal::NotAuthenticated))));

    carol_c.publish(record(&carol, "carol", 1)).await.unwrap();
    let (online, mut watch) = alice_c.watch(&[name("bob"), name("carol")]).await.unwrap();
    assert_eq!(online, vec![name("carol")]);

    bob_c.publish(record(&bob, "bob", 1)).await.unwrap();
    assert_eq!(next(&mut watch).await, WatchEvent::Changed { username: name("bob"), online: true });
    // A republish is not a change; bob leaving is.
    bob_c.publish(record(&bob, "bob", 2)).await.unwrap();
    bob_c.close().await;
    assert_eq!(next(&mut watch).await, WatchEvent::Changed { username: name("bob"), online: false });
    carol_c.withdraw().await.unwrap();
    assert_eq!(next(&mut watch).await, WatchEvent::Changed { username: name("carol"), online: false });
}

async fn next(watch: &mut sotto::rendezvous::client::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("a change within seconds").unwrap()
}
