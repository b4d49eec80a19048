//! Exit classes shared by the command line and the control socket, so a command
//! answered by a running node exits exactly as one that did the work itself.

use crate::peer::agent::SendError;
use crate::rendezvous::client::ClientError;
use crate::rendezvous::proto::Refusal;

/// Process exit codes. README.md documents them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitClass {
    Failure = 1,
    Usage = 2,
    Unreachable = 3,
    Untrusted = 4,
    Auth = 5,
    Refused = 6,
}

impl ExitClass {
    pub fn from_code(code: u8) -> ExitClass {
        match code {
            2 => ExitClass::Usage,
            3 => ExitClass::Unreachable,
            4 => ExitClass::Untrusted,
            5 => ExitClass::Auth,
            6 => ExitClass::Refused,
            _ => ExitClass::Failure,
        }
    }
}

pub fn client_error_class(e: &ClientError) -> ExitClass {
    match e {
        ClientError::Resolve { .. } | ClientError::Unreachable(_) | ClientError::Connection(_) | ClientError::Timeout => {
            ExitClass::Unreachable
        }
        ClientError::PinMismatch(_) | ClientError::Refused(Refusal::KeyChanged) => ExitClass::Untrusted,
        ClientError::Refused(Refusal::InvalidCredentials | Refusal::BadProof) => ExitClass::Auth,
        ClientError::Refused(_) => ExitClass::Refused,
        _ => ExitClass::Failure,
    }
}

pub fn send_error_class(e: &SendError) -> ExitClass {
    match e {
        SendError::Empty | SendError::TooLong(_) | SendError::ToSelf | SendError::NoSuchUser(_) => ExitClass::Usage,
        SendError::Offline(_) | SendError::Unreachable { .. } => ExitClass::Unreachable,
        SendError::KeyChanged { .. } | SendError::Untrusted { .. } => ExitClass::Untrusted,
        SendError::Rendezvous(e) => client_error_class(e),
        _ => ExitClass::Failure,
    }
}
