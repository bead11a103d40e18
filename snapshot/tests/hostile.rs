//! Crafted snapshots from an attacker: headers declaring huge images, counts and names. Each
//! must fail with a clear error at the header, before any per-window work, or (for sizes
//! within bounds) with a checksum error after work bounded by MAX_WINDOWS. Root-free.

use std::io::Cursor;
use std::time::{Duration, UNIX_EPOCH};

use miren_snapshot::{printable, Error, SnapshotReader, MAX_IMAGE_BYTES, MAX_WINDOWS};

const SKIPPABLE_HEADER: u32 = 0x184D_2A5D;
const SKIPPABLE_TRAILER: u32 = 0x184D_2A5F;

struct Crafted<'a> {
    window: u32,
    size: u64,
    allocated: u64,
    block: u32,
    name: &'a str,
    fs: &'a str,
    version: &'a str,
}

impl Default for Crafted<'_> {
    fn default() -> Self {
        Crafted {
            window: 4 << 20,
            size: 1 << 62,
            allocated: 0,
            block: 4096,
            name: "data1",
            fs: "ext4",
            version: "0.1.0",
        }
    }
}

fn frame(magic: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = magic.to_le_bytes().to_vec();
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

fn checked(mut body: Vec<u8>) -> Vec<u8> {
    let h = blake3::hash(&body);
    body.extend_from_slice(h.as_bytes());
    body
}

/// A header and a trailer claiming zero chunks: the whole "image" is declared absent.
fn crafted(c: &Crafted) -> Vec<u8> {
    let mut h = b"MIRENSNP".to_vec();
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&c.window.to_le_bytes());
    h.extend_from_slice(&c.size.to_le_bytes());
    h.extend_from_slice(&c.allocated.to_le_bytes());
    h.extend_from_slice(&c.block.to_le_bytes());
    h.extend_from_slice(&1_700_000_000u64.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    for s in [c.name, c.fs, c.version] {
        h.extend_from_slice(&(s.len() as u16).to_le_bytes());
        h.extend_from_slice(s.as_bytes());
    }
    let mut out = frame(SKIPPABLE_HEADER, &checked(h));
    let mut t = b"MIRENEND".to_vec();
    t.extend_from_slice(&0u64.to_le_bytes());
    t.extend_from_slice(&0u64.to_le_bytes());
    t.extend_from_slice(&[0u8; 32]);
    out.extend(frame(SKIPPABLE_TRAILER, &checked(t)));
    out
}

fn open_err(bytes: &[u8]) -> Error {
    match SnapshotReader::open(Cursor::new(bytes)) {
        Ok(_) => panic!("a crafted header was accepted"),
        Err(e) => e,
    }
}

#[test]
fn the_204_byte_snapshot_declaring_2_pow_62_bytes_is_refused_at_the_header() {
    let snap = crafted(&Crafted::default());
    assert_eq!(snap.len(), 204, "the finding's file is 204 bytes");
    let e = open_err(&snap);
    assert!(
        matches!(e, Error::CorruptHeader { .. }) && e.to_string().contains("64 TiB"),
        "{e}"
    );
}

#[test]
fn every_header_field_is_bounded() {
    let cases = [
        (
            Crafted {
                size: MAX_IMAGE_BYTES + 1,
                ..Default::default()
            },
            "64 TiB",
        ),
        (
            // 64 TiB in 64 KiB windows: 2^30 window checksums to hash for nothing.
            Crafted {
                size: MAX_IMAGE_BYTES,
                window: 64 << 10,
                ..Default::default()
            },
            "windows",
        ),
        (
            Crafted {
                size: 1 << 30,
                allocated: (1 << 30) + 1,
                ..Default::default()
            },
            "allocated",
        ),
        (
            Crafted {
                size: 1 << 30,
                block: 0,
                ..Default::default()
            },
            "block size",
        ),
        (
            Crafted {
                size: 1 << 30,
                block: 3000,
                ..Default::default()
            },
            "block size",
        ),
        (
            Crafted {
                size: 1 << 30,
                name: &"n".repeat(4000),
                ..Default::default()
            },
            "name",
        ),
        (
            Crafted {
                size: 1 << 30,
                fs: &"f".repeat(300),
                ..Default::default()
            },
            "filesystem",
        ),
        (
            Crafted {
                size: 1 << 30,
                version: &"v".repeat(300),
                ..Default::default()
            },
            "agent_version",
        ),
    ];
    for (case, word) in cases {
        let e = open_err(&crafted(&case));
        assert!(
            matches!(e, Error::CorruptHeader { .. }) && e.to_string().contains(word),
            "expected a header error about {word}: {e}"
        );
    }
    assert_eq!(
        MAX_IMAGE_BYTES / (4 << 20),
        MAX_WINDOWS,
        "the default window spans the max"
    );
}

#[test]
fn the_largest_allowed_declared_image_fails_on_its_checksum_without_writing() {
    // 64 TiB declared, nothing stored: the header is within bounds, so verify walks the 2^24
    // absent windows' checksums (batched) and finds the whole-image checksum wrong.
    let snap = crafted(&Crafted {
        size: MAX_IMAGE_BYTES,
        ..Default::default()
    });
    let (reader, meta) = SnapshotReader::open(Cursor::new(&snap)).expect("header in bounds");
    assert_eq!(meta.size_bytes, MAX_IMAGE_BYTES);
    let e = reader
        .verify(&mut miren_snapshot::NoProgress)
        .expect_err("a forged empty 64 TiB image verified");
    assert!(matches!(e, Error::CorruptTrailer { .. }), "{e}");
}

#[test]
fn names_with_terminal_escapes_are_read_but_printed_escaped() {
    let evil = "x\u{1b}]0;owned\u{7}\u{1b}[2J\r\n\u{9b}31m\u{202e}gnp.exe";
    let snap = crafted(&Crafted {
        size: 1 << 30,
        name: evil,
        fs: "zfs\u{1b}[31m",
        ..Default::default()
    });
    let (_, meta) = SnapshotReader::open(Cursor::new(&snap)).expect("header in bounds");
    assert_eq!(meta.name, evil, "the raw name is kept as data");
    for shown in [printable(&meta.name), meta.filesystem.to_string()] {
        assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{shown:?}"
        );
    }
    assert!(printable(&meta.name).contains("\\u{1b}]0;owned"));
    assert_eq!(printable("pg-data-1"), "pg-data-1");
    assert!(meta.created_at > UNIX_EPOCH + Duration::from_secs(1));
}
