//! Sandboxes: OCI containers run in-process with youki's libcontainer, one small
//! single-threaded supervisor process per sandbox. See docs/sandbox.md.
//!
//! The agent writes a [`SandboxSpec`] with [`create`], starts `miren supervise
//! --state-dir DIR` (which calls [`supervise`]) via [`launch`], and later uses
//! [`status`], [`stop`], [`delete`] and [`exec`]; all of them work from the state dir
//! alone, so they also work after an agent restart.

mod cgroup;
mod control;
mod exec;
mod factory;
mod layer;
mod logs;
mod mountns;
mod oci;
mod spare;
mod spec;
mod status;
mod supervisor;

pub use cgroup::{
    prepare_parent as prepare_cgroup_parent, prime_migrations as prime_cgroup_migrations,
};
pub use control::{
    create, delete, launch, needs_relaunch, relaunch, spawn, spawn_spare, status, stop, wait,
    Launch, Spare,
};
pub use exec::{exec, ExecOutput, EXEC_OUTPUT_LIMIT};
pub use factory::{run as run_spare_factory, SpareFactory};
pub use layer::{
    remove_stale_layers, LAYERS_DIR, LAYERS_IMAGE, LAYER_DIR, LAYER_IMAGE, SPARE_LAYERS_DIR,
};
pub use mountns::{prepare_private_roots, MountTemplate};
pub use oci::{DEFAULT_CAPS, DENIED_SYSCALLS};
pub use spare::supervise_spare;
pub use spec::{
    merge_env, Backoff, LogConfig, Mount, Resources, RestartPolicy, SandboxSpec, User,
    DEFAULT_WRITABLE_BYTES, MAX_WRITABLE_BYTES, MIN_WRITABLE_BYTES,
};
pub use status::{State, Status};
pub use supervisor::supervise;

/// Files and directories inside a sandbox's state dir.
pub const SPEC_FILE: &str = "spec.json";
pub const STATUS_FILE: &str = "status.json";
pub const PID_FILE: &str = "supervisor.pid";
pub const SUPERVISOR_LOG: &str = "supervisor.log";
pub const STDOUT_LOG: &str = "stdout.log";
pub const STDERR_LOG: &str = "stderr.log";
pub const STOP_FILE: &str = "stop.json";
pub const HOSTS_FILE: &str = "hosts";
pub const RESOLV_FILE: &str = "resolv.conf";
pub const ROOTFS_DIR: &str = "rootfs";
pub const UPPER_DIR: &str = "upper";
pub const WORK_DIR: &str = "work";
pub const BUNDLE_DIR: &str = "bundle";
pub const YOUKI_DIR: &str = "youki";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox spec: {0}")]
    InvalidSpec(String),
    #[error("corrupt sandbox state: {0}")]
    Corrupt(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },
    #[error("libcontainer: {0}")]
    Container(#[from] Box<libcontainer::error::LibcontainerError>),
    #[error("sandbox did not start: {0}")]
    StartFailed(String),
    /// Making, mounting, bounding or deleting a writable layer (start and delete alike).
    #[error("writable layer: {0}")]
    Layer(#[source] miren_disks::DiskError),
    #[error("no status yet in {0}")]
    NoStatus(String),
    #[error("sandbox is not running")]
    NotRunning,
    #[error("timed out: {0}")]
    Timeout(String),
}

impl SandboxError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }
    pub(crate) fn sys(context: impl Into<String>, source: nix::Error) -> Self {
        SandboxError::Sys {
            context: context.into(),
            source,
        }
    }
}

impl From<libcontainer::error::LibcontainerError> for SandboxError {
    fn from(e: libcontainer::error::LibcontainerError) -> Self {
        SandboxError::Container(Box::new(e))
    }
}

pub(crate) fn read_spec(state_dir: &std::path::Path) -> Result<SandboxSpec, SandboxError> {
    let path = state_dir.join(SPEC_FILE);
    let data = std::fs::read(&path)
        .map_err(|e| SandboxError::io(format!("read {}", path.display()), e))?;
    serde_json::from_slice(&data)
        .map_err(|e| SandboxError::Corrupt(format!("{}: {e}", path.display())))
}
