//! Hostile tests: exec_limits (see docs/security.md).
//!
//! A process started with `sandbox exec` must be exactly as confined as the sandbox's init
//! (issue 10, finding 2), and every sandbox is bounded by default: memory, pids, CPU, its
//! writable layer and its tmpfs mounts (finding 6).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::{layer_bounds, TestAgent};
use serde_json::Value;

use miren_vm_tests::BUSYBOX_IMAGE as IMAGE;

/// Starts a sandbox running `cmd` and waits until it runs; returns its status.
fn run_until_running(agent: &TestAgent, extra: &[&str], cmd: &str) -> Value {
    let mut args = vec!["sandbox", "run", "--image", IMAGE];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", cmd]);
    let id = agent.ok(&args).trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = agent.json(&["sandbox", "status", &id, "--json"]);
        if s["state"] == "running" && s["pid"].is_u64() {
            return s;
        }
        assert!(Instant::now() < deadline, "{id} never ran: {s}");
        sleep(Duration::from_millis(50));
    }
}

/// `sandbox exec NAME -- sh -c SCRIPT`: (exit code, stdout).
fn exec(agent: &TestAgent, name: &str, script: &str) -> (i32, String) {
    let out = agent.cli(&["sandbox", "exec", name, "--", "sh", "-c", script]);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `Key:\tvalue` lines of a /proc/<pid>/status.
fn status_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The part of `text` between `==NAME==` and the next `==` marker line.
fn section<'a>(text: &'a str, name: &str) -> &'a str {
    let marker = format!("=={name}==\n");
    let start = text
        .find(&marker)
        .map(|i| i + marker.len())
        .unwrap_or_else(|| panic!("no section {name} in {text}"));
    let rest = &text[start..];
    let end = rest.find("\n==").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

#[test]
fn exec_gets_exactly_the_confinement_of_the_init() {
    let agent = TestAgent::start_with_busybox();
    let s = run_until_running(&agent, &["--name", "confined"], "sleep 1000");
    let init = s["pid"].as_u64().unwrap();
    let host_status = fs::read_to_string(format!("/proc/{init}/status")).unwrap();
    // The spare supervisor makes its layer at a low priority; the sandbox never inherits it.
    let stat = fs::read_to_string(format!("/proc/{init}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let nice: i32 = after_comm.split(' ').nth(16).unwrap().parse().unwrap();
    assert_eq!(nice, 0, "the sandbox's init runs at nice {nice}");
    let host_limits = fs::read_to_string(format!("/proc/{init}/limits")).unwrap();

    let (code, out) = exec(
        &agent,
        "confined",
        "echo ==status==; cat /proc/self/status; \
         echo ==limits==; cat /proc/self/limits; \
         echo ==cgroup==; cat /proc/self/cgroup; \
         echo ==initcgroup==; cat /proc/1/cgroup; \
         echo ==ns==; for n in /proc/self/ns/*; do echo ${n##*/} $(readlink $n); done; \
         echo ==end==",
    );
    assert_eq!(code, 0, "{out}");

    // Seccomp, no_new_privs, all five capability sets, user and groups.
    let inside = status_fields(section(&out, "status"));
    let outside = status_fields(&host_status);
    assert_eq!(outside["Seccomp"], "2", "the init itself has the filter");
    for key in [
        "Seccomp",
        "Seccomp_filters",
        "NoNewPrivs",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "Uid",
        "Gid",
        "Groups",
    ] {
        assert_eq!(
            inside.get(key),
            outside.get(key),
            "exec's {key} differs from the init's"
        );
    }
    assert_eq!(section(&out, "limits"), host_limits, "rlimits differ");

    // The same cgroup in every hierarchy (both seen through the sandbox's cgroup namespace).
    assert_eq!(section(&out, "cgroup"), section(&out, "initcgroup"));

    // Every namespace of the init (inode numbers are the same from anywhere).
    let mut compared = 0;
    for line in section(&out, "ns").lines() {
        let (name, link) = line.split_once(' ').unwrap();
        let host = fs::read_link(format!("/proc/{init}/ns/{name}")).unwrap();
        assert_eq!(link, host.to_string_lossy(), "namespace {name}");
        compared += 1;
    }
    assert!(compared >= 7, "too few namespaces compared: {out}");

    // The attack: a user namespace with all capabilities, and mounts in it.
    let (_, out) = exec(
        &agent,
        "confined",
        "unshare -Urm sh -c 'mount -t tmpfs none /mnt && echo MOUNTED' 2>&1; echo rc=$?; \
         unshare -m true 2>&1; echo rc2=$?; \
         mount -t tmpfs none /mnt 2>&1; echo rc3=$?",
    );
    assert!(
        !out.contains("MOUNTED"),
        "exec made a user namespace and mounted in it: {out}"
    );
    for rc in ["rc=0", "rc2=0", "rc3=0"] {
        assert!(!out.lines().any(|l| l == rc), "{rc}: {out}");
    }

    // Two execs side by side each get their own confinement (no shared helper state).
    let a = agent.spawn_cli(&[
        "sandbox",
        "exec",
        "confined",
        "--",
        "sh",
        "-c",
        "grep Seccomp: /proc/self/status",
    ]);
    let b = agent.spawn_cli(&[
        "sandbox",
        "exec",
        "confined",
        "--",
        "sh",
        "-c",
        "grep Seccomp: /proc/self/status",
    ]);
    for child in [a, b] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    agent.ok(&["sandbox", "delete", "confined"]);
}

/// The v1 cgroup file `name` of a sandbox (under the first of `controllers` that exists).
fn cgroup_file(agent: &TestAgent, id: &str, controllers: &[&str], name: &str) -> String {
    for c in controllers {
        let p = Path::new("/sys/fs/cgroup")
            .join(c)
            .join(&agent.prefix)
            .join(id)
            .join(name);
        if let Ok(text) = fs::read_to_string(&p) {
            return text.trim().to_string();
        }
    }
    panic!("no {name} for {id} under {controllers:?}");
}

/// The type of the filesystem `path` is on (`stat -f`).
fn fs_type(path: &Path) -> String {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A sandbox's mounted writable layer, seen through its supervisor's root: the layer is
/// mounted in the supervisor's own mount namespace only (docs/sandbox.md).
fn layer_dir(sandboxes: &Path, id: &str) -> std::path::PathBuf {
    let dir = sandboxes.join(id);
    let status: Value =
        serde_json::from_slice(&fs::read(dir.join("status.json")).unwrap()).unwrap();
    Path::new(&format!("/proc/{}/root", status["supervisor_pid"]))
        .join(dir.join("layer").strip_prefix("/").unwrap())
}

/// Bytes the host filesystem holds for `dir`, not crossing into mounts below it.
fn host_bytes_used(dir: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-sx", "--block-size=1"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// (memory limit, pids.max, CFS quota) of a sandbox, read from its cgroups on the host.
fn cgroup_limits(agent: &TestAgent, id: &str) -> (String, String, String) {
    (
        cgroup_file(agent, id, &["memory"], "memory.limit_in_bytes"),
        cgroup_file(agent, id, &["pids"], "pids.max"),
        cgroup_file(agent, id, &["cpu,cpuacct", "cpu"], "cpu.cfs_quota_us"),
    )
}

const MIB: u64 = 1 << 20;

#[test]
fn every_sandbox_is_bounded_by_default_and_overrides_replace_the_bounds() {
    let agent = TestAgent::start_with_busybox();
    let sandboxes = agent.data_dir.join("sandboxes");

    // A plain run: 512M of memory, 1024 tasks, one CPU, a 1G writable layer.
    let plain = run_until_running(&agent, &["--name", "plain"], "sleep 1000");
    let plain_id = plain["id"].as_str().unwrap();
    assert_eq!(
        cgroup_limits(&agent, plain_id),
        ((512 * MIB).to_string(), "1024".into(), "100000".into())
    );
    // Its layer: its subvolume of the store, bound in its supervisor's namespace.
    assert_eq!(fs_type(&layer_dir(&sandboxes, plain_id)), "btrfs");
    assert_eq!(layer_bounds(&agent.data_dir)[plain_id], 1024 * MIB);

    // Overrides, and the attacks: fill the root filesystem and two tmpfs mounts.
    let tuned = run_until_running(
        &agent,
        &[
            "--name",
            "tuned",
            "--memory",
            "256M",
            "--pids",
            "64",
            "--cpus",
            "0.5",
            "--writable-size",
            "32M",
            "--tmpfs",
            "/t",
            "--tmpfs",
            "/big:8M",
        ],
        "sleep 1000",
    );
    let tuned_id = tuned["id"].as_str().unwrap();
    assert_eq!(
        cgroup_limits(&agent, tuned_id),
        ((256 * MIB).to_string(), "64".into(), "50000".into())
    );
    // The layer is a subvolume of the store, whose image holds what it writes.
    let store_image = agent.data_dir.join("layers.img");
    let before = host_bytes_used(&store_image);
    let (_, out) = exec(
        &agent,
        "tuned",
        "dd if=/dev/zero of=/fill bs=1M count=100 2>&1; echo rc=$?; \
         dd if=/dev/zero of=/t/fill bs=1M count=200 2>&1; echo rc=$?; \
         dd if=/dev/zero of=/big/fill bs=1M count=20 2>&1; echo rc=$?; \
         grep -E ' /(t|big) ' /proc/mounts",
    );
    // The layer's bound is a quota (EDQUOT); the tmpfs mounts are full (ENOSPC).
    assert_eq!(out.matches("Disk quota exceeded").count(), 1, "{out}");
    assert_eq!(out.matches("No space left on device").count(), 2, "{out}");
    assert!(!out.contains("rc=0"), "{out}");
    assert!(
        out.contains(" /t tmpfs ") && out.contains("size=65536k"),
        "{out}"
    );
    assert!(
        out.contains(" /big tmpfs ") && out.contains("size=8192k"),
        "{out}"
    );
    let grown = host_bytes_used(&store_image).saturating_sub(before);
    assert_eq!(layer_bounds(&agent.data_dir)[tuned_id], 32 * MIB);
    // The bound counts data; btrfs's metadata for it comes on top.
    assert!(
        grown <= 40 * MIB,
        "the host filesystem grew by {grown} bytes for a 32M layer"
    );
    let (_, out) = exec(&agent, "tuned", "ls -l /fill");
    assert!(!out.contains(" 104857600 "), "the whole 100M landed: {out}");

    // Bad sizes are refused before anything is made.
    for (flag, value) in [
        ("--writable-size", "1K"),
        ("--writable-size", "lots"),
        ("--tmpfs", "/x:big"),
    ] {
        let err = agent.fails(&[
            "sandbox", "run", "--image", IMAGE, flag, value, "--", "true",
        ]);
        assert!(
            err.contains("writable_size") || err.contains("tmpfs"),
            "{err}"
        );
    }

    // An app's services: defaults, and app.toml's own limits.
    let dir = agent.root.join("limited-app");
    fs::create_dir_all(dir.join(".miren")).unwrap();
    fs::write(
        dir.join(".miren/app.toml"),
        format!(
            "name = \"limited\"\n\n[services.web]\nimage = \"{IMAGE}\"\ncommand = \"sleep 1000\"\n\n\
             [services.big]\nimage = \"{IMAGE}\"\ncommand = \"sleep 1000\"\n\
             memory = \"1G\"\ncpus = 2\npids = 4096\ndisk = \"64M\"\n"
        ),
    )
    .unwrap();
    agent.ok(&["deploy", "-C", dir.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let services = loop {
        let list = agent.json(&["sandbox", "list", "--json"]);
        let of_app: Vec<Value> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["app"] == "limited" && s["state"] == "running")
            .cloned()
            .collect();
        if of_app.len() == 2 {
            break of_app;
        }
        assert!(Instant::now() < deadline, "services never ran: {list}");
        sleep(Duration::from_millis(100));
    };
    for s in &services {
        let id = s["id"].as_str().unwrap();
        let layer = layer_bounds(&agent.data_dir)[id];
        if s["name"].as_str().unwrap().contains("big") {
            assert_eq!(
                cgroup_limits(&agent, id),
                ((1024 * MIB).to_string(), "4096".into(), "200000".into())
            );
            assert_eq!(layer, 64 * MIB);
        } else {
            assert_eq!(
                cgroup_limits(&agent, id),
                ((512 * MIB).to_string(), "1024".into(), "100000".into())
            );
            assert_eq!(layer, 1024 * MIB);
        }
    }
}

#[test]
fn the_bounded_writable_layer_survives_a_host_restart() {
    let mut agent = TestAgent::start_with_busybox();
    let s = run_until_running(
        &agent,
        &[
            "--name",
            "keeper",
            "--restart",
            "always",
            "--writable-size",
            "64M",
        ],
        "sleep 1000",
    );
    let first_pid = s["pid"].as_u64().unwrap();
    let (code, out) = exec(&agent, "keeper", "echo kept > /kept && sync");
    assert_eq!(code, 0, "{out}");

    // Every mount and loop device gone, the image file stays on disk.
    agent.lose_everything_a_host_restart_loses();
    agent.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = agent.json(&["sandbox", "status", "keeper", "--json"]);
        if s["state"] == "running" && s["pid"].as_u64().is_some_and(|p| p != first_pid) {
            break;
        }
        assert!(Instant::now() < deadline, "never relaunched: {s}");
        sleep(Duration::from_millis(100));
    }
    // The killed spare's ready layer (subvolume and directory) went at the agent's start.
    for entry in fs::read_dir(agent.data_dir.join("spare-layers")).unwrap() {
        let pid = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            Path::new("/proc").join(&pid).exists(),
            "a dead spare's layer is left: {pid}"
        );
    }
    for entry in fs::read_dir(agent.data_dir.join("layers")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(".spare-") {
            assert!(
                Path::new("/proc").join(pid).exists(),
                "a dead spare's subvolume is left: {name}"
            );
        }
    }
    let (code, out) = exec(
        &agent,
        "keeper",
        "cat /kept; dd if=/dev/zero of=/fill bs=1M count=100 2>&1",
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("kept\n"), "{out}");
    assert!(
        out.contains("Disk quota exceeded"),
        "the bound is gone after the restart: {out}"
    );
    agent.ok(&["sandbox", "delete", "keeper"]);
    // (The waiting spare supervisor's ready layer is under spare-layers/, not here.)
    let loops = miren_disks::loops_under(&agent.data_dir.join("sandboxes")).unwrap();
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
    let mounts = miren_disks::mounts_under(&agent.data_dir.join("sandboxes")).unwrap();
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}
