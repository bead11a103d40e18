//! The content-addressed image store under `<data>/images`:
//!
//! ```text
//! blobs/sha256/<hex>   manifests, configs and layer blobs, verified before they get this name
//! layers/<hex>         one unpacked layer per diff id, shared by every image using it
//! records/<hex>.json   one image record per reference (hex = sha256 of the reference)
//! tmp/                 downloads and unpacks in progress; anything here is garbage
//! lock                 flock: pulls/imports shared, GC exclusive
//! ```

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::{digest_hex, sha256_digest, verify, Hasher};
use crate::error::{io_err, Error, IoContext, Result};
use crate::oci::{parse_config, ImageConfig, Manifest};
use crate::unpack::unpack_layer;

/// Largest manifest or config blob read into memory.
pub(crate) const MAX_JSON_BLOB: u64 = 16 << 20;

/// One image: what a reference resolved to and how to run it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct ImageRecord {
    /// Normalized reference, e.g. `docker.io/library/postgres:17`.
    pub reference: String,
    /// Digest of the platform image manifest.
    pub manifest_digest: String,
    /// Digest of the index the manifest was chosen from, if any.
    #[serde(default)]
    pub index_digest: Option<String>,
    pub config_digest: String,
    /// Layers, lowest first.
    pub layers: Vec<LayerInfo>,
    pub config: ImageConfig,
    /// Where it came from: the host contacted, or `import:<path>`.
    pub source: String,
    /// Seconds since the epoch when the record was written.
    pub stored_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct LayerInfo {
    /// Digest of the (possibly compressed) blob.
    pub digest: String,
    /// Digest of the uncompressed tar; names the unpacked directory.
    pub diff_id: String,
    pub media_type: String,
    pub size: u64,
}

/// What [`ImageStore::gc`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub layers_removed: usize,
    pub temp_removed: usize,
    pub bytes_freed: u64,
}

/// Handle on the store. Cheap to clone; many processes may share a store.
#[derive(Clone, Debug)]
pub struct ImageStore {
    root: PathBuf,
}

/// An flock on the store; released on drop.
pub(crate) struct StoreLock(#[allow(dead_code)] File);

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// fsync a directory so a rename in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync {}", dir.display()))
}

/// Normalizes a user-written reference (`postgres:17` ->
/// `docker.io/library/postgres:17`).
pub fn normalize_reference(reference: &str) -> Result<oci_client::Reference> {
    let r: oci_client::Reference =
        reference
            .parse()
            .map_err(|e: oci_client::ParseError| Error::InvalidReference {
                reference: reference.to_string(),
                reason: e.to_string(),
            })?;
    if let Some(d) = r.digest() {
        digest_hex(d)?;
    }
    Ok(r)
}

impl ImageStore {
    /// Opens (creating) the store under `<data_dir>/images` and removes
    /// leftovers of killed pulls if no other process is using the store.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<Self> {
        let root = data_dir.as_ref().join("images");
        for d in ["blobs/sha256", "layers", "records", "tmp"] {
            let p = root.join(d);
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
                .ctx(|| format!("mkdir {}", p.display()))?;
        }
        let s = ImageStore { root };
        if let Some(_l) = s.lock(true, false)? {
            s.clean_tmp()?;
        }
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    /// The unpacked directory of a layer, by diff id.
    pub fn layer_path(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.root.join("layers").join(digest_hex(diff_id)?))
    }

    /// The unpacked layer directories of an image, lowest first (overlayfs
    /// wants `lowerdir` in the opposite order).
    pub fn layer_dirs(&self, image: &ImageRecord) -> Result<Vec<PathBuf>> {
        image
            .layers
            .iter()
            .map(|l| self.layer_path(&l.diff_id))
            .collect()
    }

    fn record_path(&self, normalized: &str) -> PathBuf {
        let h = sha256_digest(normalized.as_bytes());
        self.root
            .join("records")
            .join(format!("{}.json", &h["sha256:".len()..]))
    }

    pub(crate) fn tmp_path(&self, kind: &str) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        self.root
            .join("tmp")
            .join(format!("{kind}-{}-{nanos}-{n}", std::process::id()))
    }

    pub(crate) fn lock(&self, exclusive: bool, blocking: bool) -> Result<Option<StoreLock>> {
        let p = self.root.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .ctx(|| format!("open {}", p.display()))?;
        let mut op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        if !blocking {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
                return Ok(Some(StoreLock(f)));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !blocking => return Ok(None),
                _ => return Err(io_err(format!("flock {}", p.display()), e)),
            }
        }
    }

    /// Shared lock for pulls and imports, taken off the async runtime.
    pub(crate) async fn lock_shared_async(&self) -> Result<StoreLock> {
        let s = self.clone();
        let l = tokio::task::spawn_blocking(move || s.lock(false, true))
            .await
            .map_err(|e| io_err("lock task", io::Error::other(e)))??;
        l.ok_or_else(|| io_err("flock", io::Error::other("lock not taken")))
    }

    fn clean_tmp(&self) -> Result<usize> {
        let dir = self.root.join("tmp");
        let mut n = 0;
        for e in fs::read_dir(&dir).ctx(|| format!("read {}", dir.display()))? {
            let e = e.ctx(|| format!("read {}", dir.display()))?;
            let p = e.path();
            let r = if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.ctx(|| format!("remove {}", p.display()))?;
            n += 1;
        }
        Ok(n)
    }

    pub fn has_blob(&self, digest: &str, size: Option<u64>) -> Result<bool> {
        let p = self.blob_path(digest)?;
        Ok(match fs::metadata(&p) {
            Ok(m) => size.is_none_or(|s| s == m.len()),
            Err(_) => false,
        })
    }

    /// Moves a fully written and verified temp file to its blob name.
    pub(crate) fn commit_blob(&self, tmp: &Path, digest: &str) -> Result<()> {
        let dst = self.blob_path(digest)?;
        fs::rename(tmp, &dst).ctx(|| format!("rename to {}", dst.display()))?;
        sync_dir(&self.root.join("blobs/sha256"))
    }

    /// Streams `r` into the store, checking digest and size when given.
    /// Returns the digest.
    pub(crate) fn put_blob(
        &self,
        mut r: impl Read,
        expected: Option<&str>,
        expected_size: Option<u64>,
        what: &str,
    ) -> Result<String> {
        if let Some(d) = expected {
            if self.has_blob(d, expected_size)? {
                return Ok(d.to_string());
            }
        }
        let tmp = self.tmp_path("blob");
        let res = (|| {
            let mut f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            let mut h = Hasher::default();
            let mut buf = vec![0u8; 256 * 1024];
            let mut n: u64 = 0;
            loop {
                let k = r.read(&mut buf).ctx(|| format!("read {what}"))?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                f.write_all(&buf[..k])
                    .ctx(|| format!("write {}", tmp.display()))?;
                n += k as u64;
            }
            f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
            let actual = h.finish();
            if let Some(d) = expected {
                verify(what, d, &actual)?;
            }
            if let Some(s) = expected_size {
                if s != n {
                    return Err(Error::SizeMismatch {
                        what: what.to_string(),
                        expected: s,
                        actual: n,
                    });
                }
            }
            self.commit_blob(&tmp, &actual)?;
            Ok(actual)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    pub(crate) fn put_blob_bytes(
        &self,
        bytes: &[u8],
        expected: Option<&str>,
        what: &str,
    ) -> Result<String> {
        self.put_blob(bytes, expected, Some(bytes.len() as u64), what)
    }

    /// Reads a small blob (manifest, config) and re-checks its digest.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        let f = File::open(&p).ctx(|| format!("open {}", p.display()))?;
        let mut v = Vec::new();
        f.take(MAX_JSON_BLOB + 1)
            .read_to_end(&mut v)
            .ctx(|| format!("read {}", p.display()))?;
        if v.len() as u64 > MAX_JSON_BLOB {
            return Err(Error::BadImage(format!(
                "{digest} is too large for a JSON blob"
            )));
        }
        verify(digest, digest, &sha256_digest(&v))?;
        Ok(v)
    }

    /// Unpacks the blob `digest` unless its layer directory exists; checks
    /// the diff id when known. Returns the diff id. The layer appears under
    /// its final name only when complete (unpack in tmp/, syncfs, rename).
    pub(crate) fn ensure_layer(
        &self,
        digest: &str,
        expected_diff_id: Option<&str>,
    ) -> Result<String> {
        if let Some(d) = expected_diff_id {
            if self.layer_path(d)?.is_dir() {
                return Ok(d.to_string());
            }
        }
        let blob = self.blob_path(digest)?;
        let tmp = self.tmp_path("unpack");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&tmp)
            .ctx(|| format!("mkdir {}", tmp.display()))?;
        let res = (|| {
            let diff_id = unpack_layer(&blob, &tmp)?;
            if let Some(d) = expected_diff_id {
                verify(&format!("uncompressed layer {digest}"), d, &diff_id)?;
            }
            let d = File::open(&tmp).ctx(|| format!("open {}", tmp.display()))?;
            // SAFETY: syncfs on an fd we own.
            if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
                return Err(io_err("syncfs", io::Error::last_os_error()));
            }
            let dst = self.layer_path(&diff_id)?;
            if let Err(e) = fs::rename(&tmp, &dst) {
                // Someone else unpacked the same layer first: theirs is as good.
                if !dst.is_dir() {
                    return Err(io_err(format!("rename to {}", dst.display()), e));
                }
                let _ = fs::remove_dir_all(&tmp);
            }
            sync_dir(&self.root.join("layers"))?;
            Ok(diff_id)
        })();
        if res.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        res
    }

    /// With the manifest, config and layer blobs in the store: unpack the
    /// layers and write the record.
    pub(crate) fn finish_image(
        &self,
        reference: &str,
        manifest_digest: &str,
        index_digest: Option<String>,
        manifest: &Manifest,
        source: String,
    ) -> Result<ImageRecord> {
        let cfg_bytes = self.read_blob(&manifest.config.digest)?;
        let (config, diff_ids) = parse_config(&cfg_bytes)?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(Error::BadImage(format!(
                "{} layers but {} diff ids",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::with_capacity(diff_ids.len());
        for (l, d) in manifest.layers.iter().zip(&diff_ids) {
            if !self.has_blob(&l.digest, Some(l.size()?))? {
                return Err(Error::BadImage(format!(
                    "layer blob {} is missing",
                    l.digest
                )));
            }
            self.ensure_layer(&l.digest, Some(d))?;
            layers.push(LayerInfo {
                digest: l.digest.clone(),
                diff_id: d.clone(),
                media_type: l.media_type.clone(),
                size: l.size()?,
            });
        }
        let rec = ImageRecord {
            reference: reference.to_string(),
            manifest_digest: manifest_digest.to_string(),
            index_digest,
            config_digest: manifest.config.digest.clone(),
            layers,
            config,
            source,
            stored_at: now_secs(),
        };
        self.write_record(&rec)?;
        Ok(rec)
    }

    /// temp + fsync + rename, so a record is whole or absent.
    fn write_record(&self, rec: &ImageRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(rec)
            .map_err(|e| io_err("encode record", io::Error::other(e)))?;
        let tmp = self.tmp_path("record");
        let res = (|| {
            let mut f = File::create(&tmp).ctx(|| format!("create {}", tmp.display()))?;
            f.write_all(&json)
                .ctx(|| format!("write {}", tmp.display()))?;
            f.sync_all().ctx(|| format!("fsync {}", tmp.display()))?;
            let dst = self.record_path(&rec.reference);
            fs::rename(&tmp, &dst).ctx(|| format!("rename to {}", dst.display()))?;
            sync_dir(&self.root.join("records"))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// The record for `reference` (any spelling: `postgres:17` works).
    pub fn get(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let r = normalize_reference(reference)?;
        let p = self.record_path(&r.whole());
        match fs::read(&p) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| {
                Error::BadImage(format!("record {}: {e}", p.display()))
            })?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(format!("read {}", p.display()), e)),
        }
    }

    /// All images, sorted by reference. Unreadable records are skipped.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("records");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).ctx(|| format!("read {}", dir.display()))? {
            let p = e.ctx(|| format!("read {}", dir.display()))?.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match fs::read(&p).map(|b| serde_json::from_slice::<ImageRecord>(&b)) {
                Ok(Ok(r)) => out.push(r),
                _ => tracing::warn!(path = %p.display(), "skipping unreadable image record"),
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    /// Forgets an image; its blobs and layers go at the next [`gc`](Self::gc).
    pub fn remove(&self, reference: &str) -> Result<bool> {
        let r = normalize_reference(reference)?;
        let p = self.record_path(&r.whole());
        match fs::remove_file(&p) {
            Ok(()) => {
                sync_dir(&self.root.join("records"))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(format!("remove {}", p.display()), e)),
        }
    }

    /// Removes temp files, and blobs and layers no image record uses. Waits
    /// for running pulls and imports, and holds new ones off meanwhile.
    /// Layers of removed images still used by running containers are the
    /// caller's business: keep their records until the containers are gone.
    pub fn gc(&self) -> Result<GcReport> {
        self.gc_keeping(&[])
    }

    /// Like [`ImageStore::gc`], also keeping the unpacked layer directories in `in_use` (the
    /// lower layers of running sandboxes, whose image record may be gone or re-tagged).
    pub fn gc_keeping(&self, in_use: &[PathBuf]) -> Result<GcReport> {
        let _l = self.lock(true, true)?;
        let mut rep = GcReport {
            temp_removed: self.clean_tmp()?,
            ..Default::default()
        };
        let mut blobs = HashSet::new();
        let mut layers = HashSet::new();
        for r in self.list()? {
            blobs.insert(r.manifest_digest.clone());
            blobs.insert(r.config_digest.clone());
            if let Some(i) = &r.index_digest {
                blobs.insert(i.clone());
            }
            for l in &r.layers {
                blobs.insert(l.digest.clone());
                layers.insert(l.diff_id.clone());
            }
        }
        let ldir = self.root.join("layers");
        for dir in in_use.iter().filter(|d| d.parent() == Some(ldir.as_path())) {
            if let Some(name) = dir.file_name() {
                layers.insert(format!("sha256:{}", name.to_string_lossy()));
            }
        }
        let bdir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&bdir).ctx(|| format!("read {}", bdir.display()))? {
            let e = e.ctx(|| format!("read {}", bdir.display()))?;
            let name = format!("sha256:{}", e.file_name().to_string_lossy());
            if !blobs.contains(&name) {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).ctx(|| format!("remove {}", e.path().display()))?;
                rep.blobs_removed += 1;
                rep.bytes_freed += len;
            }
        }
        for e in fs::read_dir(&ldir).ctx(|| format!("read {}", ldir.display()))? {
            let e = e.ctx(|| format!("read {}", ldir.display()))?;
            let name = format!("sha256:{}", e.file_name().to_string_lossy());
            if !layers.contains(&name) {
                // Out of its final name first, so a crash mid-delete leaves
                // only temp garbage, never a partial layer.
                let t = self.tmp_path("gc");
                fs::rename(e.path(), &t).ctx(|| format!("rename {}", e.path().display()))?;
                fs::remove_dir_all(&t).ctx(|| format!("remove {}", t.display()))?;
                rep.layers_removed += 1;
            }
        }
        Ok(rep)
    }
}
