//! Filesystem operations confined beneath a directory file descriptor.
//!
//! A layer tarball is outside input: it may plant a symlink and then name a
//! path through it, or name the symlink itself, hoping a later operation
//! follows it out of the layer. Here every path is resolved relative to a
//! directory fd with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)`, and every operation on a final
//! component either goes through an fd opened that way or uses the `*at`
//! call's no-follow form on a single name inside such a directory.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// Resolution that never leaves the directory and never follows a symlink.
const CONFINED: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS)
    .union(ResolveFlag::RESOLVE_NO_XDEV);

/// Opens the directory `rel` (one or more components) beneath `dir`.
/// A symlink anywhere on the way, the last component included, fails with
/// `ELOOP`; a non-directory with `ENOTDIR`; `..` out of `dir` with `EXDEV`.
pub(crate) fn open_dir(dir: BorrowedFd<'_>, rel: &Path) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(CONFINED);
    openat2(dir, rel, how)
}

/// Whether an `open_dir` error means "a symlink or non-directory is in the
/// way" (as opposed to missing or an I/O failure).
pub(crate) fn is_not_a_dir(e: Errno) -> bool {
    matches!(e, Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV)
}

/// `lstat` of the single name `name` in `dir`; `None` when it does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &Path) -> nix::Result<Option<FileStat>> {
    match fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Removes the single name `name` in `dir`, recursively when it is a
/// directory; a symlink is removed itself, never followed.
pub(crate) fn remove_tree(dir: BorrowedFd<'_>, name: &Path) -> nix::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => return Ok(()),
        Err(Errno::EISDIR) => {}
        Err(e) => return Err(e),
    }
    let sub = open_dir(dir, name)?;
    let mut children = Vec::new();
    {
        let mut listing = Dir::from_fd(sub.try_clone().map_err(io_to_errno)?)?;
        for ent in listing.iter() {
            let ent = ent?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                children.push(OsString::from_vec(n.to_vec()));
            }
        }
    }
    for child in children {
        remove_tree(sub.as_fd(), Path::new(&child))?;
    }
    unlinkat(dir, name, UnlinkatFlags::RemoveDir)
}

fn io_to_errno(e: io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Sets an extended attribute on an open file or directory.
pub(crate) fn fsetxattr(fd: BorrowedFd<'_>, name: &str, value: &[u8]) -> io::Result<()> {
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a live fd, a NUL-terminated name and a slice valid for its length.
    let rc = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mode` as nix wants it: permission, setuid, setgid and sticky bits.
pub(crate) fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits & 0o7777)
}
