//! Direct peer sessions: the Noise_IK core ([`session`]) and its QUIC driver.

pub mod agent;
pub mod session;
