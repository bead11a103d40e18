//! Damaged, truncated, foreign and too-new snapshots: clear errors naming the first bad chunk,
//! no panics, and nothing written outside the restore target.

mod common;

use common::*;
use miren_snapshot::{Error, SnapshotReader, FORMAT_VERSION};

const M: u64 = 1024 * 1024;

/// A snapshot with ~a dozen chunks (64 KiB windows) and its source image.
fn fixture(dir: &std::path::Path) -> (Vec<u8>, std::path::PathBuf) {
    let img = dir.join("src.img");
    let mut rng = Rng(0xC0FFEE);
    let mut pieces = Vec::new();
    for i in 0..12u64 {
        let data = if i % 2 == 0 {
            text(&mut rng, 40_000)
        } else {
            rng.bytes(30_000)
        };
        pieces.push((i * 150_000 + 777, data));
    }
    sparse_file(&img, 2 * M + 5, &pieces);
    let (snap, _) = snapshot_bytes(&img, &small_opts());
    (snap, img)
}

/// Restores and verifies; both must fail the same way. Checks the temp dir holds only the target.
fn expect_err(snap: &[u8], dir: &std::path::Path) -> Error {
    let (r, target) = restore_bytes(snap, dir);
    let names: Vec<_> = std::fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    assert_eq!(
        names,
        vec!["restore.tmp".to_string()],
        "restore wrote outside its target"
    );
    std::fs::remove_file(&target).expect("rm target");
    let e = r.expect_err("corrupt snapshot restored without error");
    let v = verify_bytes(snap).expect_err("corrupt snapshot verified");
    assert_eq!(e.to_string(), v.to_string(), "verify and restore disagree");
    assert!(
        e.is_corruption() || matches!(e, Error::UnsupportedVersion { .. }),
        "not reported as corruption: {e}"
    );
    e
}

fn chunk_frames(snap: &[u8]) -> Vec<(usize, usize, usize, usize)> {
    // (chunk header start, header len, data start, data len)
    let f = frames(snap);
    f.windows(2)
        .filter(|w| w[0].0 == Kind::ChunkHeader)
        .map(|w| (w[0].1, w[0].2, w[1].1, w[1].2))
        .collect()
}

#[test]
fn flipped_data_byte_names_the_chunk() {
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let chunks = chunk_frames(&snap);
    assert!(chunks.len() >= 8, "fixture has {} chunks", chunks.len());
    let rdir = tempdir();
    for k in [0, 3, chunks.len() - 1] {
        let (hs, _, ds, dl) = chunks[k];
        for pos in [ds + 3, ds + dl / 2, ds + dl - 1] {
            let mut bad = snap.clone();
            bad[pos] ^= 0x40;
            let e = expect_err(&bad, rdir.path());
            let want = chunk_window(&snap, hs) * (64 << 10);
            assert_eq!(e.bad_chunk(), Some((k as u64, Some(want))), "{e}");
            assert!(e.to_string().contains(&format!("chunk {k} ")), "{e}");
        }
    }
}

#[test]
fn flipped_checksum_or_run_table_names_the_chunk() {
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let chunks = chunk_frames(&snap);
    let rdir = tempdir();
    let (hs, hl, _, _) = chunks[4];
    // window, lengths, window checksum, run table, header check.
    for rel in [8, 8 + 9, 8 + 13, 8 + 20, 8 + 40, hl - 40, hl - 1] {
        let mut bad = snap.clone();
        bad[hs + rel] ^= 0x01;
        let e = expect_err(&bad, rdir.path());
        assert_eq!(e.bad_chunk().map(|b| b.0), Some(4), "offset {rel}: {e}");
    }
    // The frame length itself.
    let mut bad = snap.clone();
    bad[hs + 4] ^= 0x08;
    let e = expect_err(&bad, rdir.path());
    assert_eq!(e.bad_chunk().map(|b| b.0), Some(4), "{e}");
}

#[test]
fn flipped_metadata_and_trailer_bytes() {
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let f = frames(&snap);
    let rdir = tempdir();
    let (_, _, hlen) = f[0];
    for pos in 0..hlen {
        let mut bad = snap.clone();
        bad[pos] ^= 0x10;
        let e = expect_err(&bad, rdir.path());
        assert!(
            matches!(e, Error::CorruptHeader { .. } | Error::NotASnapshot { .. }),
            "header byte {pos}: {e}"
        );
    }
    let (_, ts, tl) = *f.last().expect("trailer");
    for pos in ts..ts + tl {
        let mut bad = snap.clone();
        bad[pos] ^= 0x02;
        let e = expect_err(&bad, rdir.path());
        assert!(
            matches!(e, Error::CorruptTrailer { .. } | Error::CorruptChunk { .. }),
            "trailer byte {pos}: {e}"
        );
    }
}

#[test]
fn truncation_anywhere_is_detected() {
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let chunks = chunk_frames(&snap);
    let rdir = tempdir();
    let mut cuts: Vec<usize> = (0..snap.len()).step_by(97).collect();
    for &(hs, hl, ds, dl) in &chunks {
        cuts.extend([hs, hs + 1, hs + 8, hs + hl - 1, ds, ds + dl - 1]);
    }
    cuts.push(snap.len() - 1);
    for cut in cuts {
        let e = expect_err(&snap[..cut], rdir.path());
        // A cut inside chunk k's frames is reported as chunk k.
        if let Some(k) = chunks
            .iter()
            .position(|&(hs, _, ds, dl)| cut > hs && cut < ds + dl)
        {
            assert!(matches!(e, Error::Truncated { .. }), "cut {cut}: {e}");
            assert_eq!(e.bad_chunk().map(|b| b.0), Some(k as u64), "cut {cut}: {e}");
        }
    }
}

#[test]
fn foreign_files_are_refused() {
    let rdir = tempdir();
    let mut rng = Rng(42);
    for input in [
        Vec::new(),
        b"hello".to_vec(),
        rng.bytes(100_000),
        zstd::encode_all(&b"just some zstd data"[..], 3).expect("zstd"),
        b"\x5d\x2a\x4d\x18\x04\x00\x00\x00abcd".to_vec(),
    ] {
        let e = expect_err(&input, rdir.path());
        assert!(matches!(e, Error::NotASnapshot { .. }), "{e}");
    }
    let plain = zstd::encode_all(&b"data"[..], 3).expect("zstd");
    let e = expect_err(&plain, rdir.path());
    assert!(e.to_string().contains("plain zstd"), "{e}");
}

/// Rewrites the header's version and fixes up its checksum, as a future miren would write it.
fn with_version(snap: &[u8], version: u16) -> Vec<u8> {
    let f = frames(snap);
    let (_, _, hlen) = f[0];
    let mut out = snap.to_vec();
    out[16..18].copy_from_slice(&version.to_le_bytes());
    let body_end = hlen - 32;
    let h = blake3::hash(&out[8..body_end]);
    out[body_end..hlen].copy_from_slice(h.as_bytes());
    out
}

#[test]
fn newer_format_version_is_refused_before_anything_is_written() {
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let rdir = tempdir();
    let bad = with_version(&snap, FORMAT_VERSION + 1);
    let e = SnapshotReader::open(&bad[..])
        .err()
        .expect("open must refuse");
    assert!(
        matches!(e, Error::UnsupportedVersion { found, supported } if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
        "{e}"
    );
    assert!(e.to_string().contains("newer miren"), "{e}");
    expect_err(&bad, rdir.path());
    // Same bytes with the current version are fine: the rewrite itself is sound.
    SnapshotReader::open(&with_version(&snap, FORMAT_VERSION)[..]).expect("current version");
}

#[test]
fn missing_reordered_duplicated_and_trailing_frames() {
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let c = chunk_frames(&snap);
    let rdir = tempdir();
    let span = |k: usize| c[k].0..c[k].2 + c[k].3;

    // Chunk 2 removed: the trailer catches it.
    let mut bad = snap[..span(2).start].to_vec();
    bad.extend_from_slice(&snap[span(2).end..]);
    let e = expect_err(&bad, rdir.path());
    assert!(matches!(e, Error::CorruptTrailer { .. }), "{e}");

    // Chunks 2 and 3 swapped: chunk 2's slot now holds a later window, chunk 3 is out of order.
    let mut bad = snap[..span(2).start].to_vec();
    bad.extend_from_slice(&snap[span(3)]);
    bad.extend_from_slice(&snap[span(2)]);
    bad.extend_from_slice(&snap[span(3).end..]);
    let e = expect_err(&bad, rdir.path());
    assert_eq!(e.bad_chunk().map(|b| b.0), Some(3), "{e}");

    // Chunk 5 duplicated.
    let mut bad = snap[..span(5).end].to_vec();
    bad.extend_from_slice(&snap[span(5)]);
    bad.extend_from_slice(&snap[span(5).end..]);
    let e = expect_err(&bad, rdir.path());
    assert_eq!(e.bad_chunk().map(|b| b.0), Some(6), "{e}");

    // Bytes after the trailer.
    let mut bad = snap.clone();
    bad.push(0);
    let e = expect_err(&bad, rdir.path());
    assert!(matches!(e, Error::CorruptTrailer { .. }), "{e}");

    // Two snapshots concatenated.
    let mut bad = snap.clone();
    bad.extend_from_slice(&snap);
    expect_err(&bad, rdir.path());
}

/// Bounded random mutations: every outcome is an error or the exact original image.
#[test]
fn random_mutations_never_panic_or_escape() {
    let work = tempdir();
    let (snap, img) = fixture(work.path());
    let original = std::fs::read(&img).expect("read source");
    let rdir = tempdir();
    let mut rng = Rng(0xF00D_F00D);
    let iterations = std::env::var("MRTST_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400u32);
    let (mut errors, mut benign) = (0, 0);
    for i in 0..iterations {
        let mut m = snap.clone();
        for _ in 0..1 + rng.below(3) {
            let len = m.len() as u64;
            match rng.below(7) {
                0 => {
                    let p = rng.below(len) as usize;
                    m[p] ^= 1 << rng.below(8);
                }
                1 => {
                    let p = rng.below(len) as usize;
                    m[p] = rng.next() as u8;
                }
                2 => m.truncate(rng.below(len) as usize),
                3 => {
                    let p = rng.below(len + 1) as usize;
                    let n = 1 + rng.below(64) as usize;
                    let ins = rng.bytes(n);
                    m.splice(p..p, ins);
                }
                4 => {
                    let p = rng.below(len) as usize;
                    let n = (1 + rng.below(4096) as usize).min(m.len() - p);
                    m.drain(p..p + n);
                }
                5 => {
                    // Copy a slice over another place (frame-shaped garbage).
                    let a = rng.below(len) as usize;
                    let b = rng.below(len) as usize;
                    let n = (1 + rng.below(2048) as usize).min(m.len() - a.max(b));
                    let src = m[a..a + n].to_vec();
                    m[b..b + n].copy_from_slice(&src);
                }
                _ => {
                    // Overwrite a 4-byte field with an extreme value.
                    let p = rng.below(len.saturating_sub(4)) as usize;
                    let v = [0u32, 1, u32::MAX, 0x184D_2A5E, 0xFD2F_B528][rng.below(5) as usize];
                    if p + 4 <= m.len() {
                        m[p..p + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
            if m.is_empty() {
                break;
            }
        }
        let (r, target) = restore_bytes(&m, rdir.path());
        let names: Vec<_> = std::fs::read_dir(rdir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            names.len(),
            1,
            "iteration {i}: restore wrote outside its target"
        );
        match r {
            Ok(_) => {
                assert_eq!(
                    std::fs::read(&target).expect("read"),
                    original,
                    "iteration {i}: wrong data accepted"
                );
                benign += 1;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                errors += 1;
            }
        }
        std::fs::remove_file(&target).expect("rm");
    }
    eprintln!("mutations: {errors} rejected, {benign} benign");
    assert!(errors > 0);
}

/// Rewrites a record's payload field and fixes up the record's own check, as if the writer had
/// produced a wrong checksum: only the deeper check can catch it.
fn patch_record(
    snap: &[u8],
    frame_start: usize,
    frame_len: usize,
    at: usize,
    bytes: &[u8],
) -> Vec<u8> {
    let mut out = snap.to_vec();
    let p = frame_start + 8;
    out[p + at..p + at + bytes.len()].copy_from_slice(bytes);
    let end = frame_start + frame_len;
    let h = blake3::hash(&out[p..end - 32]);
    out[end - 32..end].copy_from_slice(h.as_bytes());
    out
}

#[test]
fn wrong_window_and_image_checksums_are_caught() {
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let c = chunk_frames(&snap);
    let rdir = tempdir();

    // Window checksum of chunk 6 wrong, its header check consistent: the data check fails.
    let (hs, hl, _, _) = c[6];
    let bad = patch_record(&snap, hs, hl, 16, &[0xAB; 32]);
    let e = expect_err(&bad, rdir.path());
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    assert_eq!(
        e.bad_chunk(),
        Some((6, Some(chunk_window(&snap, hs) * (64 << 10)))),
        "{e}"
    );

    // Whole-image checksum wrong in an otherwise consistent trailer.
    let (_, ts, tl) = *frames(&snap).last().expect("trailer");
    let bad = patch_record(&snap, ts, tl, 24, &[0xCD; 32]);
    let e = expect_err(&bad, rdir.path());
    assert!(matches!(e, Error::CorruptTrailer { .. }), "{e}");
    assert!(e.to_string().contains("whole-image checksum"), "{e}");
}

#[test]
fn plain_zstd_test_catches_damaged_data_too() {
    if !have("zstd") {
        eprintln!("skipping: zstd binary missing");
        return;
    }
    let work = tempdir();
    let (snap, _) = fixture(work.path());
    let (_, _, ds, dl) = chunk_frames(&snap)[2];
    let mut bad = snap.clone();
    bad[ds + dl / 2] ^= 0x20;
    let p = work.path().join("bad.zst");
    std::fs::write(&p, &bad).expect("write");
    let st = std::process::Command::new("zstd")
        .arg("-qt")
        .arg(&p)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run zstd");
    assert!(!st.success(), "zstd -t accepted damaged data");
}
