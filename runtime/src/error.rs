use std::path::PathBuf;

/// Everything the image store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("invalid mirror {spec:?}: {reason}")]
    InvalidMirror { spec: String, reason: String },
    #[error("registry {registry}: {source}")]
    Registry {
        registry: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("unsupported or malformed digest {0:?} (only sha256 is supported)")]
    InvalidDigest(String),
    #[error("malformed image: {0}")]
    BadImage(String),
    #[error("no manifest for platform {0} in the image index")]
    NoPlatform(String),
    #[error("unsafe tar entry {path:?}: {reason}")]
    UnsafeEntry { path: PathBuf, reason: String },
    #[error("image {0} not found")]
    NotFound(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a short context (usually a path) to io errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

pub(crate) fn io_err(context: impl Into<String>, source: std::io::Error) -> Error {
    Error::Io {
        context: context.into(),
        source,
    }
}
