//! The agent's one error type. Services say what kind of failure an error is and what to do
//! about it; only `api/error.rs` turns a kind into an HTTP status.

use miren_disks::DiskError;

/// What kind of failure an error is: for the services that decide what to do next (a lookup
/// that found nothing, a name someone else took), and for the API's status mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong; retrying it unchanged fails the same way.
    Invalid,
    NotFound,
    /// The request conflicts with what exists (a lease, an existing name, a state).
    Conflict,
    /// A conflict because the name asked for is in use (a retry under another name may work).
    NameTaken,
    /// Another operation is under way; retrying later may work.
    Busy,
    /// Not allowed for this caller.
    Forbidden,
    /// Something did not happen in the time given.
    Timeout,
    /// The node is out of a resource it allocates (disk space, addresses).
    NoSpace,
    /// The node cannot take this now (no loop device, too many concurrent operations).
    Unavailable,
    /// A server we depend on (a registry) failed or sent something wrong.
    Upstream,
    /// The request was well formed but what it describes cannot run (a sandbox that exits
    /// before it starts).
    Unprocessable,
    Internal,
}

/// An error with the message for the person at the CLI: what went wrong and what to do. `code`
/// is the stable machine-readable name clients match on (`not_found`, `busy`, `registry`, ...).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with a code of its own (clients match on it), of the given kind.
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Error {
            kind,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, "invalid_argument", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, "conflict", message)
    }
    /// A conflict on a name: the same code as [`Error::conflict`].
    pub fn name_taken(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NameTaken, "conflict", message)
    }
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, "busy", message)
    }
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, "timeout", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, "internal", message)
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
    /// Any conflict, a taken name included.
    pub fn is_conflict(&self) -> bool {
        matches!(self.kind, ErrorKind::Conflict | ErrorKind::NameTaken)
    }
    pub fn is_name_taken(&self) -> bool {
        self.kind == ErrorKind::NameTaken
    }

    /// The same error (kind and code) with its message put in context.
    pub fn with_context(self, context: impl std::fmt::Display) -> Self {
        Error {
            message: format!("{context}: {}", self.message),
            ..self
        }
    }
}

impl From<DiskError> for Error {
    fn from(err: DiskError) -> Self {
        match err {
            DiskError::MissingTool { .. } => {
                Self::new(ErrorKind::Internal, "missing_tool", err.to_string())
            }
            DiskError::Shrink { .. } | DiskError::TooLarge { .. } => Self::invalid(err.to_string()),
            DiskError::MountBusy(_) => Self::busy(err.to_string()),
            DiskError::NoFreeLoop(_) => {
                Self::new(ErrorKind::Unavailable, "no_loop_device", err.to_string())
            }
            _ => Self::internal(err.to_string()),
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(err: rusqlite::Error) -> Self {
        Self::internal(format!("state store: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_answer_the_questions_services_ask() {
        assert!(Error::not_found("x").is_not_found());
        assert!(!Error::conflict("x").is_not_found());
        assert!(Error::conflict("x").is_conflict());
        assert!(!Error::conflict("x").is_name_taken());
        let taken = Error::name_taken("a sandbox named `x` already exists");
        assert!(taken.is_conflict() && taken.is_name_taken());
        // Clients see a taken name as any other conflict.
        assert_eq!(taken.code, "conflict");
        // A code that merely looks like one is not that kind.
        assert!(!Error::new(ErrorKind::Upstream, "not_found", "x").is_not_found());
        assert!(!Error::busy("x").is_conflict());
    }

    #[test]
    fn context_keeps_kind_and_code() {
        let err = Error::name_taken("taken").with_context("service `web`");
        assert!(err.is_name_taken());
        assert_eq!(err.code, "conflict");
        assert_eq!(err.message, "service `web`: taken");
    }
}
