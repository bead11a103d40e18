//! Deploy from source: services without `image` are built by the agent from the directory
//! `miren deploy` sends. The seeds' Bun example exactly as published, a Node app with a
//! dependency in package.json + lockfile, a Python app with requirements.txt (vendored wheels),
//! unchanged source reusing its image, a changed file giving a new digest, hostile trees
//! refused or stored safely, an unknown stack, and kill -9 mid-build.
//!
//! The base images come from the loopback registry of `scripts/images` (`oven/bun:1`,
//! `library/node:18`, `library/python:3.11`, `library/busybox:1.35`, `library/postgres:17`);
//! the tests run when MIREN_IMAGE_MIRROR is set (scripts/test sets it).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::addons::{agent_with_mirror, assert_nothing_left, text, write_app};
use miren_vm_tests::TestAgent;
use serde_json::Value;

/// GET from the host through the published port, retried while the app starts.
fn http_get(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let out = Command::new("curl")
            .args(["-fsS", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "GET :{port}: {}", text(&out));
        sleep(Duration::from_millis(200));
    }
}

fn deploy(agent: &TestAgent, dir: &Path, port: u16) -> (String, String) {
    let out = agent.cli(&[
        "deploy",
        "-C",
        dir.to_str().unwrap(),
        "--publish",
        &format!("web={port}:3000"),
    ]);
    assert!(
        out.status.success(),
        "deploy {}: {}\nagent log:\n{}",
        dir.display(),
        text(&out),
        agent.log_text()
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn web(agent: &TestAgent, app: &str) -> Value {
    let status = agent.json(&["app", "status", app, "--json"]);
    status["services"][0].clone()
}

fn copy_dir(from: &Path, to: &Path) {
    let out = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

fn temp_dir(agent: &TestAgent, name: &str) -> PathBuf {
    let dir = agent.root.join(name);
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn built_images(agent: &TestAgent) -> Vec<String> {
    let images = agent.json(&["image", "list", "--json"]);
    images
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["reference"].as_str())
        .filter(|r| r.starts_with("miren.build/"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_seeds_example_builds_from_source_and_unchanged_source_reuses_its_image() {
    let Some(agent) = agent_with_mirror(&[]) else {
        return;
    };
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bun-visits");
    // The files are the seeds' text: no image line.
    let toml = fs::read_to_string(example.join(".miren/app.toml")).unwrap();
    assert!(!toml.contains("image"), "{toml}");
    let port = miren_vm_tests::free_port();
    let (_, progress) = deploy(&agent, &example, port);
    assert!(
        progress.contains("built web from source: stack bun"),
        "{progress}"
    );
    assert_eq!(http_get(port), "Visits: 1\n");
    assert_eq!(http_get(port), "Visits: 2\n");
    let first = web(&agent, "my-bun-app");
    assert_eq!(first["built_from_source"], "bun", "{first}");
    let digest = first["image_digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{first}");
    let status = agent.ok(&["app", "status", "my-bun-app"]);
    assert!(
        status.contains("source (bun)") && status.contains(&digest),
        "{status}"
    );

    // Unchanged source: the same image, no step done again.
    let (_, progress) = deploy(&agent, &example, port);
    assert!(progress.contains("unchanged: image reused"), "{progress}");
    assert!(!progress.contains(" done "), "{progress}");
    assert_eq!(web(&agent, "my-bun-app")["image_digest"], digest.as_str());
    assert_eq!(http_get(port), "Visits: 3\n");

    // One changed file: a new digest.
    let changed = temp_dir(&agent, "changed");
    copy_dir(&example, &changed);
    let mut index = fs::read_to_string(changed.join("index.ts")).unwrap();
    index.push_str("// changed\n");
    fs::write(changed.join("index.ts"), index).unwrap();
    deploy(&agent, &changed, port);
    let after = web(&agent, "my-bun-app");
    assert_ne!(after["image_digest"], digest.as_str(), "{after}");
    assert_eq!(http_get(port), "Visits: 4\n");

    agent.ok(&["app", "delete", "my-bun-app"]);
    agent.ok(&[
        "addon",
        "destroy",
        "miren-postgresql",
        "-a",
        "my-bun-app",
        "--yes",
    ]);
    miren_vm_tests::addons::shared_server_gone(&agent, "addon-pg");
    assert_nothing_left(&agent);
}

/// A pure-Python wheel made by hand (a zip with its dist-info), so pip installs offline.
fn write_wheel(dir: &Path) {
    let script = r#"
import sys, zipfile, hashlib, base64
out = sys.argv[1]
files = {
  "greetpy/__init__.py": "def hello():\n    return 'hello from a wheel'\n",
  "greetpy-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: greetpy\nVersion: 1.0\n",
  "greetpy-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
}
record = []
with zipfile.ZipFile(out, "w") as z:
    for name, text in files.items():
        data = text.encode()
        z.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("greetpy-1.0.dist-info/RECORD,,")
    z.writestr("greetpy-1.0.dist-info/RECORD", "\n".join(record) + "\n")
"#;
    fs::create_dir_all(dir.join("wheels")).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir.join("wheels/greetpy-1.0-py3-none-any.whl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

const PYTHON_APP: &str = r#"import os
from http.server import BaseHTTPRequestHandler, HTTPServer
import greetpy

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = (greetpy.hello() + "\n").encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

HTTPServer(("0.0.0.0", int(os.environ.get("PORT", "3000"))), H).serve_forever()
"#;

const NODE_APP: &str = r#"const http = require("http");
const greet = require("greet");
http.createServer((req, res) => res.end(greet() + "\n")).listen(process.env.PORT || 3000);
"#;

const NODE_PACKAGE: &str = r#"{
  "name": "nodeapp",
  "version": "1.0.0",
  "scripts": { "start": "node server.js" },
  "dependencies": { "greet": "file:vendor/greet-1.0.0.tgz" }
}
"#;

/// A package tarball as `npm pack` makes it, and the lockfile `npm install` writes for it.
fn write_node_app(dir: &Path) {
    let pkg = dir.join("pkg/package");
    fs::create_dir_all(&pkg).unwrap();
    fs::write(
        pkg.join("package.json"),
        r#"{"name":"greet","version":"1.0.0","main":"index.js"}"#,
    )
    .unwrap();
    fs::write(
        pkg.join("index.js"),
        "module.exports = () => 'hello from a package';\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join("vendor")).unwrap();
    let tgz = dir.join("vendor/greet-1.0.0.tgz");
    let out = Command::new("tar")
        .args(["-czf"])
        .arg(&tgz)
        .arg("-C")
        .arg(dir.join("pkg"))
        .arg("package")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    fs::remove_dir_all(dir.join("pkg")).unwrap();
    let integrity = {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "printf sha512-; openssl dgst -sha512 -binary {} | base64 -w0",
                tgz.display()
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    fs::write(dir.join("package.json"), NODE_PACKAGE).unwrap();
    let lock = serde_json::json!({
        "name": "nodeapp",
        "version": "1.0.0",
        "lockfileVersion": 3,
        "requires": true,
        "packages": {
            "": {
                "name": "nodeapp",
                "version": "1.0.0",
                "dependencies": { "greet": "file:vendor/greet-1.0.0.tgz" }
            },
            "node_modules/greet": {
                "version": "1.0.0",
                "resolved": "file:vendor/greet-1.0.0.tgz",
                "integrity": integrity
            }
        }
    });
    fs::write(
        dir.join("package-lock.json"),
        serde_json::to_string_pretty(&lock).unwrap(),
    )
    .unwrap();
    fs::write(dir.join("server.js"), NODE_APP).unwrap();
}

#[test]
fn node_and_python_dependencies_are_installed_and_kill_9_mid_build_leaves_no_half_image() {
    let Some(mut agent) = agent_with_mirror(&[]) else {
        return;
    };
    // Node: package.json + package-lock.json -> npm ci.
    let node = temp_dir(&agent, "node");
    write_node_app(&node);
    write_app(
        &node,
        "name = \"nodeapp\"\n[services.web]\ncommand = \"npm start\"\n",
    );
    let port = miren_vm_tests::free_port();
    let (_, progress) = deploy(&agent, &node, port);
    assert!(progress.contains("stack node"), "{progress}");
    assert!(progress.contains("dependencies  done"), "{progress}");
    assert_eq!(http_get(port), "hello from a package\n");
    // A source change that keeps the lockfile reuses the dependency layer.
    fs::write(node.join("server.js"), format!("{NODE_APP}// v2\n")).unwrap();
    let (_, progress) = deploy(&agent, &node, port);
    assert!(progress.contains("dependencies  cached"), "{progress}");
    agent.ok(&["app", "delete", "nodeapp"]);

    // Python: requirements.txt, installed from vendored wheels (no index); the agent is
    // killed -9 while the dependency step runs, and the next deploy builds.
    let py = temp_dir(&agent, "python");
    write_wheel(&py);
    fs::write(py.join("requirements.txt"), "greetpy==1.0\n").unwrap();
    fs::write(py.join("app.py"), PYTHON_APP).unwrap();
    write_app(&py, "name = \"pyapp\"\n[services.web]\n");
    let dir = py.to_str().unwrap().to_string();
    let mut client = agent.spawn_cli(&["deploy", "-C", &dir]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = agent.json(&["sandbox", "list", "--json"]);
        if list
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["app"] == "addon-build")
        {
            break;
        }
        assert!(Instant::now() < deadline, "no build sandbox appeared");
        sleep(Duration::from_millis(50));
    }
    agent.kill9();
    let _ = client.wait();
    agent.spawn();
    assert!(
        !built_images(&agent).iter().any(|r| r.contains("pyapp")),
        "images after a killed build: {:?}",
        built_images(&agent)
    );
    let (_, progress) = deploy(&agent, &py, port);
    assert!(progress.contains("stack python"), "{progress}");
    assert!(progress.contains("dependencies  done"), "{progress}");
    assert_eq!(http_get(port), "hello from a wheel\n");
    agent.ok(&["app", "delete", "pyapp"]);
    assert_nothing_left(&agent);
}

/// Raw `POST /v1/builds` with a body from a file, as a hostile client would send it.
fn post_tar(agent: &TestAgent, body: &Path) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&agent.socket)
        .args(["-X", "POST", "-H", "content-type: application/x-tar"])
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg("http://agent/v1/builds?app=hostile&service=web&stack=static")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A tar header with a raw name (tools refuse to write `..`; a hostile client does not).
fn raw_header(name: &str, size: u64, kind: u8) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 1 << 33 {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        // GNU base-256: past the 8 GiB that 11 octal digits hold.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

#[test]
fn hostile_sources_are_refused_or_stored_safely() {
    let Some(agent) = agent_with_mirror(&[]) else {
        return;
    };
    // A symlink pointing outside the tree is sent as a link, never followed.
    let site = temp_dir(&agent, "site");
    fs::write(site.join("index.html"), "<h1>static</h1>\n").unwrap();
    fs::write(agent.root.join("host-secret"), "host secret\n").unwrap();
    std::os::unix::fs::symlink(agent.root.join("host-secret"), site.join("leak")).unwrap();
    write_app(&site, "name = \"site\"\n[services.web]\n");
    let port = miren_vm_tests::free_port();
    let (_, progress) = deploy(&agent, &site, port);
    assert!(progress.contains("stack static"), "{progress}");
    assert_eq!(http_get(port), "<h1>static</h1>\n");
    let layers = agent.data_dir.join("images/layers");
    let mut found = false;
    for layer in fs::read_dir(&layers).unwrap() {
        let leak = layer.unwrap().path().join("app/leak");
        if let Ok(meta) = fs::symlink_metadata(&leak) {
            assert!(
                meta.file_type().is_symlink(),
                "{} is not a link",
                leak.display()
            );
            found = true;
        }
    }
    assert!(found, "no layer holds app/leak");
    let read = agent.cli(&["sandbox", "exec", "site-web", "--", "cat", "/app/leak"]);
    assert!(
        !String::from_utf8_lossy(&read.stdout).contains("host secret"),
        "{}",
        text(&read)
    );
    agent.ok(&["app", "delete", "site"]);

    // A 10 GiB sparse file: the CLI refuses it from its size, naming the limit and the fix.
    let big = temp_dir(&agent, "big");
    fs::write(big.join("index.html"), "x").unwrap();
    fs::File::create(big.join("disk.img"))
        .unwrap()
        .set_len(10 << 30)
        .unwrap();
    write_app(&big, "name = \"big\"\n[services.web]\n");
    let err = agent.fails(&["deploy", "-C", big.to_str().unwrap()]);
    assert!(
        err.contains("size limit") && err.contains("disk.img") && err.contains(".gitignore"),
        "{err}"
    );
    // ... and the agent refuses a header that claims 10 GiB before reading its data.
    let body = agent.root.join("huge.tar");
    let mut tar = raw_header("disk.img", 10 << 30, b'0');
    tar.extend(vec![0u8; 1 << 20]);
    fs::write(&body, &tar).unwrap();
    let (code, answer) = post_tar(&agent, &body);
    assert_eq!(code, 422, "{answer}");
    assert!(answer.contains("source_too_large"), "{answer}");

    // `..` and absolute names, hard links and devices are refused.
    for (name, kind, want) in [
        ("../../etc/evil", b'0', "`..`"),
        ("/etc/evil", b'0', "absolute"),
        ("hard", b'1', "hard links"),
        ("dev", b'3', "only files"),
    ] {
        let mut tar = raw_header(name, 0, kind);
        tar.extend(vec![0u8; 1024]);
        fs::write(&body, &tar).unwrap();
        let (code, answer) = post_tar(&agent, &body);
        assert_eq!(code, 400, "{name}: {answer}");
        assert!(
            answer.contains("source_refused") && answer.contains(want),
            "{name}: {answer}"
        );
    }
    assert!(!Path::new("/etc/evil").exists());
    assert!(built_images(&agent).iter().all(|r| !r.contains("hostile")));

    // A source no stack recognises.
    let odd = temp_dir(&agent, "odd");
    fs::write(odd.join("README.md"), "nothing to run\n").unwrap();
    write_app(&odd, "name = \"odd\"\n[services.web]\n");
    let err = agent.fails(&["deploy", "-C", odd.to_str().unwrap()]);
    assert!(
        err.contains("cannot tell how to build this source")
            && err.contains("bun.lock")
            && err.contains("requirements.txt")
            && err.contains("stack = "),
        "{err}"
    );
    assert_nothing_left(&agent);
}
