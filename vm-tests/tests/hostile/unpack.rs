//! Hostile tests: unpack (see docs/security.md).
//!
//! A pulled or imported image is outside input. Its layers are unpacked by the agent as root on
//! the host, so a layer that names a path through a symlink, a `..` path or a hard link to a host
//! file would change host files. These tests import crafted OCI layouts through a real agent and
//! assert that a host directory and file made by the test keep their mode, owner, times, content
//! and link count, and that each import either succeeded with everything inside the layer or was
//! refused with an error naming the entry, leaving no image behind.

#[path = "../../../runtime/tests/common/mod.rs"]
mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{write_layout, Comp};
use miren_vm_tests::TestAgent;
use tar::{EntryType, Header};

/// A layer tar built header by header with raw names, as an attacker writes them.
struct RawTar(tar::Builder<Vec<u8>>);

impl RawTar {
    fn new() -> RawTar {
        RawTar(tar::Builder::new(Vec::new()))
    }

    fn entry(mut self, kind: EntryType, name: &str, link: &str, mode: u32, body: &[u8]) -> Self {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_000_000);
        h.set_size(body.len() as u64);
        if matches!(kind, EntryType::Block | EntryType::Char) {
            h.set_device_major(8).expect("major");
            h.set_device_minor(0).expect("minor");
        }
        let old = h.as_old_mut();
        assert!(
            name.len() < 100 && link.len() < 100,
            "name too long for a raw header"
        );
        old.name.fill(0);
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname.fill(0);
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        self.0.append(&h, body).expect("tar");
        self
    }

    fn dir(self, name: &str, mode: u32) -> Self {
        self.entry(EntryType::Directory, name, "", mode, b"")
    }

    fn file(self, name: &str, body: &[u8]) -> Self {
        self.entry(EntryType::Regular, name, "", 0o644, body)
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Symlink, name, target, 0o777, b"")
    }

    fn hard_link(self, name: &str, target: &str) -> Self {
        self.entry(EntryType::Link, name, target, 0o644, b"")
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().expect("tar")
    }
}

/// What an escape would change about a host path.
fn fingerprint(p: &Path) -> String {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let content = if m.is_file() {
        fs::read(p).expect("read")
    } else {
        Vec::new()
    };
    format!(
        "mode={:o} uid={} gid={} nlink={} mtime={}.{} ctime={}.{} content={:?}",
        m.mode(),
        m.uid(),
        m.gid(),
        m.nlink(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        String::from_utf8_lossy(&content)
    )
}

/// The host tree a layer aims at: every name in it and its fingerprint.
fn host_state(host: &Path) -> Vec<(PathBuf, String)> {
    let mut out = vec![(host.to_path_buf(), fingerprint(host))];
    let mut names: Vec<PathBuf> = Vec::new();
    let mut stack = vec![host.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("readdir") {
            let p = e.expect("dirent").path();
            if fs::symlink_metadata(&p).expect("lstat").is_dir() {
                stack.push(p.clone());
            }
            names.push(p);
        }
    }
    names.sort();
    out.extend(names.into_iter().map(|p| {
        let f = fingerprint(&p);
        (p, f)
    }));
    out
}

fn import_layout(agent: &TestAgent, name: &str, layer: Vec<u8>) -> std::process::Output {
    let layout = agent.root.join(format!("layout-{name}"));
    write_layout(&layout, "1", &[(layer, Comp::Gzip)], &["/bin/true"]);
    agent.cli(&[
        "image",
        "import",
        &format!("local/{name}:1"),
        layout.to_str().expect("utf-8 path"),
        "--json",
    ])
}

fn image_refs(agent: &TestAgent) -> Vec<String> {
    agent
        .json(&["image", "list", "--json"])
        .as_array()
        .expect("image list")
        .iter()
        .filter_map(|i| i["reference"].as_str().map(str::to_string))
        .collect()
}

/// The unpacked layer directories of the agent's store.
fn layer_dirs(agent: &TestAgent) -> Vec<PathBuf> {
    let layers = agent.data_dir.join("images/layers");
    fs::read_dir(&layers)
        .map(|d| d.map(|e| e.expect("dirent").path()).collect())
        .unwrap_or_default()
}

#[test]
fn image_layers_cannot_change_host_files() {
    let agent = TestAgent::start();
    let host = agent.root.join("host");
    let hostdir = host.join("hostdir");
    fs::create_dir_all(hostdir.join("sub")).expect("mkdir");
    fs::write(hostdir.join("secret"), b"host secret\n").expect("write");
    fs::write(host.join("hostfile"), b"host file\n").expect("write");
    fs::set_permissions(&hostdir, fs::Permissions::from_mode(0o750)).expect("chmod");
    fs::set_permissions(host.join("hostfile"), fs::Permissions::from_mode(0o640)).expect("chmod");
    let before = host_state(&host);
    let hostdir_s = hostdir.to_str().expect("utf-8 path").to_string();
    let hostfile_s = host
        .join("hostfile")
        .to_str()
        .expect("utf-8 path")
        .to_string();
    // `..` enough times to reach / from any layer directory, then down to the host tree.
    let dotdot = format!("{}{}", "../".repeat(16), hostdir_s.trim_start_matches('/'));

    // The finding: dir `x` 04777, then `x` a symlink to a host dir. The deferred chmod used to
    // follow it. Siblings that stay inside: an absolute name, a file and a fifo replacing
    // symlinks to host files, a block device (skipped).
    let out = import_layout(
        &agent,
        "contained",
        RawTar::new()
            .dir("x", 0o4777)
            .dir("x/sub", 0o4777)
            .symlink("x", &hostdir_s)
            .file(&format!("{hostdir_s}/abs"), b"inside\n")
            .symlink("f", &hostfile_s)
            .file("f", b"layer file\n")
            .symlink("p", &hostfile_s)
            .entry(EntryType::Fifo, "p", "", 0o666, b"")
            .entry(EntryType::Block, "sda", "", 0o666, b"")
            .bytes(),
    );
    assert!(
        out.status.success(),
        "import failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    assert_eq!(
        host_state(&host),
        before,
        "the contained layer changed the host tree"
    );
    let layer = layer_dirs(&agent)
        .into_iter()
        .find(|d| d.join("f").is_file())
        .expect("the contained layer's directory");
    assert_eq!(fs::read_link(layer.join("x")).expect("x"), hostdir);
    assert_eq!(
        fs::read(layer.join(hostdir_s.trim_start_matches('/')).join("abs")).expect("abs"),
        b"inside\n"
    );
    assert_eq!(fs::read(layer.join("f")).expect("f"), b"layer file\n");
    assert!(fs::symlink_metadata(layer.join("p"))
        .expect("p")
        .file_type()
        .is_fifo());
    assert!(
        fs::symlink_metadata(layer.join("sda")).is_err(),
        "a block device was created"
    );

    // Refused layers: the import fails naming the entry, and leaves no image behind.
    let refused: [(&str, Vec<u8>, &str); 5] = [
        (
            "dotdot",
            RawTar::new().file(&format!("{dotdot}/pwned"), b"x").bytes(),
            "leaves the layer",
        ),
        (
            "through-symlink",
            RawTar::new()
                .symlink("d", &hostdir_s)
                .file("d/pwned", b"x")
                .bytes(),
            "may not write through it",
        ),
        (
            "dir-through-symlink",
            RawTar::new()
                .symlink("d", &hostdir_s)
                .dir("d/sub", 0o4777)
                .bytes(),
            "may not write through it",
        ),
        (
            "hardlink-dotdot",
            RawTar::new()
                .hard_link("h", &format!("{dotdot}/secret"))
                .bytes(),
            "leaves the layer",
        ),
        (
            "hardlink-through-symlink",
            RawTar::new()
                .symlink("d", &hostdir_s)
                .hard_link("h", "d/secret")
                .bytes(),
            "hard link target through a symlink",
        ),
    ];
    for (name, layer, why) in refused {
        let out = import_layout(&agent, name, layer);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the {name} layer was imported");
        assert!(
            err.contains("unsafe tar entry") && err.contains(why),
            "{name}: {err}"
        );
        assert_eq!(
            host_state(&host),
            before,
            "the {name} layer changed the host tree"
        );
    }
    // An absolute hard link target means the layer's own path: missing there, so refused too.
    let out = import_layout(
        &agent,
        "hardlink-absolute",
        RawTar::new()
            .hard_link("h", &format!("{hostdir_s}/secret"))
            .bytes(),
    );
    assert!(
        !out.status.success(),
        "the hardlink-absolute layer was imported"
    );
    assert_eq!(
        host_state(&host),
        before,
        "the hardlink-absolute layer changed the host tree"
    );

    let refs = image_refs(&agent);
    assert!(
        refs.len() == 1 && refs[0].ends_with("local/contained:1"),
        "images left: {refs:?}"
    );
    assert_eq!(
        layer_dirs(&agent).len(),
        1,
        "a refused layer left a directory behind"
    );
}
