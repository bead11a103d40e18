//! Btrfs subvolumes with a size bound each (a quota group limit): many bounded directories on
//! one filesystem. A loop device and a filesystem per bound cost a superblock, a journal's
//! threads and a loop device lookup that every later one pays again; a subvolume is a tree
//! in the one filesystem. The calls are the kernel's btrfs ioctls on open directories, so
//! they work from any mount namespace the directory was opened in.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use crate::DiskError;

/// `struct btrfs_ioctl_vol_args`: a name under the directory the ioctl is made on.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; VOL_NAME_MAX + 1],
}
const VOL_NAME_MAX: usize = 4087;

/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}
const QUOTA_CTL_ENABLE: u64 = 1;

/// `struct btrfs_ioctl_qgroup_limit_args` (`qgroupid` 0: the subvolume the ioctl is made in).
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_referenced: u64,
    max_exclusive: u64,
    reserved_referenced: u64,
    reserved_exclusive: u64,
}
const QGROUP_LIMIT_MAX_REFERENCED: u64 = 1;

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
nix::ioctl_write_ptr!(ioc_subvol_create, BTRFS_IOCTL_MAGIC, 14, VolArgs);
nix::ioctl_write_ptr!(ioc_snap_destroy, BTRFS_IOCTL_MAGIC, 15, VolArgs);
nix::ioctl_readwrite!(ioc_quota_ctl, BTRFS_IOCTL_MAGIC, 40, QuotaCtlArgs);
// The kernel's header declares it _IOR, though it reads the struct.
nix::ioctl_read!(ioc_qgroup_limit, BTRFS_IOCTL_MAGIC, 43, QgroupLimitArgs);

/// A name the kernel takes as one entry of a directory: not empty, `.` or `..`, no `/`
/// or NUL, at most 4087 bytes.
fn vol_args(name: &str) -> Result<VolArgs, DiskError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > VOL_NAME_MAX
        || name.contains(['/', '\0'])
    {
        return Err(DiskError::io(
            "naming a subvolume",
            Path::new(name),
            io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    let mut args = VolArgs {
        fd: 0,
        name: [0; VOL_NAME_MAX + 1],
    };
    args.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(args)
}

fn errno_error(action: &'static str, path: &Path, e: nix::Error) -> DiskError {
    DiskError::io(action, path, io::Error::from_raw_os_error(e as i32))
}

/// Turns quota groups on for the btrfs filesystem whose root is `fs_root` (an open directory
/// in it); nothing changes if they are on already.
pub fn enable_quota(fs_root: &File, shown_as: &Path) -> Result<(), DiskError> {
    let mut args = QuotaCtlArgs {
        cmd: QUOTA_CTL_ENABLE,
        status: 0,
    };
    // SAFETY: `args` is a valid, writable btrfs_ioctl_quota_ctl_args for the call's duration;
    // the fd is an open directory we borrow.
    unsafe { ioc_quota_ctl(fs_root.as_fd().as_raw_fd(), &mut args) }
        .map(|_| ())
        .map_err(|e| errno_error("enabling quota groups on", shown_as, e))
}

/// Makes subvolume `name` in the directory `parent`; `Ok(false)` if an entry of that name
/// is there already (made by an earlier try: the caller decides whether it is one).
pub fn create_subvolume(parent: &File, name: &str, shown_as: &Path) -> Result<bool, DiskError> {
    let args = vol_args(name)?;
    // SAFETY: `args` is a valid btrfs_ioctl_vol_args (NUL-terminated name) that outlives the
    // call; the kernel only reads it.
    match unsafe { ioc_subvol_create(parent.as_fd().as_raw_fd(), &args) } {
        Ok(_) => Ok(true),
        Err(nix::Error::EEXIST) => Ok(false),
        Err(e) => Err(errno_error("creating subvolume", shown_as, e)),
    }
}

/// Deletes subvolume `name` in the directory `parent` with what is in it; fine if it is
/// not there. Its space comes back in the background (btrfs's cleaner), and with it its
/// quota group.
pub fn delete_subvolume(parent: &File, name: &str, shown_as: &Path) -> Result<(), DiskError> {
    let args = vol_args(name)?;
    // SAFETY: as in `create_subvolume`.
    match unsafe { ioc_snap_destroy(parent.as_fd().as_raw_fd(), &args) } {
        Ok(_) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(errno_error("deleting subvolume", shown_as, e)),
    }
}

/// Bounds what the subvolume `subvolume` (its open root directory) holds to `max_bytes`:
/// a write past it fails with EDQUOT ("Disk quota exceeded"). Setting it again replaces it.
pub fn limit_subvolume(subvolume: &File, max_bytes: u64, shown_as: &Path) -> Result<(), DiskError> {
    let mut args = QgroupLimitArgs {
        qgroupid: 0,
        flags: QGROUP_LIMIT_MAX_REFERENCED,
        max_referenced: max_bytes,
        max_exclusive: 0,
        reserved_referenced: 0,
        reserved_exclusive: 0,
    };
    // SAFETY: `args` is a valid btrfs_ioctl_qgroup_limit_args for the call's duration; the
    // fd is an open directory we borrow.
    unsafe { ioc_qgroup_limit(subvolume.as_fd().as_raw_fd(), &mut args) }
        .map(|_| ())
        .map_err(|e| errno_error("limiting subvolume", shown_as, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_one_entry_are_refused() {
        for bad in ["", ".", "..", "a/b", "a\0b", &"x".repeat(4088)] {
            assert!(vol_args(bad).is_err(), "{bad:?}");
        }
        assert!(vol_args(&"x".repeat(4087)).is_ok());
        assert!(vol_args(".spare-12").is_ok());
    }

    /// Unmounts (the loop device detaches itself) when the test ends, also on a failure.
    struct Mounted(std::path::PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    /// On a real btrfs: the bound holds (EDQUOT past it), and every call is safe to repeat.
    #[test]
    fn a_limited_subvolume_refuses_writes_past_its_bound() {
        use std::io::Write;
        let dir = tempfile::Builder::new()
            .prefix("mrtst-subvolumes")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        crate::create_sparse_image(&image, 1 << 30).unwrap();
        crate::make_filesystem(crate::Filesystem::Btrfs, &image).unwrap();
        let target = dir.path().join("mnt");
        let attached = crate::attach(&image).unwrap();
        crate::mount(&attached.path, &target, crate::Filesystem::Btrfs, false).unwrap();
        drop(attached);
        let _mounted = Mounted(target.clone());
        let root = File::open(&target).unwrap();
        enable_quota(&root, &target).unwrap();
        enable_quota(&root, &target).unwrap();
        assert!(create_subvolume(&root, "a", &target).unwrap());
        assert!(!create_subvolume(&root, "a", &target).unwrap());
        let sub = File::open(target.join("a")).unwrap();
        limit_subvolume(&sub, 4 << 20, &target).unwrap();
        limit_subvolume(&sub, 4 << 20, &target).unwrap();
        let mut file = File::create(target.join("a/fill")).unwrap();
        let chunk = vec![1u8; 1 << 20];
        let written = (0..8).try_for_each(|_| file.write_all(&chunk).and_then(|_| file.sync_all()));
        let err = written.expect_err("8 MiB fit in a 4 MiB bound");
        assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
        drop((file, sub));
        delete_subvolume(&root, "a", &target).unwrap();
        delete_subvolume(&root, "a", &target).unwrap();
        assert!(!target.join("a").exists());
    }
}
