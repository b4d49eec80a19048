//! sotto: an end-to-end encrypted messenger. Peers talk directly over QUIC inside
//! Noise sessions; a rendezvous node keeps accounts and signed presence records.

pub mod keys;
pub mod wire;
pub mod idfile;
pub mod presence;
pub mod username;
pub mod address;
pub mod tls;
pub mod clock;
pub mod rendezvous;
pub mod online;
pub mod profile;
