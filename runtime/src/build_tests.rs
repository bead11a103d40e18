use super::*;

/// A tar entry with a raw name (tar::Builder refuses `..` and absolute names, a hostile client
/// does not).
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, data: &[u8], link: &str) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    let pad = (512 - data.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

fn spool() -> File {
    tempfile::tempfile().expect("spool")
}

fn read(tar: &[u8]) -> std::result::Result<SourceTree, SourceError> {
    SourceTree::read(tar, SourceLimits::default(), spool())
}

fn layer_bytes(tree: &SourceTree) -> Vec<u8> {
    let mut out = Vec::new();
    tree.write_layer("app", &mut out).expect("layer");
    out
}

#[test]
fn the_same_tree_gives_the_same_layer_whatever_the_order_and_times() {
    let mut a = Vec::new();
    raw_entry(&mut a, "index.ts", tar::EntryType::Regular, b"hi", "");
    raw_entry(&mut a, "lib/x.ts", tar::EntryType::Regular, b"x", "");
    raw_entry(&mut a, "link", tar::EntryType::Symlink, b"", "index.ts");
    let mut b = Vec::new();
    raw_entry(&mut b, "./link", tar::EntryType::Symlink, b"", "index.ts");
    raw_entry(&mut b, "lib/", tar::EntryType::Directory, b"", "");
    raw_entry(&mut b, "lib/x.ts", tar::EntryType::Regular, b"x", "");
    raw_entry(&mut b, "index.ts", tar::EntryType::Regular, b"hi", "");
    let ta = read(&finish(a)).expect("a");
    let tb = read(&finish(b)).expect("b");
    assert_eq!(layer_bytes(&ta), layer_bytes(&tb));
    assert_eq!(
        ta.read_file("index.ts", 10).expect("read"),
        Some(b"hi".to_vec())
    );
    let names: Vec<String> = tar::Archive::new(&layer_bytes(&ta)[..])
        .entries()
        .expect("entries")
        .map(|e| {
            e.expect("entry")
                .path()
                .expect("path")
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "app/",
            "app/index.ts",
            "app/lib/",
            "app/lib/x.ts",
            "app/link"
        ]
    );
}

#[test]
fn a_changed_file_changes_the_layer() {
    let mut a = Vec::new();
    raw_entry(&mut a, "index.ts", tar::EntryType::Regular, b"one", "");
    let mut b = Vec::new();
    raw_entry(&mut b, "index.ts", tar::EntryType::Regular, b"two", "");
    assert_ne!(
        layer_bytes(&read(&finish(a)).expect("a")),
        layer_bytes(&read(&finish(b)).expect("b"))
    );
}

#[test]
fn hostile_names_and_kinds_are_refused() {
    let cases: &[(&str, tar::EntryType, &str, &str)] = &[
        ("../escape", tar::EntryType::Regular, "", "`..`"),
        ("a/../../b", tar::EntryType::Regular, "", "`..`"),
        ("/etc/passwd", tar::EntryType::Regular, "", "absolute"),
        ("hard", tar::EntryType::Link, "/etc/shadow", "hard links"),
        ("dev", tar::EntryType::Char, "", "only files"),
        ("fifo", tar::EntryType::Fifo, "", "only files"),
    ];
    for (name, kind, link, want) in cases {
        let mut t = Vec::new();
        raw_entry(&mut t, name, *kind, b"", link);
        let err = read(&finish(t)).err().expect("refused").to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
}

#[test]
fn nothing_is_written_through_a_symlink() {
    let mut t = Vec::new();
    raw_entry(&mut t, "out", tar::EntryType::Symlink, b"", "/etc");
    raw_entry(&mut t, "out/passwd", tar::EntryType::Regular, b"x", "");
    let err = read(&finish(t)).err().expect("refused").to_string();
    assert!(err.contains("parent `out` is not a directory"), "{err}");
}

#[test]
fn a_huge_file_is_refused_from_its_header_without_reading_it() {
    // A 10 GiB file's header and no data: refused before any read of the data.
    let mut h = tar::Header::new_gnu();
    h.set_path("big.img").expect("path");
    h.set_size(10 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    let err = read(h.as_bytes()).err().expect("refused");
    assert!(
        matches!(err, SourceError::TooLarge { ref name, .. } if name == "big.img"),
        "{err}"
    );
    assert!(err.to_string().contains(".gitignore"), "{err}");
}

#[test]
fn too_many_entries_are_refused() {
    let mut t = Vec::new();
    for i in 0..5 {
        raw_entry(&mut t, &format!("f{i}"), tar::EntryType::Regular, b"", "");
    }
    let limits = SourceLimits {
        max_bytes: 1 << 20,
        max_entries: 3,
    };
    let err = SourceTree::read(&finish(t)[..], limits, spool())
        .err()
        .expect("refused");
    assert_eq!(err, SourceError::TooManyEntries { limit: 3 });
}

#[test]
fn assembled_images_are_deterministic_and_recorded() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = ImageStore::open(dir.path()).expect("store");
    // A base image: one file in one layer.
    let rootfs = dir.path().join("rootfs.tar");
    {
        let mut b = tar::Builder::new(File::create(&rootfs).expect("create"));
        let mut h = header(tar::EntryType::Regular, 0o755, 3);
        b.append_data(&mut h, "bin/sh", &b"#!x"[..])
            .expect("append");
        b.finish().expect("finish");
    }
    let base = store
        .import_rootfs_tar(&rootfs, "example.test/base:1", None)
        .expect("base");
    let mut t = Vec::new();
    raw_entry(&mut t, "index.ts", tar::EntryType::Regular, b"hi", "");
    let tree = read(&finish(t)).expect("tree");
    let config = BuildConfig {
        working_dir: "/app".into(),
        cmd: vec!["bun".into(), "run".into(), "index.ts".into()],
        env: vec!["PORT=3000".into()],
    };
    let mut digests = Vec::new();
    for reference in ["example.test/app:a", "example.test/app:b"] {
        let layer = store
            .put_layer(|w| tree.write_layer("app", w))
            .expect("layer");
        let image = store
            .assemble(&base, &[layer], &config, reference, "build:test".into())
            .expect("assemble");
        assert_eq!(image.layers.len(), 2);
        assert_eq!(image.config.working_dir, "/app");
        assert_eq!(image.config.cmd, config.cmd);
        assert!(store.get(reference).expect("get").is_some());
        let dirs = store.layer_dirs(&image).expect("dirs");
        assert!(dirs.iter().any(|d| d.join("app/index.ts").is_file()));
        digests.push(image.manifest_digest);
    }
    assert_eq!(digests[0], digests[1]);
}
