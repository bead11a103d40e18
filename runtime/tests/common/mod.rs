//! Test helpers: OCI layouts built in memory, and a docker-registry on a
//! free loopback port with its storage in a temp dir (prefix `mrtst`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mrtst")
        .tempdir()
        .expect("tempdir")
}

pub fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// A layer's tar, built entry by entry.
pub struct Tar(tar::Builder<Vec<u8>>);

impl Default for Tar {
    fn default() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
}

impl Tar {
    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }
    pub fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, &[][..]).expect("tar");
        self
    }
    pub fn file(mut self, path: &str, body: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, body.len() as u64);
        self.0.append_data(&mut h, path, body).expect("tar");
        self
    }
    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).expect("tar");
        self
    }
    /// Raw path bytes, bypassing the builder's own `..` check.
    pub fn raw_file(mut self, path: &str, body: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, 0o644, body.len() as u64);
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        self.0.append(&h, body).expect("tar");
        self
    }
    pub fn bytes(self) -> Vec<u8> {
        self.0.into_inner().expect("tar")
    }
}

#[derive(Clone, Copy)]
pub enum Comp {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], c: Comp) -> (Vec<u8>, &'static str) {
    match c {
        Comp::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("gzip");
            (
                e.finish().expect("gzip"),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Comp::Zstd => (
            zstd::encode_all(tar, 1).expect("zstd"),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    }
}

/// Writes an OCI image layout with one image named `tag`; returns the
/// manifest digest.
pub fn write_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, Comp)], cmd: &[&str]) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |b: &[u8]| {
        let d = sha(b);
        std::fs::write(blobs.join(&d[7..]), b).expect("write blob");
        d
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, c) in layers {
        diff_ids.push(sha(tar));
        let (blob, mt) = compress(tar, *c);
        descs.push(serde_json::json!({"mediaType": mt, "digest": put(&blob), "size": blob.len()}));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin", "MRTST=1"], "WorkingDir": "/srv", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config.as_bytes()), "size": config.len()},
        "layers": descs,
    })
    .to_string();
    let md = put(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
                       "size": manifest.len(),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    md
}

/// Writes a layout whose `tag` is a multi-arch index over one single-layer
/// image per architecture; returns (index digest, manifest digests by arch).
pub fn write_index_layout(dir: &Path, tag: &str, archs: &[&str]) -> (String, Vec<String>) {
    let mut entries = Vec::new();
    let mut mds = Vec::new();
    for arch in archs {
        // Reuse write_layout for the blobs, then lift its manifest into the index.
        let layer = Tar::default().file("arch", arch.as_bytes()).bytes();
        let md = write_layout(dir, tag, &[(layer, Comp::Gzip)], &["sh"]);
        let size = std::fs::metadata(dir.join("blobs/sha256").join(&md[7..]))
            .expect("manifest")
            .len();
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md, "size": size,
            "platform": {"architecture": arch, "os": "linux"},
        }));
        mds.push(md);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    })
    .to_string();
    let id = sha(index.as_bytes());
    std::fs::write(dir.join("blobs/sha256").join(&id[7..]), &index).expect("index blob");
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": id,
                       "size": index.len(),
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    std::fs::write(dir.join("index.json"), top.to_string()).expect("index.json");
    (id, mds)
}

/// docker-registry on 127.0.0.1:<free port>, storage in a temp dir; killed on drop.
pub struct Registry {
    pub addr: String,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// User and password of [`Registry::start_with_auth`].
pub const USER: &str = "mrtst";
pub const PASSWORD: &str = "mrtst-secret";
// bcrypt of PASSWORD (docker-registry's htpasswd wants bcrypt).
const PASSWORD_BCRYPT: &str = "$2b$05$yCYHbhTKist3xxMpN1BvZ.9K8IWqh/IWxmnSpzz1Xc6a3B03R0lKm";

impl Registry {
    pub fn start() -> Registry {
        let dir = tempdir();
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("config");
        let child = Self::spawn(dir.path());
        let r = Registry { addr, dir, child };
        r.wait_up();
        r
    }

    fn spawn(dir: &Path) -> Child {
        Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).expect("log"))
            .spawn()
            .expect("docker-registry (apt-get install docker-registry) must be installed")
    }

    fn wait_up(&self) {
        let t = Instant::now();
        while !self.up() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Restarts on the same port and storage, now wanting basic auth as
    /// USER / PASSWORD. (Push first: skopeo's pushes to an htpasswd
    /// registry failed here when run from the tests.)
    pub fn restart_with_auth(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pw = self.dir.path().join("htpasswd");
        std::fs::write(&pw, format!("{USER}:{PASSWORD_BCRYPT}\n")).expect("htpasswd");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("config.yml"))
            .expect("config");
        write!(
            f,
            "auth:\n  htpasswd:\n    realm: mrtst\n    path: {}\n",
            pw.display()
        )
        .expect("config");
        // The port may take a moment to be free again.
        let t = Instant::now();
        while TcpStream::connect(&self.addr).is_ok() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "old registry still up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Self::spawn(self.dir.path());
        self.wait_up();
    }

    fn up(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(&self.addr) else {
            return false;
        };
        let req = format!("GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        let mut out = String::new();
        s.write_all(req.as_bytes()).is_ok()
            && s.read_to_string(&mut out).is_ok()
            && matches!(out.split_whitespace().nth(1), Some("200" | "401"))
    }

    /// Pushes `layout`'s image `tag` as `repo:tag` with skopeo (`--all`:
    /// an index goes with all its images).
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) {
        let st = Command::new("skopeo")
            .args([
                "copy",
                "--all",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr))
            .status()
            .expect("skopeo (apt-get install skopeo) must be installed");
        if !st.success() {
            let log =
                std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
            let cfg =
                std::fs::read_to_string(self.dir.path().join("config.yml")).unwrap_or_default();
            panic!("skopeo copy failed\n{cfg}\n{log}");
        }
    }

    /// The registry's stored file for a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn tree_count(p: &Path) -> usize {
    std::fs::read_dir(p).map(|d| d.count()).unwrap_or(0)
}
