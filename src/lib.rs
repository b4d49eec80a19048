//! sotto: an end-to-end encrypted messenger. Peers talk directly over QUIC inside
//! Noise sessions; a rendezvous node keeps accounts and signed presence records.

pub mod address;
pub mod clock;
pub mod idfile;
pub mod keys;
pub mod online;
pub mod presence;
pub mod profile;
pub mod rendezvous;
pub mod tls;
pub mod username;
pub mod wire;
