//! `miren disk backup / restore / verify` end to end, on real disks and filesystems.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::{ChildGuard, SmallFs, TestAgent};
use serde_json::Value;

fn status(agent: &TestAgent, name: &str) -> Value {
    agent.json(&["debug", "disk", "status", "-n", name, "--json"])
}

fn mount_of(agent: &TestAgent, name: &str) -> PathBuf {
    PathBuf::from(status(agent, name)["mount_path"].as_str().unwrap())
}

fn allocated(agent: &TestAgent, name: &str) -> u64 {
    status(agent, name)["allocated_bytes"].as_u64().unwrap()
}

/// Files with mixed content: text, random bytes, a sparse file, an SQLite database.
fn fill(dir: &Path, seed: u8) {
    fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    let text: String = (0..200_000)
        .map(|i| format!("line {i} seed {seed}\n"))
        .collect();
    fs::write(dir.join("sub/text.txt"), text).unwrap();
    let out = Command::new("head")
        .args(["-c", "20M", "/dev/urandom"])
        .output()
        .unwrap();
    fs::write(dir.join("sub/deeper/random.bin"), out.stdout).unwrap();
    let sparse = fs::File::create(dir.join("sparse.bin")).unwrap();
    sparse.set_len(500 << 20).unwrap();
    let status = Command::new("python3")
        .arg("-c")
        .arg(
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('create table t(a,b)'); \
             c.executemany('insert into t values(?,?)', [(i, str(i)*20) for i in range(50000)]); c.commit()",
        )
        .arg(dir.join("app.sqlite"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// Content digest of a tree (paths and bytes), via sha256sum.
fn tree_digest(dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 sha256sum")
        .arg("sh")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn backup(agent: &TestAgent, name: &str, out: &Path) -> Value {
    agent.json(&[
        "disk",
        "backup",
        "-n",
        name,
        "-o",
        out.to_str().unwrap(),
        "--json",
    ])
}

#[test]
fn round_trips_ext4_xfs_and_btrfs_with_content_and_allocation() {
    let agent = TestAgent::start();
    for fs_type in ["ext4", "xfs", "btrfs"] {
        let name = format!("rt-{fs_type}");
        agent.ok(&[
            "debug",
            "disk",
            "create",
            "-n",
            &name,
            "--size-gb",
            "4",
            "--filesystem",
            fs_type,
        ]);
        let mount = mount_of(&agent, &name);
        fill(&mount, 1);
        let before = tree_digest(&mount);
        let snap = agent.root.join(format!("{name}.miren.zst"));
        let summary = backup(&agent, &name, &snap);
        assert_eq!(summary["file"], snap.to_str().unwrap());
        assert!(summary["freeze_seconds"].as_f64().unwrap() >= 0.0);
        assert!(snap.exists());
        // plain zstd accepts it
        let zstd = Command::new("zstd")
            .arg("-q")
            .arg("-t")
            .arg(&snap)
            .status()
            .unwrap();
        assert!(zstd.success(), "zstd -t failed on {fs_type}");
        let verified = agent.json(&["disk", "verify", "-s", snap.to_str().unwrap(), "--json"]);
        assert_eq!(verified["image_checksum"], summary["image_checksum"]);
        assert_eq!(verified["filesystem"], fs_type);
        assert_eq!(verified["size_bytes"], 4u64 << 30);

        let copy = format!("{name}-copy");
        let restored = agent.json(&[
            "disk",
            "restore",
            "-s",
            snap.to_str().unwrap(),
            "-n",
            &copy,
            "--json",
        ]);
        assert_eq!(restored["image_checksum"], summary["image_checksum"]);
        assert_eq!(restored["disk"]["filesystem"], fs_type);
        assert_eq!(
            tree_digest(&mount_of(&agent, &copy)),
            before,
            "{fs_type} content differs"
        );
        let (src, dst) = (allocated(&agent, &name), allocated(&agent, &copy));
        // Restored images store no zero blocks, so they may be smaller, never more than 1% larger.
        assert!(
            dst <= src + src / 100,
            "{fs_type}: restored allocates {dst}, source {src}"
        );
        let image = PathBuf::from(status(&agent, &copy)["image_path"].as_str().unwrap());
        assert_eq!(fs::metadata(&image).unwrap().len(), 4 << 30);
        assert!(
            fs::metadata(&image).unwrap().blocks() * 512 < 1 << 30,
            "restored image is not sparse"
        );
    }
    agent.assert_converged();
}

#[test]
fn default_names_stdout_stdin_and_restore_under_the_recorded_name() {
    let agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "named", "--size-gb", "1"]);
    fill(&mount_of(&agent, "named"), 2);
    let digest = tree_digest(&mount_of(&agent, "named"));
    let workdir = agent.root.join("wd");
    fs::create_dir_all(&workdir).unwrap();
    let out = agent
        .command(&["disk", "backup", "-n", "named"])
        .current_dir(&workdir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files: Vec<String> = fs::read_dir(&workdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let re_ok = files[0].starts_with("named-")
        && files[0].ends_with(".miren.zst")
        && files[0].len() == "named-20260324-120000.miren.zst".len();
    assert!(re_ok, "{}", files[0]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&files[0]));

    // -o - writes the snapshot to stdout, -s - reads it from stdin
    let piped = agent.root.join("piped.zst");
    let out = agent
        .command(&["disk", "backup", "-n", "named", "-o", "-"])
        .stdout(fs::File::create(&piped).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    agent.ok(&["debug", "disk", "lease-release", "-n", "named"]);
    agent.ok(&["debug", "disk", "delete", "-n", "named"]);
    let out = agent
        .command(&["disk", "restore", "-s", "-"])
        .stdin(fs::File::open(&piped).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree_digest(&mount_of(&agent, "named")), digest);
}

#[test]
fn force_and_lease_refusals() {
    let agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "data", "--size-gb", "1"]);
    fs::write(mount_of(&agent, "data").join("v"), b"one").unwrap();
    let snap = agent.root.join("v1.zst");
    backup(&agent, "data", &snap);
    fs::write(mount_of(&agent, "data").join("v"), b"two").unwrap();
    let err = agent.fails(&["disk", "restore", "-s", snap.to_str().unwrap()]);
    assert!(err.contains("--force"), "{err}");
    agent.ok(&["debug", "disk", "lease", "-n", "data", "--holder", "web-7"]);
    let err = agent.fails(&["disk", "restore", "-s", snap.to_str().unwrap(), "--force"]);
    assert!(
        err.contains("web-7") && err.contains("stop the app"),
        "{err}"
    );
    assert_eq!(
        fs::read(mount_of(&agent, "data").join("v")).unwrap(),
        b"two"
    );
    agent.ok(&["debug", "disk", "lease-release", "-n", "data"]);
    let replaced = agent.json(&[
        "disk",
        "restore",
        "-s",
        snap.to_str().unwrap(),
        "--force",
        "--json",
    ]);
    assert_eq!(replaced["replaced"], true);
    assert_eq!(
        fs::read(mount_of(&agent, "data").join("v")).unwrap(),
        b"one"
    );
    agent.assert_converged();
}

#[test]
fn corruption_is_found_before_anything_changes() {
    let agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "orig", "--size-gb", "1"]);
    fill(&mount_of(&agent, "orig"), 3);
    let digest = tree_digest(&mount_of(&agent, "orig"));
    let snap = agent.root.join("good.zst");
    backup(&agent, "orig", &snap);
    let good = fs::read(&snap).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for at in [20usize, good.len() / 3, good.len() / 2, good.len() - 40] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        cases.push((format!("flipped byte at {at}"), bad));
    }
    for at in [0usize, 7, 200, good.len() / 2, good.len() - 1] {
        cases.push((format!("truncated at {at}"), good[..at].to_vec()));
    }
    cases.push((
        "foreign file".into(),
        b"PK\x03\x04 this is a zip file, not a snapshot".to_vec(),
    ));
    let plain = Command::new("sh")
        .arg("-c")
        .arg("seq 1 10000 | zstd -q -c")
        .output()
        .unwrap()
        .stdout;
    cases.push(("plain zstd".into(), plain));
    let mut trailing = good.clone();
    trailing.extend_from_slice(b"junk");
    cases.push(("bytes after the trailer".into(), trailing));

    for (what, bytes) in cases {
        let path = agent.root.join("bad.zst");
        fs::write(&path, &bytes).unwrap();
        let err = agent.fails(&["disk", "verify", "-s", path.to_str().unwrap()]);
        assert!(err.contains("error"), "{what}: {err}");
        // over the existing disk, and as a new one: both refused, nothing changed
        let err = agent.fails(&["disk", "restore", "-s", path.to_str().unwrap(), "--force"]);
        assert!(
            err.contains("nothing was changed") || err.contains("not"),
            "{what}: {err}"
        );
        agent.fails(&[
            "disk",
            "restore",
            "-s",
            path.to_str().unwrap(),
            "-n",
            "fresh",
        ]);
        assert_eq!(
            tree_digest(&mount_of(&agent, "orig")),
            digest,
            "{what}: disk changed"
        );
        assert_eq!(agent.disks().len(), 1, "{what}: a disk was created");
        agent.assert_converged();
    }
    // the first bad chunk is named
    let mut bad = good.clone();
    let at = good.len() / 2;
    bad[at] ^= 1;
    let path = agent.root.join("bad.zst");
    fs::write(&path, &bad).unwrap();
    let err = agent.fails(&["disk", "verify", "-s", path.to_str().unwrap()]);
    assert!(err.contains("chunk"), "{err}");
}

#[test]
fn a_live_backup_is_filesystem_consistent() {
    let agent = TestAgent::start();
    for fs_type in ["ext4", "xfs"] {
        let name = format!("live-{fs_type}");
        agent.ok(&[
            "debug",
            "disk",
            "create",
            "-n",
            &name,
            "--size-gb",
            "2",
            "--filesystem",
            fs_type,
        ]);
        let mount = mount_of(&agent, &name);
        // A writer that keeps creating, appending and deleting files during the backup.
        let writer = ChildGuard(
            Command::new("sh")
                .arg("-c")
                .arg("i=0; while true; do i=$((i+1)); head -c 65536 /dev/urandom > f$((i%50)); echo $i >> log; [ $((i%7)) = 0 ] && rm -f f$((i%13)); done")
                .current_dir(&mount)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        sleep(Duration::from_millis(500));
        let snap = agent.root.join(format!("{name}.zst"));
        let summary = backup(&agent, &name, &snap);
        drop(writer);
        assert!(summary["freeze_seconds"].as_f64().unwrap() < 30.0);
        // Restore as a new disk, unmount it, and check the filesystem offline.
        let copy = format!("{name}-copy");
        agent.ok(&["disk", "restore", "-s", snap.to_str().unwrap(), "-n", &copy]);
        let image = status(&agent, &copy)["image_path"]
            .as_str()
            .unwrap()
            .to_string();
        let mount_copy = mount_of(&agent, &copy);
        assert!(mount_copy.join("log").exists());
        nix::mount::umount(&mount_copy).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !miren_disks::loops_backed_by(Path::new(&image))
            .unwrap()
            .is_empty()
        {
            assert!(Instant::now() < deadline);
            sleep(Duration::from_millis(10));
        }
        let check = match fs_type {
            "ext4" => Command::new("fsck.ext4")
                .args(["-n", "-f", &image])
                .output()
                .unwrap(),
            _ => Command::new("xfs_repair")
                .args(["-n", "-f", &image])
                .output()
                .unwrap(),
        };
        assert!(
            check.status.success(),
            "{fs_type} snapshot needs repair:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

#[test]
fn disk_full_while_writing_a_backup_leaves_no_file() {
    let agent = TestAgent::start();
    let small = SmallFs::new(40);
    agent.ok(&["debug", "disk", "create", "-n", "big", "--size-gb", "1"]);
    let data = Command::new("head")
        .args(["-c", "80M", "/dev/urandom"])
        .output()
        .unwrap()
        .stdout;
    fs::write(mount_of(&agent, "big").join("random"), data).unwrap();
    let target = small.mount.join("big.miren.zst");
    let err = agent.fails(&[
        "disk",
        "backup",
        "-n",
        "big",
        "-o",
        target.to_str().unwrap(),
    ]);
    assert!(err.contains("No space") || err.contains("space"), "{err}");
    let left: Vec<_> = fs::read_dir(&small.mount)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.iter().all(|n| n == "lost+found"),
        "left behind: {left:?}"
    );
    // the disk is fine and not frozen: a write goes through
    let probe = Command::new("timeout")
        .args(["10", "sh", "-c"])
        .arg(format!(
            "echo ok > {}/probe && sync",
            mount_of(&agent, "big").display()
        ))
        .status()
        .unwrap();
    assert!(probe.success(), "disk still frozen");
}

#[test]
fn disk_full_while_restoring_leaves_the_old_disk_as_it_was() {
    // A snapshot with more data than the small data dir can hold.
    let maker = TestAgent::start();
    maker.ok(&["debug", "disk", "create", "-n", "victim", "--size-gb", "1"]);
    let data = Command::new("head")
        .args(["-c", "150M", "/dev/urandom"])
        .output()
        .unwrap()
        .stdout;
    fs::write(mount_of(&maker, "victim").join("random"), data).unwrap();
    let snap = maker.root.join("victim.zst");
    backup(&maker, "victim", &snap);

    let small = SmallFs::new(120);
    let agent = TestAgent::builder()
        .data_dir(&small.mount.join("data"))
        .start();
    agent.ok(&["debug", "disk", "create", "-n", "victim", "--size-gb", "1"]);
    fs::write(mount_of(&agent, "victim").join("mine"), b"precious").unwrap();
    let err = agent.fails(&["disk", "restore", "-s", snap.to_str().unwrap(), "--force"]);
    assert!(err.contains("space"), "{err}");
    assert_eq!(
        fs::read(mount_of(&agent, "victim").join("mine")).unwrap(),
        b"precious"
    );
    let err = agent.fails(&[
        "disk",
        "restore",
        "-s",
        snap.to_str().unwrap(),
        "-n",
        "other",
    ]);
    assert!(err.contains("space"), "{err}");
    assert_eq!(agent.disks().len(), 1);
    agent.assert_converged();
}

#[test]
fn kill_9_during_backup_thaws_and_during_restore_keeps_the_old_disk() {
    let mut agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "busy", "--size-gb", "2"]);
    let mount = mount_of(&agent, "busy");
    let data = Command::new("head")
        .args(["-c", "300M", "/dev/urandom"])
        .output()
        .unwrap()
        .stdout;
    fs::write(mount.join("random"), &data).unwrap();
    fs::write(mount.join("marker"), b"old").unwrap();
    let snap = agent.root.join("busy.zst");
    backup(&agent, "busy", &snap);
    fs::write(mount.join("marker"), b"current").unwrap();

    for delay_ms in [5u64, 30, 80, 150, 300] {
        // backup: kill somewhere in freeze, capture or compression
        let client = agent.spawn_cli(&[
            "disk",
            "backup",
            "-n",
            "busy",
            "-o",
            agent.root.join("k.zst").to_str().unwrap(),
        ]);
        sleep(Duration::from_millis(delay_ms));
        agent.kill9();
        let _ = ChildGuard(client);
        agent.spawn();
        let probe = Command::new("timeout")
            .args(["10", "sh", "-c"])
            .arg(format!("echo x > {}/probe && sync", mount.display()))
            .status()
            .unwrap();
        assert!(
            probe.success(),
            "filesystem still frozen after a restart ({delay_ms} ms)"
        );
        assert!(
            !agent.root.join("k.zst").exists(),
            "a killed backup left a file under the final name"
        );
        assert_eq!(
            fs::read_dir(agent.data_dir.join("tmp"))
                .map(|d| d.count())
                .unwrap_or(0),
            0
        );
        agent.assert_converged();

        // restore over the disk: either nothing happened, or all of it
        let client = agent.spawn_cli(&["disk", "restore", "-s", snap.to_str().unwrap(), "--force"]);
        sleep(Duration::from_millis(delay_ms * 2));
        agent.kill9();
        let _ = ChildGuard(client);
        agent.spawn();
        agent.assert_converged();
        let marker = fs::read(mount.join("marker")).unwrap();
        assert!(
            marker == b"current" || marker == b"old",
            "torn restore: {marker:?}"
        );
        if marker == b"old" {
            assert_eq!(
                fs::read(mount.join("random")).unwrap(),
                data,
                "restored data differs"
            );
            fs::write(mount.join("marker"), b"current").unwrap();
        }
        let strays: Vec<_> = fs::read_dir(agent.data_dir.join("disks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("restore"))
            .collect();
        assert!(strays.is_empty(), "{strays:?}");
    }
}

/// One operation at a time per disk: a delete or resize during a backup is refused as busy
/// (and the backup finishes), and a delete that finds the mount in use changes nothing.
#[test]
fn operations_on_one_disk_take_turns_and_a_busy_mount_loses_nothing() {
    let agent = TestAgent::builder()
        .env("MIREN_TEST_FREEZE_HOLD_MS", "3000")
        .start();
    agent.ok(&["debug", "disk", "create", "-n", "turns", "--size-gb", "1"]);
    let mount = mount_of(&agent, "turns");
    fs::write(mount.join("kept"), b"still here").unwrap();
    let idle = status(&agent, "turns")["status"].clone();

    let out_file = agent.root.join("turns.zst");
    let mut backup = ChildGuard(agent.spawn_cli(&[
        "disk",
        "backup",
        "-n",
        "turns",
        "-o",
        out_file.to_str().unwrap(),
    ]));
    agent.wait_for_log("holding the backup freeze");
    for args in [
        &["debug", "disk", "delete", "-n", "turns"][..],
        &["debug", "disk", "resize", "-n", "turns", "--size-gb", "2"][..],
    ] {
        let err = agent.fails(args);
        assert!(
            err.contains("busy") && err.contains("backup is under way"),
            "{args:?}: {err}"
        );
    }
    assert!(backup.0.wait().unwrap().success());
    assert_eq!(status(&agent, "turns")["status"], idle);

    // A process working inside the mount: the delete is refused and the disk stays as it was.
    let mut squatter = ChildGuard(
        Command::new("sleep")
            .arg("600")
            .current_dir(&mount)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let err = agent.fails(&["debug", "disk", "delete", "-n", "turns"]);
    assert!(
        err.contains("still in use") && err.contains("fuser"),
        "{err}"
    );
    assert_eq!(status(&agent, "turns")["status"], idle);
    assert_eq!(fs::read(mount.join("kept")).unwrap(), b"still here");
    squatter.0.kill().unwrap();
    squatter.0.wait().unwrap();
    agent.ok(&["debug", "disk", "delete", "-n", "turns"]);
    agent.assert_converged();
}
