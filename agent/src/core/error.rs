//! The agent's one error type. Services say what kind of failure an error is and what to do
//! about it; only `api/error.rs` turns a kind into an HTTP status.

use miren_disks::DiskError;

use crate::store::{DiskOp, StoreError};

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

/// The store says what it refused; this says it to the user, with what to do about it.
impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Sql(_) => Self::internal(err.to_string()),
            StoreError::NotFound { .. } => Self::not_found(err.to_string()),
            StoreError::DiskNameTaken { name, id } => Self::conflict(format!(
                "a disk named `{name}` already exists (id {id}); use it, pick another name, or delete it first"
            )),
            StoreError::Leased {
                disk,
                lease,
                op: DiskOp::Restore,
            } => Self::conflict(format!(
                "disk `{disk}` is in use by `{}` (since {}); stop the app that holds it, then restore",
                lease.holder, lease.acquired_at
            )),
            StoreError::Leased { disk, lease, .. } => Self::conflict(format!(
                "disk `{disk}` is leased by `{}` (since {}); stop the holder or run `miren debug disk lease-release -n {disk}` first",
                lease.holder, lease.acquired_at
            )),
            StoreError::WrongState {
                disk,
                status,
                op: DiskOp::Resize,
            } => Self::busy(format!(
                "disk `{disk}` is {status}; it can be resized once it is ready"
            )),
            StoreError::WrongState {
                disk,
                status,
                op: DiskOp::Lease,
            } => Self::busy(format!("disk {disk} is {status} and cannot be leased")),
            StoreError::WrongState { disk, status, .. } => Self::busy(format!(
                "disk `{disk}` is {status}; retry when that finishes"
            )),
            StoreError::Shrink {
                disk,
                size_gb,
                requested_gb,
            } => Self::invalid(format!(
                "disk `{disk}` is {size_gb} GiB; shrinking to {requested_gb} GiB is not supported (disks only grow). Back it up and restore into a new, smaller disk instead"
            )),
            StoreError::SandboxNameTaken { name, id } => Self::name_taken(format!(
                "a sandbox named `{name}` already exists ({id}); pick another name or delete it first"
            )),
            StoreError::OwnerTaken { owner, sandbox } => Self::conflict(format!(
                "{} already runs as sandbox `{sandbox}`; delete it first",
                owner.describe()
            )),
            StoreError::EndpointExists { owner, ip, app } => Self::conflict(format!(
                "owner `{owner}` already has an endpoint ({ip}, app {app}); delete it first or use another owner"
            )),
            StoreError::SubnetExhausted { subnet, in_use } => Self::new(
                ErrorKind::NoSpace,
                "subnet_exhausted",
                format!(
                    "no free address left in {subnet} ({in_use} in use); delete endpoints or start the agent with a larger --subnet"
                ),
            ),
        }
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

    fn lease(holder: &str) -> crate::store::LeaseRow {
        crate::store::LeaseRow {
            disk_id: "disk_1".into(),
            holder: holder.into(),
            acquired_at: "2026-01-01T00:00:00Z".into(),
            holder_pid: None,
            holder_start_time: None,
        }
    }

    /// The store says what it refused; the user reads the same words as before the store had
    /// its own error, with the same kind and code.
    #[test]
    fn store_refusals_become_the_messages_users_know() {
        use crate::core::status::DiskStatus;
        use crate::store::{DiskOp, Owner};

        let err = Error::from(StoreError::Leased {
            disk: "data".into(),
            lease: Box::new(lease("sbx_1")),
            op: DiskOp::Delete,
        });
        assert_eq!((err.kind, err.code), (ErrorKind::Conflict, "conflict"));
        assert_eq!(
            err.message,
            "disk `data` is leased by `sbx_1` (since 2026-01-01T00:00:00Z); stop the holder or run `miren debug disk lease-release -n data` first"
        );
        let err = Error::from(StoreError::Leased {
            disk: "data".into(),
            lease: Box::new(lease("sbx_1")),
            op: DiskOp::Restore,
        });
        assert_eq!(
            err.message,
            "disk `data` is in use by `sbx_1` (since 2026-01-01T00:00:00Z); stop the app that holds it, then restore"
        );

        let state = |op| {
            Error::from(StoreError::WrongState {
                disk: "data".into(),
                status: DiskStatus::Creating,
                op,
            })
        };
        for op in [DiskOp::Delete, DiskOp::Restore] {
            let err = state(op);
            assert_eq!((err.kind, err.code), (ErrorKind::Busy, "busy"));
            assert_eq!(
                err.message,
                "disk `data` is creating; retry when that finishes"
            );
        }
        assert_eq!(
            state(DiskOp::Resize).message,
            "disk `data` is creating; it can be resized once it is ready"
        );
        assert_eq!(
            state(DiskOp::Lease).message,
            "disk data is creating and cannot be leased"
        );

        let err = Error::from(StoreError::disk_not_found("disk_9"));
        assert!(err.is_not_found());
        assert_eq!(err.message, "disk disk_9 does not exist");

        let err = Error::from(StoreError::Shrink {
            disk: "data".into(),
            size_gb: 4,
            requested_gb: 2,
        });
        assert_eq!(err.kind, ErrorKind::Invalid);
        assert!(err.message.starts_with(
            "disk `data` is 4 GiB; shrinking to 2 GiB is not supported (disks only grow)"
        ));

        let err = Error::from(StoreError::DiskNameTaken {
            name: "Data".into(),
            id: "disk_1".into(),
        });
        assert_eq!((err.kind, err.code), (ErrorKind::Conflict, "conflict"));
        assert!(err
            .message
            .contains("a disk named `Data` already exists (id disk_1)"));

        let err = Error::from(StoreError::SandboxNameTaken {
            name: "web".into(),
            id: "sbx_1".into(),
        });
        assert!(err.is_name_taken());
        assert_eq!(err.code, "conflict");

        let err = Error::from(StoreError::OwnerTaken {
            owner: Owner::service("shop", "web"),
            sandbox: "shop-web".into(),
        });
        assert_eq!(err.kind, ErrorKind::Conflict);
        assert_eq!(
            err.message,
            "service `web` of app `shop` already runs as sandbox `shop-web`; delete it first"
        );

        let err = Error::from(StoreError::EndpointExists {
            owner: "sbx_1".into(),
            ip: std::net::Ipv4Addr::new(10, 0, 0, 2),
            app: "shop".into(),
        });
        assert!(err
            .message
            .contains("already has an endpoint (10.0.0.2, app shop)"));

        let err = Error::from(StoreError::SubnetExhausted {
            subnet: "10.0.0.0/30".into(),
            in_use: 2,
        });
        assert_eq!(
            (err.kind, err.code),
            (ErrorKind::NoSpace, "subnet_exhausted")
        );
        assert!(err
            .message
            .starts_with("no free address left in 10.0.0.0/30 (2 in use)"));

        let err = Error::from(StoreError::Sql(rusqlite::Error::InvalidQuery));
        assert_eq!((err.kind, err.code), (ErrorKind::Internal, "internal"));
        assert!(err.message.starts_with("state store: "), "{}", err.message);
    }
}
