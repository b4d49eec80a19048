//! Exit codes: the library's [`ExitClass`] for every error a command can end with.

use sotto::address::AddressError;
use sotto::control::RpcError;
use sotto::exit::{client_error_class, send_error_class, ExitClass};
use sotto::idfile::IdFileError;
use sotto::peer::agent::SendError;
use sotto::profile::ProfileError;
use sotto::rendezvous::client::ClientError;
use sotto::username::InvalidUsername;

pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return client_error_class(e) as u8;
        }
        if let Some(e) = cause.downcast_ref::<SendError>() {
            return send_error_class(e) as u8;
        }
        if let Some(e) = cause.downcast_ref::<RpcError>() {
            return e.exit as u8;
        }
        if let Some(ProfileError::IdFile { source: IdFileError::WrongPassphrase, .. }) = cause.downcast_ref::<ProfileError>() {
            return ExitClass::Auth as u8;
        }
        if cause.downcast_ref::<UsageError>().is_some()
            || cause.downcast_ref::<InvalidUsername>().is_some()
            || cause.downcast_ref::<AddressError>().is_some()
            || cause.downcast_ref::<sotto::config::ConfigError>().is_some()
        {
            return ExitClass::Usage as u8;
        }
        if cause.downcast_ref::<UntrustedError>().is_some() {
            return ExitClass::Untrusted as u8;
        }
    }
    ExitClass::Failure as u8
}

/// A command used wrongly, found after parsing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Something the node sent does not verify.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UntrustedError(pub String);
