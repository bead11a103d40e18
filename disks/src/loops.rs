use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use loopdev::{LoopControl, LoopDevice};

use crate::{DiskError, BLOCK_SIZE};

/// `LOOP_SET_BLOCK_SIZE` from `<linux/loop.h>`; loopdev-3 does not wrap it.
const LOOP_SET_BLOCK_SIZE: libc::c_ulong = 0x4C09;

/// A loop device as the kernel reports it in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    pub device: PathBuf,
    pub backing_file: PathBuf,
}

/// An attached loop device, held open by the caller. The device is attached with autoclear, so
/// the kernel detaches it as soon as the last user goes away: if the agent dies before the
/// filesystem is mounted, nothing stays attached. Once mounted, the mount keeps it alive.
pub struct AttachedLoop {
    device: LoopDevice,
    pub path: PathBuf,
    pub direct_io: bool,
}

impl AsRawFd for AttachedLoop {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.device.as_raw_fd()
    }
}

/// Attaches `image` to a free loop device with 4 KiB logical blocks and direct I/O where the
/// backing filesystem allows it.
pub fn attach(image: &Path) -> Result<AttachedLoop, DiskError> {
    let control = LoopControl::open().map_err(DiskError::NoFreeLoop)?;
    // Another process (a second agent, losetup) can grab the device between GET_FREE and SET_FD;
    // the kernel then answers EBUSY and we simply ask for the next free one.
    let mut last_error = None;
    for _ in 0..16 {
        let device = control.next_free().map_err(DiskError::NoFreeLoop)?;
        let path = device
            .path()
            .ok_or_else(|| DiskError::NoFreeLoop(io::Error::other("loop device has no path")))?;
        match device.with().autoclear(true).attach(image) {
            Ok(()) => {
                set_block_size(&device, &path)?;
                // Direct I/O avoids caching every block twice (in the loop and in the host's
                // page cache); not every backing filesystem supports it, and that is fine.
                let direct_io = device.set_direct_io(true).is_ok();
                return Ok(AttachedLoop {
                    device,
                    path,
                    direct_io,
                });
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_error = Some(e),
            Err(e) => return Err(DiskError::io("attaching loop device for", image, e)),
        }
    }
    Err(DiskError::NoFreeLoop(last_error.unwrap_or_else(|| {
        io::Error::other("every free loop device was taken")
    })))
}

fn set_block_size(device: &LoopDevice, path: &Path) -> Result<(), DiskError> {
    // SAFETY: the ioctl takes the block size by value and only reads it.
    let rc = unsafe {
        libc::ioctl(
            device.as_raw_fd(),
            LOOP_SET_BLOCK_SIZE as _,
            BLOCK_SIZE as libc::c_ulong,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        let _ = device.detach();
        return Err(DiskError::io("setting 4 KiB blocks on", path, err));
    }
    Ok(())
}

/// Detaches a loop device. A device that is no longer attached is fine; one that is still in
/// use is detached by the kernel once its last user closes it (autoclear).
pub fn detach(device: &Path) -> Result<(), DiskError> {
    let dev = match LoopDevice::open(device) {
        Ok(dev) => dev,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DiskError::io("opening", device, e)),
    };
    match dev.detach() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(()),
        Err(e) => Err(DiskError::io("detaching", device, e)),
    }
}

/// Tells the loop device its backing file grew (LOOP_SET_CAPACITY).
pub fn refresh_capacity(device: &Path) -> Result<(), DiskError> {
    LoopDevice::open(device)
        .and_then(|dev| dev.set_capacity())
        .map_err(|e| DiskError::io("refreshing capacity of", device, e))
}

/// Every attached loop device, read from sysfs.
pub fn all_loops() -> Result<Vec<LoopInfo>, DiskError> {
    let sys = Path::new("/sys/block");
    let entries = fs::read_dir(sys).map_err(|e| DiskError::io("listing", sys, e))?;
    let mut loops = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        // Only attached devices have a backing_file; races with detaches are harmless here.
        let Ok(raw) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = raw.trim_end_matches('\n');
        let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
        loops.push(LoopInfo {
            device: Path::new("/dev").join(name),
            backing_file: PathBuf::from(backing),
        });
    }
    loops.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(loops)
}

/// Loop devices whose backing file is `image`.
pub fn loops_backed_by(image: &Path) -> Result<Vec<LoopInfo>, DiskError> {
    Ok(all_loops()?
        .into_iter()
        .filter(|l| l.backing_file == image)
        .collect())
}

/// Loop devices whose backing file lives under `dir`: what one agent owns.
pub fn loops_under(dir: &Path) -> Result<Vec<LoopInfo>, DiskError> {
    Ok(all_loops()?
        .into_iter()
        .filter(|l| l.backing_file.starts_with(dir))
        .collect())
}
