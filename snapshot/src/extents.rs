//! Allocated-extent walking (SEEK_DATA / SEEK_HOLE) and point-in-time extent copies.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Data extents `(offset, len)` of `file`, ascending, clipped to `size`.
pub(crate) fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        let start = match lseek(fd, pos, libc::SEEK_DATA) {
            Ok(s) => s,
            // ENXIO: no data at or after pos.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if start >= size {
            break;
        }
        let end = lseek(fd, start, libc::SEEK_HOLE)?.min(size);
        if end <= start {
            // Cannot happen on a sane filesystem; avoid looping forever if it does.
            return Err(io::Error::other("SEEK_HOLE went backwards"));
        }
        out.push((start, end - start));
        pos = end;
    }
    Ok(out)
}

fn lseek(fd: i32, pos: u64, whence: i32) -> io::Result<u64> {
    let off = i64::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: plain syscall on a valid fd owned by the caller.
    let r = unsafe { libc::lseek(fd, off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Copies only the allocated extents of `src` into a new sparse file `dst` (which must not
/// exist) of the same size, with `copy_file_range` (a reflink on xfs/btrfs, an in-kernel copy
/// on ext4). Meant to run while the disk's filesystem is frozen: the freeze lasts as long as
/// copying the data, and compression runs afterwards from `dst`.
///
/// Returns the number of bytes copied. On error `dst` may exist partly written; the caller
/// deletes it.
pub fn capture_extents(src: &Path, dst: &Path) -> Result<u64> {
    let dfile = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| {
            Error::io(
                format!("create {} (it must not exist yet)", dst.display()),
                e,
            )
        })?;
    capture_extents_into(src, &dfile, &dst.display().to_string())
}

/// Like [`capture_extents`], into `dst`, an empty file open for writing (for example a
/// [`memory_file`]); `what` names it in errors.
pub fn capture_extents_into(src: &Path, dst: &File, what: &str) -> Result<u64> {
    let sfile = File::open(src).map_err(|e| Error::io(format!("open {}", src.display()), e))?;
    let size = sfile
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", src.display()), e))?
        .len();
    let ctx = || format!("copy extents of {} to {what}", src.display());
    dst.set_len(size).map_err(|e| Error::io(ctx(), e))?;
    let extents = data_extents(&sfile, size).map_err(|e| Error::io(ctx(), e))?;
    let mut copied = 0;
    for (off, len) in extents {
        copy_range(&sfile, dst, off, len).map_err(|e| Error::io(ctx(), e))?;
        copied += len;
    }
    Ok(copied)
}

/// A new anonymous file in memory (`memfd_create`): sparse like a file on disk (SEEK_DATA and
/// SEEK_HOLE work), never written back to a disk, gone when the last descriptor closes.
/// `/proc/self/fd/<fd>` opens it again by path.
pub fn memory_file(name: &str) -> Result<File> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| Error::InvalidInput(format!("memory file name {name:?} holds a NUL")))?;
    // SAFETY: a valid NUL-terminated name; the returned fd is new and owned by the File.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io(
            "memfd_create (the kernel has no memfd support?)",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut ioff = (off + done) as i64;
        let mut ooff = ioff;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: valid fds and offset pointers that live across the call.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut ioff,
                dst.as_raw_fd(),
                &mut ooff,
                want,
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Kernel or filesystem cannot do it (cross-device, say into a memory file):
                // sendfile, still in the kernel.
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                    copy_sendfile(src, dst, off + done, len - done)
                }
                _ => Err(e),
            };
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source image shrank during capture",
            ));
        }
        done += r as u64;
    }
    Ok(())
}

/// sendfile writes at `dst`'s file position: seek it to the range first.
fn copy_sendfile(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let start = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: plain syscall on a valid fd owned by the caller.
    if unsafe { libc::lseek(dst.as_raw_fd(), start, libc::SEEK_SET) } < 0 {
        return copy_plain(src, dst, off, len);
    }
    let mut done = 0u64;
    while done < len {
        let mut ioff = (off + done) as i64;
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: valid fds and an offset pointer that lives across the call.
        let r = unsafe { libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut ioff, want) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    copy_plain(src, dst, off + done, len - done)
                }
                _ => Err(e),
            };
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source image shrank during capture",
            ));
        }
        done += r as u64;
    }
    Ok(())
}

fn copy_plain(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off + done)?;
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}
