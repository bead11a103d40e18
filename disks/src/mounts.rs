use std::fs;
use std::path::Path;

use miren_sys::unmount::WhenBusy;
use sys_mount::{Mount, MountFlags};

use crate::{DiskError, Filesystem};

/// One line of /proc/self/mountinfo, reduced to what reconciliation needs.
pub use miren_sys::mountinfo::MountEntry;

/// Mounts `device` at `target` (created if missing). `discard` lets deleted files give their
/// space back to the host, which is what keeps a thin-provisioned image thin over time.
pub fn mount(
    device: &Path,
    target: &Path,
    fs: Filesystem,
    read_only: bool,
) -> Result<(), DiskError> {
    fs::create_dir_all(target).map_err(|e| DiskError::io("creating mount point", target, e))?;
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let attempt = || {
        Mount::builder()
            .fstype(fs.as_str())
            .flags(flags)
            .data(fs.mount_options())
            .mount(device, target)
            .map(|_| ())
    };
    let mut result = attempt();
    // A btrfs copy (a restore) has its source's fsid. If udev's `btrfs device scan` registered
    // the new loop device before the mount, the kernel refuses it as a second device of the
    // mounted source (EEXIST); forgetting the unmounted registration lets the mount give the
    // copy a temporary fsid, as it does when nothing raced it.
    for _ in 0..3 {
        match &result {
            Err(e) if fs == Filesystem::Btrfs && e.raw_os_error() == Some(libc::EEXIST) => {
                let _ = std::process::Command::new("btrfs")
                    .args(["device", "scan", "--forget"])
                    .arg(device)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                std::thread::sleep(std::time::Duration::from_millis(50));
                result = attempt();
            }
            _ => break,
        }
    }
    result.map_err(|e| DiskError::io("mounting", target, e))
}

/// Switches an existing mount between read-only and read-write.
pub fn remount(target: &Path, fs: Filesystem, read_only: bool) -> Result<(), DiskError> {
    let mut flags = MountFlags::REMOUNT | MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    Mount::builder()
        .flags(flags)
        .data(fs.mount_options())
        .mount("", target)
        .map(|_| ())
        .map_err(|e| DiskError::io("remounting", target, e))
}

/// Unmounts `target`; a path that is not mounted (or gone) is fine. A busy disk is an error,
/// never detached: a detached mount keeps its filesystem and loop device alive, out of sight,
/// for as long as some process holds a file under it, and the disk would look free when it is not.
pub fn unmount(target: &Path) -> Result<(), DiskError> {
    match miren_sys::unmount::unmount(target, WhenBusy::Fail) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            Err(DiskError::MountBusy(target.to_path_buf()))
        }
        Err(e) => Err(DiskError::io("unmounting", target, e)),
    }
}

/// The mount at exactly `target`, if any (the topmost one when stacked).
pub fn mount_point_of(target: &Path) -> Result<Option<MountEntry>, DiskError> {
    Ok(read_mountinfo()?
        .into_iter()
        .rev()
        .find(|m| m.target == target))
}

/// Every mount at or below `dir`.
pub fn mounts_under(dir: &Path) -> Result<Vec<MountEntry>, DiskError> {
    Ok(read_mountinfo()?
        .into_iter()
        .filter(|m| m.target.starts_with(dir))
        .collect())
}

fn read_mountinfo() -> Result<Vec<MountEntry>, DiskError> {
    miren_sys::mountinfo::read_self()
        .map_err(|e| DiskError::io("reading", Path::new("/proc/self/mountinfo"), e))
}
