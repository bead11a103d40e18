//! Following a snapshot as its bytes pass by (to a file, a pipe, a socket), without
//! decompressing: chunk headers say how much image data each data frame carries, and the
//! trailer carries the totals and the whole-image checksum. Used for progress and summaries
//! by whoever relays a snapshot; it checks nothing (that is `SnapshotReader`'s job).

use crate::format::{SKIPPABLE_CHUNK, SKIPPABLE_HEADER, SKIPPABLE_TRAILER, TRAILER_MAGIC};

/// What the trailer of a snapshot says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailerSummary {
    pub chunks: u64,
    /// Image data bytes stored (all chunks' raw lengths).
    pub data_bytes: u64,
    /// Whole-image checksum, hex.
    pub image_checksum: String,
}

/// Largest record payload worth buffering; anything larger is not a well-formed record.
const MAX_RECORD: u32 = 1 << 20;

#[derive(Debug, Default)]
pub struct StreamObserver {
    header: Vec<u8>,
    record: Vec<u8>,
    record_magic: u32,
    record_len: u32,
    skip: u64,
    data_bytes: u64,
    trailer: Option<TrailerSummary>,
    lost: bool,
}

impl StreamObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Image data bytes whose frames have passed by so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// The trailer, once it has passed by.
    pub fn trailer(&self) -> Option<&TrailerSummary> {
        self.trailer.as_ref()
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                continue;
            }
            if self.record_len > 0 {
                let want = self.record_len as usize - self.record.len();
                let n = want.min(data.len());
                self.record.extend_from_slice(&data[..n]);
                data = &data[n..];
                if self.record.len() == self.record_len as usize {
                    self.finish_record();
                }
                continue;
            }
            let n = (8 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == 8 {
                let magic = u32::from_le_bytes([
                    self.header[0],
                    self.header[1],
                    self.header[2],
                    self.header[3],
                ]);
                let len = u32::from_le_bytes([
                    self.header[4],
                    self.header[5],
                    self.header[6],
                    self.header[7],
                ]);
                self.header.clear();
                match magic {
                    SKIPPABLE_CHUNK | SKIPPABLE_TRAILER if len > 0 && len <= MAX_RECORD => {
                        self.record_magic = magic;
                        self.record_len = len;
                        self.record.clear();
                    }
                    SKIPPABLE_HEADER => self.skip = u64::from(len),
                    _ => self.lost = true,
                }
            }
        }
    }

    fn finish_record(&mut self) {
        let r = std::mem::take(&mut self.record);
        self.record_len = 0;
        let u32_at = |o: usize| {
            r.get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let u64_at = |o: usize| {
            r.get(o..o + 8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_le_bytes)
        };
        match self.record_magic {
            SKIPPABLE_CHUNK => match (u32_at(8), u32_at(12)) {
                (Some(raw), Some(comp)) => {
                    self.data_bytes += u64::from(raw);
                    self.skip = u64::from(comp);
                }
                _ => self.lost = true,
            },
            _ => {
                let checksum = r
                    .get(24..56)
                    .map(|b| b.iter().map(|x| format!("{x:02x}")).collect());
                match (r.get(0..8), u64_at(8), u64_at(16), checksum) {
                    (Some(magic), Some(chunks), Some(data_bytes), Some(image_checksum))
                        if magic == TRAILER_MAGIC =>
                    {
                        self.trailer = Some(TrailerSummary {
                            chunks,
                            data_bytes,
                            image_checksum,
                        })
                    }
                    _ => self.lost = true,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{write_snapshot, Filesystem, NoProgress, SnapshotMeta, WriteOptions};
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn follows_a_real_snapshot_fed_in_odd_pieces() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-obs")
            .tempdir()
            .unwrap();
        let image = dir.path().join("img");
        let mut f = std::fs::File::create(&image).unwrap();
        f.set_len(64 << 20).unwrap();
        for (i, off) in [0u64, 9 << 20, 40 << 20].iter().enumerate() {
            f.seek(SeekFrom::Start(*off)).unwrap();
            f.write_all(&vec![i as u8 + 1; 300_000]).unwrap();
        }
        drop(f);
        let meta = SnapshotMeta {
            name: "d".into(),
            size_bytes: 64 << 20,
            filesystem: Filesystem::Ext4,
            block_size: 4096,
            created_at: std::time::SystemTime::now(),
            agent_version: "test".into(),
        };
        let mut out = Vec::new();
        let summary = write_snapshot(
            &image,
            &meta,
            &mut out,
            &WriteOptions::default(),
            &mut NoProgress,
        )
        .unwrap();
        let mut observer = StreamObserver::new();
        for piece in out.chunks(7) {
            observer.feed(piece);
        }
        let trailer = observer.trailer().expect("trailer seen");
        assert_eq!(trailer.image_checksum, summary.image_checksum);
        assert_eq!(trailer.data_bytes, summary.data_bytes_stored);
        assert_eq!(observer.data_bytes(), summary.data_bytes_stored);
        // garbage never panics
        let mut junk = StreamObserver::new();
        junk.feed(&[0xff; 1000]);
        assert!(junk.trailer().is_none());
    }
}
