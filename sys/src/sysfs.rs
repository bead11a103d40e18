//! A sysfs mount made apart from any mount namespace (`fsopen`/`fsmount`), for a sandbox's
//! `/sys`. sysfs shows the network namespace of the thread that makes it (its
//! `/sys/class/net`), so it is made in the sandbox's namespace. Making one walks every
//! sysfs superblock on the host (one per network namespace with a `/sys`), which is why
//! the agent makes it ahead with the namespace instead of on a start's path.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `f_type` of sysfs (linux/magic.h).
pub const SYSFS_MAGIC: i64 = 0x6265_6572;

// linux/mount.h
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

fn owned(rc: libc::c_long, what: &str) -> io::Result<OwnedFd> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// A detached, read-only (and nosuid, nodev, noexec) sysfs of the calling thread's network
/// namespace. Attach it with `move_mount`, or clone it (`open_tree`) from another process
/// through `/proc/PID/fd/N`, which the kernel allows for detached mounts.
pub fn detached_sysfs() -> io::Result<OwnedFd> {
    // SAFETY: the name is NUL-terminated and outlives the call; fsopen returns a new
    // descriptor (or -1).
    let context = owned(
        unsafe { libc::syscall(libc::SYS_fsopen, c"sysfs".as_ptr(), FSOPEN_CLOEXEC) },
        "fsopen(sysfs)",
    )?;
    // SAFETY: the descriptor is ours and open; this command takes no key or value.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            context.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("creating a sysfs: {e}")));
    }
    let attrs = MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC;
    // SAFETY: the descriptor is ours and holds a created superblock; fsmount returns a new
    // descriptor for the detached mount (or -1).
    owned(
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                context.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attrs,
            )
        },
        "fsmount(sysfs)",
    )
}
