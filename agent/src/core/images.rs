//! OCI images as the agent serves them: a content-addressed store under the data dir
//! (`miren_runtime::ImageStore`), pulls through the configured registry mirrors.

use std::path::Path;

use miren_runtime::{Credentials, ImageRecord, ImageStore, Mirrors, ProgressFn, PullOptions};

use crate::core::error::Error;
use crate::model::{ImageGcReport, ImageSummary};

pub struct ImageService {
    store: ImageStore,
    mirrors: Mirrors,
}

impl From<miren_runtime::Error> for Error {
    fn from(err: miren_runtime::Error) -> Self {
        use miren_runtime::Error as E;
        match &err {
            E::InvalidReference { .. } | E::InvalidMirror { .. } | E::InvalidDigest(_) => {
                Error::invalid(err.to_string())
            }
            E::NotFound(_) => Error::not_found(format!(
                "{err}; `miren image list` shows the images on this node"
            )),
            E::Registry { .. } => Error::new(
                crate::core::error::ErrorKind::Upstream,
                "registry",
                format!("{err}; check the reference, the credentials and --image-mirror"),
            ),
            E::DigestMismatch { .. } | E::SizeMismatch { .. } => Error::new(
                crate::core::error::ErrorKind::Upstream,
                "digest_mismatch",
                format!("{err}; the registry served corrupt content, nothing was stored"),
            ),
            E::BadImage(_) | E::NoPlatform(_) | E::UnsafeEntry { .. } => {
                Error::invalid(err.to_string())
            }
            _ => Error::internal(err.to_string()),
        }
    }
}

pub fn summary(record: &ImageRecord) -> ImageSummary {
    ImageSummary {
        reference: record.reference.clone(),
        manifest_digest: record.manifest_digest.clone(),
        config_digest: record.config_digest.clone(),
        layers: record.layers.len(),
        size_bytes: record.layers.iter().map(|l| l.size).sum(),
        entrypoint: record.config.entrypoint.clone(),
        cmd: record.config.cmd.clone(),
        source: record.source.clone(),
        stored_at: humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(record.stored_at),
        )
        .to_string(),
    }
}

/// Why the image service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ImageServiceError {
    #[error("opening the image store: {0}")]
    OpenStore(miren_runtime::Error),
}

impl ImageService {
    pub fn open(data_dir: &Path, mirrors: Mirrors) -> Result<ImageService, ImageServiceError> {
        let store = ImageStore::open(data_dir).map_err(ImageServiceError::OpenStore)?;
        Ok(ImageService { store, mirrors })
    }

    pub fn store(&self) -> &ImageStore {
        &self.store
    }

    pub async fn pull(
        &self,
        reference: &str,
        credentials: Option<(String, String)>,
        progress: Option<ProgressFn>,
    ) -> Result<ImageSummary, Error> {
        let r = miren_runtime::normalize_reference(reference)?;
        let mut creds = Credentials::default();
        if let Some((user, password)) = credentials {
            // Keyed by the host actually contacted: a mirror's own credentials go under it.
            let host = self.mirrors.endpoint(r.registry()).host;
            creds.insert(&host, &user, &password);
        }
        let opts = PullOptions {
            mirrors: self.mirrors.clone(),
            credentials: creds,
            progress,
            ..PullOptions::default()
        };
        let record = self.store.pull(reference, &opts).await?;
        Ok(summary(&record))
    }

    pub fn list(&self) -> Result<Vec<ImageSummary>, Error> {
        Ok(self.store.list()?.iter().map(summary).collect())
    }

    pub fn remove(&self, reference: &str) -> Result<bool, Error> {
        Ok(self.store.remove(reference)?)
    }

    pub fn import(&self, path: &Path, reference: &str) -> Result<ImageSummary, Error> {
        if !path.is_absolute() {
            return Err(Error::invalid(format!(
                "{} must be an absolute path on the node",
                path.display()
            )));
        }
        if !path.exists() {
            return Err(Error::invalid(format!(
                "{} does not exist on the node",
                path.display()
            )));
        }
        let (_, record) = self.store.import(path, reference)?;
        Ok(summary(&record))
    }

    /// Removes blobs and layers no image uses, keeping `in_use` (sandboxes' lower layers).
    pub fn gc(&self, in_use: &[std::path::PathBuf]) -> Result<ImageGcReport, Error> {
        let report = self.store.gc_keeping(in_use)?;
        Ok(ImageGcReport {
            blobs_removed: report.blobs_removed,
            layers_removed: report.layers_removed,
            bytes_freed: report.bytes_freed,
        })
    }
}
