//! Layer unpacking: gzip / zstd / plain tar into a fresh directory, with OCI
//! whiteouts converted to overlayfs form. Tarballs are outside input: every
//! path is checked, and nothing is written through a symlink.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{
    fchmod, fchmodat, futimens, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, Gid, Uid};
use tar::EntryType;

use crate::confined;
use crate::digest::HashReader;
use crate::error::{io_err, Error, IoContext, Result};

/// Compression of a layer blob, told by its magic bytes (media types lie).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn sniff<R: BufRead>(r: &mut R) -> io::Result<Compression> {
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    })
}

/// Opens a possibly compressed tar stream.
pub(crate) fn decompressed(path: &Path) -> Result<(Box<dyn Read>, Compression)> {
    let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let c = sniff(&mut r).ctx(|| format!("read {}", path.display()))?;
    let boxed: Box<dyn Read> = match c {
        Compression::None => Box::new(r),
        // MultiGzDecoder: some tools write concatenated gzip members.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(r)
                .ctx(|| format!("zstd {}", path.display()))?,
        ),
    };
    Ok((boxed, c))
}

/// Unpacks the layer blob at `blob` into the empty directory `dest` and
/// returns its diff id (sha256 of the uncompressed tar).
///
/// Every filesystem operation is confined beneath `dest`: see [`crate::confined`].
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<String> {
    let (reader, _) = decompressed(blob)?;
    let mut hr = HashReader::new(reader);
    {
        let mut ar = tar::Archive::new(&mut hr);
        let mut layer = LayerDir::open(dest)?;
        let entries = ar
            .entries()
            .ctx(|| format!("read layer {}", blob.display()))?;
        for entry in entries {
            let mut e = entry.ctx(|| format!("read layer {}", blob.display()))?;
            layer.unpack_entry(&mut e)?;
        }
        layer.finish_dirs()?;
    }
    let (diff_id, _) = hr
        .finish()
        .ctx(|| format!("read layer {}", blob.display()))?;
    Ok(diff_id)
}

/// Normalizes an entry path to a relative path with no `..`; `None` for the
/// root itself.
pub(crate) fn sanitize(path: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::UnsafeEntry {
                    path: path.to_path_buf(),
                    reason: "path leaves the layer".into(),
                })
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Makes every directory of `rel` under `root`, refusing to pass through a
/// symlink or a non-directory (that is how a tar escapes its root).
pub(crate) fn ensure_dirs(root: &Path, rel: Option<&Path>) -> Result<()> {
    let Some(rel) = rel else { return Ok(()) };
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::UnsafeEntry {
                    path: rel.to_path_buf(),
                    reason: format!("{} is not a directory", cur.display()),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&cur)
                    .ctx(|| format!("mkdir {}", cur.display()))?;
            }
            Err(e) => return Err(io_err(format!("stat {}", cur.display()), e)),
        }
    }
    Ok(())
}

/// xattrs from a layer worth keeping. `trusted.overlay.*` would let a layer
/// steer overlayfs (redirects, opaque dirs), so those are dropped.
fn keep_xattr(name: &str) -> bool {
    name == "security.capability" || name.starts_with("user.")
}

fn sys_err(what: impl FnOnce() -> String) -> impl FnOnce(Errno) -> Error {
    move |e| io_err(what(), io::Error::from(e))
}

/// The layer directory being filled, held by fd: every operation below
/// resolves beneath it (see [`crate::confined`]).
struct LayerDir {
    path: PathBuf,
    root: OwnedFd,
    /// The parent directory of the last entry, reused while consecutive
    /// entries share it (tars list a directory's children together).
    parent: Option<(PathBuf, OwnedFd)>,
    /// Directories' modes and times, applied last: creating children changes
    /// a directory's mtime, and a read-only mode would stop root-less use.
    dirs: Vec<(PathBuf, u32, u64)>,
}

impl LayerDir {
    fn open(dest: &Path) -> Result<Self> {
        let root = nix::fcntl::open(
            dest,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(sys_err(|| format!("open {}", dest.display())))?;
        Ok(LayerDir {
            path: dest.to_path_buf(),
            root,
            parent: None,
            dirs: Vec::new(),
        })
    }

    /// The directory `rel` (empty for the layer root) as an fd, made with
    /// mode 0755 where missing. A symlink or non-directory on the way is an
    /// `UnsafeEntry`: that is how a tar escapes its root.
    fn take_parent(&mut self, rel: &Path, raw: &Path) -> Result<OwnedFd> {
        if let Some((cached, fd)) = self.parent.take() {
            if cached == rel {
                return Ok(fd);
            }
        }
        if rel.as_os_str().is_empty() {
            return self
                .root
                .try_clone()
                .ctx(|| format!("dup fd of {}", self.path.display()));
        }
        let not_a_dir = |at: &Path| Error::UnsafeEntry {
            path: raw.to_path_buf(),
            reason: format!(
                "{} is a symlink or not a directory; a layer may not write through it",
                at.display()
            ),
        };
        match confined::open_dir(self.root.as_fd(), rel) {
            Ok(fd) => return Ok(fd),
            Err(Errno::ENOENT) => {}
            Err(e) if confined::is_not_a_dir(e) => return Err(not_a_dir(rel)),
            Err(e) => return Err(sys_err(|| format!("open {}", rel.display()))(e)),
        }
        // Some directory is missing: walk down, making the missing ones.
        let mut cur: Option<OwnedFd> = None;
        let mut so_far = PathBuf::new();
        for c in rel.components() {
            so_far.push(c);
            let at = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let name = Path::new(c.as_os_str());
            let next = match confined::open_dir(at, name) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match mkdirat(at, name, confined::mode(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(sys_err(|| format!("mkdir {}", so_far.display()))(e)),
                    }
                    confined::open_dir(at, name).map_err(|e| {
                        if confined::is_not_a_dir(e) {
                            not_a_dir(&so_far)
                        } else {
                            sys_err(|| format!("open {}", so_far.display()))(e)
                        }
                    })?
                }
                Err(e) if confined::is_not_a_dir(e) => return Err(not_a_dir(&so_far)),
                Err(e) => return Err(sys_err(|| format!("open {}", so_far.display()))(e)),
            };
            cur = Some(next);
        }
        match cur {
            Some(fd) => Ok(fd),
            None => self
                .root
                .try_clone()
                .ctx(|| format!("dup fd of {}", self.path.display())),
        }
    }

    fn unpack_entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<()> {
        let raw = e.path().ctx(|| "tar entry path".to_string())?.into_owned();
        let kind = e.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let Some(rel) = sanitize(&raw)? else {
            return Ok(()); // the layer root: dest already exists
        };
        let name = rel
            .file_name()
            .ok_or_else(|| Error::UnsafeEntry {
                path: raw.clone(),
                reason: "no file name".into(),
            })?
            .to_os_string();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let dir = self.take_parent(&parent_rel, &raw)?;
        let res = self.unpack_in(e, dir.as_fd(), Path::new(&name), &rel, &raw, kind);
        self.parent = Some((parent_rel, dir));
        res
    }

    /// Unpacks one entry named `name` inside the directory `dir`.
    fn unpack_in<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        dir: BorrowedFd<'_>,
        name: &Path,
        rel: &Path,
        raw: &Path,
        kind: EntryType,
    ) -> Result<()> {
        let unsafe_entry = |reason: &str| Error::UnsafeEntry {
            path: raw.to_path_buf(),
            reason: reason.to_string(),
        };
        let name_bytes = name.as_os_str().as_bytes();

        // OCI whiteouts -> overlayfs: opaque dir xattr, or a 0/0 char device.
        if name_bytes == b".wh..wh..opq" {
            return confined::fsetxattr(dir, "trusted.overlay.opaque", b"y").ctx(|| {
                format!(
                    "mark {} opaque",
                    rel.parent().unwrap_or(Path::new("/")).display()
                )
            });
        }
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            if hidden.starts_with(b".wh.") {
                return Ok(()); // other AUFS metadata; no meaning for overlayfs
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(unsafe_entry("bad whiteout name"));
            }
            let hidden = Path::new(OsStr::from_bytes(hidden));
            clear(dir, hidden, false, raw)?;
            return mknodat(dir, hidden, SFlag::S_IFCHR, Mode::empty(), 0)
                .map_err(sys_err(|| format!("whiteout {}", raw.display())));
        }

        let h = e.header().clone();
        let mode = h.mode().ctx(|| format!("mode of {}", raw.display()))? & 0o7777;
        // Empty numeric fields read as 0, as Go's archive/tar does.
        let uid =
            u32::try_from(h.uid().unwrap_or(0)).map_err(|_| unsafe_entry("uid out of range"))?;
        let gid =
            u32::try_from(h.gid().unwrap_or(0)).map_err(|_| unsafe_entry("gid out of range"))?;
        let owner = (Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
        let mtime = h.mtime().unwrap_or(0);
        let mut xattrs = Vec::new();
        if let Ok(Some(exts)) = e.pax_extensions() {
            for ext in exts.flatten() {
                if let Ok(key) = ext.key() {
                    if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                        if keep_xattr(x) {
                            xattrs.push((x.to_string(), ext.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        let chown_at = || {
            fchownat(dir, name, owner.0, owner.1, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(sys_err(|| format!("chown {}", raw.display())))
        };
        let times_at = || {
            let t = timespec(mtime);
            utimensat(dir, name, &t, &t, UtimensatFlags::NoFollowSymlink)
                .map_err(sys_err(|| format!("utimensat {}", raw.display())))
        };
        let set_xattrs = |fd: BorrowedFd<'_>| -> Result<()> {
            for (k, v) in &xattrs {
                confined::fsetxattr(fd, k, v)
                    .ctx(|| format!("setxattr {k} on {}", raw.display()))?;
            }
            Ok(())
        };

        match kind {
            EntryType::Directory => {
                clear(dir, name, true, raw)?;
                match mkdirat(dir, name, confined::mode(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(sys_err(|| format!("mkdir {}", raw.display()))(e)),
                }
                chown_at()?;
                if !xattrs.is_empty() {
                    let fd = confined::open_dir(dir, name)
                        .map_err(sys_err(|| format!("open {}", raw.display())))?;
                    set_xattrs(fd.as_fd())?;
                }
                self.dirs.push((rel.to_path_buf(), mode, mtime));
            }
            // The tar crate expands GNU sparse entries when read.
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                clear(dir, name, false, raw)?;
                // O_EXCL never follows a symlink, O_NOFOLLOW says so twice.
                let fd = openat(
                    dir,
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    confined::mode(0o600),
                )
                .map_err(sys_err(|| format!("create {}", raw.display())))?;
                let mut f = File::from(fd);
                io::copy(e, &mut f).ctx(|| format!("write {}", raw.display()))?;
                // All on the open file: chown, then chmod (chown clears
                // setuid bits), then xattrs (chown clears file
                // capabilities), then times.
                fchown(&f, owner.0, owner.1)
                    .map_err(sys_err(|| format!("chown {}", raw.display())))?;
                fchmod(&f, confined::mode(mode))
                    .map_err(sys_err(|| format!("chmod {}", raw.display())))?;
                set_xattrs(f.as_fd())?;
                let t = timespec(mtime);
                futimens(&f, &t, &t).map_err(sys_err(|| format!("utimens {}", raw.display())))?;
            }
            EntryType::Symlink => {
                let target = e
                    .link_name()
                    .ctx(|| format!("link of {}", raw.display()))?
                    .ok_or_else(|| unsafe_entry("symlink without target"))?
                    .into_owned();
                clear(dir, name, false, raw)?;
                // The target is resolved inside the container's root, never here.
                symlinkat(&target, dir, name)
                    .map_err(sys_err(|| format!("symlink {}", raw.display())))?;
                chown_at()?;
                times_at()?;
            }
            EntryType::Link => {
                let target = e
                    .link_name()
                    .ctx(|| format!("link of {}", raw.display()))?
                    .ok_or_else(|| unsafe_entry("hard link without target"))?;
                let target = sanitize(&target)?.ok_or_else(|| unsafe_entry("hard link to root"))?;
                if target == rel {
                    return Ok(());
                }
                let tname = target
                    .file_name()
                    .ok_or_else(|| unsafe_entry("hard link target has no name"))?;
                // The source must be inside the layer, reached without symlinks.
                let tdir_rel = target.parent().unwrap_or(Path::new(""));
                let tdir = if tdir_rel.as_os_str().is_empty() {
                    None
                } else {
                    Some(
                        confined::open_dir(self.root.as_fd(), tdir_rel).map_err(|e| {
                            if confined::is_not_a_dir(e) {
                                unsafe_entry("hard link target through a symlink or non-directory")
                            } else {
                                sys_err(|| format!("hard link target {}", target.display()))(e)
                            }
                        })?,
                    )
                };
                let tdir = tdir.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
                clear(dir, name, false, raw)?;
                // Flags 0: a symlink source is linked itself, not followed.
                linkat(tdir, tname, dir, name, AtFlags::empty()).map_err(sys_err(|| {
                    format!("link {} to {}", raw.display(), target.display())
                }))?;
                // Shares the source's inode and metadata.
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                let t = match kind {
                    // A 0/0 char device is an overlayfs whiteout: harmless.
                    EntryType::Char if major == 0 && minor == 0 => SFlag::S_IFCHR,
                    EntryType::Fifo => SFlag::S_IFIFO,
                    _ => {
                        // A device node in a layer would open a host device to
                        // anyone who can reach the layer directory; containers
                        // get their /dev from the runtime.
                        tracing::warn!(
                            path = %raw.display(), kind = ?kind, major, minor,
                            "skipping device node in image layer"
                        );
                        return Ok(());
                    }
                };
                clear(dir, name, false, raw)?;
                mknodat(dir, name, t, Mode::empty(), 0)
                    .map_err(sys_err(|| format!("mknod {}", raw.display())))?;
                chown_at()?;
                fchmodat(
                    dir,
                    name,
                    confined::mode(mode),
                    FchmodatFlags::NoFollowSymlink,
                )
                .map_err(sys_err(|| format!("chmod {}", raw.display())))?;
                times_at()?;
            }
            other => {
                tracing::debug!(path = %raw.display(), kind = ?other, "skipping tar entry");
            }
        }
        Ok(())
    }

    /// Applies the recorded directory modes and times, last listed first
    /// (children are listed after their parents). Each directory is re-opened beneath the root without following
    /// symlinks: one replaced since by a symlink or a file is skipped. When a
    /// directory is listed twice, the later entry wins.
    fn finish_dirs(&mut self) -> Result<()> {
        let mut done = std::collections::HashSet::new();
        for (rel, mode, mtime) in std::mem::take(&mut self.dirs).into_iter().rev() {
            if !done.insert(rel.clone()) {
                continue;
            }
            let fd = match confined::open_dir(self.root.as_fd(), &rel) {
                Ok(fd) => fd,
                Err(e) if e == Errno::ENOENT || confined::is_not_a_dir(e) => continue,
                Err(e) => return Err(sys_err(|| format!("open {}", rel.display()))(e)),
            };
            fchmod(&fd, confined::mode(mode))
                .map_err(sys_err(|| format!("chmod {}", rel.display())))?;
            let t = timespec(mtime);
            futimens(&fd, &t, &t).map_err(sys_err(|| format!("utimens {}", rel.display())))?;
        }
        Ok(())
    }
}

fn timespec(mtime: u64) -> TimeSpec {
    TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0)
}

/// Removes whatever is at `name` in `dir` so an entry can take its place;
/// keeps an existing directory when the new entry is a directory too.
/// Nothing is followed: a symlink is removed, not its target.
fn clear(dir: BorrowedFd<'_>, name: &Path, keep_dir: bool, raw: &Path) -> Result<()> {
    let st =
        confined::lstat_at(dir, name).map_err(sys_err(|| format!("stat {}", raw.display())))?;
    match st {
        Some(st) if confined::is_dir(&st) && keep_dir => Ok(()),
        Some(_) => confined::remove_tree(dir, name)
            .map_err(sys_err(|| format!("replace {}", raw.display()))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(kind: EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h
    }

    fn unpack_bytes(tar: Vec<u8>) -> (tempfile::TempDir, Result<String>) {
        let d = tempfile::Builder::new()
            .prefix("mrtst")
            .tempdir()
            .expect("tempdir");
        let blob = d.path().join("blob");
        fs::write(&blob, tar).expect("write");
        let dest = d.path().join("root");
        fs::create_dir(&dest).expect("mkdir");
        let r = unpack_layer(&blob, &dest);
        (d, r)
    }

    fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
        let n = std::ffi::CString::new(name).ok()?;
        let mut buf = [0u8; 64];
        // SAFETY: valid strings and buffer.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(r).ok().map(|n| buf[..n].to_vec())
    }

    #[test]
    fn hard_links_stay_inside() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut hdr(EntryType::Regular, 2), "a", &b"hi"[..])
            .expect("tar");
        b.append_link(&mut hdr(EntryType::Link, 0), "b", "./a")
            .expect("tar");
        let (d, r) = unpack_bytes(b.into_inner().expect("tar"));
        r.expect("unpack");
        let root = d.path().join("root");
        let (ma, mb) = (
            fs::metadata(root.join("a")).expect("a"),
            fs::metadata(root.join("b")).expect("b"),
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(ma.ino(), mb.ino());

        let mut b = tar::Builder::new(Vec::new());
        let mut h = hdr(EntryType::Link, 0);
        h.set_path("evil").expect("path");
        h.as_old_mut().linkname[..9].copy_from_slice(b"../../etc");
        h.set_cksum();
        b.append(&h, &[][..]).expect("tar");
        let (_d, r) = unpack_bytes(b.into_inner().expect("tar"));
        assert!(matches!(r, Err(Error::UnsafeEntry { .. })), "{r:?}");
    }

    #[test]
    fn overlay_xattrs_from_layers_are_dropped() {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
            ("SCHILY.xattr.user.mrtst", &b"1"[..]),
        ])
        .expect("pax");
        b.append_data(&mut hdr(EntryType::Directory, 0), "d", &[][..])
            .expect("tar");
        let (d, r) = unpack_bytes(b.into_inner().expect("tar"));
        r.expect("unpack");
        let dir = d.path().join("root/d");
        assert_eq!(xattr(&dir, "user.mrtst").as_deref(), Some(&b"1"[..]));
        assert_eq!(xattr(&dir, "trusted.overlay.redirect"), None);
    }

    #[test]
    fn sanitize_paths() {
        assert_eq!(
            sanitize(Path::new("./a/b")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(
            sanitize(Path::new("/a/./b/")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(sanitize(Path::new("./")).unwrap(), None);
        assert!(sanitize(Path::new("a/../../etc")).is_err());
    }
}
