//! Error type. Messages say what happened and what the operator can do next.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while writing, reading or capturing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a local file or stream, with what we were doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The input does not start with a miren snapshot header.
    #[error("not a miren snapshot ({reason}); check that you passed the right file")]
    NotASnapshot { reason: String },

    /// Written by a newer miren with a format this build cannot read.
    #[error(
        "snapshot format version {found} is newer than this miren supports (up to {supported}); \
         restore it with a newer miren"
    )]
    UnsupportedVersion { found: u16, supported: u16 },

    /// The header frame is damaged.
    #[error("snapshot header is corrupt ({reason}); the file is damaged, use another backup")]
    CorruptHeader { reason: String },

    /// A chunk failed validation. `index` counts stored chunks from 0; `snapshot_offset` is the
    /// byte position of its frame in the snapshot; `image_offset` is where it belongs in the image
    /// when that is still known.
    #[error(
        "snapshot chunk {index} is corrupt (snapshot byte {snapshot_offset}{}): {reason}; \
         the backup is damaged, use another backup",
        fmt_image_offset(*.image_offset)
    )]
    CorruptChunk {
        index: u64,
        snapshot_offset: u64,
        image_offset: Option<u64>,
        reason: String,
    },

    /// The stream ended before the trailer.
    #[error(
        "snapshot is truncated: it ends inside or before chunk {index} (snapshot byte {snapshot_offset}{}); \
         the copy is incomplete, copy the whole file again or use another backup",
        fmt_image_offset(*.image_offset)
    )]
    Truncated {
        index: u64,
        snapshot_offset: u64,
        image_offset: Option<u64>,
    },

    /// The trailer (chunk count, whole-image checksum) is damaged or does not match the chunks.
    #[error("snapshot trailer check failed ({reason}); the backup is damaged, use another backup")]
    CorruptTrailer { reason: String },

    /// `restore_into` needs a fresh, empty file: old bytes would survive in the holes.
    #[error("restore target must be a new empty file, but it holds {len} bytes; pass a freshly created temporary file")]
    TargetNotEmpty { len: u64 },

    /// The caller passed metadata or options that cannot be written.
    #[error("invalid snapshot request: {0}")]
    InvalidInput(String),

    /// FIFREEZE reported the filesystem is already frozen.
    #[error("{} is already frozen (a previous backup may have crashed); thaw it first", path.display())]
    AlreadyFrozen { path: PathBuf },
}

fn fmt_image_offset(off: Option<u64>) -> String {
    match off {
        Some(o) => format!(", image offset {o}"),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// For chunk errors: `(chunk index, image offset if known)` of the first bad chunk.
    pub fn bad_chunk(&self) -> Option<(u64, Option<u64>)> {
        match self {
            Error::CorruptChunk {
                index,
                image_offset,
                ..
            }
            | Error::Truncated {
                index,
                image_offset,
                ..
            } => Some((*index, *image_offset)),
            _ => None,
        }
    }

    /// True when the snapshot bytes themselves are bad (as opposed to local I/O or usage errors).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::NotASnapshot { .. }
                | Error::CorruptHeader { .. }
                | Error::CorruptChunk { .. }
                | Error::Truncated { .. }
                | Error::CorruptTrailer { .. }
        )
    }
}
