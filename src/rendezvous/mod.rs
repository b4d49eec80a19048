//! The rendezvous node and its client: accounts, identity proofs, signed presence.

pub mod accounts;
pub mod auth;
pub mod client;
pub mod directory;
pub mod limit;
pub mod node;
pub mod proto;
