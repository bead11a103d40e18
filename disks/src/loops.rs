use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use loopdev::{LoopControl, LoopDevice};

use crate::{DiskError, BLOCK_SIZE};

/// `LOOP_CONFIGURE` from `<linux/loop.h>` (Linux 5.8+); loopdev-3 does not wrap it.
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

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

/// Attaches `image` to a free loop device with 4 KiB logical blocks, autoclear, and direct I/O
/// where the backing filesystem allows it, all in one LOOP_CONFIGURE: each separate loop ioctl
/// freezes the device's queue (an RCU grace period, ~15 ms here), and that is most of the cost
/// of making a disk.
pub fn attach(image: &Path) -> Result<AttachedLoop, DiskError> {
    let backing = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| DiskError::io("opening image", image, e))?;
    let control = LoopControl::open().map_err(DiskError::NoFreeLoop)?;
    // Another process (a second agent, losetup) can grab the device between GET_FREE and
    // CONFIGURE; the kernel then answers EBUSY and we ask for the next free one.
    let mut last_error = None;
    for _ in 0..16 {
        let device = control.next_free().map_err(DiskError::NoFreeLoop)?;
        let path = device
            .path()
            .ok_or_else(|| DiskError::NoFreeLoop(io::Error::other("loop device has no path")))?;
        let mut result = configure(&device, &backing, LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO);
        let mut direct_io = true;
        if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            // The backing filesystem cannot do direct I/O at this block size: go buffered.
            direct_io = false;
            result = configure(&device, &backing, LO_FLAGS_AUTOCLEAR);
        }
        match result {
            Ok(()) => {
                return Ok(AttachedLoop {
                    device,
                    path,
                    direct_io,
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last_error = Some(e),
            Err(e) => return Err(DiskError::io("attaching loop device for", image, e)),
        }
    }
    Err(DiskError::NoFreeLoop(last_error.unwrap_or_else(|| {
        io::Error::other("every free loop device was taken")
    })))
}

fn configure(device: &LoopDevice, backing: &fs::File, flags: u32) -> io::Result<()> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        block_size: BLOCK_SIZE,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: `config` is a fully initialised `struct loop_config` that outlives the call; the
    // kernel only reads it.
    let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
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
