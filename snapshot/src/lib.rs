//! Snapshots of miren's loop-backed disk images.
//!
//! A snapshot is a sequence of zstd frames (`zstd -t` accepts it): a header in a skippable
//! frame, then for every 4 MiB window of the image that holds non-zero data a skippable chunk
//! header followed by one ordinary zstd frame with that data, then a trailer with the
//! whole-image checksum. Holes and all-zero blocks are never stored. See
//! `docs/snapshot-format.md` for the byte layout.
//!
//! Typical live backup, driven by the agent:
//! 1. `let g = freeze(mount)?; capture_extents(image, tmp)?; drop(g);`
//! 2. `write_snapshot(tmp, &meta, out, &WriteOptions::default(), &mut progress)?;`
//!
//! Restore: `SnapshotReader::open(input)?`, inspect the metadata, then
//! `reader.restore_into(&new_temp_file, &mut progress)?` and rename the file into place.

mod error;
mod extents;
mod format;
mod freeze;
mod observe;
mod read;
mod write;

pub use error::{Error, Result};
pub use extents::{capture_extents, capture_extents_into, memory_file};
pub use format::{
    printable, Filesystem, SnapshotInfo, SnapshotMeta, FORMAT_VERSION, MAX_IMAGE_BYTES, MAX_WINDOWS,
};
pub use freeze::{freeze, freeze_bound, hold_freeze, thaw, FreezeGuard, HoldEnd, MAX_FREEZE};
pub use observe::{StreamObserver, TrailerSummary};
pub use read::{ReadSummary, SnapshotReader};
pub use write::{write_snapshot, Summary, WriteOptions};

/// Progress sink. Called from the thread that called into this crate, in order.
pub trait Progress {
    /// Total bytes the operation expects to process (allocated bytes of the image).
    fn start(&mut self, _total_bytes: u64) {}
    /// `bytes` more were processed.
    fn advance(&mut self, bytes: u64);
}

/// Ignores progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&mut self, _bytes: u64) {}
}

/// Any `FnMut(u64)` is a progress sink that sees the bytes of each step.
impl<F: FnMut(u64)> Progress for F {
    fn advance(&mut self, bytes: u64) {
        self(bytes)
    }
}
