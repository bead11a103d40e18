//! `miren disk backup -o s3://TARGET/KEY` and `miren disk restore -s s3://TARGET/KEY` against a
//! real S3 server (SeaweedFS on loopback) and a local-directory target: same snapshot format
//! and checksums as a file, and a failed upload leaves no object under the final key.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use miren_vm_tests::s3::SeaweedFs;
use miren_vm_tests::{ChildGuard, TestAgent};
use serde_json::Value;

/// A real S3 server and an agent with targets `offsite` (S3, under prefix `node-1`) and `nas`
/// (a directory). Each test has its own: the one that cuts the server off must not disturb
/// the others.
struct Env {
    s3: SeaweedFs,
    agent: TestAgent,
    nas: PathBuf,
}

impl Env {
    fn start() -> Env {
        let s3 = SeaweedFs::start();
        let nas = PathBuf::from(format!("/tmp/mrtst-nas-{}", miren_vm_tests::random_hex(6)));
        let agent = TestAgent::builder()
            .arg("--backup-target")
            .arg(&s3.target_arg("offsite", "node-1"))
            .arg("--backup-target")
            .arg(&format!("nas={}", nas.display()))
            .start();
        Env { s3, agent, nas }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.nas);
    }
}

fn mount_of(agent: &TestAgent, name: &str) -> PathBuf {
    let status = agent.json(&["debug", "disk", "status", "-n", name, "--json"]);
    PathBuf::from(status["mount_path"].as_str().unwrap())
}

fn write_random(path: &std::path::Path, size: &str) {
    let out = Command::new("head")
        .args(["-c", size, "/dev/urandom"])
        .output()
        .unwrap();
    fs::write(path, out.stdout).unwrap();
}

#[test]
fn s3_and_directory_targets_round_trip_and_refuse_bad_input() {
    let env = Env::start();
    s3_round_trip_with_the_same_checksum_as_a_file(&env);
    a_directory_target_is_said_to_be_on_the_node(&env);
    bad_targets_and_keys_say_what_to_do(&env);
    env.agent.assert_converged();
}

fn s3_round_trip_with_the_same_checksum_as_a_file(env: &Env) {
    let agent = &env.agent;
    agent.ok(&["debug", "disk", "create", "-n", "orders", "--size-gb", "1"]);
    let mount = mount_of(agent, "orders");
    write_random(&mount.join("random.bin"), "8M");
    fs::write(mount.join("note.txt"), b"kept across the trip").unwrap();
    let original = fs::read(mount.join("random.bin")).unwrap();

    let stored: Value = agent.json(&[
        "disk",
        "backup",
        "-n",
        "orders",
        "-o",
        "s3://offsite/orders/",
        "--json",
    ]);
    let key = stored["key"].as_str().unwrap().to_string();
    assert!(
        key.starts_with("orders/orders-") && key.ends_with(".miren.zst"),
        "{stored}"
    );
    assert_eq!(stored["target"], "offsite");
    assert_eq!(stored["off_node"], true);
    // The object is where the target's prefix says, whole: it verifies as a file.
    let object = env
        .s3
        .object(&format!("node-1/{key}"))
        .expect("the backup object in the bucket");
    assert_eq!(
        object.len() as u64,
        stored["snapshot_bytes"].as_u64().unwrap()
    );
    let file = agent.root.join("from-s3.miren.zst");
    fs::write(&file, &object).unwrap();
    let verified = agent.json(&["disk", "verify", "-s", file.to_str().unwrap(), "--json"]);
    assert_eq!(verified["image_checksum"], stored["image_checksum"]);

    // A key is never written over.
    let again = agent.fails(&[
        "disk",
        "backup",
        "-n",
        "orders",
        "-o",
        &format!("s3://offsite/{key}"),
    ]);
    assert!(again.contains("never overwritten"), "{again}");

    // Restore under a new name, straight from the target.
    let restored = agent.json(&[
        "disk",
        "restore",
        "-s",
        &format!("s3://offsite/{key}"),
        "-n",
        "orders-copy",
        "--json",
    ]);
    assert_eq!(restored["image_checksum"], stored["image_checksum"]);
    let copy = mount_of(agent, "orders-copy");
    assert_eq!(fs::read(copy.join("random.bin")).unwrap(), original);
    assert_eq!(
        fs::read(copy.join("note.txt")).unwrap(),
        b"kept across the trip"
    );
    agent.ok(&["debug", "disk", "delete", "-n", "orders-copy"]);
    agent.ok(&["debug", "disk", "delete", "-n", "orders"]);
}

fn a_directory_target_is_said_to_be_on_the_node(env: &Env) {
    let agent = &env.agent;
    agent.ok(&["debug", "disk", "create", "-n", "cache", "--size-gb", "1"]);
    fs::write(mount_of(agent, "cache").join("a"), b"A").unwrap();
    let out = agent.ok(&[
        "disk",
        "backup",
        "-n",
        "cache",
        "-o",
        "s3://nas/cache/one.miren.zst",
    ]);
    assert!(out.contains("directory on this node"), "{out}");
    let file = env.nas.join("cache/one.miren.zst");
    assert!(file.is_file(), "{out}");
    // Only the finished object: no partial files beside it.
    let names: Vec<_> = fs::read_dir(env.nas.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["one.miren.zst".to_string()]);
    // Over the existing disk, with --force, from the directory target.
    fs::write(mount_of(agent, "cache").join("a"), b"B").unwrap();
    agent.ok(&[
        "disk",
        "restore",
        "-s",
        "s3://nas/cache/one.miren.zst",
        "-n",
        "cache",
        "--force",
    ]);
    assert_eq!(fs::read(mount_of(agent, "cache").join("a")).unwrap(), b"A");
    agent.ok(&["debug", "disk", "delete", "-n", "cache"]);
}

fn bad_targets_and_keys_say_what_to_do(env: &Env) {
    let agent = &env.agent;
    agent.ok(&["debug", "disk", "create", "-n", "tiny", "--size-gb", "1"]);
    let unknown = agent.fails(&["disk", "backup", "-n", "tiny", "-o", "s3://elsewhere/x"]);
    assert!(
        unknown.contains("no backup target `elsewhere`") && unknown.contains("offsite"),
        "{unknown}"
    );
    let bad_key = agent.fails(&["disk", "backup", "-n", "tiny", "-o", "s3://offsite/a/../b"]);
    assert!(bad_key.contains("is invalid"), "{bad_key}");
    let missing = agent.fails(&[
        "disk",
        "restore",
        "-s",
        "s3://offsite/nothing-here",
        "-n",
        "x",
    ]);
    assert!(missing.contains("no backup `nothing-here`"), "{missing}");
    assert!(agent.disks().iter().all(|d| d["name"] != "x"));
    agent.ok(&["debug", "disk", "delete", "-n", "tiny"]);

    // A credentials file others can read is refused at start, naming the fix.
    let s3 = &env.s3;
    let loose = agent.root.join("loose.env");
    fs::copy(&s3.credentials_file, &loose).unwrap();
    fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = Command::new(miren_vm_tests::miren_bin())
        .args(["agent", "--data-dir"])
        .arg(agent.root.join("never"))
        .arg("--socket")
        .arg(agent.root.join("never.sock"))
        .arg("--backup-target")
        .arg(format!(
            "x=s3://{}?endpoint={}&credentials={}",
            s3.bucket,
            s3.endpoint,
            loose.display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn an_upload_cut_off_leaves_no_object_under_the_key() {
    let mut env = Env::start();
    let agent = &env.agent;
    agent.ok(&["debug", "disk", "create", "-n", "bulky", "--size-gb", "2"]);
    write_random(&mount_of(agent, "bulky").join("random.bin"), "700M");
    // Through the API, to see the first progress line before the target goes away.
    let mut curl = ChildGuard(
        Command::new("curl")
            .args(["-sN", "--unix-socket"])
            .arg(&agent.socket)
            .args([
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "--data",
            ])
            .arg(r#"{"target":"offsite","key":"cut/bulky.miren.zst"}"#)
            .arg("http://agent/v1/disks/bulky/backups")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(curl.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("progress"), "{first}");
    let s3 = &mut env.s3;
    s3.stop();
    let last = lines.map_while(Result::ok).last().unwrap_or_default();
    assert!(last.contains("\"error\""), "the backup should fail: {last}");
    s3.resume();
    assert!(
        s3.keys("node-1/cut").is_empty(),
        "a failed upload left {:?}",
        s3.keys("node-1/cut")
    );
    // The disk is usable again: a backup after the outage succeeds.
    let stored: Value = agent.json(&[
        "disk",
        "backup",
        "-n",
        "bulky",
        "-o",
        "s3://offsite/cut/bulky.miren.zst",
        "--json",
    ]);
    assert_eq!(stored["key"], "cut/bulky.miren.zst");
    agent.ok(&["debug", "disk", "delete", "-n", "bulky"]);
    agent.assert_converged();
}
