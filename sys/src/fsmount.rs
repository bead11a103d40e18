//! Mounts made apart from any mount namespace (`fsopen`, `fsconfig`, `fsmount`): a new
//! superblock reached only through the returned descriptor, gone when the last one closes.
//! Nothing is added to a mount table, so no other process sees it or pays for it.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// linux/mount.h
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;

/// `MOUNT_ATTR_*` flags of the detached mount (linux/mount.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountAttrs(libc::c_uint);

impl MountAttrs {
    pub const RDONLY: MountAttrs = MountAttrs(0x1);
    pub const NOSUID: MountAttrs = MountAttrs(0x2);
    pub const NODEV: MountAttrs = MountAttrs(0x4);
    pub const NOEXEC: MountAttrs = MountAttrs(0x8);
}

impl std::ops::BitOr for MountAttrs {
    type Output = MountAttrs;
    fn bitor(self, other: MountAttrs) -> MountAttrs {
        MountAttrs(self.0 | other.0)
    }
}

fn owned(rc: libc::c_long, what: impl FnOnce() -> String) -> io::Result<OwnedFd> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{}: {e}", what())));
    }
    // SAFETY: a descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// A new, detached mount of a file system of type `fstype` that takes no source and no
/// options (sysfs, proc, tmpfs), made as the calling thread sees the world (its network
/// namespace for sysfs and `/proc/sys/net`, its pid namespace for proc). Attach it with
/// `move_mount`, clone it (`open_tree`) from another process through `/proc/PID/fd/N`, or
/// use it in place with `openat`.
pub fn detached(fstype: &CStr, attrs: MountAttrs) -> io::Result<OwnedFd> {
    let name = || fstype.to_string_lossy().into_owned();
    // SAFETY: the name is NUL-terminated and outlives the call; fsopen returns a new
    // descriptor (or -1).
    let context = owned(
        unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), FSOPEN_CLOEXEC) },
        || format!("fsopen({})", name()),
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
        return Err(io::Error::new(
            e.kind(),
            format!("creating a {}: {e}", name()),
        ));
    }
    // SAFETY: the descriptor is ours and holds a created superblock; fsmount returns a new
    // descriptor for the detached mount (or -1).
    owned(
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                context.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attrs.0,
            )
        },
        || format!("fsmount({})", name()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_detached_proc_shows_the_callers_processes() {
        // Needs CAP_SYS_ADMIN; the tests run as root.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let proc = detached(
            c"proc",
            MountAttrs::NOSUID | MountAttrs::NODEV | MountAttrs::NOEXEC,
        )
        .expect("a detached proc");
        let me = format!("{}/stat", std::process::id());
        let fd = nix::fcntl::openat(
            &proc,
            me.as_str(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .expect("this process in it");
        drop(fd);
    }
}
