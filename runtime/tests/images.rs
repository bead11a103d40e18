//! Image store tests against a real docker-registry on loopback. Need root
//! (whiteouts are device nodes), `docker-registry` and `skopeo`.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::sync::{Arc, Mutex};

use common::*;
use miren_runtime::{Error, ImageStore, ImportKind, Mirrors, PullOptions};

fn opts(reg: &Registry) -> PullOptions {
    PullOptions {
        mirrors: Mirrors::parse([format!("docker.io={}", reg.addr)], false).expect("mirrors"),
        ..Default::default()
    }
}

fn base_layer() -> Vec<u8> {
    Tar::default()
        .dir("etc")
        .file("etc/os-release", b"ID=mrtst\n")
        .dir("srv")
        .file("srv/gone", b"deleted by the top layer\n")
        .dir("data")
        .file("data/old", b"hidden by an opaque dir\n")
        .symlink("bin", "usr/bin")
        .bytes()
}

fn top_layer(tag: &str) -> Vec<u8> {
    Tar::default()
        .dir("srv")
        .file("srv/.wh.gone", b"")
        .dir("data")
        .file("data/.wh..wh..opq", b"")
        .file("data/new", b"new\n")
        .file("srv/tag", tag.as_bytes())
        .bytes()
}

fn xattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: valid strings and buffer.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

#[tokio::test]
async fn pull_by_tag_and_digest_through_mirror() {
    let reg = Registry::start();
    let layout = tempdir();
    let md = write_layout(
        layout.path(),
        "v1",
        &[(base_layer(), Comp::Gzip), (top_layer("v1"), Comp::Zstd)],
        &["/bin/app"],
    );
    reg.push(layout.path(), "v1", "mrtst/app");

    let data = tempdir();
    let store = ImageStore::open(data.path()).expect("open");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut o = opts(&reg);
    let s2 = seen.clone();
    o.progress = Some(Arc::new(move |p| s2.lock().expect("lock").push(p.clone())));

    let rec = store.pull("mrtst/app:v1", &o).await.expect("pull by tag");
    assert_eq!(rec.reference, "docker.io/mrtst/app:v1"); // as written, not the mirror
    assert_eq!(rec.source, reg.addr);
    assert_eq!(rec.manifest_digest, md);
    assert_eq!(rec.config.cmd, ["/bin/app"]);
    assert_eq!(rec.config.working_dir, "/srv");
    assert_eq!(rec.config.user, "1000");
    assert!(rec.config.env.contains(&"MRTST=1".to_string()));
    assert_eq!(rec.layers.len(), 2);
    for l in &rec.layers {
        let p = seen.lock().expect("lock");
        assert!(p
            .iter()
            .any(|x| x.digest == l.digest && x.done == l.size && x.total == l.size));
    }

    let dirs = store.layer_dirs(&rec).expect("dirs");
    assert_eq!(
        std::fs::read(dirs[0].join("etc/os-release")).expect("read"),
        b"ID=mrtst\n"
    );
    assert_eq!(
        std::fs::read_link(dirs[0].join("bin")).expect("link"),
        std::path::Path::new("usr/bin")
    );
    // Whiteouts in overlayfs form.
    let wh = std::fs::symlink_metadata(dirs[1].join("srv/gone")).expect("whiteout");
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert!(!dirs[1].join("srv/.wh.gone").exists());
    assert_eq!(
        xattr(&dirs[1].join("data"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(!dirs[1].join("data/.wh..wh..opq").exists());
    assert!(dirs[1].join("data/new").is_file());

    // By digest, through the same mirror: same image, nothing fetched again.
    let by_digest = format!("mrtst/app@{md}");
    let rec2 = store.pull(&by_digest, &o).await.expect("pull by digest");
    assert_eq!(rec2.manifest_digest, md);
    assert_eq!(rec2.reference, format!("docker.io/mrtst/app@{md}"));
    assert_eq!(store.list().expect("list").len(), 2);
    assert_eq!(store.get("mrtst/app:v1").expect("get"), Some(rec));

    // A digest the registry does not have.
    let missing = format!("mrtst/app@sha256:{}", "0".repeat(64));
    assert!(store.pull(&missing, &o).await.is_err());
}

#[tokio::test]
async fn multi_arch_index_resolves_to_this_platform() {
    let reg = Registry::start();
    let layout = tempdir();
    let (index, mds) = write_index_layout(layout.path(), "multi", &["arm64", "amd64"]);
    reg.push(layout.path(), "multi", "mrtst/multi");

    let data = tempdir();
    let store = ImageStore::open(data.path()).expect("open");
    let rec = store
        .pull("mrtst/multi:multi", &opts(&reg))
        .await
        .expect("pull");
    assert_eq!(rec.index_digest.as_deref(), Some(index.as_str()));
    assert_eq!(rec.manifest_digest, mds[1]); // amd64, this machine
    let dirs = store.layer_dirs(&rec).expect("dirs");
    assert_eq!(std::fs::read(dirs[0].join("arch")).expect("arch"), b"amd64");

    // By the index digest, and from the layout directly: same choice.
    let rec = store
        .pull(&format!("mrtst/multi@{index}"), &opts(&reg))
        .await
        .expect("pull");
    assert_eq!(rec.manifest_digest, mds[1]);
    let rec = store
        .import_oci_layout(layout.path(), "local/multi:multi")
        .expect("import");
    assert_eq!(rec.manifest_digest, mds[1]);
    assert_eq!(rec.index_digest.as_deref(), Some(index.as_str()));

    // No image for the asked platform.
    let mut o = opts(&reg);
    o.platform.architecture = "riscv64".into();
    let err = store
        .pull("mrtst/multi:multi", &o)
        .await
        .expect_err("no riscv64");
    assert!(matches!(err, Error::NoPlatform(_)), "{err:?}");
}

#[tokio::test]
async fn pull_with_credentials() {
    let mut reg = Registry::start();
    let layout = tempdir();
    write_layout(layout.path(), "v1", &[(base_layer(), Comp::Gzip)], &["sh"]);
    reg.push(layout.path(), "v1", "mrtst/private");
    reg.restart_with_auth();

    let data = tempdir();
    let store = ImageStore::open(data.path()).expect("open");
    let mut o = opts(&reg);
    let err = store
        .pull("mrtst/private:v1", &o)
        .await
        .expect_err("anonymous must fail");
    assert!(matches!(err, Error::Registry { .. }), "got {err:?}");
    o.credentials.insert(&reg.addr, USER, "wrong");
    assert!(store.pull("mrtst/private:v1", &o).await.is_err());
    // Credentials go with the host contacted: the mirror.
    o.credentials.insert(&reg.addr, USER, PASSWORD);
    let rec = store
        .pull("mrtst/private:v1", &o)
        .await
        .expect("pull with credentials");
    assert_eq!(rec.reference, "docker.io/mrtst/private:v1");
    assert!(!format!("{:?}", o.credentials).contains(PASSWORD));
}

#[tokio::test]
async fn digest_mismatch_is_detected() {
    let reg = Registry::start();
    let layout = tempdir();
    let layer = Tar::default().file("f", &[7u8; 4096]).bytes();
    write_layout(layout.path(), "v1", &[(layer, Comp::Gzip)], &["sh"]);
    reg.push(layout.path(), "v1", "mrtst/bad");

    // Flip a byte of the layer blob in the registry's storage.
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).expect("index"))
            .expect("json");
    let md = idx["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.path().join("blobs/sha256").join(&md[7..])).expect("m"),
    )
    .expect("json");
    let ld = m["layers"][0]["digest"]
        .as_str()
        .expect("layer digest")
        .to_string();
    let f = reg.blob_file(&ld);
    let mut b = std::fs::read(&f).expect("registry blob");
    let last = b.len() - 1;
    b[last] ^= 0xff;
    std::fs::write(&f, &b).expect("corrupt");

    let data = tempdir();
    let store = ImageStore::open(data.path()).expect("open");
    let err = store
        .pull("mrtst/bad:v1", &opts(&reg))
        .await
        .expect_err("must fail");
    assert!(matches!(err, Error::DigestMismatch { .. }), "got {err:?}");
    assert!(!store.blob_path(&ld).expect("path").exists());
    assert!(store.list().expect("list").is_empty());
    assert_eq!(tree_count(&store.root().join("tmp")), 0);
    assert_eq!(tree_count(&store.root().join("layers")), 0);
}

#[test]
fn import_each_kind() {
    let data = tempdir();
    let store = ImageStore::open(data.path()).expect("open");
    let work = tempdir();

    // OCI layout directory.
    let layout = work.path().join("layout");
    let md = write_layout(&layout, "v2", &[(top_layer("v2"), Comp::None)], &["run"]);
    let (kind, rec) = store.import(&layout, "local/app:v2").expect("layout");
    assert_eq!(kind, ImportKind::OciLayout);
    assert_eq!(rec.manifest_digest, md);
    assert_eq!(rec.reference, "docker.io/local/app:v2");

    // OCI archive: a tar of that layout.
    let archive = work.path().join("app.oci.tar");
    {
        let mut b = tar::Builder::new(std::fs::File::create(&archive).expect("create"));
        b.append_dir_all(".", &layout).expect("tar");
        b.finish().expect("tar");
    }
    let (kind, rec) = store
        .import(&archive, "example.com/app:v2")
        .expect("archive");
    assert_eq!(kind, ImportKind::OciArchive);
    assert_eq!(rec.manifest_digest, md);
    let dirs = store.layer_dirs(&rec).expect("dirs");
    assert_eq!(std::fs::read(dirs[0].join("srv/tag")).expect("tag"), b"v2");

    // Plain rootfs tarball, gzip-compressed, like `docker import`.
    let rootfs = work.path().join("rootfs.tar.gz");
    std::fs::write(&rootfs, compress(&base_layer(), Comp::Gzip).0).expect("write");
    let (kind, rec) = store.import(&rootfs, "rootfs:1").expect("rootfs");
    assert_eq!(kind, ImportKind::RootfsTar);
    assert_eq!(rec.layers.len(), 1);
    assert_eq!(rec.layers[0].diff_id, sha(&base_layer()));
    assert!(rec.config.env[0].starts_with("PATH="));
    let dirs = store.layer_dirs(&rec).expect("dirs");
    assert!(dirs[0].join("etc/os-release").is_file());

    let refs: Vec<_> = store
        .list()
        .expect("list")
        .into_iter()
        .map(|r| r.reference)
        .collect();
    assert_eq!(
        refs,
        [
            "docker.io/library/rootfs:1",
            "docker.io/local/app:v2",
            "example.com/app:v2"
        ]
    );
    assert_eq!(tree_count(&store.root().join("tmp")), 0);
}

#[test]
fn unsafe_tar_entries_are_refused() {
    let data = tempdir();
    let store = ImageStore::open(data.path()).expect("open");
    let work = tempdir();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");

    let cases = [
        Tar::default().raw_file("../escape", b"x").bytes(),
        Tar::default()
            .symlink("link", outside.to_str().expect("utf8"))
            .raw_file("link/escape", b"x")
            .bytes(),
    ];
    for (i, t) in cases.iter().enumerate() {
        let p = work.path().join(format!("bad{i}.tar"));
        std::fs::write(&p, t).expect("write");
        let err = store
            .import_rootfs_tar(&p, "bad:1", None)
            .expect_err("must refuse");
        assert!(
            matches!(err, Error::UnsafeEntry { .. }),
            "case {i}: {err:?}"
        );
    }
    assert_eq!(tree_count(&outside), 0);
    assert!(!work.path().join("escape").exists());
    assert_eq!(tree_count(&store.root().join("layers")), 0);
    assert_eq!(tree_count(&store.root().join("tmp")), 0);
}

#[tokio::test]
async fn shared_layer_is_unpacked_once_and_gc_removes_unused() {
    let reg = Registry::start();
    for tag in ["a", "b"] {
        let layout = tempdir();
        write_layout(
            layout.path(),
            tag,
            &[(base_layer(), Comp::Gzip), (top_layer(tag), Comp::Gzip)],
            &["sh"],
        );
        reg.push(layout.path(), tag, "mrtst/shared");
    }
    let data = tempdir();
    let store = ImageStore::open(data.path()).expect("open");
    let a = store
        .pull("mrtst/shared:a", &opts(&reg))
        .await
        .expect("pull a");
    let base = store.layer_path(&a.layers[0].diff_id).expect("path");
    let ino = std::fs::metadata(&base).expect("stat").ino();
    let b = store
        .pull("mrtst/shared:b", &opts(&reg))
        .await
        .expect("pull b");
    assert_eq!(a.layers[0], b.layers[0]);
    assert_ne!(a.layers[1].diff_id, b.layers[1].diff_id);
    // Same directory, not unpacked again.
    assert_eq!(std::fs::metadata(&base).expect("stat").ino(), ino);
    assert_eq!(tree_count(&store.root().join("layers")), 3);

    // Nothing unused yet.
    let rep = store.gc().expect("gc");
    assert_eq!((rep.blobs_removed, rep.layers_removed), (0, 0));

    assert!(store.remove("mrtst/shared:a").expect("remove"));
    assert!(!store.remove("mrtst/shared:a").expect("remove again"));
    let rep = store.gc().expect("gc");
    // a's manifest, config and top layer blob; a's top layer dir.
    assert_eq!(rep.blobs_removed, 3);
    assert_eq!(rep.layers_removed, 1);
    assert!(base.is_dir());
    for d in store.layer_dirs(&b).expect("dirs") {
        assert!(d.is_dir());
    }
    assert!(!store
        .layer_path(&a.layers[1].diff_id)
        .expect("path")
        .exists());
    assert!(!store.blob_path(&a.manifest_digest).expect("path").exists());

    assert!(store.remove("mrtst/shared:b").expect("remove"));
    store.gc().expect("gc");
    assert_eq!(tree_count(&store.root().join("layers")), 0);
    assert_eq!(tree_count(&store.root().join("blobs/sha256")), 0);
}

/// Child half of `killed_import_leaves_only_temp_files`: imports until killed.
#[test]
#[ignore]
fn kill_child_import_forever() {
    let Ok(dir) = std::env::var("MRTST_KILL_DATA") else {
        return;
    };
    let tarball = std::env::var("MRTST_KILL_TAR").expect("tar");
    let store = ImageStore::open(&dir).expect("open");
    // Bounded, in case the parent died without killing us.
    let t0 = std::time::Instant::now();
    let mut i = 0;
    while t0.elapsed() < std::time::Duration::from_secs(120) {
        // Same tarball each round: remove and GC so it unpacks again.
        let r = format!("big:{i}");
        let _ = store.import_rootfs_tar(std::path::Path::new(&tarball), &r, None);
        let _ = store.remove(&r);
        let _ = store.gc();
        i += 1;
    }
}

#[test]
fn killed_import_leaves_only_temp_files() {
    use std::os::unix::process::ExitStatusExt;
    let work = tempdir();
    // Many small files, so an unpack takes long enough to be caught.
    let mut t = Tar::default().dir("d");
    for i in 0..20000 {
        t = t.file(&format!("d/f{i}"), &[b'x'; 100]);
    }
    let tarball = work.path().join("big.tar");
    std::fs::write(&tarball, t.bytes()).expect("write");
    let data = work.path().join("data");
    let store = ImageStore::open(&data).expect("open");
    let tmp = store.root().join("tmp");

    let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "kill_child_import_forever",
            "--ignored",
            "--nocapture",
        ])
        .env("MRTST_KILL_DATA", &data)
        .env("MRTST_KILL_TAR", &tarball)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn child");
    // Wait until an unpack is under way, then kill -9.
    let t0 = std::time::Instant::now();
    let caught = loop {
        let busy = std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("unpack-"))
            })
            .unwrap_or(false);
        if busy {
            std::thread::sleep(std::time::Duration::from_millis(20));
            break true;
        }
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    child.kill().expect("kill");
    let st = child.wait().expect("wait");
    assert!(caught, "never saw an unpack in progress");
    assert_eq!(st.signal(), Some(libc::SIGKILL));

    // Whatever the moment: every layer under its final name is complete.
    let layers = store.root().join("layers");
    for e in std::fs::read_dir(&layers).expect("layers").flatten() {
        assert_eq!(
            tree_count(&e.path().join("d")),
            20000,
            "partial layer {:?}",
            e.path()
        );
    }
    assert!(tree_count(&tmp) > 0, "the killed unpack left its temp dir");
    // The next open (no one else using the store) removes the leftovers.
    let store = ImageStore::open(&data).expect("reopen");
    assert_eq!(tree_count(&tmp), 0);
    store.gc().expect("gc");
    assert_eq!(tree_count(&layers), 0);
}
