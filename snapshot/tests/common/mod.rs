//! Shared test helpers: temp dirs, sparse files, frame walking, loop mounts with cleanup guards.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, UNIX_EPOCH};

use miren_snapshot::{
    write_snapshot, Filesystem, NoProgress, ReadSummary, SnapshotMeta, SnapshotReader, Summary,
    WriteOptions,
};

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mrtst")
        .tempdir_in(std::env::var_os("MRTST_DIR").unwrap_or_else(|| "/var/tmp".into()))
        .expect("create temp dir")
}

/// Tiny deterministic PRNG (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Compressible but not trivial text.
pub fn text(rng: &mut Rng, n: usize) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"alpha ", b"beta ", b"gamma ", b"disk ", b"loop ", b"\n", b"miren ", b"zstd ",
    ];
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(words[rng.below(8) as usize]);
    }
    v.truncate(n);
    v
}

/// Creates a sparse file of `size` with `(offset, bytes)` written into it.
pub fn sparse_file(path: &Path, size: u64, pieces: &[(u64, Vec<u8>)]) {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .expect("create sparse file");
    f.set_len(size).expect("size sparse file");
    for (off, data) in pieces {
        f.write_all_at(data, *off).expect("write piece");
    }
    f.sync_all().expect("sync");
}

pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat").blocks() * 512
}

pub fn meta_for(path: &Path, name: &str) -> SnapshotMeta {
    SnapshotMeta {
        name: name.into(),
        size_bytes: std::fs::metadata(path).expect("stat").len(),
        filesystem: Filesystem::Ext4,
        block_size: 4096,
        created_at: UNIX_EPOCH + Duration::new(1_763_000_000, 123_456_789),
        agent_version: "0.1.0-test".into(),
    }
}

pub fn small_opts() -> WriteOptions {
    WriteOptions {
        window_size: 64 << 10,
        ..WriteOptions::default()
    }
}

pub fn snapshot_bytes(img: &Path, opts: &WriteOptions) -> (Vec<u8>, Summary) {
    let mut out = Vec::new();
    let s = write_snapshot(
        img,
        &meta_for(img, "disk-a"),
        &mut out,
        opts,
        &mut NoProgress,
    )
    .expect("write snapshot");
    assert_eq!(s.compressed_bytes_written, out.len() as u64);
    (out, s)
}

/// Restores `snap` into a new file `dir/restore.tmp` (removed first if present).
pub fn restore_bytes(snap: &[u8], dir: &Path) -> (miren_snapshot::Result<ReadSummary>, PathBuf) {
    let target = dir.join("restore.tmp");
    let _ = std::fs::remove_file(&target);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&target)
        .expect("create restore target");
    let r =
        SnapshotReader::open(snap).and_then(|(reader, _)| reader.restore_into(&f, &mut NoProgress));
    (r, target)
}

pub fn verify_bytes(snap: &[u8]) -> miren_snapshot::Result<ReadSummary> {
    SnapshotReader::open(snap).and_then(|(r, _)| r.verify(&mut NoProgress))
}

pub fn same_bytes(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        File::open(a).expect("open a"),
        File::open(b).expect("open b"),
    );
    let (la, lb) = (
        fa.metadata().expect("stat").len(),
        fb.metadata().expect("stat").len(),
    );
    if la != lb {
        return false;
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < la {
        let n = (la - off).min(ba.len() as u64) as usize;
        fa.read_exact_at(&mut ba[..n], off).expect("read a");
        fb.read_exact_at(&mut bb[..n], off).expect("read b");
        if ba[..n] != bb[..n] {
            return false;
        }
        off += n as u64;
    }
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Header,
    ChunkHeader,
    Data,
    Trailer,
}

/// Walks the frames of a well-formed snapshot: (kind, start, len).
pub fn frames(snap: &[u8]) -> Vec<(Kind, usize, usize)> {
    let mut v = Vec::new();
    let mut p = 0;
    while p < snap.len() {
        let magic = u32::from_le_bytes(snap[p..p + 4].try_into().expect("4 bytes"));
        let (kind, len) = match magic {
            0x184D_2A5D => (
                Kind::Header,
                8 + u32::from_le_bytes(snap[p + 4..p + 8].try_into().unwrap()) as usize,
            ),
            0x184D_2A5E => (
                Kind::ChunkHeader,
                8 + u32::from_le_bytes(snap[p + 4..p + 8].try_into().unwrap()) as usize,
            ),
            0x184D_2A5F => (
                Kind::Trailer,
                8 + u32::from_le_bytes(snap[p + 4..p + 8].try_into().unwrap()) as usize,
            ),
            0xFD2F_B528 => (
                Kind::Data,
                zstd::zstd_safe::find_frame_compressed_size(&snap[p..]).expect("zstd frame"),
            ),
            m => panic!("unknown frame {m:#x} at {p}"),
        };
        v.push((kind, p, len));
        p += len;
    }
    v
}

/// Window number stored in the chunk header frame starting at `start`.
pub fn chunk_window(snap: &[u8], start: usize) -> u64 {
    u64::from_le_bytes(snap[start + 8..start + 16].try_into().expect("8 bytes"))
}

pub fn is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A loop device with the image mounted; unmounts (thawing first) and detaches on drop,
/// panics included.
pub struct LoopMount {
    pub dev: String,
    pub mnt: PathBuf,
    mounted: bool,
    attached: bool,
}

impl LoopMount {
    pub fn new(img: &Path, mnt: &Path, read_only: bool) -> LoopMount {
        std::fs::create_dir_all(mnt).expect("mkdir mount point");
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        let img_s = img.to_str().expect("utf8 path");
        args.push(img_s);
        let dev = run("losetup", &args).trim().to_string();
        let mut g = LoopMount {
            dev,
            mnt: mnt.to_path_buf(),
            mounted: false,
            attached: true,
        };
        let opts = if read_only { "ro" } else { "rw" };
        run("mount", &["-o", opts, &g.dev, mnt.to_str().expect("utf8")]);
        g.mounted = true;
        g
    }

    pub fn unmount(&mut self) {
        if self.mounted {
            let _ = miren_snapshot::thaw(&self.mnt);
            let m = self.mnt.to_str().expect("utf8");
            // A child forked by a parallel test can hold an fd into the mount for a moment
            // (until its exec closes it); retry briefly on "busy".
            for _ in 0..50 {
                let o = Command::new("umount").arg(m).output().expect("run umount");
                if o.status.success() {
                    self.mounted = false;
                    break;
                }
                assert!(
                    String::from_utf8_lossy(&o.stderr).contains("busy"),
                    "umount {m} failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                eprintln!("umount {m}: busy, retrying");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            assert!(!self.mounted, "{m} stayed busy");
        }
        if self.attached {
            run("losetup", &["-d", &self.dev]);
            self.attached = false;
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = miren_snapshot::thaw(&self.mnt);
            let m = self.mnt.to_string_lossy().into_owned();
            if !Command::new("umount")
                .arg(&m)
                .status()
                .is_ok_and(|s| s.success())
            {
                let _ = Command::new("umount").args(["-l", &m]).status();
            }
        }
        if self.attached {
            let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        }
    }
}
