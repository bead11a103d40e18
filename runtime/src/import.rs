//! Import from an OCI image layout, an OCI archive (a tar of a layout), or a
//! plain rootfs tarball (like `docker import`).

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use crate::digest::digest_hex;
use crate::error::{Error, IoContext, Result};
use crate::oci::{
    parse_manifest, select_platform, synth_config, Descriptor, ImageConfig, Manifest, Parsed,
    Platform, OCI_CONFIG, OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_LAYER_ZSTD, REF_NAME_ANNOTATION,
};
use crate::store::{normalize_reference, ImageRecord, ImageStore, MAX_JSON_BLOB};
use crate::unpack::{decompressed, ensure_dirs, sanitize, sniff, Compression};

/// What [`ImageStore::import`] found at a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImportKind {
    OciLayout,
    OciArchive,
    RootfsTar,
}

fn read_small(path: &Path) -> Result<Vec<u8>> {
    let f = File::open(path).ctx(|| format!("open {}", path.display()))?;
    let mut v = Vec::new();
    f.take(MAX_JSON_BLOB + 1)
        .read_to_end(&mut v)
        .ctx(|| format!("read {}", path.display()))?;
    if v.len() as u64 > MAX_JSON_BLOB {
        return Err(Error::BadImage(format!("{} is too large", path.display())));
    }
    Ok(v)
}

impl ImageStore {
    /// Imports `path` under `reference`, telling the kind by looking: a
    /// directory is an OCI layout; a tar holding `oci-layout` an OCI
    /// archive; any other tar (plain, gzip or zstd) a rootfs.
    pub fn import(&self, path: &Path, reference: &str) -> Result<(ImportKind, ImageRecord)> {
        if path.is_dir() {
            return Ok((
                ImportKind::OciLayout,
                self.import_oci_layout(path, reference)?,
            ));
        }
        let (r, _) = decompressed(path)?;
        let mut ar = tar::Archive::new(r);
        let mut is_layout = false;
        for e in ar.entries().ctx(|| format!("read {}", path.display()))? {
            let e = e.ctx(|| format!("read {}", path.display()))?;
            let p = e.path().ctx(|| format!("read {}", path.display()))?;
            if sanitize(&p)
                .ok()
                .flatten()
                .is_some_and(|p| p == Path::new("oci-layout"))
            {
                is_layout = true;
                break;
            }
        }
        if is_layout {
            Ok((
                ImportKind::OciArchive,
                self.import_oci_archive(path, reference)?,
            ))
        } else {
            Ok((
                ImportKind::RootfsTar,
                self.import_rootfs_tar(path, reference, None)?,
            ))
        }
    }

    /// Imports the image of an OCI image-layout directory. With several
    /// images in `index.json`, the one whose `org.opencontainers.image.ref.name`
    /// equals the reference's tag (or the whole reference) is taken.
    pub fn import_oci_layout(&self, dir: &Path, reference: &str) -> Result<ImageRecord> {
        let r = normalize_reference(reference)?;
        let _l = self.lock(false, true)?;
        self.layout_import(dir, &r, format!("import:{}", dir.display()))
    }

    fn layout_import(
        &self,
        dir: &Path,
        r: &oci_client::Reference,
        source: String,
    ) -> Result<ImageRecord> {
        let index_bytes = read_small(&dir.join("index.json"))?;
        let Parsed::Index(entries) = parse_manifest(&index_bytes)? else {
            return Err(Error::BadImage("index.json is not an image index".into()));
        };
        let blob = |d: &str| -> Result<std::path::PathBuf> {
            Ok(dir.join("blobs/sha256").join(digest_hex(d)?))
        };
        let want = |d: &Descriptor| {
            d.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME_ANNOTATION))
                .is_some_and(|n| Some(n.as_str()) == r.tag() || *n == r.whole())
        };
        let top = match entries.iter().find(|d| want(d)) {
            Some(d) => d,
            None if entries.len() == 1 => &entries[0],
            None => select_platform(&entries, &Platform::current()).map_err(|_| {
                Error::BadImage(format!(
                    "{} holds {} images and none is named {:?}",
                    dir.display(),
                    entries.len(),
                    r.tag().unwrap_or("latest")
                ))
            })?,
        };
        let copy_small = |d: &Descriptor, what: &str| -> Result<Vec<u8>> {
            let bytes = read_small(&blob(&d.digest)?)?;
            self.put_blob_bytes(&bytes, Some(&d.digest), what)?;
            Ok(bytes)
        };
        let mut index_digest = None;
        let mut desc = top.clone();
        let mut bytes = copy_small(&desc, "manifest")?;
        let manifest = loop {
            match parse_manifest(&bytes)? {
                Parsed::Manifest(m) => break m,
                Parsed::Index(e) if index_digest.is_none() => {
                    index_digest = Some(desc.digest.clone());
                    desc = select_platform(&e, &Platform::current())?.clone();
                    bytes = copy_small(&desc, "manifest")?;
                }
                Parsed::Index(_) => return Err(Error::BadImage("nested image index".into())),
            }
        };
        copy_small(&manifest.config, "image config")?;
        for l in &manifest.layers {
            let p = blob(&l.digest)?;
            let f = File::open(&p).ctx(|| format!("open {}", p.display()))?;
            self.put_blob(
                f,
                Some(&l.digest),
                Some(l.size()?),
                &format!("layer {}", l.digest),
            )?;
        }
        self.finish_image(&r.whole(), &desc.digest, index_digest, &manifest, source)
    }

    /// Imports an OCI archive (a tar, possibly compressed, of an OCI layout).
    pub fn import_oci_archive(&self, archive: &Path, reference: &str) -> Result<ImageRecord> {
        let tmp = self.tmp_path("archive");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .ctx(|| format!("mkdir {}", tmp.display()))?;
        let res = (|| {
            let r = normalize_reference(reference)?;
            let _l = self.lock(false, true)?;
            extract_plain(archive, &tmp)?;
            self.layout_import(&tmp, &r, format!("import:{}", archive.display()))
        })();
        let _ = fs::remove_dir_all(&tmp);
        res
    }

    /// Imports a rootfs tarball (plain, gzip or zstd) as a one-layer image,
    /// like `docker import`. `config` defaults to a standard `PATH`.
    pub fn import_rootfs_tar(
        &self,
        tarball: &Path,
        reference: &str,
        config: Option<ImageConfig>,
    ) -> Result<ImageRecord> {
        let r = normalize_reference(reference)?;
        let _l = self.lock(false, true)?;
        let media_type = {
            let f = File::open(tarball).ctx(|| format!("open {}", tarball.display()))?;
            let mut br = io::BufReader::new(f);
            match sniff(&mut br).ctx(|| format!("read {}", tarball.display()))? {
                Compression::None => OCI_LAYER_TAR,
                Compression::Gzip => OCI_LAYER_GZIP,
                Compression::Zstd => OCI_LAYER_ZSTD,
            }
        };
        let f = File::open(tarball).ctx(|| format!("open {}", tarball.display()))?;
        let size = f
            .metadata()
            .ctx(|| format!("stat {}", tarball.display()))?
            .len();
        let layer_digest = self.put_blob(f, None, None, "rootfs tarball")?;
        let diff_id = self.ensure_layer(&layer_digest, None)?;
        let cfg = config.unwrap_or_else(|| ImageConfig {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..Default::default()
        });
        let cfg_bytes = synth_config(&cfg, std::slice::from_ref(&diff_id));
        let cfg_digest = self.put_blob_bytes(&cfg_bytes, None, "image config")?;
        let manifest = Manifest {
            config: Descriptor {
                media_type: OCI_CONFIG.into(),
                digest: cfg_digest,
                size: cfg_bytes.len() as i64,
                platform: None,
                annotations: None,
            },
            layers: vec![Descriptor {
                media_type: media_type.into(),
                digest: layer_digest,
                size: size as i64,
                platform: None,
                annotations: None,
            }],
        };
        let mbytes = manifest.to_oci_json();
        let mdigest = self.put_blob_bytes(&mbytes, None, "manifest")?;
        self.finish_image(
            &r.whole(),
            &mdigest,
            None,
            &manifest,
            format!("import:{}", tarball.display()),
        )
    }
}

/// Extracts only directories and regular files, with checked paths: an OCI
/// archive needs nothing else.
fn extract_plain(archive: &Path, dest: &Path) -> Result<()> {
    let (r, _) = decompressed(archive)?;
    let mut ar = tar::Archive::new(r);
    for e in ar.entries().ctx(|| format!("read {}", archive.display()))? {
        let mut e = e.ctx(|| format!("read {}", archive.display()))?;
        let raw = e
            .path()
            .ctx(|| format!("read {}", archive.display()))?
            .into_owned();
        let Some(rel) = sanitize(&raw)? else { continue };
        match e.header().entry_type() {
            tar::EntryType::Directory => ensure_dirs(dest, Some(&rel))?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                ensure_dirs(dest, rel.parent().filter(|p| !p.as_os_str().is_empty()))?;
                let p = dest.join(&rel);
                let _ = fs::remove_file(&p);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&p)
                    .ctx(|| format!("create {}", p.display()))?;
                io::copy(&mut e, &mut f).ctx(|| format!("write {}", p.display()))?;
            }
            _ => {}
        }
    }
    Ok(())
}
