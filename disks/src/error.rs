use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{tool} is not installed: install the Debian package `{package}` (apt-get install {package})")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("{tool} failed on {target} (exit {status}): {stderr}")]
    ToolFailed {
        tool: String,
        target: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The filesystem is still in use (a process has a file or its working directory under
    /// it); nothing was unmounted.
    #[error("{0} is still in use: a process has files or its working directory under it; stop it (`fuser -vm {0}` names it) and retry")]
    MountBusy(PathBuf),
    #[error("no free loop device: {0}; load more with `modprobe loop max_loop=64` or free some with `losetup -d`")]
    NoFreeLoop(io::Error),
    /// The kernel refuses online ext4 growth without CAP_SYS_RESOURCE (some hosts drop it).
    #[error("the kernel refused to grow the mounted filesystem on {0} (online ext4 growth needs CAP_SYS_RESOURCE)")]
    OnlineGrowthDenied(PathBuf),
    /// A size beyond what the filesystem or the host can hold; nothing was changed.
    #[error("{requested} bytes is too large: {reason}")]
    TooLarge { requested: u64, reason: String },
    #[error("refusing to shrink {path} from {current} to {requested} bytes: disks only grow")]
    Shrink {
        path: PathBuf,
        current: u64,
        requested: u64,
    },
}

impl DiskError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DiskError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
