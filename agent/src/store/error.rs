//! What a store operation can refuse, as data: the caller decides what it means for the user
//! (`core/error.rs` writes the message and its hint). Nothing here knows HTTP or the CLI.

use std::fmt;

use crate::core::status::DiskStatus;
use crate::store::{LeaseRow, Owner};

/// The disk operation a refusal is about: the same state refuses a delete and a resize with
/// different advice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskOp {
    Delete,
    Resize,
    Lease,
    Restore,
}

impl fmt::Display for DiskOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskOp::Delete => "delete",
            DiskOp::Resize => "resize",
            DiskOp::Lease => "lease",
            DiskOp::Restore => "restore",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (I/O, corruption, an unknown stored status, ...).
    #[error("state store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The row the operation is about is not there; `key` is what the caller gave.
    #[error("{what} {key} does not exist")]
    NotFound { what: &'static str, key: String },
    /// A disk with this name (ignoring case) exists already.
    #[error("disk name `{name}` is taken by {id}")]
    DiskNameTaken { name: String, id: String },
    /// The disk is leased, so `op` may not touch it.
    #[error("disk `{disk}` is leased by `{}`; cannot {op}", lease.holder)]
    Leased {
        disk: String,
        lease: Box<LeaseRow>,
        op: DiskOp,
    },
    /// The disk's status does not allow `op` now. `disk` is its name (its id for a lease).
    #[error("disk `{disk}` is {status}; cannot {op}")]
    WrongState {
        disk: String,
        status: DiskStatus,
        op: DiskOp,
    },
    /// Disks only grow.
    #[error("disk `{disk}` is {size_gb} GiB; cannot shrink to {requested_gb} GiB")]
    Shrink {
        disk: String,
        size_gb: u64,
        requested_gb: u64,
    },
    /// A sandbox with this name exists already.
    #[error("sandbox name `{name}` is taken by {id}")]
    SandboxNameTaken { name: String, id: String },
    /// The owner already runs a sandbox (one per owner).
    #[error("{owner:?} already runs as sandbox `{sandbox}`")]
    OwnerTaken { owner: Owner, sandbox: String },
    /// The endpoint owner already has an endpoint.
    #[error("owner `{owner}` already has an endpoint ({ip})")]
    EndpointExists {
        owner: String,
        ip: std::net::Ipv4Addr,
        app: String,
    },
    /// Every address of the subnet is taken.
    #[error("no free address left in {subnet} ({in_use} in use)")]
    SubnetExhausted { subnet: String, in_use: usize },
}

impl StoreError {
    pub(crate) fn disk_not_found(id: &str) -> Self {
        StoreError::NotFound {
            what: "disk",
            key: id.to_string(),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
