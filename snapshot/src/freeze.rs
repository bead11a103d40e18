//! FIFREEZE / FITHAW on a mounted filesystem.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

// _IOWR('X', 119, int) and _IOWR('X', 120, int) from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// A frozen filesystem; thawed when dropped (errors on drop are ignored, use [`FreezeGuard::thaw`]
/// to see them).
#[derive(Debug)]
pub struct FreezeGuard {
    dir: Option<File>,
    path: PathBuf,
}

/// Freezes the filesystem mounted at `mount_path`: flushes it and blocks new writes until
/// thawed. Keep the guard only as long as the point-in-time copy takes.
///
/// Refuses paths that are not mount points and the root filesystem: FIFREEZE freezes whatever
/// filesystem holds the path, and freezing the node's own root would hang the agent.
pub fn freeze(mount_path: &Path) -> Result<FreezeGuard> {
    check_mount_point(mount_path)?;
    let dir = open_dir(mount_path)?;
    if let Err(e) = ioctl(&dir, FIFREEZE) {
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Err(Error::AlreadyFrozen {
                path: mount_path.to_path_buf(),
            });
        }
        return Err(Error::io(
            format!(
                "freeze {} (needs root and a filesystem that supports FIFREEZE)",
                mount_path.display()
            ),
            e,
        ));
    }
    Ok(FreezeGuard {
        dir: Some(dir),
        path: mount_path.to_path_buf(),
    })
}

impl FreezeGuard {
    /// Mount path this guard froze.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Thaws now and reports errors.
    pub fn thaw(mut self) -> Result<()> {
        match self.dir.take() {
            Some(dir) => ioctl(&dir, FITHAW)
                .map_err(|e| Error::io(format!("thaw {}", self.path.display()), e)),
            None => Ok(()),
        }
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            // Nothing useful to do on failure here; `thaw(path)` can be retried by the agent.
            let _ = ioctl(&dir, FITHAW);
        }
    }
}

/// Thaws `mount_path` if it is frozen. Returns `true` if it was frozen, `false` if it was not,
/// so the agent can call it unconditionally after a crash.
pub fn thaw(mount_path: &Path) -> Result<bool> {
    let dir = open_dir(mount_path)?;
    match ioctl(&dir, FITHAW) {
        Ok(()) => Ok(true),
        // The kernel answers EINVAL when the filesystem is not frozen.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(Error::io(format!("thaw {}", mount_path.display()), e)),
    }
}

fn check_mount_point(p: &Path) -> Result<()> {
    let stat =
        |q: &Path| std::fs::metadata(q).map_err(|e| Error::io(format!("stat {}", q.display()), e));
    let me = stat(p)?;
    let parent = stat(&p.join(".."))?;
    // Same device and inode as "..": this is "/" (of our mount namespace).
    if me.dev() == parent.dev() && me.ino() == parent.ino() {
        return Err(Error::InvalidInput(format!(
            "refusing to freeze {}: it is the root filesystem",
            p.display()
        )));
    }
    if me.dev() == parent.dev() {
        return Err(Error::InvalidInput(format!(
            "refusing to freeze {}: it is not a mount point (pass the disk's mount path)",
            p.display()
        )));
    }
    Ok(())
}

fn open_dir(p: &Path) -> Result<File> {
    File::open(p).map_err(|e| Error::io(format!("open mount point {}", p.display()), e))
}

fn ioctl(f: &File, req: libc::c_ulong) -> io::Result<()> {
    // SAFETY: FIFREEZE/FITHAW take an ignored int argument; the fd is valid.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
