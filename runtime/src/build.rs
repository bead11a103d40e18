//! Images built on this node: an app's source tree (received as an untrusted tar) checked entry
//! by entry and re-written as one deterministic layer, and an image assembled from a base image
//! in the store plus such layers.
//!
//! The source tar is never extracted by this code: entries are checked (relative names made of
//! plain components, only files, directories and symlinks, size and count limits read from the
//! headers before any data), their data spooled to an unlinked temp file, and a new tar written
//! in name order with fixed owners, modes and times, so the same tree always gives the same
//! digest. That layer is unpacked by the store's confined unpack like any pulled layer.
//!
//! Crash safety: blobs are written to temp names in `tmp/` and renamed once complete; the image
//! record is written last (temp + rename). A crash leaves at most unreferenced blobs for GC.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path};

use crate::digest::Hasher;
use crate::error::{IoContext, Result};
use crate::oci::{synth_config, Descriptor, ImageConfig, Manifest, OCI_CONFIG, OCI_LAYER_TAR};
use crate::store::{normalize_reference, ImageRecord, ImageStore, LayerInfo};

/// How much source a build accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLimits {
    /// Sum of the files' sizes, in bytes.
    pub max_bytes: u64,
    /// Entries of any kind.
    pub max_entries: u64,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            max_bytes: 512 << 20,
            max_entries: 100_000,
        }
    }
}

/// Why a source tree was refused: what to change is in the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("source entry {name:?} is refused: {reason}")]
    Unsafe { name: String, reason: String },
    #[error("the source is larger than the build limit of {limit} bytes (at {name:?}); exclude large files with .gitignore or .dockerignore")]
    TooLarge { name: String, limit: u64 },
    #[error("the source has more than the build limit of {limit} entries; exclude generated directories (node_modules, .venv, build output) with .gitignore or .dockerignore")]
    TooManyEntries { limit: u64 },
    #[error("the source is not a valid tar stream: {0}")]
    Malformed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File { offset: u64, len: u64, exec: bool },
    Symlink(String),
}

/// A checked source tree: names (relative, `/`-separated, no `.`/`..`) in order, their data in
/// an unlinked spool file.
pub struct SourceTree {
    entries: BTreeMap<String, Kind>,
    spool: File,
    bytes: u64,
}

/// `./a//b/` -> `a/b`; None for names that are absolute, empty or climb with `..`.
fn clean_name(raw: &Path) -> std::result::Result<String, String> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => match p.to_str() {
                Some(p) => parts.push(p),
                None => return Err("the name is not UTF-8".into()),
            },
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` is not allowed in names".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute names are not allowed".into())
            }
        }
    }
    if parts.is_empty() {
        return Err("empty name".into());
    }
    Ok(parts.join("/"))
}

impl SourceTree {
    /// Reads and checks a tar stream; `spool` must be a new, unlinked, writable file.
    pub fn read(
        input: impl Read,
        limits: SourceLimits,
        mut spool: File,
    ) -> std::result::Result<SourceTree, SourceError> {
        let mut entries: BTreeMap<String, Kind> = BTreeMap::new();
        let mut bytes: u64 = 0;
        let mut offset: u64 = 0;
        let mut archive = tar::Archive::new(input);
        let malformed = |e: io::Error| SourceError::Malformed(e.to_string());
        for entry in archive.entries().map_err(malformed)? {
            let mut entry = entry.map_err(malformed)?;
            if entries.len() as u64 >= limits.max_entries {
                return Err(SourceError::TooManyEntries {
                    limit: limits.max_entries,
                });
            }
            let raw = entry.path().map_err(malformed)?.into_owned();
            let unsafe_entry = |reason: String| SourceError::Unsafe {
                name: raw.display().to_string(),
                reason,
            };
            let name = clean_name(&raw).map_err(unsafe_entry)?;
            let header = entry.header();
            let kind = match header.entry_type() {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(malformed)?
                        .ok_or_else(|| unsafe_entry("a symlink without a target".into()))?;
                    let target = target
                        .to_str()
                        .ok_or_else(|| unsafe_entry("the link target is not UTF-8".into()))?
                        .to_string();
                    Kind::Symlink(target)
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    // The header's size, checked before a byte of data is read: a huge (or
                    // sparse) file is refused without reading it.
                    let len = header.size().map_err(malformed)?;
                    if bytes.saturating_add(len) > limits.max_bytes {
                        return Err(SourceError::TooLarge {
                            name,
                            limit: limits.max_bytes,
                        });
                    }
                    let exec = header.mode().map_err(malformed)? & 0o111 != 0;
                    let copied = io::copy(&mut (&mut entry).take(len), &mut spool)
                        .map_err(|e| SourceError::Malformed(format!("{name}: {e}")))?;
                    if copied != len {
                        return Err(SourceError::Malformed(format!(
                            "{name}: the stream ended inside the file"
                        )));
                    }
                    bytes += len;
                    let kind = Kind::File { offset, len, exec };
                    offset += len;
                    kind
                }
                tar::EntryType::Link => {
                    return Err(unsafe_entry(
                        "hard links are not accepted; send the file itself".into(),
                    ))
                }
                other => {
                    return Err(unsafe_entry(format!(
                        "only files, directories and symlinks are accepted, not {other:?}"
                    )))
                }
            };
            if entries.contains_key(&name) {
                if kind == Kind::Dir && entries.get(&name) == Some(&Kind::Dir) {
                    continue;
                }
                return Err(SourceError::Unsafe {
                    name,
                    reason: "it appears twice in the stream".into(),
                });
            }
            entries.insert(name, kind);
        }
        // Every parent must be a directory: a file or symlink with children could make an
        // unpack write through a link.
        for name in entries.keys() {
            let mut parent = name.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                if let Some(k) = entries.get(p) {
                    if *k != Kind::Dir {
                        return Err(SourceError::Unsafe {
                            name: name.clone(),
                            reason: format!("its parent `{p}` is not a directory"),
                        });
                    }
                }
                parent = p;
            }
        }
        Ok(SourceTree {
            entries,
            spool,
            bytes,
        })
    }

    /// Bytes of file data.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Entries of any kind.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// True for a regular file of that name.
    pub fn is_file(&self, name: &str) -> bool {
        matches!(self.entries.get(name), Some(Kind::File { .. }))
    }

    /// A regular file's bytes, if it exists and is at most `max` bytes.
    pub fn read_file(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let Some(Kind::File { offset, len, .. }) = self.entries.get(name) else {
            return Ok(None);
        };
        if *len > max {
            return Ok(None);
        }
        let mut buf = vec![0u8; *len as usize];
        read_at(&self.spool, *offset, &mut buf).ctx(|| format!("read spooled {name}"))?;
        Ok(Some(buf))
    }

    /// The tree as a tar under `prefix/` (e.g. `app`), in name order, owned by 0:0, mode 0644
    /// (0755 for directories and executables), mtime 0: the same tree, the same bytes.
    pub fn write_layer(&self, prefix: &str, out: &mut dyn Write) -> Result<()> {
        let mut b = tar::Builder::new(out);
        let mut dirs_done: Vec<String> = Vec::new();
        let mut dir = |b: &mut tar::Builder<&mut dyn Write>, path: &str| -> Result<()> {
            if dirs_done.iter().any(|d| d == path) {
                return Ok(());
            }
            dirs_done.push(path.to_string());
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut h, format!("{path}/"), io::empty())
                .ctx(|| format!("write {path}/"))
        };
        let mut prefix_parts = String::new();
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            if !prefix_parts.is_empty() {
                prefix_parts.push('/');
            }
            prefix_parts.push_str(part);
            dir(&mut b, &prefix_parts)?;
        }
        for (name, kind) in &self.entries {
            // Parents a stream left implicit, in order.
            let mut at = 0;
            while let Some(i) = name[at..].find('/') {
                dir(&mut b, &format!("{prefix_parts}/{}", &name[..at + i]))?;
                at += i + 1;
            }
            let path = format!("{prefix_parts}/{name}");
            match kind {
                Kind::Dir => dir(&mut b, &path)?,
                Kind::File { offset, len, exec } => {
                    let mut h = header(
                        tar::EntryType::Regular,
                        if *exec { 0o755 } else { 0o644 },
                        *len,
                    );
                    let reader = SpoolReader {
                        file: &self.spool,
                        at: *offset,
                        left: *len,
                    };
                    b.append_data(&mut h, &path, reader)
                        .ctx(|| format!("write {path}"))?;
                }
                Kind::Symlink(target) => {
                    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                    b.append_link(&mut h, &path, target)
                        .ctx(|| format!("write {path}"))?;
                }
            }
        }
        b.finish().ctx(|| "finish the layer tar".into())
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// Reads `left` bytes of the spool from `at`, without moving a shared cursor.
struct SpoolReader<'a> {
    file: &'a File,
    at: u64,
    left: u64,
}

impl Read for SpoolReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = (buf.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.at)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spool file is shorter than recorded",
            ));
        }
        self.at += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes through to a file while hashing.
struct HashWriter {
    file: File,
    hasher: Hasher,
    len: u64,
}

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// What an assembled image runs.
#[derive(Clone, Debug, Default)]
pub struct BuildConfig {
    pub working_dir: String,
    /// Empty: the base image's.
    pub cmd: Vec<String>,
    /// Added after the base image's env, replacing keys it sets.
    pub env: Vec<String>,
}

impl ImageStore {
    /// A new spool file for [`SourceTree::read`]: in the store's `tmp/`, already unlinked, so
    /// nothing is left behind whatever happens.
    pub fn spool_file(&self) -> Result<File> {
        let p = self.tmp_path("spool");
        let f = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .ctx(|| format!("create {}", p.display()))?;
        std::fs::remove_file(&p).ctx(|| format!("unlink {}", p.display()))?;
        Ok(f)
    }

    /// Writes an uncompressed layer produced by `write` into the store (a temp name, then its
    /// digest) and unpacks it; its digest is its diff id.
    pub fn put_layer(&self, write: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<LayerInfo> {
        let _l = self.lock(false, true)?;
        let tmp = self.tmp_path("layer");
        let res = (|| {
            let file = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            let mut w = HashWriter {
                file,
                hasher: Hasher::default(),
                len: 0,
            };
            write(&mut w)?;
            w.file
                .sync_all()
                .ctx(|| format!("fsync {}", tmp.display()))?;
            let digest = w.hasher.finish();
            if self.has_blob(&digest, Some(w.len))? {
                let _ = std::fs::remove_file(&tmp);
            } else {
                self.commit_blob(&tmp, &digest)?;
            }
            let diff_id = self.ensure_layer(&digest, Some(&digest))?;
            Ok(LayerInfo {
                digest,
                diff_id,
                media_type: OCI_LAYER_TAR.into(),
                size: w.len,
            })
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    /// A layer already in the store, by its (uncompressed) digest, if its blob and unpacked
    /// directory are both there.
    pub fn stored_layer(&self, digest: &str) -> Result<Option<LayerInfo>> {
        let blob = self.blob_path(digest)?;
        let Ok(meta) = std::fs::metadata(&blob) else {
            return Ok(None);
        };
        if !self.layer_path(digest)?.is_dir() {
            return Ok(None);
        }
        Ok(Some(LayerInfo {
            digest: digest.to_string(),
            diff_id: digest.to_string(),
            media_type: OCI_LAYER_TAR.into(),
            size: meta.len(),
        }))
    }

    /// `base`'s layers plus `layers`, with `config` over the base's, recorded as `reference`.
    /// Deterministic: the same inputs give the same manifest digest. The record is written
    /// last, so a crash leaves no half image.
    pub fn assemble(
        &self,
        base: &ImageRecord,
        layers: &[LayerInfo],
        config: &BuildConfig,
        reference: &str,
        source: String,
    ) -> Result<ImageRecord> {
        let r = normalize_reference(reference)?;
        let _l = self.lock(false, true)?;
        let mut cfg: ImageConfig = base.config.clone();
        cfg.working_dir = config.working_dir.clone();
        if !config.cmd.is_empty() {
            cfg.entrypoint = Vec::new();
            cfg.cmd = config.cmd.clone();
        }
        for var in &config.env {
            let key = var.split_once('=').map_or(var.as_str(), |(k, _)| k);
            cfg.env
                .retain(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) != key);
            cfg.env.push(var.clone());
        }
        let all: Vec<&LayerInfo> = base.layers.iter().chain(layers).collect();
        let diff_ids: Vec<String> = all.iter().map(|l| l.diff_id.clone()).collect();
        let cfg_bytes = synth_config(&cfg, &diff_ids);
        let cfg_digest = self.put_blob_bytes(&cfg_bytes, None, "image config")?;
        let manifest = Manifest {
            config: Descriptor {
                media_type: OCI_CONFIG.into(),
                digest: cfg_digest,
                size: cfg_bytes.len() as i64,
                platform: None,
                annotations: None,
            },
            layers: all
                .iter()
                .map(|l| Descriptor {
                    media_type: l.media_type.clone(),
                    digest: l.digest.clone(),
                    size: l.size as i64,
                    platform: None,
                    annotations: None,
                })
                .collect(),
        };
        let mbytes = manifest.to_oci_json();
        let mdigest = self.put_blob_bytes(&mbytes, None, "manifest")?;
        self.finish_image(&r.whole(), &mdigest, None, &manifest, source)
    }
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
