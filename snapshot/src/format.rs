//! On-disk layout (see docs/snapshot-format.md). Everything is little-endian and every
//! miren frame is a zstd skippable frame, so the whole file stays a valid zstd stream.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Newest format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;

pub(crate) const ZSTD_MAGIC: u32 = 0xFD2F_B528;
pub(crate) const SKIPPABLE_HEADER: u32 = 0x184D_2A5D;
pub(crate) const SKIPPABLE_CHUNK: u32 = 0x184D_2A5E;
pub(crate) const SKIPPABLE_TRAILER: u32 = 0x184D_2A5F;
const SKIPPABLE_MASK: u32 = 0xFFFF_FFF0;
const SKIPPABLE_BASE: u32 = 0x184D_2A50;

pub(crate) const HEADER_MAGIC: &[u8; 8] = b"MIRENSNP";
pub(crate) const TRAILER_MAGIC: &[u8; 8] = b"MIRENEND";
/// Domain separation for the whole-image checksum.
pub(crate) const IMAGE_HASH_DOMAIN: &[u8] = b"miren-snapshot image v1\0";

/// Zero detection granularity inside allocated extents.
pub(crate) const SPARSE_BLOCK: usize = 4096;
pub(crate) const MIN_WINDOW: u32 = 64 << 10;
pub(crate) const MAX_WINDOW: u32 = 64 << 20;
/// Default chunk window: big enough for good ratio, small enough to keep 2 cores busy.
pub(crate) const DEFAULT_WINDOW: u32 = 4 << 20;

pub(crate) const MAX_HEADER_PAYLOAD: u32 = 64 << 10;
pub(crate) const MAX_STRING: usize = 4096;
/// Largest image a snapshot may describe: 64 TiB, the agent's largest disk (and below the
/// ext4, XFS and btrfs maxima). A header declaring more is refused before any work.
pub const MAX_IMAGE_BYTES: u64 = 64 << 40;
/// Most windows an image may span: verify and restore hash one 32-byte checksum per window,
/// stored or not, so this bounds the work a tiny file declaring a huge sparse image can cause
/// (2^24 windows: 64 TiB at the default 4 MiB window).
pub const MAX_WINDOWS: u64 = 1 << 24;
/// Longest disk name, filesystem name and agent version a snapshot may carry.
pub(crate) const MAX_NAME: usize = 255;
pub(crate) const MAX_FS_NAME: usize = 32;
pub(crate) const MAX_VERSION: usize = 64;
const HASH_LEN: usize = 32;
const CHUNK_FIXED: usize = 8 + 4 + 4 + HASH_LEN + 4;
pub(crate) const TRAILER_PAYLOAD: u32 = (8 + 8 + 8 + HASH_LEN + HASH_LEN) as u32;

/// Filesystem on the disk image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Filesystem {
    Ext4,
    Xfs,
    Btrfs,
    /// Anything else, kept verbatim so newer agents can add kinds without a format bump.
    Other(String),
}

impl Filesystem {
    /// Name as stored in the snapshot and shown to users.
    pub fn as_str(&self) -> &str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
            Filesystem::Btrfs => "btrfs",
            Filesystem::Other(s) => s,
        }
    }

    /// Parses a stored name; unknown names become `Other`.
    pub fn from_name(s: &str) -> Filesystem {
        match s {
            "ext4" => Filesystem::Ext4,
            "xfs" => Filesystem::Xfs,
            "btrfs" => Filesystem::Btrfs,
            other => Filesystem::Other(other.to_string()),
        }
    }
}

/// Shown with [`printable`]: a snapshot's filesystem name is untrusted text.
impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&printable(self.as_str()))
    }
}

/// Text from a snapshot (or any untrusted source) made safe to print on a terminal or in a
/// log: control characters (C0, DEL, C1: terminal escapes, carriage returns, newlines) and the
/// invisible bidirectional and zero-width formatting characters are shown as `\u{..}`.
pub fn printable(s: &str) -> String {
    miren_sys::printable(s)
}

/// What the snapshot says about the disk it was taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Disk name in the agent.
    pub name: String,
    /// Logical size of the image file in bytes.
    pub size_bytes: u64,
    pub filesystem: Filesystem,
    /// Filesystem block size in bytes (informational; restore does not depend on it).
    pub block_size: u32,
    /// When the snapshot was taken (stored with nanosecond precision).
    pub created_at: SystemTime,
    /// Version of the agent that wrote it, e.g. "0.1.0".
    pub agent_version: String,
}

/// Format facts from the header that are not part of [`SnapshotMeta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub format_version: u16,
    /// Logical bytes per chunk window.
    pub window_size: u32,
    /// Allocated bytes of the source image when it was written: an upper bound on the data a
    /// restore writes, for progress bars.
    pub source_allocated_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub info: SnapshotInfo,
    pub meta: SnapshotMeta,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkHeader {
    /// Window number: the chunk covers image bytes [window*ws, window*ws + window_len).
    pub window: u64,
    pub raw_len: u32,
    pub comp_len: u32,
    /// blake3 of the whole logical window, zeros included.
    pub hash: [u8; HASH_LEN],
    /// (offset in window, length) of the stored non-zero runs, ascending, disjoint.
    pub runs: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub chunk_count: u64,
    pub data_bytes: u64,
    pub image_hash: [u8; HASH_LEN],
}

pub(crate) fn is_skippable(magic: u32) -> bool {
    magic & SKIPPABLE_MASK == SKIPPABLE_BASE
}

pub(crate) fn skippable_frame(magic: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&magic.to_le_bytes());
    // Payloads are bounded far below 4 GiB by construction.
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn push_check(v: &mut Vec<u8>) {
    let h = blake3::hash(v);
    v.extend_from_slice(h.as_bytes());
}

/// Splits off and verifies the trailing blake3 of a payload.
fn split_check(payload: &[u8]) -> Option<&[u8]> {
    let body_len = payload.len().checked_sub(HASH_LEN)?;
    let (body, check) = payload.split_at(body_len);
    let want = blake3::hash(body);
    // Constant time is not needed; this guards against accidents, not attackers.
    (want.as_bytes() == check).then_some(body)
}

fn push_str(v: &mut Vec<u8>, s: &str) {
    v.extend_from_slice(&(s.len() as u16).to_le_bytes());
    v.extend_from_slice(s.as_bytes());
}

/// Bounds every header field a reader must trust before reading further; `None` if fine,
/// else what is wrong. Shared by writer and reader so nothing written is refused on read.
pub(crate) fn check_geometry(
    meta: &SnapshotMeta,
    window_size: u32,
    source_allocated_bytes: u64,
) -> Option<String> {
    if meta.size_bytes > MAX_IMAGE_BYTES {
        return Some(format!(
            "image size {} bytes is larger than {MAX_IMAGE_BYTES} (64 TiB)",
            meta.size_bytes
        ));
    }
    let windows = meta.size_bytes.div_ceil(u64::from(window_size.max(1)));
    if windows > MAX_WINDOWS {
        return Some(format!(
            "{windows} windows of {window_size} bytes exceed the limit of {MAX_WINDOWS}; use a larger window"
        ));
    }
    if source_allocated_bytes > meta.size_bytes {
        return Some("more bytes allocated than the image holds".into());
    }
    if !meta.block_size.is_power_of_two() || !(512..=65536).contains(&meta.block_size) {
        return Some(format!(
            "block size {} is not a power of two from 512 to 65536",
            meta.block_size
        ));
    }
    for (what, s, max) in [
        ("name", meta.name.as_str(), MAX_NAME),
        ("filesystem", meta.filesystem.as_str(), MAX_FS_NAME),
        ("agent_version", meta.agent_version.as_str(), MAX_VERSION),
    ] {
        if s.len() > max {
            return Some(format!(
                "{what} is {} bytes long, at most {max} are allowed",
                s.len()
            ));
        }
    }
    None
}

pub(crate) fn validate_meta(meta: &SnapshotMeta) -> Result<()> {
    for (what, s) in [
        ("name", meta.name.as_str()),
        ("filesystem", meta.filesystem.as_str()),
        ("agent_version", meta.agent_version.as_str()),
    ] {
        if s.len() > MAX_STRING {
            return Err(Error::InvalidInput(format!(
                "{what} is {} bytes long, at most {MAX_STRING} are allowed",
                s.len()
            )));
        }
    }
    if meta.created_at.duration_since(UNIX_EPOCH).is_err() {
        return Err(Error::InvalidInput(
            "created_at is before 1970; check the system clock".into(),
        ));
    }
    Ok(())
}

pub(crate) fn encode_header(h: &Header) -> Vec<u8> {
    let m = &h.meta;
    let since = m.created_at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut v = Vec::with_capacity(256);
    v.extend_from_slice(HEADER_MAGIC);
    v.extend_from_slice(&h.info.format_version.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes()); // flags, none defined in v1
    v.extend_from_slice(&h.info.window_size.to_le_bytes());
    v.extend_from_slice(&m.size_bytes.to_le_bytes());
    v.extend_from_slice(&h.info.source_allocated_bytes.to_le_bytes());
    v.extend_from_slice(&m.block_size.to_le_bytes());
    v.extend_from_slice(&since.as_secs().to_le_bytes());
    v.extend_from_slice(&since.subsec_nanos().to_le_bytes());
    push_str(&mut v, &m.name);
    push_str(&mut v, m.filesystem.as_str());
    push_str(&mut v, &m.agent_version);
    push_check(&mut v);
    skippable_frame(SKIPPABLE_HEADER, &v)
}

/// Parses a header payload (the bytes after the 8-byte skippable frame head).
pub(crate) fn decode_header(payload: &[u8]) -> Result<Header> {
    if payload.len() < 10 || &payload[..8] != HEADER_MAGIC {
        return Err(Error::NotASnapshot {
            reason: "the first frame is not a miren header".into(),
        });
    }
    let corrupt = |reason: &str| Error::CorruptHeader {
        reason: reason.to_string(),
    };
    // Every version keeps magic, version and the trailing blake3 where they are, so the
    // checksum is checked first: a flipped version byte reads as corruption, not "too new".
    let body = split_check(payload).ok_or_else(|| corrupt("header checksum mismatch"))?;
    let mut c = Cur::new(body.get(8..).ok_or_else(|| corrupt("short header"))?);
    let version = c.u16().ok_or_else(|| corrupt("short header"))?;
    if version > FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(corrupt("format version 0 does not exist"));
    }
    let short = || corrupt("short header");
    let flags = c.u16().ok_or_else(short)?;
    if flags != 0 {
        return Err(corrupt("unknown header flags"));
    }
    let window_size = c.u32().ok_or_else(short)?;
    if !window_size.is_power_of_two() || !(MIN_WINDOW..=MAX_WINDOW).contains(&window_size) {
        return Err(corrupt("window size out of range"));
    }
    let size_bytes = c.u64().ok_or_else(short)?;
    let source_allocated_bytes = c.u64().ok_or_else(short)?;
    let block_size = c.u32().ok_or_else(short)?;
    let secs = c.u64().ok_or_else(short)?;
    let nanos = c.u32().ok_or_else(short)?;
    if nanos >= 1_000_000_000 {
        return Err(corrupt("bad creation time"));
    }
    let created_at = UNIX_EPOCH
        .checked_add(Duration::new(secs, nanos))
        .ok_or_else(|| corrupt("bad creation time"))?;
    let name = c.string().ok_or_else(|| corrupt("bad name"))?;
    let fs = c.string().ok_or_else(|| corrupt("bad filesystem"))?;
    let agent_version = c.string().ok_or_else(|| corrupt("bad agent version"))?;
    if !c.is_empty() {
        return Err(corrupt("unexpected bytes after the header fields"));
    }
    let header = Header {
        info: SnapshotInfo {
            format_version: version,
            window_size,
            source_allocated_bytes,
        },
        meta: SnapshotMeta {
            name,
            size_bytes,
            filesystem: Filesystem::from_name(&fs),
            block_size,
            created_at,
            agent_version,
        },
    };
    if let Some(reason) = check_geometry(&header.meta, window_size, source_allocated_bytes) {
        return Err(Error::CorruptHeader { reason });
    }
    Ok(header)
}

pub(crate) fn chunk_payload_len(run_count: usize) -> usize {
    CHUNK_FIXED + run_count * 8 + HASH_LEN
}

/// Largest chunk payload a window of `window_size` can need (alternating data/zero blocks).
pub(crate) fn max_chunk_payload(window_size: u32) -> usize {
    chunk_payload_len(window_size as usize / SPARSE_BLOCK / 2 + 2)
}

pub(crate) fn encode_chunk_header(c: &ChunkHeader) -> Vec<u8> {
    let mut v = Vec::with_capacity(chunk_payload_len(c.runs.len()));
    v.extend_from_slice(&c.window.to_le_bytes());
    v.extend_from_slice(&c.raw_len.to_le_bytes());
    v.extend_from_slice(&c.comp_len.to_le_bytes());
    v.extend_from_slice(&c.hash);
    v.extend_from_slice(&(c.runs.len() as u32).to_le_bytes());
    for (off, len) in &c.runs {
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
    }
    push_check(&mut v);
    skippable_frame(SKIPPABLE_CHUNK, &v)
}

/// Parses and checks a chunk payload against the image geometry. Returns a reason on failure.
pub(crate) fn decode_chunk_header(
    payload: &[u8],
    window_size: u32,
    size_bytes: u64,
) -> std::result::Result<ChunkHeader, String> {
    let body = split_check(payload).ok_or("chunk header checksum mismatch")?;
    let mut c = Cur::new(body);
    let short = || "short chunk header".to_string();
    let window = c.u64().ok_or_else(short)?;
    let raw_len = c.u32().ok_or_else(short)?;
    let comp_len = c.u32().ok_or_else(short)?;
    let hash: [u8; HASH_LEN] = c
        .take(HASH_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(short)?;
    let run_count = c.u32().ok_or_else(short)? as usize;
    if payload.len() != chunk_payload_len(run_count) {
        return Err("chunk header length does not match its run count".into());
    }
    let start = window
        .checked_mul(u64::from(window_size))
        .filter(|s| *s < size_bytes)
        .ok_or("chunk lies beyond the end of the image")?;
    let window_len = (size_bytes - start).min(u64::from(window_size));
    let mut runs = Vec::with_capacity(run_count);
    let mut end = 0u64;
    let mut total = 0u64;
    for _ in 0..run_count {
        let off = c.u32().ok_or_else(short)?;
        let len = c.u32().ok_or_else(short)?;
        if len == 0 || u64::from(off) < end || u64::from(off) + u64::from(len) > window_len {
            return Err("chunk run table is inconsistent".into());
        }
        end = u64::from(off) + u64::from(len);
        total += u64::from(len);
        runs.push((off, len));
    }
    if runs.is_empty() || total != u64::from(raw_len) {
        return Err("chunk run table does not add up to its data length".into());
    }
    if comp_len as usize > zstd::zstd_safe::compress_bound(raw_len as usize) + 1024 {
        return Err("compressed length is implausibly large".into());
    }
    Ok(ChunkHeader {
        window,
        raw_len,
        comp_len,
        hash,
        runs,
    })
}

pub(crate) fn encode_trailer(t: &Trailer) -> Vec<u8> {
    let mut v = Vec::with_capacity(TRAILER_PAYLOAD as usize);
    v.extend_from_slice(TRAILER_MAGIC);
    v.extend_from_slice(&t.chunk_count.to_le_bytes());
    v.extend_from_slice(&t.data_bytes.to_le_bytes());
    v.extend_from_slice(&t.image_hash);
    push_check(&mut v);
    skippable_frame(SKIPPABLE_TRAILER, &v)
}

pub(crate) fn decode_trailer(payload: &[u8]) -> std::result::Result<Trailer, String> {
    if payload.len() != TRAILER_PAYLOAD as usize {
        return Err("trailer has the wrong length".into());
    }
    let body = split_check(payload).ok_or("trailer checksum mismatch")?;
    let mut c = Cur::new(body);
    let bad = || "short trailer".to_string();
    if c.take(8).ok_or_else(bad)? != TRAILER_MAGIC {
        return Err("trailer magic missing".into());
    }
    let chunk_count = c.u64().ok_or_else(bad)?;
    let data_bytes = c.u64().ok_or_else(bad)?;
    let image_hash = c
        .take(HASH_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    Ok(Trailer {
        chunk_count,
        data_bytes,
        image_hash,
    })
}

/// Whole-image checksum: blake3 over (domain, size, window size, each window's blake3), where
/// windows that hold only zeros use the hash of a zero window. Independent of which zero
/// blocks happened to be allocated, so identical images always get the same value.
pub(crate) struct ImageHasher {
    hasher: blake3::Hasher,
    size: u64,
    window_size: u64,
    next_window: u64,
    zero_full: blake3::Hash,
    zero_last: blake3::Hash,
}

impl ImageHasher {
    pub fn new(size: u64, window_size: u32) -> Self {
        let ws = u64::from(window_size);
        let mut hasher = blake3::Hasher::new();
        hasher.update(IMAGE_HASH_DOMAIN);
        hasher.update(&size.to_le_bytes());
        hasher.update(&window_size.to_le_bytes());
        let zero_full = zero_hash(ws);
        let tail = size % ws;
        let zero_last = if tail == 0 {
            zero_full
        } else {
            zero_hash(tail)
        };
        ImageHasher {
            hasher,
            size,
            window_size: ws,
            next_window: 0,
            zero_full,
            zero_last,
        }
    }

    pub fn windows(&self) -> u64 {
        self.size.div_ceil(self.window_size)
    }

    /// Next window that `add` may accept.
    pub fn next_window(&self) -> u64 {
        self.next_window
    }

    /// Hashes the checksums of the absent (all-zero) windows before `window`, many per
    /// `update` so blake3 hashes them with SIMD: this loop is the only work an absent range
    /// costs, and [`MAX_WINDOWS`] bounds it.
    fn fill_zeros_to(&mut self, window: u64) {
        const BATCH: usize = 2048;
        let last = self.windows().saturating_sub(1);
        let full_until = window.min(last);
        if self.next_window < full_until {
            let batch: Vec<u8> = self.zero_full.as_bytes().repeat(BATCH);
            while self.next_window < full_until {
                let n = (full_until - self.next_window).min(BATCH as u64);
                self.hasher.update(&batch[..n as usize * HASH_LEN]);
                self.next_window += n;
            }
        }
        if self.next_window < window {
            // Only the last window is left, and it may be shorter than the others.
            self.hasher.update(self.zero_last.as_bytes());
            self.next_window += 1;
        }
    }

    /// Adds a stored window; windows must come in strictly increasing order.
    pub fn add(&mut self, window: u64, hash: &[u8; HASH_LEN]) {
        self.fill_zeros_to(window);
        self.hasher.update(hash);
        self.next_window = window + 1;
    }

    pub fn finish(mut self) -> [u8; HASH_LEN] {
        let n = self.windows();
        self.fill_zeros_to(n);
        *self.hasher.finalize().as_bytes()
    }
}

pub(crate) static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

pub(crate) fn hash_zeros(h: &mut blake3::Hasher, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

fn zero_hash(len: u64) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    hash_zeros(&mut h, len);
    h.finalize()
}

/// Bounds-checked little-endian cursor over untrusted bytes.
struct Cur<'a> {
    b: &'a [u8],
}

impl<'a> Cur<'a> {
    fn new(b: &'a [u8]) -> Self {
        Cur { b }
    }
    fn is_empty(&self) -> bool {
        self.b.is_empty()
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_le_bytes)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u16()? as usize;
        if n > MAX_STRING {
            return None;
        }
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}
