//! Exit codes. Scripts can tell a usage error from an unreachable node, a changed or
//! untrusted identity, and failed authentication.

use sotto::address::AddressError;
use sotto::idfile::IdFileError;
use sotto::profile::ProfileError;
use sotto::rendezvous::client::ClientError;
use sotto::rendezvous::proto::Refusal;
use sotto::username::InvalidUsername;

pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const UNREACHABLE: u8 = 3;
pub const UNTRUSTED: u8 = 4;
pub const AUTH: u8 = 5;
pub const REFUSED: u8 = 6;

pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<ClientError>() {
            return match e {
                ClientError::Resolve { .. } | ClientError::Unreachable(_) | ClientError::Connection(_) | ClientError::Timeout => {
                    UNREACHABLE
                }
                ClientError::PinMismatch(_) => UNTRUSTED,
                ClientError::Refused(Refusal::KeyChanged) => UNTRUSTED,
                ClientError::Refused(Refusal::InvalidCredentials | Refusal::BadProof) => AUTH,
                ClientError::Refused(_) => REFUSED,
                _ => FAILURE,
            };
        }
        if let Some(ProfileError::IdFile { source: IdFileError::WrongPassphrase, .. }) = cause.downcast_ref::<ProfileError>() {
            return AUTH;
        }
        if cause.downcast_ref::<UsageError>().is_some()
            || cause.downcast_ref::<InvalidUsername>().is_some()
            || cause.downcast_ref::<AddressError>().is_some()
        {
            return USAGE;
        }
        if cause.downcast_ref::<UntrustedError>().is_some() {
            return UNTRUSTED;
        }
    }
    FAILURE
}

/// A command used wrongly, found after parsing.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Something the node sent does not verify.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UntrustedError(pub String);
