//! Layer unpacking: gzip / zstd / plain tar into a fresh directory, with OCI
//! whiteouts converted to overlayfs form. Tarballs are outside input: every
//! path is checked, and nothing is written through a symlink.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

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
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<String> {
    let (reader, _) = decompressed(blob)?;
    let mut hr = HashReader::new(reader);
    {
        let mut ar = tar::Archive::new(&mut hr);
        let mut dirs = Vec::new();
        let entries = ar
            .entries()
            .ctx(|| format!("read layer {}", blob.display()))?;
        for entry in entries {
            let mut e = entry.ctx(|| format!("read layer {}", blob.display()))?;
            unpack_entry(&mut e, dest, &mut dirs)?;
        }
        // Directory modes and times last: children changed their mtimes.
        for (path, mode, mtime) in dirs.into_iter().rev() {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .ctx(|| format!("chmod {}", path.display()))?;
            set_mtime(&path, mtime)?;
        }
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

/// Removes whatever is at `path` so an entry can take its place; keeps an
/// existing directory when the new entry is a directory too.
fn clear(path: &Path, keep_dir: bool) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            if !keep_dir {
                fs::remove_dir_all(path).ctx(|| format!("remove {}", path.display()))?;
            }
        }
        Ok(_) => fs::remove_file(path).ctx(|| format!("remove {}", path.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(format!("stat {}", path.display()), e)),
    }
    Ok(())
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::UnsafeEntry {
        path: p.to_path_buf(),
        reason: "NUL in path".into(),
    })
}

fn check(rc: libc::c_int, what: impl FnOnce() -> String) -> Result<()> {
    if rc != 0 {
        return Err(io_err(what(), io::Error::last_os_error()));
    }
    Ok(())
}

fn mknod(path: &Path, kind: libc::mode_t, perm: u32, major: u32, minor: u32) -> Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    let rc = unsafe { libc::mknod(c.as_ptr(), kind | perm, libc::makedev(major, minor)) };
    check(rc, || format!("mknod {}", path.display()))
}

fn lchown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .ctx(|| format!("chown {}", path.display()))
}

fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let c = cpath(path)?;
    let n = CString::new(name).map_err(|_| Error::UnsafeEntry {
        path: path.to_path_buf(),
        reason: "NUL in xattr name".into(),
    })?;
    // SAFETY: valid C strings and a live slice.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(rc, || format!("setxattr {name} on {}", path.display()))
}

fn set_mtime(path: &Path, mtime: u64) -> Result<()> {
    let c = cpath(path)?;
    let secs = libc::time_t::try_from(mtime).unwrap_or(libc::time_t::MAX);
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: valid path and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(rc, || format!("utimensat {}", path.display()))
}

/// xattrs from a layer worth keeping. `trusted.overlay.*` would let a layer
/// steer overlayfs (redirects, opaque dirs), so those are dropped.
fn keep_xattr(name: &str) -> bool {
    name == "security.capability" || name.starts_with("user.")
}

fn unpack_entry<R: Read>(
    e: &mut tar::Entry<'_, R>,
    root: &Path,
    dirs: &mut Vec<(PathBuf, u32, u64)>,
) -> Result<()> {
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
    let unsafe_entry = |reason: &str| Error::UnsafeEntry {
        path: raw.clone(),
        reason: reason.to_string(),
    };
    let name = rel
        .file_name()
        .ok_or_else(|| unsafe_entry("no file name"))?
        .to_os_string();
    let name_bytes = name.as_bytes();
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    ensure_dirs(root, parent)?;
    let dir = parent.map_or_else(|| root.to_path_buf(), |p| root.join(p));

    // OCI whiteouts -> overlayfs: opaque dir xattr, or a 0/0 char device.
    if name_bytes == b".wh..wh..opq" {
        return lsetxattr(&dir, "trusted.overlay.opaque", b"y");
    }
    if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
        if hidden.starts_with(b".wh.") {
            return Ok(()); // other AUFS metadata; no meaning for overlayfs
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(unsafe_entry("bad whiteout name"));
        }
        let target = dir.join(OsStr::from_bytes(hidden));
        clear(&target, false)?;
        return mknod(&target, libc::S_IFCHR, 0, 0, 0);
    }

    let h = e.header().clone();
    let mode = h.mode().ctx(|| format!("mode of {}", raw.display()))? & 0o7777;
    // Empty numeric fields read as 0, as Go's archive/tar does.
    let uid = u32::try_from(h.uid().unwrap_or(0)).map_err(|_| unsafe_entry("uid out of range"))?;
    let gid = u32::try_from(h.gid().unwrap_or(0)).map_err(|_| unsafe_entry("gid out of range"))?;
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
    let full = dir.join(&name);

    match kind {
        EntryType::Directory => {
            clear(&full, true)?;
            if fs::symlink_metadata(&full).is_err() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&full)
                    .ctx(|| format!("mkdir {}", full.display()))?;
            }
            lchown(&full, uid, gid)?;
            dirs.push((full.clone(), mode, mtime));
        }
        // The tar crate expands GNU sparse entries when read.
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            clear(&full, false)?;
            // create_new + O_NOFOLLOW: never write through a planted symlink.
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&full)
                .ctx(|| format!("create {}", full.display()))?;
            io::copy(e, &mut f).ctx(|| format!("write {}", full.display()))?;
            drop(f);
            lchown(&full, uid, gid)?;
            // chmod after chown: chown clears setuid bits.
            fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                .ctx(|| format!("chmod {}", full.display()))?;
        }
        EntryType::Symlink => {
            let target = e
                .link_name()
                .ctx(|| format!("link of {}", raw.display()))?
                .ok_or_else(|| unsafe_entry("symlink without target"))?
                .into_owned();
            clear(&full, false)?;
            // The target is resolved inside the container's root, not here.
            std::os::unix::fs::symlink(&target, &full)
                .ctx(|| format!("symlink {}", full.display()))?;
            lchown(&full, uid, gid)?;
        }
        EntryType::Link => {
            let target = e
                .link_name()
                .ctx(|| format!("link of {}", raw.display()))?
                .ok_or_else(|| unsafe_entry("hard link without target"))?;
            let target = sanitize(&target)?.ok_or_else(|| unsafe_entry("hard link to root"))?;
            // The source must be inside the layer, reached without symlinks.
            let tdir = target.parent().filter(|p| !p.as_os_str().is_empty());
            if let Some(td) = tdir {
                let mut cur = root.to_path_buf();
                for c in td.components() {
                    cur.push(c);
                    let m = fs::symlink_metadata(&cur)
                        .ctx(|| format!("hard link source {}", cur.display()))?;
                    if !m.is_dir() {
                        return Err(unsafe_entry("hard link through a non-directory"));
                    }
                }
            }
            let src = root.join(&target);
            if src == full {
                return Ok(());
            }
            clear(&full, false)?;
            fs::hard_link(&src, &full).ctx(|| format!("link {}", full.display()))?;
            return Ok(()); // shares the source's inode and metadata
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            let t = match kind {
                EntryType::Char => libc::S_IFCHR,
                EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            clear(&full, false)?;
            mknod(&full, t, 0, major, minor)?;
            lchown(&full, uid, gid)?;
            fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                .ctx(|| format!("chmod {}", full.display()))?;
        }
        other => {
            tracing::debug!(path = %raw.display(), kind = ?other, "skipping tar entry");
            return Ok(());
        }
    }
    for (k, v) in &xattrs {
        lsetxattr(&full, k, v)?;
    }
    if kind != EntryType::Directory {
        set_mtime(&full, mtime)?;
    }
    Ok(())
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
        let c = cpath(p).ok()?;
        let n = CString::new(name).ok()?;
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
