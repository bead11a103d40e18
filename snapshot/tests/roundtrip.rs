//! Round trips on real sparse files: bytes, sparseness, checksums, streams, `zstd -t`.

mod common;

use std::io::Write;
use std::process::Command;

use common::*;
use miren_snapshot::{write_snapshot, NoProgress, SnapshotReader, WriteOptions};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;

/// Scattered text/random pieces, unaligned offsets and lengths, size not a window multiple.
fn scattered(rng: &mut Rng, size: u64, n: usize) -> Vec<(u64, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let len = 1 + rng.below((300 * K).min(size / 2)) as usize;
            let off = rng.below(size - len as u64);
            let data = if i % 2 == 0 {
                text(rng, len)
            } else {
                rng.bytes(len)
            };
            (off, data)
        })
        .collect()
}

fn zstd_t(dir: &std::path::Path, snap: &[u8]) {
    let p = dir.join("snap.zst");
    std::fs::write(&p, snap).expect("write snap file");
    let st = Command::new("zstd")
        .arg("-qt")
        .arg(&p)
        .status()
        .expect("run zstd (apt-get install zstd)");
    assert!(st.success(), "zstd -t rejected the snapshot");
    std::fs::remove_file(&p).expect("rm");
}

#[test]
fn round_trip_sparse_scattered() {
    let dir = tempdir();
    for (seed, size, window) in [
        (1u64, 7 * M + 12_345, 64 * K),
        (2, 33 * M + 1, 1 << 20),
        (3, 5 * M + 4095, 4 << 20),
        (4, 3 * 4096, 64 * K),
    ] {
        let mut rng = Rng(seed * 0x9E37_79B9);
        let img = dir.path().join(format!("src{seed}.img"));
        let n = (size / M) as usize + 3;
        let pieces = scattered(&mut rng, size, n);
        sparse_file(&img, size, &pieces);
        let opts = WriteOptions {
            window_size: window as u32,
            threads: 3,
            ..WriteOptions::default()
        };
        let (snap, sum) = snapshot_bytes(&img, &opts);
        assert_eq!(sum.logical_bytes, size);
        zstd_t(dir.path(), &snap);

        let (r, restored) = restore_bytes(&snap, dir.path());
        let rs = r.expect("restore");
        assert_eq!(rs.image_checksum, sum.image_checksum);
        assert_eq!(rs.data_bytes, sum.data_bytes_stored);
        assert!(
            same_bytes(&img, &restored),
            "seed {seed}: restored bytes differ"
        );
        let (a, b) = (allocated(&img), allocated(&restored));
        assert!(
            b.abs_diff(a) * 100 <= a.max(1),
            "seed {seed}: allocation {b} vs source {a} differs by more than 1%"
        );
        std::fs::remove_file(&restored).expect("rm");
        std::fs::remove_file(&img).expect("rm");
    }
}

#[test]
fn zero_blocks_inside_extents_are_skipped() {
    let dir = tempdir();
    let img = dir.path().join("zeros.img");
    let mut rng = Rng(77);
    // 4 MiB allocated but all zero, then data, then 2 MiB of allocated zeros, an odd tail.
    let mut pieces = vec![(0, vec![0u8; 4 * M as usize])];
    pieces.push((4 * M + 100, text(&mut rng, 50_000)));
    pieces.push((6 * M, vec![0u8; 2 * M as usize]));
    pieces.push((9 * M - 10, rng.bytes(10)));
    sparse_file(&img, 9 * M, &pieces);
    assert!(allocated(&img) >= 6 * M, "setup: zeros must be allocated");

    let (snap, sum) = snapshot_bytes(&img, &small_opts());
    assert!(sum.data_bytes_read >= 6 * M);
    assert!(
        sum.data_bytes_stored <= 64 * K,
        "stored {}",
        sum.data_bytes_stored
    );
    assert!(snap.len() < 64 * K as usize);
    zstd_t(dir.path(), &snap);

    let (r, restored) = restore_bytes(&snap, dir.path());
    r.expect("restore");
    assert!(same_bytes(&img, &restored));
    // Sparse: only the non-zero blocks are allocated.
    assert!(
        allocated(&restored) <= 128 * K,
        "restored alloc {}",
        allocated(&restored)
    );

    // The whole-image checksum names the logical image: a fully written copy with the
    // same bytes gets the same value.
    let dense = dir.path().join("dense.img");
    std::fs::copy(&img, &dense).expect("copy");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dense)
        .expect("open");
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; 9 * M as usize - 20], 10)
        .and_then(|()| {
            std::os::unix::fs::FileExt::write_all_at(&f, &std::fs::read(&img).expect("read")[..], 0)
        })
        .expect("densify");
    let (_, sum2) = snapshot_bytes(&dense, &small_opts());
    assert_eq!(sum.image_checksum, sum2.image_checksum);
}

#[test]
fn empty_and_hole_only_images() {
    let dir = tempdir();
    for size in [0u64, 1, 10 * M + 7] {
        let img = dir.path().join(format!("hole{size}.img"));
        sparse_file(&img, size, &[]);
        let (snap, sum) = snapshot_bytes(&img, &small_opts());
        assert_eq!(sum.chunks, 0);
        zstd_t(dir.path(), &snap);
        let (r, restored) = restore_bytes(&snap, dir.path());
        r.expect("restore");
        assert_eq!(std::fs::metadata(&restored).expect("stat").len(), size);
        assert_eq!(allocated(&restored), 0);
    }
}

#[test]
fn streams_through_a_pipe_and_reports_progress() {
    let dir = tempdir();
    let img = dir.path().join("pipe.img");
    let mut rng = Rng(5);
    let pieces = scattered(&mut rng, 20 * M, 12);
    sparse_file(&img, 20 * M, &pieces);

    let (rd, wr) = std::io::pipe().expect("pipe");
    let img2 = img.clone();
    let writer = std::thread::spawn(move || {
        let mut done = 0u64;
        let mut total = 0u64;
        struct P<'a>(&'a mut u64, &'a mut u64);
        impl miren_snapshot::Progress for P<'_> {
            fn start(&mut self, t: u64) {
                *self.1 = t;
            }
            fn advance(&mut self, b: u64) {
                *self.0 += b;
            }
        }
        let s = write_snapshot(
            &img2,
            &meta_for(&img2, "piped"),
            wr,
            &WriteOptions::default(),
            &mut P(&mut done, &mut total),
        )
        .expect("backup into pipe");
        assert_eq!(done, total);
        assert_eq!(done, s.data_bytes_read);
        s
    });
    let (reader, meta) = SnapshotReader::open(rd).expect("open from pipe");
    assert_eq!(meta.name, "piped");
    assert_eq!(meta.size_bytes, 20 * M);
    assert_eq!(meta.created_at, meta_for(&img, "x").created_at);
    assert_eq!(meta.agent_version, "0.1.0-test");
    let target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dir.path().join("out.img"))
        .expect("create");
    let mut seen = 0u64;
    let rs = reader
        .restore_into(&target, &mut |b| seen += b)
        .expect("restore from pipe");
    let ws = writer.join().expect("writer thread");
    assert_eq!(rs.image_checksum, ws.image_checksum);
    assert_eq!(seen, rs.data_bytes);
    assert!(same_bytes(&img, &dir.path().join("out.img")));
}

#[test]
fn verify_matches_backup_summary_and_rejects_dirty_target() {
    let dir = tempdir();
    let img = dir.path().join("v.img");
    let mut rng = Rng(9);
    sparse_file(&img, 3 * M, &scattered(&mut rng, 3 * M, 4));
    let (snap, sum) = snapshot_bytes(&img, &small_opts());
    let v = verify_bytes(&snap).expect("verify");
    assert_eq!(v.image_checksum, sum.image_checksum);
    assert_eq!(v.chunks, sum.chunks);

    let dirty = dir.path().join("dirty.img");
    let mut f = std::fs::File::create(&dirty).expect("create");
    f.write_all(b"old").expect("write");
    let (reader, _) = SnapshotReader::open(&snap[..]).expect("open");
    let e = reader
        .restore_into(&f, &mut NoProgress)
        .expect_err("must refuse");
    assert!(
        matches!(e, miren_snapshot::Error::TargetNotEmpty { len: 3 }),
        "{e}"
    );
    assert_eq!(std::fs::read(&dirty).expect("read"), b"old");
}
