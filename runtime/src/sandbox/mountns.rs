//! The supervisor's own mount namespace.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::OnceLock;

use nix::fcntl::{open, openat, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;

use super::control::is_mounted;
use super::SandboxError;

/// The host's root, opened before leaving its mount namespace: paths looked up from it cross
/// the host's mounts, including those made after we left.
static HOST_ROOT: OnceLock<OwnedFd> = OnceLock::new();

/// Moves this (single-threaded) supervisor into a mount namespace of its own, receiving the
/// host's mounts where propagation allows but never showing its own: the sandbox's overlay
/// root is mounted there, so the host's mount table does not grow by one long overlay line
/// per sandbox. Whatever reads mountinfo (libcgroups parses it once per controller for every
/// cgroup manager it makes) or copies the table (each container's mount namespace) paid for
/// every sandbox running. The overlay goes with the namespace once the supervisor and its
/// container are gone. Call once, before the overlay is mounted.
pub(crate) fn private_mount_namespace() -> Result<(), SandboxError> {
    let root = open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SandboxError::sys("open /", e))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::sys("unshare a mount namespace", e))?;
    // Slave: on a host whose mounts are shared, ours still never go back.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys("make mounts slave", e))?;
    let _ = HOST_ROOT.set(root);
    Ok(())
}

/// Shows here what the host has mounted at `path` since we left its namespace (the
/// endpoint's netns, which the agent bind-mounts while the supervisor prepares; this host's
/// root is private, so nothing propagates by itself). A no-op if it is already a mount here.
pub(crate) fn follow_host_mount(path: Option<&Path>) -> Result<(), SandboxError> {
    let (Some(path), Some(root)) = (path, HOST_ROOT.get()) else {
        return Ok(());
    };
    if is_mounted(path) {
        return Ok(());
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    let fail = |e| SandboxError::sys(format!("bind the host's {}", path.display()), e);
    let fd = openat(
        root,
        relative,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(
        Some(source.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(fail)
}
