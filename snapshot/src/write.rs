//! Backup: extent walk, zero-block skipping, parallel per-window zstd, ordered output.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Condvar, Mutex};

use crate::error::{Error, Result};
use crate::extents::data_extents;
use crate::format::{
    encode_chunk_header, encode_header, encode_trailer, validate_meta, ChunkHeader, Header,
    ImageHasher, SnapshotInfo, SnapshotMeta, Trailer, DEFAULT_WINDOW, FORMAT_VERSION, MAX_WINDOW,
    MIN_WINDOW, SPARSE_BLOCK,
};
use crate::Progress;

/// Tuning for [`write_snapshot`].
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// zstd level (1 is fast and usually enough for disk images).
    pub level: i32,
    /// Compression threads; 0 means one per core plus one.
    pub threads: usize,
    /// Logical bytes per chunk: a power of two from 64 KiB to 64 MiB.
    pub window_size: u32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            level: 1,
            threads: 0,
            window_size: DEFAULT_WINDOW,
        }
    }
}

/// What a backup did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Logical image size.
    pub logical_bytes: u64,
    /// Allocated bytes read from the image.
    pub data_bytes_read: u64,
    /// Non-zero bytes stored (before compression).
    pub data_bytes_stored: u64,
    /// Total snapshot bytes written, all frames included.
    pub compressed_bytes_written: u64,
    /// Number of chunks stored.
    pub chunks: u64,
    /// Whole-image checksum, hex (see docs/snapshot-format.md).
    pub image_checksum: String,
}

struct Job {
    window: u64,
    ranges: Vec<(u64, u64)>,
    alloc: u64,
}

struct Encoded {
    header: ChunkHeader,
    data: Vec<u8>,
}

/// `n`, or for 0 one thread per core plus one: a thread waiting on a cold-cache read then
/// does not leave a core idle.
pub(crate) fn threads_or_cores(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get()) + 1
    }
}

/// Writes a snapshot of the image file `image` to `out`, sequentially (a pipe or stdout works).
///
/// Only allocated extents are read and all-zero 4 KiB blocks inside them are skipped. The image
/// must not change while this runs: snapshot a [`capture_extents`](crate::capture_extents) copy
/// of a live disk. `meta.size_bytes` must equal the image's length.
pub fn write_snapshot<W: Write>(
    image: &Path,
    meta: &SnapshotMeta,
    out: W,
    opts: &WriteOptions,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    validate_meta(meta)?;
    let ws = opts.window_size;
    if !ws.is_power_of_two() || !(MIN_WINDOW..=MAX_WINDOW).contains(&ws) {
        return Err(Error::InvalidInput(format!(
            "window_size {ws} must be a power of two from {MIN_WINDOW} to {MAX_WINDOW}"
        )));
    }
    if let Some(reason) = crate::format::check_geometry(meta, ws, 0) {
        return Err(Error::InvalidInput(reason));
    }
    let level_range = zstd::compression_level_range();
    if !level_range.contains(&opts.level) {
        return Err(Error::InvalidInput(format!(
            "zstd level {} is outside {level_range:?}",
            opts.level
        )));
    }
    let file = File::open(image).map_err(|e| Error::io(format!("open {}", image.display()), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", image.display()), e))?
        .len();
    if size != meta.size_bytes {
        return Err(Error::InvalidInput(format!(
            "metadata says the disk is {} bytes but {} is {size} bytes",
            meta.size_bytes,
            image.display()
        )));
    }
    let extents = data_extents(&file, size)
        .map_err(|e| Error::io(format!("list extents of {}", image.display()), e))?;
    let jobs = window_jobs(&extents, u64::from(ws));
    let allocated: u64 = extents.iter().map(|e| e.1).sum();
    progress.start(allocated);

    let mut out = CountingWriter {
        inner: BufWriter::with_capacity(1 << 20, out),
        written: 0,
    };
    let header = Header {
        info: SnapshotInfo {
            format_version: FORMAT_VERSION,
            window_size: ws,
            source_allocated_bytes: allocated,
        },
        meta: meta.clone(),
    };
    let werr = |e| Error::io("write snapshot output", e);
    out.write_all(&encode_header(&header)).map_err(werr)?;

    let threads = threads_or_cores(opts.threads).min(jobs.len().max(1));
    // Windows allowed in flight beyond the next one to write: bounds memory to a few windows
    // per thread while keeping every core busy.
    let ahead = threads * 3;
    let next = AtomicUsize::new(0);
    let written = Mutex::new(0usize);
    let cv = Condvar::new();
    let abort = AtomicBool::new(false);
    let mut image_hash = ImageHasher::new(size, ws);
    let mut stored = 0u64;
    let mut chunks = 0u64;

    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = mpsc::channel::<(usize, Result<Option<Encoded>>)>();
        for _ in 0..threads {
            let tx = tx.clone();
            let (file, jobs, next, written, cv, abort) =
                (&file, &jobs, &next, &written, &cv, &abort);
            s.spawn(move || {
                let mut comp = match new_compressor(opts.level) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send((next.fetch_add(1, Ordering::SeqCst), Err(e)));
                        return;
                    }
                };
                let mut buf = vec![0u8; ws as usize];
                let mut raw = Vec::new();
                loop {
                    let j = next.fetch_add(1, Ordering::SeqCst);
                    if j >= jobs.len() || abort.load(Ordering::SeqCst) {
                        return;
                    }
                    {
                        let mut w = written.lock().unwrap_or_else(|p| p.into_inner());
                        while j >= *w + ahead && !abort.load(Ordering::SeqCst) {
                            w = cv.wait(w).unwrap_or_else(|p| p.into_inner());
                        }
                    }
                    if abort.load(Ordering::SeqCst) {
                        return;
                    }
                    let r = encode_window(file, &jobs[j], size, ws, &mut buf, &mut raw, &mut comp);
                    if tx.send((j, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);

        let res = (|| -> Result<()> {
            let mut pending = BTreeMap::new();
            let mut next_write = 0usize;
            while next_write < jobs.len() {
                let (j, r) = rx
                    .recv()
                    .map_err(|_| Error::io("compress", std::io::Error::other("worker exited")))?;
                pending.insert(j, r);
                while let Some(r) = pending.remove(&next_write) {
                    if let Some(enc) = r? {
                        out.write_all(&encode_chunk_header(&enc.header))
                            .map_err(werr)?;
                        out.write_all(&enc.data).map_err(werr)?;
                        image_hash.add(enc.header.window, &enc.header.hash);
                        stored += u64::from(enc.header.raw_len);
                        chunks += 1;
                    }
                    progress.advance(jobs[next_write].alloc);
                    next_write += 1;
                    *written.lock().unwrap_or_else(|p| p.into_inner()) = next_write;
                    cv.notify_all();
                }
            }
            Ok(())
        })();
        if res.is_err() {
            abort.store(true, Ordering::SeqCst);
            // Take the lock so no worker misses the wake-up between its check and its wait.
            drop(written.lock().unwrap_or_else(|p| p.into_inner()));
            cv.notify_all();
        }
        res
    })?;

    let image_hash = image_hash.finish();
    out.write_all(&encode_trailer(&Trailer {
        chunk_count: chunks,
        data_bytes: stored,
        image_hash,
    }))
    .map_err(werr)?;
    out.inner.flush().map_err(werr)?;
    Ok(Summary {
        logical_bytes: size,
        data_bytes_read: allocated,
        data_bytes_stored: stored,
        compressed_bytes_written: out.written,
        chunks,
        image_checksum: hex(&image_hash),
    })
}

fn new_compressor(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    let cerr = |e| Error::io("set up zstd compressor", e);
    let mut c = zstd::bulk::Compressor::new(level).map_err(cerr)?;
    // The frame checksum lets `zstd -t` catch damaged data on its own.
    c.include_checksum(true).map_err(cerr)?;
    c.include_contentsize(true).map_err(cerr)?;
    Ok(c)
}

/// Splits extents on window boundaries, one job per window that has any allocated byte.
fn window_jobs(extents: &[(u64, u64)], ws: u64) -> Vec<Job> {
    let mut jobs: Vec<Job> = Vec::new();
    for &(mut off, len) in extents {
        let end = off + len;
        while off < end {
            let window = off / ws;
            let piece_end = end.min((window + 1) * ws);
            match jobs.last_mut() {
                Some(j) if j.window == window => {
                    j.ranges.push((off, piece_end - off));
                    j.alloc += piece_end - off;
                }
                _ => jobs.push(Job {
                    window,
                    ranges: vec![(off, piece_end - off)],
                    alloc: piece_end - off,
                }),
            }
            off = piece_end;
        }
    }
    jobs
}

fn encode_window(
    file: &File,
    job: &Job,
    size: u64,
    ws: u32,
    buf: &mut [u8],
    raw: &mut Vec<u8>,
    comp: &mut zstd::bulk::Compressor<'static>,
) -> Result<Option<Encoded>> {
    let wstart = job.window * u64::from(ws);
    let wlen = (size - wstart).min(u64::from(ws)) as usize;
    let buf = &mut buf[..wlen];
    // Read allocated ranges; zero only the gaps (holes read as zeros anyway).
    let mut cursor = 0usize;
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &(off, len) in &job.ranges {
        let s = (off - wstart) as usize;
        let e = s + len as usize;
        buf[cursor..s].fill(0);
        file.read_exact_at(&mut buf[s..e], off)
            .map_err(|e| Error::io("read image (did it change during the backup?)", e))?;
        cursor = e;
        // Non-zero SPARSE_BLOCK-aligned blocks of this range become runs.
        let mut b = s - s % SPARSE_BLOCK;
        while b < e {
            let be = (b + SPARSE_BLOCK).min(wlen);
            let (cs, ce) = (b.max(s), be.min(e));
            if !is_zero(&buf[cs..ce]) {
                let (rs, re) = (b as u32, be as u32);
                match runs.last_mut() {
                    Some(last) if last.0 + last.1 >= rs => last.1 = last.1.max(re - last.0),
                    _ => runs.push((rs, re - rs)),
                }
            }
            b = be;
        }
    }
    buf[cursor..].fill(0);
    if runs.is_empty() {
        return Ok(None);
    }
    let hash = *blake3::hash(buf).as_bytes();
    let raw_len: u32 = runs.iter().map(|r| r.1).sum();
    let data = if runs.len() == 1 && runs[0] == (0, wlen as u32) {
        comp.compress(buf)
    } else {
        raw.clear();
        for &(o, l) in &runs {
            raw.extend_from_slice(&buf[o as usize..(o + l) as usize]);
        }
        comp.compress(raw)
    }
    .map_err(|e| Error::io("zstd compress", e))?;
    Ok(Some(Encoded {
        header: ChunkHeader {
            window: job.window,
            raw_len,
            comp_len: data.len() as u32,
            hash,
            runs,
        },
        data,
    }))
}

/// All-zero test that the compiler vectorizes (no early exit inside 64-byte blocks).
fn is_zero(b: &[u8]) -> bool {
    let mut it = b.chunks_exact(64);
    let whole = it.all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0);
    whole && it.remainder().iter().all(|&x| x == 0)
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct CountingWriter<W: Write> {
    inner: BufWriter<W>,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }
}
