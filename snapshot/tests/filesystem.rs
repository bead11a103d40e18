//! Real loop-backed ext4: snapshot/restore with fsck, freeze/thaw, live capture.
//! Needs root, losetup, mount, mkfs.ext4 and fsck.ext4; skipped (with a note) otherwise.

mod common;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use miren_snapshot::{capture_extents, capture_extents_into, freeze, memory_file, thaw, Error};

const M: u64 = 1024 * 1024;

fn can_run() -> bool {
    let ok = is_root()
        && ["losetup", "mount", "mkfs.ext4", "fsck.ext4", "zstd"]
            .iter()
            .all(|t| have(t));
    if !ok {
        // Under CI a missing prerequisite is a broken setup, not a reason to pass.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: needs root, losetup, mount, mkfs.ext4, fsck.ext4 and zstd (scripts/setup)"
        );
        eprintln!("skipping: needs root, losetup, mount, mkfs.ext4, fsck.ext4 and zstd");
    }
    ok
}

fn mkfs_ext4(img: &Path, size: u64) {
    mkfs("ext4", img, size);
}

fn mkfs(fs: &str, img: &Path, size: u64) {
    sparse_file(img, size, &[]);
    let p = img.to_str().expect("utf8");
    match fs {
        "ext4" => run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                p,
            ],
        ),
        "xfs" => run("mkfs.xfs", &["-q", "-f", p]),
        "btrfs" => run("mkfs.btrfs", &["-q", "-f", p]),
        other => panic!("no mkfs for {other}"),
    };
}

/// Writes a tree of files and returns relative path -> contents.
fn populate(root: &Path, seed: u64) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut rng = Rng(seed);
    let mut files = BTreeMap::new();
    for d in 0..4 {
        let dir = root.join(format!("dir{d}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        for f in 0..6 {
            let len = rng.below(700_000) as usize;
            let data = if f % 2 == 0 {
                text(&mut rng, len)
            } else {
                rng.bytes(len)
            };
            let rel = PathBuf::from(format!("dir{d}/file{f}"));
            std::fs::write(root.join(&rel), &data).expect("write file");
            files.insert(rel, data);
        }
    }
    // A sparse file inside the filesystem too.
    let rel = PathBuf::from("sparse.bin");
    let f = std::fs::File::create(root.join(&rel)).expect("create");
    f.set_len(20 * M).expect("set_len");
    std::os::unix::fs::FileExt::write_all_at(&f, b"end of sparse", 20 * M - 13).expect("write");
    let mut content = vec![0u8; 20 * M as usize];
    content[20 * M as usize - 13..].copy_from_slice(b"end of sparse");
    files.insert(rel, content);
    run("sync", &[]);
    files
}

fn check_tree(root: &Path, files: &BTreeMap<PathBuf, Vec<u8>>) {
    for (rel, want) in files {
        let got =
            std::fs::read(root.join(rel)).unwrap_or_else(|e| panic!("read {}: {e}", rel.display()));
        assert!(got == *want, "{} differs after restore", rel.display());
    }
}

fn fsck_clean(img: &Path) {
    fsck("ext4", img);
}

/// Read-only filesystem check; panics if the checker finds problems.
fn fsck(fs: &str, img: &Path) {
    let p = img.to_str().expect("utf8");
    match fs {
        "ext4" => run("fsck.ext4", &["-n", "-f", p]),
        "xfs" => run("xfs_repair", &["-n", "-f", p]),
        "btrfs" => run("btrfs", &["check", "--readonly", p]),
        other => panic!("no fsck for {other}"),
    };
}

fn snapshot_restore_check(work: &Path, img: &Path, files: &BTreeMap<PathBuf, Vec<u8>>, tag: &str) {
    snapshot_restore_check_fs("ext4", work, img, files, tag)
}

fn snapshot_restore_check_fs(
    fs: &str,
    work: &Path,
    img: &Path,
    files: &BTreeMap<PathBuf, Vec<u8>>,
    tag: &str,
) {
    let (snap, sum) = snapshot_bytes(img, &Default::default());
    let snap_path = work.join(format!("{tag}.snap"));
    std::fs::write(&snap_path, &snap).expect("write snap");
    run("zstd", &["-qt", snap_path.to_str().expect("utf8")]);
    std::fs::remove_file(&snap_path).expect("rm");

    let rdir = work.join(format!("{tag}-restore"));
    std::fs::create_dir(&rdir).expect("mkdir");
    let (r, restored) = restore_bytes(&snap, &rdir);
    let rs = r.expect("restore");
    assert_eq!(rs.image_checksum, sum.image_checksum);
    assert!(same_bytes(img, &restored), "restored image differs");
    let (a, b) = (allocated(img), allocated(&restored));
    // Restore never allocates more than the source; it may allocate less when the source has
    // allocated all-zero blocks, which are not stored.
    assert!(b <= a + a / 100, "restored alloc {b} vs source {a}");
    assert!(
        b >= sum.data_bytes_stored,
        "restored alloc {b} < stored {}",
        sum.data_bytes_stored
    );
    eprintln!(
        "{tag}: source alloc {a}, restored alloc {b}, stored {}",
        sum.data_bytes_stored
    );
    fsck(fs, &restored);

    let mut m = LoopMount::new(&restored, &work.join(format!("{tag}-mnt")), true);
    check_tree(&m.mnt, files);
    m.unmount();
}

#[test]
fn ext4_image_round_trip_fsck_clean() {
    if !can_run() {
        return;
    }
    let work = tempdir();
    let img = work.path().join("disk.img");
    mkfs_ext4(&img, 256 * M);
    let mut m = LoopMount::new(&img, &work.path().join("mnt"), false);
    let files = populate(&m.mnt, 11);
    m.unmount();
    fsck_clean(&img);
    snapshot_restore_check(work.path(), &img, &files, "offline");
}

#[test]
fn freeze_blocks_writes_and_guard_thaws() {
    if !can_run() {
        return;
    }
    let work = tempdir();
    let img = work.path().join("frz.img");
    mkfs_ext4(&img, 64 * M);
    let mut m = LoopMount::new(&img, &work.path().join("mnt"), false);
    let mnt = m.mnt.clone();

    assert!(!thaw(&mnt).expect("thaw of a thawed fs is fine"));
    // Never the node's root or a plain directory (that would freeze the filesystem holding it).
    assert!(matches!(
        freeze(Path::new("/")),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(freeze(work.path()), Err(Error::InvalidInput(_))));
    assert!(matches!(freeze(&mnt.join("nope")), Err(Error::Io { .. })));
    let guard = freeze(&mnt).expect("freeze");
    assert!(matches!(freeze(&mnt), Err(Error::AlreadyFrozen { .. })));

    let (tx, rx) = mpsc::channel();
    let path = mnt.join("written-while-frozen");
    let writer = std::thread::spawn(move || {
        let r = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"hello").and_then(|()| f.sync_all()));
        let _ = tx.send(r.is_ok());
    });
    // The writer cannot finish while frozen; this only checks it has not, never how fast.
    assert!(
        matches!(
            rx.recv_timeout(Duration::from_millis(300)),
            Err(mpsc::RecvTimeoutError::Timeout)
        ),
        "a write completed on a frozen filesystem"
    );
    drop(guard);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(60)),
        Ok(true),
        "write did not resume after thaw"
    );
    writer.join().expect("writer");

    freeze(&mnt)
        .expect("freeze 2")
        .thaw()
        .expect("explicit thaw");
    // A process that froze the filesystem and died without thawing: thaw(path) recovers.
    if have("fsfreeze") {
        run("fsfreeze", &["--freeze", mnt.to_str().expect("utf8")]);
        assert!(
            thaw(&mnt).expect("thaw after crash"),
            "should report it was frozen"
        );
    }
    assert!(!thaw(&mnt).expect("second thaw"));
    m.unmount();
}

#[test]
fn live_capture_while_frozen_then_snapshot() {
    if !can_run() {
        return;
    }
    let work = tempdir();
    let img = work.path().join("live.img");
    mkfs_ext4(&img, 128 * M);
    let mut m = LoopMount::new(&img, &work.path().join("mnt"), false);
    let files = populate(&m.mnt, 23);

    let copy = work.path().join("capture.img");
    let guard = freeze(&m.mnt).expect("freeze");
    let copied = capture_extents(&img, &copy).expect("capture");
    drop(guard);
    assert!(copied > 0);
    // The live disk keeps changing afterwards; the capture must not.
    std::fs::write(m.mnt.join("after-capture"), b"later").expect("write after");
    m.unmount();

    assert!(
        matches!(capture_extents(&img, &copy), Err(Error::Io { .. })),
        "capture must refuse to overwrite an existing file"
    );
    let (a, c) = (allocated(&img), allocated(&copy));
    assert!(c <= a + a / 100, "capture alloc {c} vs source {a}");
    // A frozen ext4 is consistent and clean on disk (the journal is flushed by the freeze).
    fsck_clean(&copy);
    snapshot_restore_check(work.path(), &copy, &files, "live");
}

#[test]
fn capture_extents_of_plain_sparse_file() {
    let work = tempdir();
    let src = work.path().join("s.img");
    let mut rng = Rng(3);
    sparse_file(
        &src,
        50 * M + 3,
        &[
            (0, rng.bytes(5000)),
            (7 * M, text(&mut rng, 3 * M as usize)),
            (50 * M - 10, rng.bytes(13)),
        ],
    );
    let dst = work.path().join("d.img");
    let n = capture_extents(&src, &dst).expect("capture");
    assert!(n >= 3 * M);
    assert!(same_bytes(&src, &dst));
    let (a, b) = (allocated(&src), allocated(&dst));
    assert!(b.abs_diff(a) * 100 <= a, "capture alloc {b} vs {a}");
}

/// A capture into memory (what the agent uses when the data fits) is the same sparse copy,
/// and its snapshot is the source's, read back through `/proc/self/fd`.
#[test]
fn capture_into_memory_file() {
    let work = tempdir();
    let src = work.path().join("s.img");
    let mut rng = Rng(5);
    sparse_file(
        &src,
        40 * M,
        &[
            (M, rng.bytes(300_000)),
            (9 * M, text(&mut rng, 5 * M as usize)),
            (40 * M - 4096, rng.bytes(4096)),
        ],
    );
    let mem = memory_file("capture-test").expect("memfd");
    let n = capture_extents_into(&src, &mem, "memory").expect("capture");
    assert!(n >= 5 * M);
    let copy = PathBuf::from(format!("/proc/self/fd/{}", mem.as_raw_fd()));
    assert!(same_bytes(&src, &copy));
    let (a, b) = (allocated(&src), allocated(&copy));
    assert!(b.abs_diff(a) * 100 <= a, "memory capture alloc {b} vs {a}");
    let (_, from_src) = snapshot_bytes(&src, &small_opts());
    let (_, from_mem) = snapshot_bytes(&copy, &small_opts());
    assert_eq!(from_src.image_checksum, from_mem.image_checksum);
    assert_eq!(from_src.data_bytes_stored, from_mem.data_bytes_stored);
}

/// Same round trip on xfs and btrfs when their tools are installed (Debian: xfsprogs, btrfs-progs).
#[test]
fn xfs_and_btrfs_round_trip() {
    if !can_run() {
        return;
    }
    for (fs, mkfs_tool, fsck_tool, size) in [
        ("xfs", "mkfs.xfs", "xfs_repair", 512 * M),
        ("btrfs", "mkfs.btrfs", "btrfs", 256 * M),
    ] {
        if !have(mkfs_tool) || !have(fsck_tool) {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI: {mkfs_tool} and {fsck_tool} are missing (scripts/setup)"
            );
            eprintln!("skipping {fs}: {mkfs_tool} or {fsck_tool} missing");
            continue;
        }
        let work = tempdir();
        let img = work.path().join(format!("{fs}.img"));
        mkfs(fs, &img, size);
        let mut m = LoopMount::new(&img, &work.path().join("mnt"), false);
        let files = populate(&m.mnt, 31);
        m.unmount();
        fsck(fs, &img);
        snapshot_restore_check_fs(fs, work.path(), &img, &files, fs);
    }
}
