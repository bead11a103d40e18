//! The one unmount primitive. Callers differ on purpose in what a busy mount means, so the
//! policy is an argument and each caller states its reason where it picks one.

use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{umount2, MntFlags};

/// What to do when the kernel refuses a plain unmount because the mount is in use (`EBUSY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Report `EBUSY`. For data the caller must not lose track of (a disk): a detached mount
    /// would keep its filesystem and loop device alive, invisibly, for as long as a process
    /// holds a file under it.
    Fail,
    /// Detach it (`MNT_DETACH`): it vanishes from the tree now and goes away when its last user
    /// does. For mounts whose users are already being torn down (a sandbox's rootfs).
    Detach,
    /// Detach without trying a plain unmount first. For mounts with no filesystem to flush
    /// (an nsfs bind mount that pins a network namespace).
    DetachAlways,
}

/// What one [`unmount`] call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// A mount at the path was removed (or detached).
    Removed,
    /// Nothing was mounted at the path, or the path does not exist.
    NotMounted,
}

/// Unmounts the topmost mount at `target` following `when_busy`. A path that is not a mount
/// point, or is gone, is not an error: unmounting is idempotent.
pub fn unmount(target: &Path, when_busy: WhenBusy) -> io::Result<Unmounted> {
    let first = if when_busy == WhenBusy::DetachAlways {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    let result = match umount2(target, first) {
        Err(Errno::EBUSY) if when_busy == WhenBusy::Detach => umount2(target, MntFlags::MNT_DETACH),
        other => other,
    };
    match result {
        Ok(()) => Ok(Unmounted::Removed),
        Err(Errno::EINVAL | Errno::ENOENT) => Ok(Unmounted::NotMounted),
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_is_not_mounted_is_fine() {
        let missing = Path::new("/nonexistent/mrtst-sys-unmount");
        for policy in [WhenBusy::Fail, WhenBusy::Detach, WhenBusy::DetachAlways] {
            match unmount(missing, policy) {
                Ok(found) => assert_eq!(found, Unmounted::NotMounted),
                // Without CAP_SYS_ADMIN the kernel answers EPERM before it looks at the path.
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
            }
        }
    }
}
