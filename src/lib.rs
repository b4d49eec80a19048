//! sotto: an end-to-end encrypted messenger. Peers talk directly over QUIC inside
//! Noise sessions; a rendezvous node keeps accounts and signed presence records.

pub mod address;
pub mod app;
pub mod chat;
pub mod clock;
pub mod config;
pub mod control;
pub mod exit;
pub mod idfile;
pub mod keys;
pub mod online;
pub mod peer;
pub mod presence;
pub mod profile;
pub mod quic;
pub mod rendezvous;
pub mod store;
pub mod tls;
pub mod username;
pub mod wire;
