//! Small driver for the bench and for poking at snapshots by hand.
//!
//! snap gen IMG SIZE_MIB DATA_MIB      sparse image, scattered extents, half text, half random
//! snap backup IMG OUT|-               snapshot IMG (OUT "-" = stdout)
//! snap restore SNAP|- IMG             restore into a new file IMG (deleted on error)
//! snap verify SNAP|-
//! snap capture SRC DST                copy allocated extents of SRC into new sparse DST

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use miren_snapshot::{
    capture_extents, write_snapshot, Filesystem, NoProgress, SnapshotMeta, SnapshotReader,
    WriteOptions,
};

type BoxErr = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["gen", img, size, data] => gen(Path::new(img), size.parse().unwrap_or(0), data.parse().unwrap_or(0)),
        ["backup", img, out] => backup(Path::new(img), out),
        ["restore", snap, img] => restore(snap, Path::new(img)),
        ["verify", snap] => verify(snap),
        ["capture", src, dst] => capture_extents(Path::new(src), Path::new(dst))
            .map(|n| eprintln!("captured {n} bytes"))
            .map_err(Into::into),
        _ => Err("usage: snap gen IMG SIZE_MIB DATA_MIB | backup IMG OUT | restore SNAP IMG | verify SNAP | capture SRC DST".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("snap: {e}");
            ExitCode::FAILURE
        }
    }
}

fn input(p: &str) -> Result<Box<dyn Read>, BoxErr> {
    Ok(if p == "-" {
        Box::new(io::stdin().lock())
    } else {
        Box::new(File::open(p)?)
    })
}

fn backup(img: &Path, out: &str) -> Result<(), BoxErr> {
    let meta = SnapshotMeta {
        name: img
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size_bytes: std::fs::metadata(img)?.len(),
        filesystem: Filesystem::Ext4,
        block_size: 4096,
        created_at: SystemTime::now(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    // Knobs for experiments: SNAP_LEVEL (zstd level), SNAP_THREADS (0 = all cores).
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse().ok());
    let mut opts = WriteOptions::default();
    if let Some(l) = env("SNAP_LEVEL") {
        opts.level = l;
    }
    if let Some(t) = env("SNAP_THREADS") {
        opts.threads = t as usize;
    }
    let s = if out == "-" {
        write_snapshot(img, &meta, io::stdout().lock(), &opts, &mut NoProgress)?
    } else {
        let f = OpenOptions::new().write(true).create_new(true).open(out)?;
        write_snapshot(img, &meta, &f, &opts, &mut NoProgress)?
    };
    eprintln!(
        "backup: {} chunks, read {} stored {} wrote {} bytes, image {}",
        s.chunks,
        s.data_bytes_read,
        s.data_bytes_stored,
        s.compressed_bytes_written,
        s.image_checksum
    );
    Ok(())
}

fn restore(snap: &str, img: &Path) -> Result<(), BoxErr> {
    let (reader, meta) = SnapshotReader::open(input(snap)?)?;
    eprintln!(
        "restore: {} ({} bytes, {})",
        meta.name, meta.size_bytes, meta.filesystem
    );
    let f = OpenOptions::new().write(true).create_new(true).open(img)?;
    match reader.restore_into(&f, &mut NoProgress) {
        Ok(s) => {
            eprintln!(
                "restore: {} chunks, {} bytes, image {}",
                s.chunks, s.data_bytes, s.image_checksum
            );
            Ok(())
        }
        Err(e) => {
            drop(f);
            let _ = std::fs::remove_file(img);
            Err(e.into())
        }
    }
}

fn verify(snap: &str) -> Result<(), BoxErr> {
    let (reader, meta) = SnapshotReader::open(input(snap)?)?;
    let s = reader.verify(&mut NoProgress)?;
    eprintln!(
        "verify: {} ok, {} chunks, image {}",
        meta.name, s.chunks, s.image_checksum
    );
    Ok(())
}

/// Deterministic test image: 4 MiB extents at random offsets in 8 MiB slots, alternating
/// word-soup text (compresses ~3x) and random bytes (does not compress).
fn gen(img: &Path, size_mib: u64, data_mib: u64) -> Result<(), BoxErr> {
    const MIB: u64 = 1 << 20;
    let slots = size_mib / 8;
    let extents = data_mib / 4;
    if size_mib == 0 || extents > slots {
        return Err("need SIZE_MIB >= 2 * DATA_MIB > 0".into());
    }
    let f = OpenOptions::new().write(true).create_new(true).open(img)?;
    f.set_len(size_mib * MIB)?;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Choose `extents` distinct slots (partial Fisher-Yates).
    let mut order: Vec<u64> = (0..slots).collect();
    for i in 0..extents as usize {
        let j = i + (next() % (slots - i as u64)) as usize;
        order.swap(i, j);
    }
    let words = [
        "disk ",
        "backup ",
        "restore ",
        "extent ",
        "miren ",
        "node ",
        "agent ",
        "zstd ",
        "sparse ",
        "chunk ",
        "the ",
        "of ",
        "and ",
        "checksum ",
        "loop ",
        "mount ",
    ];
    let mut buf = vec![0u8; 4 * MIB as usize];
    for (i, slot) in order[..extents as usize].iter().enumerate() {
        if i % 2 == 0 {
            let mut p = 0;
            while p < buf.len() {
                let r = next();
                let w = words[(r % 16) as usize].as_bytes();
                let n = w.len().min(buf.len() - p);
                buf[p..p + n].copy_from_slice(&w[..n]);
                p += n;
                if r % 13 == 0 && p < buf.len() {
                    buf[p] = b'\n';
                    p += 1;
                }
            }
        } else {
            for c in buf.chunks_exact_mut(8) {
                c.copy_from_slice(&next().to_le_bytes());
            }
        }
        let shift = (next() % 1024) * 4096;
        f.write_all_at(&buf, slot * 8 * MIB + shift)?;
    }
    f.sync_all()?;
    io::stderr().flush()?;
    Ok(())
}
