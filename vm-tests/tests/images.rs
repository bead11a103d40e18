//! Images through the agent: pull from a real registry on loopback through a mirror, import,
//! list, rm, gc.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::fs;

use common::{write_layout, Comp, Registry, Tar};
use miren_vm_tests::TestAgent;

fn layer(marker: &str) -> Vec<u8> {
    Tar::default()
        .dir("bin")
        .file(
            "bin/hello",
            format!("#!/bin/sh\necho {marker}\n").as_bytes(),
        )
        .file("etc/marker", marker.as_bytes())
        .bytes()
}

#[test]
fn pull_through_a_mirror_list_rm_and_gc() {
    let registry = Registry::start();
    let layout = registry.dir.path().join("layout");
    let digest = write_layout(
        &layout,
        "1.0",
        &[(layer("base"), Comp::Gzip), (layer("top"), Comp::Zstd)],
        &["/bin/hello"],
    );
    registry.push(&layout, "1.0", "library/mini");
    let mirror = format!("docker.io={}", registry.addr);
    let agent = TestAgent::builder()
        .arg("--image-mirror")
        .arg(&mirror)
        .start();

    // Docker Hub style reference, fetched from the mirror, reference kept as written
    let pulled = agent.json(&["image", "pull", "mini:1.0", "--json"]);
    assert_eq!(pulled["reference"], "docker.io/library/mini:1.0");
    assert_eq!(pulled["manifest_digest"], digest.as_str());
    assert_eq!(pulled["layers"], 2);
    assert_eq!(pulled["cmd"], serde_json::json!(["/bin/hello"]));
    // by digest too
    let by_digest = agent.json(&["image", "pull", &format!("mini@{digest}"), "--json"]);
    assert_eq!(by_digest["manifest_digest"], digest.as_str());
    let list = agent.json(&["image", "list", "--json"]);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["reference"] == "docker.io/library/mini:1.0"));
    assert!(agent
        .ok(&["image", "list"])
        .contains("docker.io/library/mini:1.0"));

    let err = agent.fails(&["image", "pull", "mini:nope"]);
    assert!(
        err.contains("manifest unknown") || err.contains("not found"),
        "{err}"
    );
    let err = agent.fails(&["image", "pull", "Not A Ref"]);
    assert!(err.contains("invalid"), "{err}");

    agent.ok(&["image", "rm", "mini:1.0"]);
    agent.ok(&["image", "rm", &format!("mini@{digest}")]);
    assert!(agent
        .ok(&["image", "rm", "mini:1.0"])
        .contains("nothing to do"));
    assert!(agent.ok(&["image", "gc"]).contains("removed"));
    let layers = agent.data_dir.join("images/layers");
    let left = fs::read_dir(&layers).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "gc left unpacked layers");
}

#[test]
fn import_a_rootfs_tarball_and_an_oci_layout() {
    let agent = TestAgent::start();
    let tarball = agent.root.join("rootfs.tar");
    fs::write(&tarball, layer("imported")).unwrap();
    let image = agent.json(&[
        "image",
        "import",
        "local/rootfs:1",
        tarball.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(image["layers"], 1);
    let layout = agent.root.join("layout");
    write_layout(
        &layout,
        "2.0",
        &[(layer("layout"), Comp::Gzip)],
        &["/bin/hello"],
    );
    let image = agent.json(&[
        "image",
        "import",
        "local/layout:2.0",
        layout.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(image["cmd"], serde_json::json!(["/bin/hello"]));
    assert_eq!(
        agent
            .json(&["image", "list", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let err = agent.fails(&["image", "import", "local/x:1", "/nonexistent/path"]);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn pull_with_credentials() {
    let mut registry = Registry::start();
    let layout = registry.dir.path().join("layout");
    write_layout(
        &layout,
        "1",
        &[(layer("private"), Comp::Gzip)],
        &["/bin/hello"],
    );
    registry.push(&layout, "1", "team/private");
    registry.restart_with_auth();
    let mirror = format!("docker.io={}", registry.addr);
    let agent = TestAgent::builder()
        .arg("--image-mirror")
        .arg(&mirror)
        .start();
    let err = agent.fails(&["image", "pull", "team/private:1"]);
    assert!(err.contains("registry"), "{err}");
    let mut pull = agent
        .command(&[
            "image",
            "pull",
            "team/private:1",
            "--username",
            common::USER,
            "--password-stdin",
            "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    pull.stdin
        .take()
        .unwrap()
        .write_all(common::PASSWORD.as_bytes())
        .unwrap();
    let out = pull.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(image["reference"], "docker.io/team/private:1");
    assert!(
        !agent.log_text().contains(common::PASSWORD),
        "the password reached the log"
    );
}
