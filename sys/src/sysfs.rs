//! A sysfs mount made apart from any mount namespace (`fsopen`/`fsmount`), for a sandbox's
//! `/sys`. sysfs shows the network namespace of the thread that makes it (its
//! `/sys/class/net`), so it is made in the sandbox's namespace. Making one walks every
//! sysfs superblock on the host (one per network namespace with a `/sys`), which is why
//! the agent makes it ahead with the namespace instead of on a start's path.

use std::io;
use std::os::fd::OwnedFd;

use crate::fsmount::{detached, MountAttrs};

/// `f_type` of sysfs (linux/magic.h).
pub const SYSFS_MAGIC: i64 = 0x6265_6572;

/// A detached, read-only (and nosuid, nodev, noexec) sysfs of the calling thread's network
/// namespace. Attach it with `move_mount`, or clone it (`open_tree`) from another process
/// through `/proc/PID/fd/N`, which the kernel allows for detached mounts.
pub fn detached_sysfs() -> io::Result<OwnedFd> {
    detached(
        c"sysfs",
        MountAttrs::RDONLY | MountAttrs::NOSUID | MountAttrs::NODEV | MountAttrs::NOEXEC,
    )
}
