//! Hostile tests: disks (see docs/security.md). A client asking for sizes nothing can hold,
//! resizes that fail halfway, snapshot files crafted to burn CPU or carry terminal escapes,
//! and an agent killed while it holds a filesystem frozen.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime};

use miren_vm_tests::{ChildGuard, TestAgent};
use serde_json::Value;

const GIB: u64 = 1 << 30;

fn disk(agent: &TestAgent, name: &str) -> Value {
    agent.json(&["debug", "disk", "status", "-n", name, "--json"])
}

fn mount_of(agent: &TestAgent, name: &str) -> PathBuf {
    PathBuf::from(disk(agent, name)["mount_path"].as_str().expect("mounted"))
}

fn image_len(agent: &TestAgent, name: &str) -> u64 {
    fs::metadata(disk(agent, name)["image_path"].as_str().expect("image"))
        .expect("image")
        .len()
}

fn fs_size(mount: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(mount).expect("statvfs");
    st.blocks() * st.fragment_size()
}

/// Usable in every way a wedged disk was not: a lease, a backup, a (small) growth.
fn assert_usable(agent: &TestAgent, name: &str, grow_to_gb: u64) {
    agent.ok(&["debug", "disk", "lease", "-n", name, "--holder", "probe"]);
    agent.ok(&["debug", "disk", "lease-release", "-n", name]);
    let snap = agent.root.join(format!("{name}-usable.zst"));
    agent.ok(&["disk", "backup", "-n", name, "-o", snap.to_str().unwrap()]);
    agent.ok(&["disk", "verify", "-s", snap.to_str().unwrap()]);
    fs::remove_file(&snap).unwrap();
    let gb = grow_to_gb.to_string();
    agent.ok(&["debug", "disk", "resize", "-n", name, "--size-gb", &gb]);
    let d = disk(agent, name);
    assert_eq!(d["size_gb"], grow_to_gb, "{d}");
    assert_eq!(d["status"], "attached", "{d}");
    assert_eq!(image_len(agent, name), grow_to_gb * GIB);
    assert!(fs_size(&mount_of(agent, name)) > (grow_to_gb - 1) * GIB);
}

#[test]
fn sizes_nothing_can_hold_are_refused_before_anything_is_recorded() {
    let agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "victim", "--size-gb", "1"]);
    fs::write(mount_of(&agent, "victim").join("keep"), b"data").unwrap();

    // 65536 GiB passes the API's range check but exceeds the host's (ext4) largest file;
    // 20000 GiB too. Both must be a 400 naming size_gb, with the disk untouched.
    for size in ["65536", "20000"] {
        let (code, body) = agent.curl(
            "POST",
            "/v1/disks/victim/resize",
            Some(&format!("{{\"size_gb\": {size}}}")),
        );
        assert_eq!(code, 400, "resize to {size} GiB: {body}");
        assert!(body.contains("size_gb"), "{body}");
        let d = disk(&agent, "victim");
        assert_eq!(d["status"], "attached", "{d}");
        assert_eq!(d["size_gb"], 1, "{d}");
        assert!(d["error"].is_null(), "{d}");
        assert_eq!(image_len(&agent, "victim"), GIB);
    }
    // Shrinking, zero and absurd sizes: refused, nothing recorded.
    for size in ["0", "1099511627776"] {
        let (code, body) = agent.curl(
            "POST",
            "/v1/disks/victim/resize",
            Some(&format!("{{\"size_gb\": {size}}}")),
        );
        assert_eq!(code, 400, "resize to {size}: {body}");
    }
    for size in ["0", "1099511627776", "65536", "20000"] {
        let (code, body) = agent.curl(
            "POST",
            "/v1/disks",
            Some(&format!("{{\"name\": \"huge\", \"size_gb\": {size}}}")),
        );
        assert_eq!(code, 400, "create with {size} GiB: {body}");
        assert!(body.contains("size_gb"), "{body}");
    }
    assert!(agent.disks().iter().all(|d| d["name"] != "huge"));

    // The disk works in every way the wedged one did not.
    assert_usable(&agent, "victim", 2);
    let err = agent.fails(&["debug", "disk", "resize", "-n", "victim", "--size-gb", "1"]);
    assert!(err.contains("shrink"), "{err}");
    assert_eq!(disk(&agent, "victim")["size_gb"], 2);
    assert_eq!(
        fs::read(mount_of(&agent, "victim").join("keep")).unwrap(),
        b"data"
    );
    agent.assert_converged();
}

fn sqlite(agent: &TestAgent, sql: &str) {
    let out = Command::new("sqlite3")
        .arg(agent.data_dir.join("state.db"))
        .arg(sql)
        .output()
        .expect("sqlite3 (apt-get install sqlite3)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_failed_resize_rolls_back_now_and_after_a_restart() {
    let mut agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "held", "--size-gb", "1"]);
    fs::write(mount_of(&agent, "held").join("keep"), b"data").unwrap();

    // A resize that fails after it was recorded: growing a leased ext4 disk needs online
    // growth, which this host refuses (no CAP_SYS_RESOURCE). Where the host allows it, the
    // resize simply succeeds; either way the disk ends `ready` at the size it really has.
    agent.ok(&["debug", "disk", "lease", "-n", "held", "--holder", "app"]);
    let grew = agent
        .cli(&["debug", "disk", "resize", "-n", "held", "--size-gb", "3"])
        .status
        .success();
    let d = disk(&agent, "held");
    assert_eq!(d["status"], "attached", "{d}");
    let size = if grew { 3 } else { 1 };
    assert_eq!(d["size_gb"], size, "{d}");
    assert_eq!(image_len(&agent, "held"), size * GIB);
    agent.ok(&["debug", "disk", "lease-release", "-n", "held"]);

    // What the unfixed agent left behind: `resizing` to 65536 GiB. A start must not retry it
    // for ever: it rolls back to the size the filesystem really has.
    agent.kill9();
    sqlite(
        &agent,
        "UPDATE disks SET status = 'resizing', size_gb = 65536 WHERE name = 'held'",
    );
    agent.spawn();
    let d = disk(&agent, "held");
    assert_eq!(d["status"], "attached", "{d}");
    assert_eq!(d["size_gb"], size, "{d}");
    assert!(
        d["error"].as_str().unwrap_or("").contains("65536"),
        "the rollback says why: {d}"
    );
    assert_usable(&agent, "held", size + 1);
    assert_eq!(
        fs::read(mount_of(&agent, "held").join("keep")).unwrap(),
        b"data"
    );

    // A read-only disk grows and stays read-only.
    agent.ok(&[
        "debug",
        "disk",
        "create",
        "-n",
        "ro",
        "--size-gb",
        "1",
        "--read-only",
    ]);
    agent.ok(&["debug", "disk", "resize", "-n", "ro", "--size-gb", "2"]);
    let d = disk(&agent, "ro");
    assert_eq!(d["size_gb"], 2, "{d}");
    assert!(d["read_only"].as_bool().unwrap());
    let m = miren_disks::mount_point_of(&mount_of(&agent, "ro"))
        .unwrap()
        .expect("mounted");
    assert!(m.read_only, "a resize left a read-only disk writable");
    agent.assert_converged();
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

/// The finding's file: a valid header declaring a 2^62-byte ext4 image, and a trailer
/// claiming zero chunks. 204 bytes.
fn crafted_204_bytes() -> Vec<u8> {
    let mut h = b"MIRENSNP".to_vec();
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&(64u32 << 10).to_le_bytes());
    h.extend_from_slice(&(1u64 << 62).to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    h.extend_from_slice(&4096u32.to_le_bytes());
    h.extend_from_slice(&1_700_000_000u64.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    for s in ["data1", "ext4", "0.1.0"] {
        h.extend_from_slice(&(s.len() as u16).to_le_bytes());
        h.extend_from_slice(s.as_bytes());
    }
    let mut out = frame(0x184D_2A5D, &checked(h));
    let mut t = b"MIRENEND".to_vec();
    t.extend_from_slice(&[0u8; 16 + 32]);
    out.extend(frame(0x184D_2A5F, &checked(t)));
    out
}

const EVIL: &str = "x\u{1b}]0;owned\u{7}\u{1b}[2J\r\u{9b}31m";

fn no_escapes(what: &str, text: &str) {
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{9b}') && !text.contains('\r'),
        "{what} printed a raw terminal escape: {text:?}"
    );
}

#[test]
fn crafted_snapshots_are_refused_and_their_names_printed_escaped() {
    let agent = TestAgent::start();
    let crafted = agent.root.join("crafted.zst");
    let bytes = crafted_204_bytes();
    assert_eq!(bytes.len(), 204);
    fs::write(&crafted, &bytes).unwrap();
    let path = crafted.to_str().unwrap();
    let err = agent.fails(&["disk", "verify", "-s", path]);
    assert!(err.contains("64 TiB"), "{err}");
    let err = agent.fails(&["disk", "restore", "-s", path, "-n", "crafted"]);
    assert!(err.contains("64 TiB"), "{err}");
    assert!(agent.disks().is_empty(), "a crafted restore created a disk");
    assert_eq!(fs::read_dir(agent.images_dir()).unwrap().count(), 0);

    // A well-formed snapshot whose recorded name carries terminal escapes.
    let img = agent.root.join("small.img");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"payload", 1 << 20).unwrap();
    let meta = miren_snapshot::SnapshotMeta {
        name: EVIL.into(),
        size_bytes: 64 << 20,
        filesystem: miren_snapshot::Filesystem::Ext4,
        block_size: 4096,
        created_at: SystemTime::now(),
        agent_version: format!("9{EVIL}"),
    };
    let evil = agent.root.join("evil.zst");
    miren_snapshot::write_snapshot(
        &img,
        &meta,
        fs::File::create(&evil).unwrap(),
        &miren_snapshot::WriteOptions::default(),
        &mut miren_snapshot::NoProgress,
    )
    .unwrap();
    let evil = evil.to_str().unwrap();
    for args in [
        vec!["disk", "verify", "-s", evil],
        vec!["disk", "verify", "-s", evil, "--json"],
    ] {
        let out = agent.ok(&args);
        no_escapes("verify", &out);
        assert!(out.contains("u{1b}"), "the name is shown, escaped: {out}");
    }
    // Restored under its recorded name: refused, with the name escaped in the error.
    let err = agent.fails(&["disk", "restore", "-s", evil]);
    no_escapes("restore", &err);
    assert!(err.contains("u{1b}"), "{err}");
    no_escapes("the agent log", &agent.log_text());
    assert!(agent.disks().is_empty());

    // A backup file (written as a partial, then renamed) is 0600 whatever the umask.
    agent.ok(&["debug", "disk", "create", "-n", "private", "--size-gb", "1"]);
    let out_file = agent.root.join("out").join("private.zst");
    fs::create_dir_all(out_file.parent().unwrap()).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$0\" disk backup -n private -o \"$1\"")
        .arg(miren_vm_tests::miren_bin())
        .arg(&out_file)
        .env("MIREN_SOCKET", &agent.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = fs::metadata(&out_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "backup file mode {mode:o}");
    assert_eq!(fs::read_dir(out_file.parent().unwrap()).unwrap().count(), 1);
}

/// Thaws `mount` on drop, so a failing test never leaves a filesystem frozen behind it.
struct ThawOnDrop(PathBuf);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Waits for `child` to exit, up to `limit` (a liveness bound, not a measurement).
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        sleep(Duration::from_millis(20));
    }
    None
}

fn freeze_helpers_of(mount: &Path) -> Vec<u32> {
    let needle = mount.as_os_str().as_encoded_bytes().to_vec();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmd.windows(11).any(|w| w == b"freeze-hold")
                && cmd.windows(needle.len()).any(|w| w == needle.as_slice())
        })
        .collect()
}

#[test]
fn backups_are_private_and_a_killed_agent_never_leaves_a_filesystem_frozen() {
    let mut agent = TestAgent::builder()
        .env("MIREN_TEST_FREEZE_HOLD_MS", "25000")
        .start();
    agent.ok(&["debug", "disk", "create", "-n", "live", "--size-gb", "1"]);
    let mount = mount_of(&agent, "live");
    let _thaw = ThawOnDrop(mount.clone());
    fs::write(mount.join("data"), vec![7u8; 4 << 20]).unwrap();

    // The freeze helper on its own: it thaws on its bound, and when its parent goes away.
    let exe = miren_vm_tests::miren_bin();
    for (max, release) in [("1", false), ("30", true)] {
        let mut helper = ChildGuard(
            Command::new(&exe)
                .args(["freeze-hold", "--mount"])
                .arg(&mount)
                .args(["--max-seconds", max])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stdin = helper.0.stdin.take();
        let mut out = BufReader::new(helper.0.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "frozen");
        if release {
            drop(stdin); // the parent "dies": EOF
        }
        line.clear();
        out.read_line(&mut line).unwrap();
        let expected = if release {
            "thawed parent-gone"
        } else {
            "thawed timeout"
        };
        assert_eq!(line.trim(), expected);
        fs::write(mount.join("after-helper"), b"x").unwrap();
        assert!(wait_exit(&mut helper.0, Duration::from_secs(10)).is_some());
    }
    // A helper refuses a bound above the documented 600 s.
    let out = Command::new(&exe)
        .args(["freeze-hold", "--mount"])
        .arg(&mount)
        .args(["--max-seconds", "601"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());

    // A live backup; the knob keeps its freeze held after the copy.
    let out_file = agent.root.join("out").join("live.zst");
    fs::create_dir_all(out_file.parent().unwrap()).unwrap();
    let client = ChildGuard(agent.spawn_cli(&[
        "disk",
        "backup",
        "-n",
        "live",
        "-o",
        out_file.to_str().unwrap(),
    ]));
    agent.wait_for_log("holding the backup freeze");
    // The agent's point-in-time copy is private from its first byte: a 0600 file in its tmp
    // dir, or (when it fits in memory) an anonymous memfd of the agent's, which has no path.
    let captures: Vec<_> = fs::read_dir(agent.data_dir.join("tmp"))
        .map(|dir| dir.flatten().collect())
        .unwrap_or_default();
    let memfds = fs::read_dir(format!("/proc/{}/fd", agent.pid().unwrap()))
        .unwrap()
        .flatten()
        .filter(|fd| {
            fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy().starts_with("/memfd:"))
        })
        .count();
    assert_eq!(
        captures.len() + usize::from(memfds > 0),
        1,
        "one capture: {captures:?}, memfds {memfds}"
    );
    for capture in &captures {
        assert_eq!(capture.metadata().unwrap().mode() & 0o777, 0o600);
    }

    // A writer blocks on the frozen filesystem (uninterruptible, as in the finding).
    let mut writer = ChildGuard(
        Command::new("sh")
            .arg("-c")
            .arg("echo x > \"$1/during\"")
            .arg("sh")
            .arg(&mount)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            writer.0.try_wait().unwrap().is_none(),
            "the write went through: the filesystem was not frozen"
        );
        if proc_state(writer.0.id()) == Some('D') {
            break;
        }
        assert!(Instant::now() < deadline, "the writer never blocked");
        sleep(Duration::from_millis(20));
    }

    // kill -9 the agent; no restart. The helper sees EOF and thaws: the write completes.
    agent.kill9();
    let status = wait_exit(&mut writer.0, Duration::from_secs(45));
    assert!(
        status.is_some_and(|s| s.success()),
        "the filesystem stayed frozen after the agent died"
    );
    assert_eq!(fs::read(mount.join("during")).unwrap(), b"x\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !freeze_helpers_of(&mount).is_empty() {
        assert!(Instant::now() < deadline, "the freeze helper lingers");
        sleep(Duration::from_millis(20));
    }
    drop(client);
    assert!(!out_file.exists(), "a killed backup left a file");

    agent.spawn();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(mount.join("data"))
        .unwrap();
    f.write_all(b"writable").unwrap();
    agent.assert_converged();
}
