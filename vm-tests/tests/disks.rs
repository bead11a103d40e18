//! Disks end to end: real agents, real loop devices, real filesystems. Run as root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::{random_hex, ChildGuard, TestAgent};
use serde_json::Value;

fn disk(agent: &TestAgent, name: &str) -> Value {
    agent.json(&["debug", "disk", "status", "-n", name, "--json"])
}

#[test]
fn every_disk_command_works_on_every_filesystem() {
    let agent = TestAgent::start();
    for (name, fs_type) in [("d-ext4", "ext4"), ("d-xfs", "xfs"), ("d-btrfs", "btrfs")] {
        let created = agent.json(&[
            "debug",
            "disk",
            "create",
            "-n",
            name,
            "--size-gb",
            "2",
            "--filesystem",
            fs_type,
            "--json",
        ]);
        for field in [
            "id",
            "name",
            "size_gb",
            "filesystem",
            "read_only",
            "status",
            "allocated_bytes",
            "image_path",
            "device",
            "mount_path",
            "lease",
        ] {
            assert!(
                created.get(field).is_some(),
                "{field} missing from {created}"
            );
        }
        assert_eq!(created["filesystem"], fs_type);
        assert_eq!(created["status"], "attached");
        assert_eq!(created["size_gb"], 2);
        assert!(created["lease"].is_null());
        let image = Path::new(created["image_path"].as_str().unwrap());
        assert_eq!(fs::metadata(image).unwrap().len(), 2 << 30, "apparent size");
        let allocated = created["allocated_bytes"].as_u64().unwrap();
        assert!(allocated < 100 << 20, "{name} allocates {allocated} bytes");
        assert_eq!(allocated, fs::metadata(image).unwrap().blocks() * 512);
        let mount = created["mount_path"].as_str().unwrap();
        let mounted = miren_disks::mount_point_of(Path::new(mount))
            .unwrap()
            .unwrap();
        assert_eq!(mounted.fstype, fs_type);
        assert_eq!(mounted.source, created["device"].as_str().unwrap());
        assert!(!mounted.read_only);
        fs::write(Path::new(mount).join("hello"), b"data").unwrap();

        // status by id and by name agree
        let id = created["id"].as_str().unwrap();
        let by_id = agent.json(&["debug", "disk", "status", "-i", id, "--json"]);
        assert_eq!(by_id["name"], name);
        assert!(agent
            .ok(&["debug", "disk", "status", "-n", name])
            .contains(fs_type));

        // grow online while mounted (ext4 may fall back to offline growth on hosts without
        // CAP_SYS_RESOURCE; it is not leased here, so that is allowed)
        let grown = agent.json(&[
            "debug",
            "disk",
            "resize",
            "-n",
            name,
            "--size-gb",
            "3",
            "--json",
        ]);
        assert_eq!(grown["size_gb"], 3);
        assert_eq!(fs::metadata(image).unwrap().len(), 3 << 30);
        let stat = nix::sys::statvfs::statvfs(mount).unwrap();
        let fs_bytes = stat.blocks() * stat.fragment_size();
        assert!(
            fs_bytes > (2 << 30) + (512 << 20),
            "{name}: filesystem not grown: {fs_bytes}"
        );
        assert_eq!(fs::read(Path::new(mount).join("hello")).unwrap(), b"data");
        let err = agent.fails(&["debug", "disk", "resize", "-n", name, "--size-gb", "1"]);
        assert!(err.contains("shrink"), "{err}");
    }

    let list = agent.disks();
    assert_eq!(list.len(), 3);
    let human = agent.ok(&["debug", "disk", "list"]);
    assert!(
        human.starts_with("ID") && human.contains("d-xfs"),
        "{human}"
    );

    agent.ok(&[
        "debug",
        "disk",
        "lease",
        "-n",
        "d-xfs",
        "--holder",
        "sandbox-1",
        "--timeout",
        "5s",
    ]);
    let leases = agent.json(&["debug", "disk", "lease-list", "--json"]);
    assert_eq!(leases.as_array().unwrap().len(), 1);
    assert_eq!(leases[0]["disk"], "d-xfs");
    assert_eq!(leases[0]["holder"], "sandbox-1");
    assert!(leases[0]["disk_id"].as_str().unwrap().starts_with("disk_"));
    assert!(leases[0]["acquired_at"].is_string());
    assert_eq!(disk(&agent, "d-xfs")["lease"]["holder"], "sandbox-1");
    assert!(agent
        .ok(&["debug", "disk", "lease-list"])
        .contains("sandbox-1"));
    agent.ok(&["debug", "disk", "lease-release", "-n", "d-xfs"]);
    // releasing again is a no-op, not an error
    assert!(agent
        .ok(&["debug", "disk", "lease-release", "-n", "d-xfs"])
        .contains("not leased"));
    agent.assert_converged();

    for name in ["d-ext4", "d-xfs", "d-btrfs"] {
        let image = disk(&agent, name)["image_path"]
            .as_str()
            .unwrap()
            .to_string();
        agent.ok(&["debug", "disk", "delete", "-n", name]);
        assert!(!Path::new(&image).exists());
        let err = agent.fails(&["debug", "disk", "status", "-n", name]);
        assert!(err.contains("no disk"), "{err}");
    }
    assert!(agent.disks().is_empty());
    agent.assert_converged();
}

#[test]
fn read_only_disks_are_mounted_read_only() {
    let agent = TestAgent::start();
    let d = agent.json(&[
        "debug",
        "disk",
        "create",
        "-n",
        "ro",
        "--size-gb",
        "1",
        "--read-only",
        "--json",
    ]);
    assert_eq!(d["read_only"], true);
    let mount = d["mount_path"].as_str().unwrap();
    assert!(
        miren_disks::mount_point_of(Path::new(mount))
            .unwrap()
            .unwrap()
            .read_only
    );
    assert!(fs::write(Path::new(mount).join("x"), b"x").is_err());
    // growing keeps it read-only
    agent.ok(&["debug", "disk", "resize", "-n", "ro", "--size-gb", "2"]);
    assert!(
        miren_disks::mount_point_of(Path::new(mount))
            .unwrap()
            .unwrap()
            .read_only
    );
    agent.assert_converged();
}

#[test]
fn bad_names_and_sizes_are_refused_before_anything_is_made() {
    let agent = TestAgent::start();
    let long = "x".repeat(64);
    for bad in ["../x", "a_b", "a.b", "a b", "", "-a", long.as_str(), "a/b"] {
        let err = agent.fails(&["debug", "disk", "create", "-n", bad, "--size-gb", "1"]);
        assert!(err.contains("error"), "{bad:?}: {err}");
        // The API refuses it too, for clients other than the CLI.
        let body = serde_json::json!({"name": bad, "size_gb": 1}).to_string();
        let (code, body) = agent.curl("POST", "/v1/disks", Some(&body));
        assert_eq!(code, 400, "{bad:?}: {body}");
        let err: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(err["code"], "invalid_argument");
        assert!(err["message"].as_str().unwrap().len() > 10);
    }
    for bad_size in ["0", "-1", "abc", "1000000000"] {
        agent.fails(&["debug", "disk", "create", "-n", "ok", "--size-gb", bad_size]);
    }
    let (code, _) = agent.curl("POST", "/v1/disks", Some(r#"{"name":"ok","size_gb":0}"#));
    assert_eq!(code, 400);
    let err = agent.fails(&[
        "debug",
        "disk",
        "create",
        "-n",
        "ok",
        "--size-gb",
        "1",
        "--filesystem",
        "zfs",
    ]);
    assert!(err.contains("ext4"), "{err}");
    assert!(agent.disks().is_empty());
    assert_eq!(fs::read_dir(agent.images_dir()).unwrap().count(), 0);
    assert!(miren_disks::loops_under(&agent.images_dir())
        .unwrap()
        .is_empty());
    agent.assert_converged();
}

#[test]
fn duplicate_names_conflict_ignoring_case() {
    let agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "Data", "--size-gb", "1"]);
    for dup in ["Data", "data", "DATA"] {
        let err = agent.fails(&["debug", "disk", "create", "-n", dup, "--size-gb", "1"]);
        assert!(err.contains("already exists"), "{err}");
    }
    let (code, body) = agent.curl("POST", "/v1/disks", Some(r#"{"name":"data","size_gb":1}"#));
    assert_eq!(code, 409, "{body}");
    assert_eq!(agent.disks().len(), 1);
    agent.assert_converged();
}

#[test]
fn leases_are_exclusive_wait_and_time_out() {
    let agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "shared", "--size-gb", "1"]);
    agent.ok(&[
        "debug", "disk", "lease", "-n", "shared", "--holder", "app-a",
    ]);
    // same holder again: idempotent
    agent.ok(&[
        "debug",
        "disk",
        "lease",
        "-n",
        "shared",
        "--holder",
        "app-a",
        "--timeout",
        "1s",
    ]);
    let err = agent.fails(&[
        "debug",
        "disk",
        "lease",
        "-n",
        "shared",
        "--holder",
        "app-b",
        "--timeout",
        "1s",
    ]);
    assert!(err.contains("app-a") && err.contains("leased"), "{err}");

    // a waiter gets the disk as soon as the holder releases it
    let waiter = agent
        .command(&[
            "debug",
            "disk",
            "lease",
            "-n",
            "shared",
            "--holder",
            "app-b",
            "--timeout",
            "60s",
            "--json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sleep(Duration::from_millis(300));
    agent.ok(&["debug", "disk", "lease-release", "-n", "shared"]);
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success());
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(lease["holder"], "app-b");
    assert_eq!(disk(&agent, "shared")["lease"]["holder"], "app-b");
}

#[test]
fn delete_is_refused_while_leased() {
    let agent = TestAgent::start();
    agent.ok(&["debug", "disk", "create", "-n", "keep", "--size-gb", "1"]);
    agent.ok(&["debug", "disk", "lease", "-n", "keep", "--holder", "db-1"]);
    let err = agent.fails(&["debug", "disk", "delete", "-n", "keep"]);
    assert!(err.contains("db-1") && err.contains("lease"), "{err}");
    assert_eq!(disk(&agent, "keep")["status"], "attached");
    agent.ok(&["debug", "disk", "lease-release", "-n", "keep"]);
    agent.ok(&["debug", "disk", "delete", "-n", "keep"]);
    agent.assert_converged();
}

#[test]
fn leases_of_dead_holders_are_reclaimed() {
    let agent = TestAgent::builder()
        .arg("--reclaim-interval")
        .arg("200ms")
        .start();
    agent.ok(&["debug", "disk", "create", "-n", "a", "--size-gb", "1"]);
    agent.ok(&["debug", "disk", "create", "-n", "b", "--size-gb", "1"]);
    let holder = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
    let pid = format!("pid:{}", holder.0.id());
    let holder2 = ChildGuard(Command::new("sleep").arg("600").spawn().unwrap());
    let pid2 = format!("pid:{}", holder2.0.id());
    agent.ok(&["debug", "disk", "lease", "-n", "a", "--holder", &pid]);
    agent.ok(&["debug", "disk", "lease", "-n", "b", "--holder", &pid2]);
    let err = agent.fails(&[
        "debug",
        "disk",
        "lease",
        "-n",
        "a",
        "--holder",
        "other",
        "--timeout",
        "1s",
    ]);
    assert!(err.contains(&pid), "{err}");
    let err = agent.fails(&[
        "debug",
        "disk",
        "lease",
        "-n",
        "a",
        "--holder",
        "pid:999999999",
    ]);
    assert!(err.contains("no process"), "{err}");

    // A waiter is not blocked forever by a holder that dies.
    drop(holder);
    agent.ok(&[
        "debug",
        "disk",
        "lease",
        "-n",
        "a",
        "--holder",
        "other",
        "--timeout",
        "30s",
    ]);
    // The periodic sweep frees the other one without anyone asking.
    drop(holder2);
    let deadline = Instant::now() + Duration::from_secs(30);
    while disk(&agent, "b")["lease"].is_object() {
        assert!(
            Instant::now() < deadline,
            "lease of a dead holder never reclaimed"
        );
        sleep(Duration::from_millis(100));
    }
    assert!(
        agent.log_text().contains("reclaimed the lease"),
        "reclaim not logged"
    );
}

#[test]
fn local_storage_is_a_per_app_directory_listed_with_disks() {
    let agent = TestAgent::start();
    let local = agent.json(&["debug", "disk", "local", "-a", "web-app", "--json"]);
    assert_eq!(local["provider"], "local");
    let dir = local["mount_path"].as_str().unwrap().to_string();
    assert!(Path::new(&dir).is_dir());
    fs::write(Path::new(&dir).join("f"), b"x").unwrap();
    // second use: same directory, data kept
    let again = agent.json(&["debug", "disk", "local", "-a", "web-app", "--json"]);
    assert_eq!(again["mount_path"], dir.as_str());
    assert!(Path::new(&dir).join("f").exists());
    let list = agent.disks();
    assert!(list
        .iter()
        .any(|d| d["provider"] == "local" && d["name"] == "web-app" && d["lease"].is_null()));
    agent.fails(&["debug", "disk", "local", "-a", "../etc"]);
}

#[test]
fn a_restart_reattaches_and_never_attaches_twice() {
    let mut agent = TestAgent::start();
    let d = agent.json(&[
        "debug",
        "disk",
        "create",
        "-n",
        "persist",
        "--size-gb",
        "1",
        "--json",
    ]);
    let mount = d["mount_path"].as_str().unwrap().to_string();
    let image = d["image_path"].as_str().unwrap().to_string();
    fs::write(Path::new(&mount).join("kept"), b"still here").unwrap();
    agent.kill9();
    // Simulate a reboot: the kernel forgets every mount and loop device.
    nix::mount::umount(mount.as_str()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !miren_disks::loops_backed_by(Path::new(&image))
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "loop device did not autoclear");
        sleep(Duration::from_millis(10));
    }
    agent.spawn();
    agent.assert_converged();
    assert_eq!(
        fs::read(Path::new(&mount).join("kept")).unwrap(),
        b"still here"
    );

    // An extra loop device on the same image (someone ran losetup) is detached, not used.
    agent.kill9();
    let out = Command::new("losetup")
        .args(["-f", "--show", &image])
        .output()
        .unwrap();
    assert!(out.status.success());
    agent.spawn();
    agent.assert_converged();
}

#[test]
fn kill_9_during_creates_and_deletes_converges_with_nothing_leaked() {
    let mut agent = TestAgent::start();
    agent.ok(&[
        "debug",
        "disk",
        "create",
        "-n",
        "survivor",
        "--size-gb",
        "1",
    ]);
    let survivor = disk(&agent, "survivor");
    fs::write(
        Path::new(survivor["mount_path"].as_str().unwrap()).join("f"),
        b"precious",
    )
    .unwrap();
    // Delays spread over the whole create/delete path (request parsing, row insert, image,
    // loop attach, mkfs, mount, commit), varied per round.
    let delays_ms = [0u64, 2, 5, 8, 12, 16, 20, 25, 30, 40, 55, 70, 90, 120];
    for (round, delay) in delays_ms.iter().enumerate() {
        let existing: Vec<String> = agent
            .disks()
            .iter()
            .filter(|d| d["name"] != "survivor")
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect();
        let mut clients = Vec::new();
        for i in 0..3 {
            let fs_type = ["ext4", "xfs", "btrfs"][(round + i) % 3];
            let name = format!("r{round}-{i}");
            clients.push(agent.spawn_cli(&[
                "debug",
                "disk",
                "create",
                "-n",
                &name,
                "--size-gb",
                "1",
                "--filesystem",
                fs_type,
            ]));
        }
        for name in existing.iter().take(2) {
            clients.push(agent.spawn_cli(&["debug", "disk", "delete", "-n", name]));
        }
        sleep(Duration::from_millis(*delay));
        agent.kill9();
        for mut c in clients {
            let _ = c.wait();
        }
        agent.spawn();
        agent.assert_converged();
        let s = disk(&agent, "survivor");
        assert_eq!(s["status"], "attached");
        let data = fs::read(Path::new(s["mount_path"].as_str().unwrap()).join("f")).unwrap();
        assert_eq!(data, b"precious", "round {round}");
        for d in agent.disks() {
            assert_eq!(d["status"], "attached", "round {round}: {d}");
        }
    }
    // Everything that survived can still be deleted cleanly.
    for d in agent.disks() {
        agent.ok(&["debug", "disk", "delete", "-i", d["id"].as_str().unwrap()]);
    }
    agent.assert_converged();
    assert!(miren_disks::loops_under(&agent.images_dir())
        .unwrap()
        .is_empty());
}

#[test]
fn two_agents_side_by_side_never_see_each_others_disks() {
    let one = TestAgent::start();
    let two = TestAgent::start();
    assert_ne!(one.prefix, two.prefix);
    one.ok(&[
        "debug",
        "disk",
        "create",
        "-n",
        "same-name",
        "--size-gb",
        "1",
    ]);
    two.ok(&[
        "debug",
        "disk",
        "create",
        "-n",
        "same-name",
        "--size-gb",
        "1",
    ]);
    two.ok(&[
        "debug",
        "disk",
        "create",
        "-n",
        "only-two",
        "--size-gb",
        "1",
    ]);
    assert_eq!(one.disks().len(), 1);
    assert_eq!(two.disks().len(), 2);
    let mount_one = disk(&one, "same-name")["mount_path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(mount_one.contains(&one.prefix));
    one.ok(&["debug", "disk", "delete", "-n", "same-name"]);
    assert_eq!(two.disks().len(), 2);
    one.assert_converged();
    two.assert_converged();
}

#[test]
fn a_missing_mkfs_tool_names_the_package_and_leaves_nothing() {
    // A PATH with nft (the network needs it) but without the sbin directories holding mkfs.*.
    let tools = std::env::temp_dir().join(format!("mrtst-tools-{}", random_hex(6)));
    fs::create_dir_all(&tools).unwrap();
    std::os::unix::fs::symlink("/usr/sbin/nft", tools.join("nft")).unwrap();
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _tools_guard = RemoveDir(tools.clone());
    let path = format!("/usr/bin:/bin:{}", tools.display());
    let agent = TestAgent::builder().env("PATH", &path).start();
    let err = agent.fails(&[
        "debug",
        "disk",
        "create",
        "-n",
        "nofs",
        "--size-gb",
        "1",
        "--filesystem",
        "xfs",
    ]);
    assert!(
        err.contains("xfsprogs") && err.contains("apt-get install"),
        "{err}"
    );
    assert!(agent.disks().is_empty());
    assert_eq!(fs::read_dir(agent.images_dir()).unwrap().count(), 0);
    assert!(miren_disks::loops_under(&agent.images_dir())
        .unwrap()
        .is_empty());
    agent.assert_converged();
}

#[test]
fn malformed_requests_get_json_errors_and_never_crash_the_agent() {
    let agent = TestAgent::start();
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("POST", "/v1/disks", Some("{"), 400),
        ("POST", "/v1/disks", Some("[]"), 400),
        (
            "POST",
            "/v1/disks",
            Some(r#"{"name": 5, "size_gb": "x"}"#),
            400,
        ),
        (
            "POST",
            "/v1/disks",
            Some(r#"{"name": "a", "size_gb": 1, "bogus": true}"#),
            400,
        ),
        (
            "POST",
            "/v1/disks",
            Some(r#"{"name": "a", "size_gb": 1e99}"#),
            400,
        ),
        ("POST", "/v1/disks", Some("\u{1}\u{2}\u{3}"), 400),
        (
            "POST",
            "/v1/disks/nope/lease",
            Some(r#"{"holder":"h","timeout_secs":-1}"#),
            400,
        ),
        ("GET", "/v1/disks/..%2F..%2Fetc", None, 404),
        ("GET", "/v1/nothing-here", None, 404),
        ("PATCH", "/v1/disks", None, 405),
        ("DELETE", "/v1/disks/disk_0000000000000000", None, 404),
    ];
    for (method, path, body, status) in cases {
        let (code, text) = agent.curl(method, path, *body);
        assert_eq!(code, *status, "{method} {path}: {text}");
        let err: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        assert!(
            err["code"].is_string() && err["message"].is_string(),
            "{text}"
        );
    }
    let huge = format!(r#"{{"name": "{}", "size_gb": 1}}"#, "a".repeat(5 << 20));
    let (code, _) = agent.curl("POST", "/v1/disks", Some(&huge));
    assert!(code == 400 || code == 413, "{code}");
    // still alive and well
    assert_eq!(agent.curl("GET", "/v1/disks", None).0, 200);
}

#[test]
fn the_served_openapi_document_is_the_committed_one() {
    let agent = TestAgent::start();
    let (code, served) = agent.curl("GET", "/openapi.json", None);
    assert_eq!(code, 200);
    let committed =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json")).unwrap();
    let served: Value = serde_json::from_str(&served).unwrap();
    let committed: Value = serde_json::from_str(&committed).unwrap();
    assert_eq!(
        served, committed,
        "docs/openapi.json differs from what the agent serves"
    );
    assert_eq!(
        served["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
}

#[test]
fn the_socket_admits_only_root_and_its_group() {
    let group = format!("mrtst{}", random_hex(4));
    let status = Command::new("groupadd").arg(&group).status().unwrap();
    assert!(status.success());
    struct GroupGuard(String);
    impl Drop for GroupGuard {
        fn drop(&mut self) {
            let _ = Command::new("groupdel").arg(&self.0).status();
        }
    }
    let _guard = GroupGuard(group.clone());
    let gid = nix::unistd::Group::from_name(&group)
        .unwrap()
        .unwrap()
        .gid
        .as_raw();

    let agent = TestAgent::builder()
        .arg("--socket-group")
        .arg(&group)
        .start();
    let meta = fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.gid(), gid);

    // Reach the socket's directory as another user.
    fs::set_permissions(&agent.root, fs::Permissions::from_mode(0o755)).unwrap();
    let as_user = |extra_groups: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", extra_groups])
            .args(["curl", "-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&agent.socket)
            .arg("http://agent/v1/disks")
            .output()
            .unwrap()
    };
    // A member of the group gets in.
    let out = as_user(&format!("--groups={gid}"));
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with("200"),
        "{out:?}"
    );
    // A non-member is stopped by the file mode; with the mode opened up by mistake, the agent
    // still refuses it by its credentials.
    fs::set_permissions(&agent.socket, fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_user("--clear-groups");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.ends_with("403") && text.contains("forbidden"),
        "{text}"
    );
    assert!(agent.log_text().contains("refused a peer"));
}

#[test]
fn systemd_readiness_and_clean_shutdown() {
    use std::os::unix::net::UnixDatagram;
    let mut agent = TestAgent::start();
    agent.stop();
    let notify_path = agent.root.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut child = Command::new(miren_vm_tests::miren_bin())
        .args(["agent", "--data-dir"])
        .arg(&agent.data_dir)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["--name-prefix", &agent.prefix, "--subnet", &agent.subnet])
        .arg("--run-dir")
        .arg(&agent.run_dir)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // READY means the socket already accepts requests.
    assert_eq!(agent.curl("GET", "/v1/disks", None).0, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!agent.socket.exists(), "socket left behind");
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused() {
    let agent = TestAgent::start();
    let out = Command::new(miren_vm_tests::miren_bin())
        .args(["agent", "--data-dir"])
        .arg(&agent.data_dir)
        .arg("--socket")
        .arg(agent.root.join("other.sock"))
        .args(["--name-prefix", &agent.prefix, "--subnet", &agent.subnet])
        .arg("--run-dir")
        .arg(&agent.run_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already using"));
}

#[test]
fn a_100_gib_disk_is_thin_uses_4k_blocks_and_direct_io() {
    let agent = TestAgent::start();
    let d = agent.json(&[
        "debug",
        "disk",
        "create",
        "-n",
        "big",
        "--size-gb",
        "100",
        "--json",
    ]);
    let allocated = d["allocated_bytes"].as_u64().unwrap();
    assert!(
        allocated < 16 << 20,
        "a 100 GiB ext4 disk allocates {allocated} bytes"
    );
    let device = d["device"].as_str().unwrap();
    let sys = Path::new("/sys/block").join(Path::new(device).file_name().unwrap());
    let read = |f: &str| fs::read_to_string(sys.join(f)).unwrap().trim().to_string();
    assert_eq!(read("queue/logical_block_size"), "4096");
    assert_eq!(read("loop/autoclear"), "1");
    // /tmp here is ext4 on a virtio disk, which supports direct I/O at 4 KiB.
    assert_eq!(read("loop/dio"), "1");
    let mount = d["mount_path"].as_str().unwrap();
    let stat = nix::sys::statvfs::statvfs(mount).unwrap();
    assert!(stat.blocks() * stat.fragment_size() > 90 << 30);
}
