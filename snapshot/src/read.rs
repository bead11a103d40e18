//! Verify and restore: sequential read of the stream, parallel decompress + check.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Mutex};

use crate::error::{Error, Result};
use crate::format::{
    decode_chunk_header, decode_header, decode_trailer, hash_zeros, is_skippable,
    max_chunk_payload, Header, ImageHasher, SnapshotInfo, SnapshotMeta, MAX_HEADER_PAYLOAD,
    SKIPPABLE_CHUNK, SKIPPABLE_HEADER, SKIPPABLE_TRAILER, TRAILER_PAYLOAD, ZSTD_MAGIC,
};
use crate::write::{hex, threads_or_cores};
use crate::Progress;

/// What a verify or restore checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSummary {
    pub logical_bytes: u64,
    pub chunks: u64,
    /// Non-zero bytes stored in the snapshot (what a restore writes).
    pub data_bytes: u64,
    /// Whole-image checksum, hex; equals the one [`write_snapshot`](crate::write_snapshot) returned.
    pub image_checksum: String,
}

/// A snapshot whose header has been read and checked; nothing else has been read yet.
pub struct SnapshotReader<R: Read> {
    input: BufReader<R>,
    pos: u64,
    header: Header,
}

struct Job {
    index: u64,
    frame_pos: u64,
    image_off: u64,
    window_len: u64,
    runs: Vec<(u32, u32)>,
    raw_len: u32,
    hash: [u8; 32],
    data: Vec<u8>,
}

enum Frame {
    Eof,
    Head { magic: u32, len: u32 },
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and validates the header so the caller can decide on the name, size and refusals
    /// before anything is written. Fails on foreign files and newer format versions.
    pub fn open(input: R) -> Result<(Self, SnapshotMeta)> {
        let mut input = BufReader::with_capacity(1 << 20, input);
        let mut head = [0u8; 8];
        let n = read_full(&mut input, &mut head).map_err(|e| Error::io("read snapshot", e))?;
        if n < head.len() {
            return Err(Error::NotASnapshot {
                reason: format!("input is only {n} bytes long"),
            });
        }
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if magic == ZSTD_MAGIC {
            return Err(Error::NotASnapshot {
                reason: "it is a plain zstd file".into(),
            });
        }
        if magic != SKIPPABLE_HEADER {
            return Err(Error::NotASnapshot {
                reason: "unknown magic number".into(),
            });
        }
        if len > MAX_HEADER_PAYLOAD {
            return Err(Error::CorruptHeader {
                reason: format!("header length {len} is too large"),
            });
        }
        let mut payload = vec![0u8; len as usize];
        let n = read_full(&mut input, &mut payload).map_err(|e| Error::io("read snapshot", e))?;
        if n < payload.len() {
            return Err(Error::CorruptHeader {
                reason: "the file ends inside the header (truncated)".into(),
            });
        }
        let header = decode_header(&payload)?;
        let meta = header.meta.clone();
        Ok((
            SnapshotReader {
                input,
                pos: 8 + u64::from(len),
                header,
            },
            meta,
        ))
    }

    /// Format facts from the header.
    pub fn info(&self) -> SnapshotInfo {
        self.header.info
    }

    /// Reads the whole snapshot and checks every chunk and the whole-image checksum.
    pub fn verify(self, progress: &mut dyn Progress) -> Result<ReadSummary> {
        self.run(None, progress)
    }

    /// Restores into `target`, which must be a new, empty file (a temporary file the caller
    /// created next to the final image). Only data runs are written, at their offsets, and
    /// the file is sized with `set_len`, so the result is sparse. Nothing outside `target` is
    /// written. On error the file holds a partial image: delete it. The caller should fsync it
    /// before renaming it into place.
    pub fn restore_into(self, target: &File, progress: &mut dyn Progress) -> Result<ReadSummary> {
        let len = target
            .metadata()
            .map_err(|e| Error::io("stat restore target", e))?
            .len();
        if len != 0 {
            return Err(Error::TargetNotEmpty { len });
        }
        target.set_len(self.header.meta.size_bytes).map_err(|e| {
            Error::io(
                format!(
                    "size restore target to {} bytes",
                    self.header.meta.size_bytes
                ),
                e,
            )
        })?;
        self.run(Some(target), progress)
    }

    fn run(mut self, target: Option<&File>, progress: &mut dyn Progress) -> Result<ReadSummary> {
        let size = self.header.meta.size_bytes;
        let ws = self.header.info.window_size;
        progress.start(self.header.info.source_allocated_bytes);
        let threads = threads_or_cores(0);
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(threads * 2);
        let job_rx = Mutex::new(job_rx);
        let (res_tx, res_rx) = mpsc::channel::<(u64, Result<u32>)>();

        std::thread::scope(|s| {
            for _ in 0..threads {
                let res_tx = res_tx.clone();
                let job_rx = &job_rx;
                s.spawn(move || {
                    let mut dec = match zstd::bulk::Decompressor::new() {
                        Ok(d) => d,
                        Err(e) => {
                            let _ = res_tx.send((0, Err(Error::io("set up zstd", e))));
                            return;
                        }
                    };
                    loop {
                        let job = match job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                            Ok(j) => j,
                            Err(_) => return,
                        };
                        let r = check_chunk(&job, &mut dec, target).map(|()| job.raw_len);
                        if res_tx.send((job.index, r)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(res_tx);

            // Lowest-index error wins: the first bad chunk is what the operator needs.
            let mut first_err: Option<(u64, Error)> = None;
            let mut data_bytes = 0u64;
            let mut handle = |(idx, r): (u64, Result<u32>),
                              first: &mut Option<(u64, Error)>,
                              progress: &mut dyn Progress| match r {
                Ok(n) => {
                    data_bytes += u64::from(n);
                    progress.advance(u64::from(n));
                }
                Err(e) => note(first, idx, e),
            };

            let mut hasher = ImageHasher::new(size, ws);
            let mut index = 0u64;
            let mut stored = 0u64;
            let mut trailer = None;
            loop {
                while let Ok(r) = res_rx.try_recv() {
                    handle(r, &mut first_err, progress);
                }
                if first_err.is_some() {
                    break;
                }
                match self.next_chunk(index, &mut hasher) {
                    Ok(Next::Chunk(job)) => {
                        stored += u64::from(job.raw_len);
                        index += 1;
                        if job_tx.send(job).is_err() {
                            break;
                        }
                    }
                    Ok(Next::Trailer(t)) => {
                        trailer = Some(t);
                        break;
                    }
                    Err(e) => {
                        note(&mut first_err, index, e);
                        break;
                    }
                }
            }
            drop(job_tx);
            for r in res_rx.iter() {
                handle(r, &mut first_err, progress);
            }
            if let Some((_, e)) = first_err {
                return Err(e);
            }
            let Some(t) = trailer else {
                return Err(Error::CorruptTrailer {
                    reason: "reading stopped before the trailer".into(),
                });
            };
            let bad = |reason: String| Err(Error::CorruptTrailer { reason });
            if t.chunk_count != index {
                return bad(format!(
                    "trailer lists {} chunks but {index} were found (chunks are missing or extra)",
                    t.chunk_count
                ));
            }
            if t.data_bytes != stored || data_bytes != stored {
                return bad("stored data length does not match the trailer".into());
            }
            let image_hash = hasher.finish();
            if image_hash != t.image_hash {
                return bad("whole-image checksum mismatch".into());
            }
            Ok(ReadSummary {
                logical_bytes: size,
                chunks: index,
                data_bytes: stored,
                image_checksum: hex(&image_hash),
            })
        })
    }

    /// Reads the next frame: a chunk (header checked, data read) or the trailer (followed by EOF).
    fn next_chunk(&mut self, index: u64, hasher: &mut ImageHasher) -> Result<Next> {
        let frame_pos = self.pos;
        let truncated = |image_offset| Error::Truncated {
            index,
            snapshot_offset: frame_pos,
            image_offset,
        };
        let corrupt = |reason: String, image_offset| Error::CorruptChunk {
            index,
            snapshot_offset: frame_pos,
            image_offset,
            reason,
        };
        let (magic, len) = match self.frame_head()? {
            Frame::Eof => return Err(truncated(None)),
            Frame::Head { magic, len } => (magic, len),
        };
        match magic {
            SKIPPABLE_CHUNK => {}
            SKIPPABLE_TRAILER => {
                if len != TRAILER_PAYLOAD {
                    return Err(Error::CorruptTrailer {
                        reason: "trailer has the wrong length".into(),
                    });
                }
                let mut p = vec![0u8; len as usize];
                if !self.fill(&mut p)? {
                    return Err(truncated(None));
                }
                let t = decode_trailer(&p).map_err(|reason| Error::CorruptTrailer { reason })?;
                let mut extra = [0u8; 1];
                if read_full(&mut self.input, &mut extra).map_err(rerr)? != 0 {
                    return Err(Error::CorruptTrailer {
                        reason: "unexpected bytes after the trailer".into(),
                    });
                }
                return Ok(Next::Trailer(t));
            }
            ZSTD_MAGIC => {
                return Err(corrupt(
                    "unexpected zstd frame where a chunk header belongs".into(),
                    None,
                ))
            }
            m if is_skippable(m) => {
                return Err(corrupt(format!("unknown skippable frame {m:#x}"), None))
            }
            _ => return Err(corrupt("garbage where a chunk header belongs".into(), None)),
        }
        let ws = self.header.info.window_size;
        let size = self.header.meta.size_bytes;
        if len as usize > max_chunk_payload(ws) {
            return Err(corrupt("chunk header is implausibly large".into(), None));
        }
        let mut p = vec![0u8; len as usize];
        if !self.fill(&mut p)? {
            return Err(truncated(None));
        }
        let ch = decode_chunk_header(&p, ws, size).map_err(|r| corrupt(r, None))?;
        let image_off = ch.window * u64::from(ws);
        if ch.window < hasher.next_window() {
            return Err(corrupt(
                "chunk is out of order or duplicated".into(),
                Some(image_off),
            ));
        }
        let mut data = vec![0u8; ch.comp_len as usize];
        if !self.fill(&mut data)? {
            return Err(truncated(Some(image_off)));
        }
        hasher.add(ch.window, &ch.hash);
        Ok(Next::Chunk(Job {
            index,
            frame_pos,
            image_off,
            window_len: (size - image_off).min(u64::from(ws)),
            runs: ch.runs,
            raw_len: ch.raw_len,
            hash: ch.hash,
            data,
        }))
    }

    fn frame_head(&mut self) -> Result<Frame> {
        let mut head = [0u8; 8];
        let n = read_full(&mut self.input, &mut head).map_err(rerr)?;
        if n == 0 {
            return Ok(Frame::Eof);
        }
        if n < 8 {
            // A partial frame head is a truncation just like a clean end.
            return Ok(Frame::Eof);
        }
        self.pos += 8;
        Ok(Frame::Head {
            magic: u32::from_le_bytes([head[0], head[1], head[2], head[3]]),
            len: u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
        })
    }

    /// Fills `buf`; `Ok(false)` when the input ends first.
    fn fill(&mut self, buf: &mut [u8]) -> Result<bool> {
        let n = read_full(&mut self.input, buf).map_err(rerr)?;
        self.pos += n as u64;
        Ok(n == buf.len())
    }
}

fn note(first: &mut Option<(u64, Error)>, idx: u64, e: Error) {
    if first.as_ref().is_none_or(|(i, _)| idx < *i) {
        *first = Some((idx, e));
    }
}

enum Next {
    Chunk(Job),
    Trailer(crate::format::Trailer),
}

fn rerr(e: io::Error) -> Error {
    Error::io("read snapshot", e)
}

/// Decompresses one chunk, checks its window checksum, then (only if it is good) writes its
/// runs into the target.
fn check_chunk(
    job: &Job,
    dec: &mut zstd::bulk::Decompressor<'static>,
    target: Option<&File>,
) -> Result<()> {
    let corrupt = |reason: String| Error::CorruptChunk {
        index: job.index,
        snapshot_offset: job.frame_pos,
        image_offset: Some(job.image_off),
        reason,
    };
    // Exactly one zstd frame must fill the declared length.
    match zstd::zstd_safe::find_frame_compressed_size(&job.data) {
        Ok(n) if n == job.data.len() => {}
        _ => {
            return Err(corrupt(
                "compressed data is not one complete zstd frame".into(),
            ))
        }
    }
    let raw = dec
        .decompress(&job.data, job.raw_len as usize)
        .map_err(|e| corrupt(format!("zstd: {e}")))?;
    if raw.len() != job.raw_len as usize {
        return Err(corrupt(
            "decompressed length differs from the header".into(),
        ));
    }
    let mut h = blake3::Hasher::new();
    let mut cursor = 0u64;
    let mut p = 0usize;
    for &(off, len) in &job.runs {
        hash_zeros(&mut h, u64::from(off) - cursor);
        h.update(&raw[p..p + len as usize]);
        p += len as usize;
        cursor = u64::from(off) + u64::from(len);
    }
    hash_zeros(&mut h, job.window_len - cursor);
    if h.finalize().as_bytes() != &job.hash {
        return Err(corrupt("checksum mismatch".into()));
    }
    if let Some(f) = target {
        let mut p = 0usize;
        for &(off, len) in &job.runs {
            f.write_all_at(&raw[p..p + len as usize], job.image_off + u64::from(off))
                .map_err(|e| Error::io("write restored image", e))?;
            p += len as usize;
        }
    }
    Ok(())
}

/// Reads until `buf` is full or EOF; returns the byte count.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
