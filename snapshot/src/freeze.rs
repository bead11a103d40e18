//! FIFREEZE / FITHAW on a mounted filesystem.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

/// The longest any freeze is held, whatever happens to the process that asked for it.
pub const MAX_FREEZE: Duration = Duration::from_secs(600);

/// The bound for a freeze that copies `bytes` aside: 30 s, plus one second per 128 MiB (a
/// copy without reflinks runs at 0.5-1 GB/s here, so that is a 4-8x margin), at most
/// [`MAX_FREEZE`]. A small disk's freeze is never held long; a large one can still finish.
pub fn freeze_bound(bytes: u64) -> Duration {
    let secs = 30 + bytes / (128 << 20);
    Duration::from_secs(secs).min(MAX_FREEZE)
}

/// Why a held freeze ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldEnd {
    /// The parent wrote to the control pipe: its copy is done.
    Released,
    /// The control pipe reached EOF: the parent died (or dropped the pipe) mid-freeze.
    ParentGone,
    /// `max` passed first; the parent's copy is not point-in-time and must be discarded.
    TimedOut,
}

impl HoldEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldEnd::Released => "released",
            HoldEnd::ParentGone => "parent-gone",
            HoldEnd::TimedOut => "timeout",
        }
    }
}

/// The body of the small helper process that holds a backup's freeze, so that the thaw never
/// depends on the agent surviving: freezes `mount_path`, writes `frozen` to `report`, then
/// thaws as soon as `control` (the read end of a pipe from the agent) becomes readable, with
/// data or with EOF because the agent died, or after `max` (at most [`MAX_FREEZE`]). Writes
/// `thawed <how>` and returns how it ended.
pub fn hold_freeze(
    mount_path: &Path,
    max: Duration,
    control: &impl AsRawFd,
    report: &mut impl Write,
) -> Result<HoldEnd> {
    let max = max.min(MAX_FREEZE);
    let guard = freeze(mount_path)?;
    let started = Instant::now();
    let reported = writeln!(report, "frozen").and_then(|()| report.flush());
    let end = if reported.is_err() {
        // Nobody is listening: the parent is gone.
        HoldEnd::ParentGone
    } else {
        wait_for_release(control, started + max)
    };
    guard.thaw()?;
    let _ = writeln!(report, "thawed {}", end.as_str()).and_then(|()| report.flush());
    Ok(end)
}

fn wait_for_release(control: &impl AsRawFd, deadline: Instant) -> HoldEnd {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return HoldEnd::TimedOut;
        }
        let mut pfd = libc::pollfd {
            fd: control.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd that lives across the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // poll itself failing leaves no way to hear the parent: do not hold on.
            return HoldEnd::ParentGone;
        }
        if r == 0 {
            continue;
        }
        let mut byte = [0u8; 1];
        // SAFETY: reads at most one byte into a live buffer from a valid fd.
        let n = unsafe { libc::read(control.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        return if n > 0 {
            HoldEnd::Released
        } else {
            HoldEnd::ParentGone
        };
    }
}
