//! Sandboxes through the agent: real libcontainer containers, supervisors, cgroups, overlays,
//! network endpoints and disks.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use miren_vm_tests::{busybox_rootfs_tar, TestAgent};
use serde_json::Value;

use miren_vm_tests::BUSYBOX_IMAGE as IMAGE;

fn status(agent: &TestAgent, id: &str) -> Value {
    agent.json(&["sandbox", "status", id, "--json"])
}

fn logs(agent: &TestAgent, id: &str) -> String {
    agent.ok(&["sandbox", "logs", id])
}

/// Waits until the sandbox has printed `line`.
fn wait_for_line(agent: &TestAgent, id: &str, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs(agent, id).lines().any(|l| l == line) {
        assert!(Instant::now() < deadline, "{id} never printed {line}");
        sleep(Duration::from_millis(50));
    }
}

/// Nothing of any sandbox is left: no state dirs, cgroups, overlay mounts, endpoints, leases.
fn assert_nothing_left(agent: &TestAgent) {
    let sandboxes = agent.data_dir.join("sandboxes");
    let left = fs::read_dir(&sandboxes).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "sandbox state dirs left");
    let overlays: Vec<_> = miren_disks::mounts_under(&sandboxes).unwrap();
    assert!(overlays.is_empty(), "mounts left: {overlays:?}");
    for hierarchy in ["memory", "pids", "cpu,cpuacct", "unified"] {
        let dir = Path::new("/sys/fs/cgroup")
            .join(hierarchy)
            .join(&agent.prefix);
        let children = fs::read_dir(&dir)
            .map(|d| {
                d.filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(children, 0, "cgroups left under {}", dir.display());
    }
    let endpoints = agent.json(&["debug", "net", "list", "--json"]);
    assert!(
        endpoints.as_array().unwrap().is_empty(),
        "endpoints left: {endpoints}"
    );
    let leases = agent.json(&["debug", "disk", "lease-list", "--json"]);
    assert!(
        leases.as_array().unwrap().is_empty(),
        "leases left: {leases}"
    );
}

#[test]
fn run_logs_exit_codes_and_delete_leaves_nothing() {
    let agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(
        &["--name", "talker"],
        "echo to-stdout; echo to-stderr >&2; exit 3",
    );
    assert!(id.starts_with("sbx_"), "{id}");
    // `sandbox wait` returns once the end is on record, with the exit code.
    assert_eq!(agent.ok(&["sandbox", "wait", "talker"]).trim(), "3");
    let s = status(&agent, "talker");
    assert_eq!(s["state"], "exited");
    assert_eq!(s["exit_code"], 3);
    assert_eq!(s["name"], "talker");
    assert_eq!(s["image"], IMAGE);
    assert!(s["ip"].is_string());
    for field in ["id", "app", "pid", "oom_killed", "restarts", "started_at"] {
        assert!(s.get(field).is_some(), "{field} missing: {s}");
    }
    let out = logs(&agent, "talker");
    assert!(
        out.contains("to-stdout") && out.contains("to-stderr"),
        "{out}"
    );
    let ok = agent.run_busybox(
        &["--env", "GREETING=hi there"],
        "echo \"$GREETING\" from $(hostname)",
    );
    let waited = agent.json(&["sandbox", "wait", &ok, "--json"]);
    assert_eq!(
        (&waited["state"], &waited["exit_code"]),
        (&"exited".into(), &0.into())
    );
    // A sandbox still running: the wait gives up after --timeout, saying so.
    let sleeper = agent.run_busybox(&[], "sleep 1000");
    let err = agent.fails(&["sandbox", "wait", &sleeper, "--timeout", "300ms"]);
    assert!(
        err.contains("still") && err.contains("miren sandbox stop"),
        "{err}"
    );
    agent.ok(&["sandbox", "delete", &sleeper]);
    assert!(logs(&agent, &ok).contains("hi there from"));
    let listed = agent.json(&["sandbox", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    agent.ok(&["sandbox", "delete", "talker"]);
    agent.ok(&["sandbox", "delete", &ok]);
    let err = agent.fails(&["sandbox", "status", "talker"]);
    assert!(err.contains("no sandbox"), "{err}");
    assert_nothing_left(&agent);
}

#[test]
fn stop_sends_sigterm_then_sigkill_after_the_grace() {
    let agent = TestAgent::start_with_busybox();
    // Traps SIGTERM and exits 0: stopped within the grace. The stop waits until the trap is
    // set: the shell is the container's PID 1, and a PID 1 drops a signal it has no handler
    // for, so a stop that came first would end in the kill.
    let polite = agent.run_busybox(
        &[],
        "trap 'exit 0' TERM; echo trapped; while true; do sleep 0.1; done",
    );
    wait_for_line(&agent, &polite, "trapped");
    agent.ok(&["sandbox", "stop", &polite, "--grace", "5s"]);
    assert_eq!(status(&agent, &polite)["exit_code"], 0);
    // Ignores SIGTERM: killed after the grace.
    let stubborn = agent.run_busybox(
        &[],
        "trap '' TERM; echo trapped; while true; do sleep 0.1; done",
    );
    wait_for_line(&agent, &stubborn, "trapped");
    agent.ok(&["sandbox", "stop", &stubborn, "--grace", "300ms"]);
    assert_eq!(status(&agent, &stubborn)["exit_code"], 137);
    agent.ok(&["sandbox", "delete", &polite]);
    agent.ok(&["sandbox", "delete", &stubborn]);
    assert_nothing_left(&agent);
}

#[test]
fn a_memory_limit_holds_and_the_oom_kill_is_reported() {
    let agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(
        &["--memory", "32M"],
        "dd if=/dev/zero of=/dev/null bs=100M count=1",
    );
    let s = agent.wait_sandbox_state(&id, "exited");
    assert_eq!(s["exit_code"], 137, "{s}");
    assert_eq!(s["oom_killed"], true, "{s}");
    agent.ok(&["sandbox", "delete", &id]);
    assert_nothing_left(&agent);
}

#[test]
fn on_failure_restarts_with_backoff() {
    let agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(&["--restart", "on-failure"], "echo attempt; exit 1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&agent, &id)["restarts"].as_u64().unwrap_or(0) < 3 {
        assert!(
            Instant::now() < deadline,
            "never restarted 3 times: {}",
            status(&agent, &id)
        );
        sleep(Duration::from_millis(100));
    }
    assert!(logs(&agent, &id).matches("attempt").count() >= 3);
    agent.ok(&["sandbox", "delete", &id]);
    assert_nothing_left(&agent);
}

#[test]
fn a_disk_keeps_its_data_and_is_refused_to_a_second_sandbox_while_leased() {
    let agent = TestAgent::start_with_busybox();
    agent.ok(&[
        "debug",
        "disk",
        "create",
        "-n",
        "app-data",
        "--size-gb",
        "1",
    ]);
    let writer = agent.run_busybox(
        &["--name", "writer", "--disk", "app-data:/data"],
        "echo persisted > /data/file; sleep 1000",
    );
    agent.wait_sandbox_state(&writer, "running");
    let lease = agent.json(&["debug", "disk", "status", "-n", "app-data", "--json"]);
    assert_eq!(lease["lease"]["holder"], writer.as_str());
    let err = agent.fails(&[
        "sandbox",
        "run",
        "--image",
        IMAGE,
        "--name",
        "second",
        "--disk",
        "app-data:/data",
        "--lease-timeout",
        "1s",
        "--",
        "true",
    ]);
    assert!(err.contains(&writer), "{err}");
    assert!(agent
        .fails(&["sandbox", "status", "second"])
        .contains("no sandbox"));
    agent.ok(&["sandbox", "delete", "writer"]);
    let reader = agent.run_busybox(
        &["--name", "reader", "--disk", "app-data:/data:ro"],
        "cat /data/file; touch /data/x || echo read-only",
    );
    agent.wait_sandbox_state(&reader, "exited");
    let out = logs(&agent, &reader);
    assert!(
        out.contains("persisted") && out.contains("read-only"),
        "{out}"
    );
    agent.ok(&["sandbox", "delete", &reader]);
    assert_nothing_left(&agent);
}

#[test]
fn sandboxes_of_an_app_talk_and_a_published_port_reaches_the_host() {
    let agent = TestAgent::start_with_busybox();
    let port = 21000 + (std::process::id() % 20000) as u16;
    let web = agent.run_busybox(
        &[
            "--name",
            "web",
            "--app",
            "shop",
            "--publish",
            &format!("{port}:8080"),
        ],
        "echo hello-from-web > /www/index.html; httpd -f -p 8080 -h /www",
    );
    let web_status = agent.wait_sandbox_state(&web, "running");
    let ip = web_status["ip"].as_str().unwrap().to_string();
    let client = agent.run_busybox(&["--app", "shop"],
        &format!("for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O - http://{ip}:8080/ && exit 0; sleep 0.3; done; exit 1"),
    );
    let s = agent.wait_sandbox_state(&client, "exited");
    assert_eq!(s["exit_code"], 0, "{}", logs(&agent, &client));
    assert!(logs(&agent, &client).contains("hello-from-web"));
    let outsider = agent.run_busybox(
        &["--app", "other"],
        &format!("wget -q -T 2 -O - http://{ip}:8080/"),
    );
    let s = agent.wait_sandbox_state(&outsider, "exited");
    assert_ne!(
        s["exit_code"],
        0,
        "another app reached shop: {}",
        logs(&agent, &outsider)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-m", "2"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("hello-from-web") {
            break;
        }
        assert!(Instant::now() < deadline, "published port not reachable");
        sleep(Duration::from_millis(100));
    }
    for id in [&web, &client, &outsider] {
        agent.ok(&["sandbox", "delete", id]);
    }
    assert_nothing_left(&agent);
}

#[test]
fn sandboxes_survive_a_kill_9_of_the_agent_and_are_readopted() {
    let mut agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(&["--name", "survivor"],
        "trap 'echo got-term; exit 7' TERM; i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
    );
    let before = agent.wait_sandbox_state(&id, "running");
    let pid = before["pid"].as_i64().unwrap();
    agent.kill9();
    sleep(Duration::from_millis(500));
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the sandbox died with the agent"
    );
    agent.spawn();
    let after = status(&agent, &id);
    assert_eq!(after["state"], "running");
    assert_eq!(after["pid"], pid);
    let ticks = |text: &str| text.matches("tick").count();
    let first = ticks(&logs(&agent, &id));
    sleep(Duration::from_millis(500));
    assert!(ticks(&logs(&agent, &id)) > first, "logs stopped flowing");
    agent.ok(&["sandbox", "stop", &id, "--grace", "5s"]);
    let s = status(&agent, &id);
    assert_eq!(s["exit_code"], 7, "{s}");
    assert!(logs(&agent, &id).contains("got-term"));
    agent.ok(&["sandbox", "delete", &id]);
    assert_nothing_left(&agent);
}

#[test]
fn after_a_host_restart_sandboxes_whose_policy_asks_run_again() {
    let mut agent = TestAgent::start_with_busybox();
    agent.ok(&["debug", "disk", "create", "-n", "keep", "--size-gb", "1"]);
    let keeper = agent.run_busybox(
        &[
            "--name",
            "keeper",
            "--restart",
            "always",
            "--disk",
            "keep:/data",
        ],
        "echo run >> /data/runs; cat /data/runs | wc -l; sleep 1000",
    );
    let plain = agent.run_busybox(&["--name", "plain"], "sleep 1000");
    let stopped = agent.run_busybox(&["--name", "stopped", "--restart", "always"], "sleep 1000");
    let before = agent.wait_sandbox_state(&keeper, "running");
    agent.wait_sandbox_state(&plain, "running");
    agent.ok(&["sandbox", "stop", &stopped, "--grace", "1s"]);

    agent.lose_everything_a_host_restart_loses();
    agent.spawn();

    // `always`: running again, in the same endpoint, with its disk (and what it wrote).
    let after = agent.wait_sandbox_state(&keeper, "running");
    assert_ne!(after["pid"], before["pid"]);
    assert_eq!(after["ip"], before["ip"]);
    assert_eq!(after["restarts"], 1, "{after}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs(&agent, &keeper).contains('2') {
        assert!(Instant::now() < deadline, "{}", logs(&agent, &keeper));
        sleep(Duration::from_millis(50));
    }
    // Reachable over its endpoint from a sandbox of its app.
    let ip = after["ip"].as_str().unwrap().to_string();
    let probe = agent.run_busybox(&["--app", "keeper"], &format!("ping -c 1 -W 5 {ip}"));
    assert_eq!(
        agent.ok(&["sandbox", "wait", &probe]).trim(),
        "0",
        "{}",
        logs(&agent, &probe)
    );
    // No restart policy: failed, saying why. A recorded stop stays stopped.
    let s = status(&agent, &plain);
    assert_eq!(s["state"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("supervisor is gone"),
        "{s}"
    );
    assert_eq!(status(&agent, &stopped)["state"], "exited");

    for id in [&keeper, &plain, &stopped, &probe] {
        agent.ok(&["sandbox", "delete", id]);
    }
    assert_nothing_left(&agent);
}

#[test]
fn bad_sandbox_requests_are_refused_and_leave_nothing() {
    let agent = TestAgent::start_with_busybox();
    for (args, expect) in [
        (vec!["--memory", "lots"], "memory"),
        (vec!["--disk", "nope"], "NAME:/path"),
        (vec!["--disk", "missing-disk:/data"], "no disk"),
        (vec!["--tmpfs", "relative/path"], "absolute"),
        (vec!["--name", "bad_name"], "_"),
        (vec!["--env", "NOEQUALS"], "KEY=VALUE"),
    ] {
        let mut full = vec!["sandbox", "run", "--image", IMAGE];
        full.extend(args.iter().copied());
        full.extend(["--", "true"]);
        let err = agent.fails(&full);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let err = agent.fails(&["sandbox", "run", "--image", "local/none:1", "--", "true"]);
    assert!(err.contains("error"), "{err}");
    assert!(agent
        .json(&["sandbox", "list", "--json"])
        .as_array()
        .unwrap()
        .is_empty());
    assert_nothing_left(&agent);
}

/// The real PostgreSQL 17 test image (scripts/images), pulled through a mirror as from Docker
/// Hub, its data on a miren disk, reached over a published port with psql. Runs when
/// MIREN_IMAGE_MIRROR is set (scripts/test sets it).
#[test]
fn postgres_from_the_mirror_on_a_disk_answers_psql() {
    let Some(mirror) = miren_vm_tests::image_mirror() else {
        return;
    };
    let agent = TestAgent::builder()
        .arg("--image-mirror")
        .arg(&mirror)
        .start();
    agent.ok(&["debug", "disk", "create", "-n", "pgdata", "--size-gb", "1"]);
    let port = 23000 + (std::process::id() % 20000) as u16;
    let id = agent.ok(&[
        "sandbox",
        "run",
        "--image",
        "postgres:17",
        "--name",
        "pg",
        "--env",
        "POSTGRES_PASSWORD=s3cret",
        "--env",
        "PGDATA=/var/lib/postgresql/data/pgdata",
        "--disk",
        "pgdata:/var/lib/postgresql/data",
        "--publish",
        &format!("{port}:5432"),
    ]);
    let psql = |password: &str, sql: &str| {
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-tAc",
                sql,
            ])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "2")
            .output()
            .expect("psql (apt-get install postgresql-client)")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !psql("s3cret", "select 1").status.success() {
        assert!(
            Instant::now() < deadline,
            "postgres never answered:\n{}",
            logs(&agent, "pg")
        );
        sleep(Duration::from_millis(100));
    }
    psql("s3cret", "create table t(a int); insert into t values (42)");
    assert!(
        !psql("wrong", "select 1").status.success(),
        "a wrong password got in"
    );
    // The data lives on the disk: a new sandbox on the same disk sees it.
    agent.ok(&["sandbox", "delete", id.trim()]);
    agent.ok(&[
        "sandbox",
        "run",
        "--image",
        "postgres:17",
        "--name",
        "pg2",
        "--env",
        "POSTGRES_PASSWORD=s3cret",
        "--env",
        "PGDATA=/var/lib/postgresql/data/pgdata",
        "--disk",
        "pgdata:/var/lib/postgresql/data",
        "--publish",
        &format!("{port}:5432"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = psql("s3cret", "select a from t");
        if out.status.success() {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
            break;
        }
        assert!(Instant::now() < deadline, "postgres never came back");
        sleep(Duration::from_millis(100));
    }
    agent.ok(&["sandbox", "delete", "pg2"]);
    assert_nothing_left(&agent);
}

#[test]
fn image_gc_keeps_the_layers_of_running_sandboxes() {
    let agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(
        &[],
        "while true; do cat /bin/busybox > /dev/null; sleep 0.1; done",
    );
    agent.wait_sandbox_state(&id, "running");
    agent.ok(&["image", "rm", IMAGE]);
    agent.ok(&["image", "gc"]);
    // The overlay still has its lower layer: the sandbox keeps running and can exec files.
    sleep(Duration::from_millis(300));
    assert_eq!(status(&agent, &id)["state"], "running");
    let layers = agent.data_dir.join("images/layers");
    assert_eq!(
        fs::read_dir(&layers).unwrap().count(),
        1,
        "the running sandbox's layer was collected"
    );
    agent.ok(&["sandbox", "delete", &id]);
    agent.ok(&["image", "gc"]);
    assert_eq!(
        fs::read_dir(&layers).unwrap().count(),
        0,
        "unused layer kept"
    );
    assert_nothing_left(&agent);
}

/// The harness itself: a test that fails before deleting its sandboxes must still leave no
/// supervisor, container or cgroup behind (supervisors outlive agents by design).
#[test]
fn a_dropped_test_agent_takes_its_sandboxes_with_it() {
    let agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(&[], "sleep 1000");
    let s = agent.wait_sandbox_state(&id, "running");
    let pid = s["pid"].as_i64().unwrap();
    let prefix = agent.prefix.clone();
    drop(agent);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "container survived its test"
    );
    for hierarchy in ["memory", "pids", "unified"] {
        let dir = Path::new("/sys/fs/cgroup").join(hierarchy).join(&prefix);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

fn tree_digest(dir: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg("cd \"$1\" && find . -print0 | sort -z | xargs -0 stat -c '%n %s %a %u %g %Y' && find . -type f -print0 | sort -z | xargs -0 sha256sum")
        .arg("sh")
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn isolation_defaults_hold() {
    let agent = TestAgent::start_with_busybox();
    let layers = agent.data_dir.join("images/layers");
    let before = tree_digest(&layers);
    // Root in the sandbox tries to raise its own limit, mount, unshare, and scribble over
    // every directory it can reach.
    let id = agent.run_busybox(
        &["--memory", "64M"],
        "for f in /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max; do \
           (echo 1073741824 > $f) 2>/dev/null && echo raised-$f; done; \
         mount -t tmpfs none /mnt 2>/dev/null && echo mounted; \
         unshare -n true 2>/dev/null && echo unshared; \
         for d in / /bin /etc /tmp /data /www /usr; do echo x > $d/scribble 2>/dev/null; done; \
         rm -f /bin/busybox-gone /bin/ls 2>/dev/null; echo done",
    );
    agent.wait_sandbox_state(&id, "exited");
    let out = logs(&agent, &id);
    assert!(out.contains("done"), "{out}");
    assert!(
        !out.contains("raised"),
        "the sandbox raised its own cgroup limit: {out}"
    );
    assert!(!out.contains("mounted"), "mount was allowed: {out}");
    assert!(!out.contains("unshared"), "unshare was allowed: {out}");
    assert_eq!(
        tree_digest(&layers),
        before,
        "the shared image layers changed"
    );
    // and its own writes are really there, in its overlay
    let second = agent.run_busybox(&[], "ls /bin/ls >/dev/null 2>&1 && echo ls-present");
    agent.wait_sandbox_state(&second, "exited");
    assert!(
        logs(&agent, &second).contains("ls-present"),
        "another sandbox saw the deletion"
    );
    agent.ok(&["sandbox", "delete", &id]);
    agent.ok(&["sandbox", "delete", &second]);
    assert_nothing_left(&agent);
}

#[test]
fn pids_cpus_tmpfs_and_local_storage() {
    let agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(&["--name", "limited", "--app", "site", "--pids", "16", "--cpus", "0.5", "--tmpfs", "/scratch", "--local-dir", "/local"],
        "( for i in $(seq 40); do sleep 2 & done ) 2>&1 | grep -qi fork && echo fork-refused; sleep 3; \
         grep ' /scratch ' /proc/mounts | cut -d' ' -f3; \
         echo from-sandbox > /local/shared; sleep 1000",
    );
    let s = agent.wait_sandbox_state(&id, "running");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs(&agent, &id).contains("tmpfs") {
        assert!(Instant::now() < deadline, "{}", logs(&agent, &id));
        sleep(Duration::from_millis(50));
    }
    assert!(
        logs(&agent, &id).contains("fork-refused"),
        "40 processes fit under --pids 16"
    );
    let pids_max = fs::read_to_string(format!(
        "/sys/fs/cgroup/pids/{}/{}/pids.max",
        agent.prefix,
        s["id"].as_str().unwrap()
    ))
    .unwrap_or_default();
    assert_eq!(pids_max.trim(), "16");
    let quota = fs::read_to_string(format!(
        "/sys/fs/cgroup/cpu,cpuacct/{}/{}/cpu.cfs_quota_us",
        agent.prefix,
        s["id"].as_str().unwrap()
    ))
    .or_else(|_| {
        fs::read_to_string(format!(
            "/sys/fs/cgroup/cpu/{}/{}/cpu.cfs_quota_us",
            agent.prefix,
            s["id"].as_str().unwrap()
        ))
    })
    .unwrap_or_default();
    assert_eq!(quota.trim(), "50000", "cpu quota");
    let sandbox_id = s["id"].as_str().unwrap();
    // The quota is over the kernel's default period, which is left as it is.
    for cpu in ["cpu,cpuacct", "cpu"] {
        let period = Path::new("/sys/fs/cgroup")
            .join(cpu)
            .join(&agent.prefix)
            .join(sandbox_id)
            .join("cpu.cfs_period_us");
        if let Ok(period) = fs::read_to_string(period) {
            assert_eq!(period.trim(), "100000", "cpu period");
        }
    }
    // The v1 cpuset parent hands the host's CPUs and memory nodes to each sandbox cgroup
    // as the kernel makes it, so no start writes them (docs/sandbox.md "Cost").
    let cpuset = Path::new("/sys/fs/cgroup/cpuset");
    if cpuset.join("cpuset.cpus").exists() {
        let read = |p: &Path| fs::read_to_string(p).unwrap().trim().to_string();
        let parent = cpuset.join(&agent.prefix);
        assert_eq!(read(&parent.join("cgroup.clone_children")), "1");
        for file in ["cpuset.cpus", "cpuset.mems"] {
            assert_eq!(
                read(&parent.join(sandbox_id).join(file)),
                read(&cpuset.join(file)),
                "{file}"
            );
        }
    }
    let local = agent.json(&["debug", "disk", "local", "-a", "site", "--json"]);
    let shared = Path::new(local["mount_path"].as_str().unwrap()).join("shared");
    assert_eq!(fs::read_to_string(shared).unwrap(), "from-sandbox\n");
    agent.ok(&["sandbox", "delete", &id]);
    assert_nothing_left(&agent);
}

#[test]
fn exec_runs_inside_the_sandbox_with_its_exit_code_and_output() {
    let agent = TestAgent::start_with_busybox();
    let id = agent.run_busybox(
        &["--name", "target", "--env", "WHO=sandbox"],
        "echo marker > /tmp/inside; sleep 1000",
    );
    agent.wait_sandbox_state(&id, "running");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = agent.cli(&[
            "sandbox",
            "exec",
            "target",
            "--",
            "sh",
            "-c",
            "cat /tmp/inside; hostname; echo oops >&2; exit 5",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.contains("marker") {
            assert_eq!(out.status.code(), Some(5));
            assert!(stdout.contains("target"), "{stdout}");
            assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "exec never saw the sandbox's files: {out:?}"
        );
        sleep(Duration::from_millis(100));
    }
    // `/sys` is a sysfs of the sandbox's own network namespace (made with it by the agent,
    // docs/sandbox.md "Cost"): its links only, read-only, firmware masked.
    let links = agent.ok(&["sandbox", "exec", "target", "--", "ls", "/sys/class/net"]);
    assert_eq!(links.split_whitespace().collect::<Vec<_>>(), ["eth0", "lo"]);
    let write = agent.cli(&["sandbox", "exec", "target", "--", "touch", "/sys/kernel/x"]);
    assert!(!write.status.success(), "/sys is writable");
    let firmware = agent.ok(&["sandbox", "exec", "target", "--", "ls", "/sys/firmware"]);
    assert_eq!(firmware.trim(), "");
    // IPv4 only (docs/netns.md): IPv6 off on eth0, so it sends no router solicitations, DAD
    // or MLD to the host; `lo` keeps `::1`.
    let off = agent.ok(&[
        "sandbox",
        "exec",
        "target",
        "--",
        "cat",
        "/proc/sys/net/ipv6/conf/eth0/disable_ipv6",
    ]);
    assert_eq!(off.trim(), "1");
    let v6 = agent.ok(&[
        "sandbox",
        "exec",
        "target",
        "--",
        "cat",
        "/proc/net/if_inet6",
    ]);
    let v6_links: Vec<&str> = v6
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    assert_eq!(v6_links, ["lo"], "{v6}");
    assert!(
        agent
            .log_text()
            .lines()
            .filter(|l| l.contains("sandbox started"))
            .any(|l| l.contains(" sysfs=")),
        "no start used the sysfs made with its namespace"
    );
    agent.ok(&["sandbox", "stop", "target", "--grace", "0s"]);
    let err = agent.fails(&["sandbox", "exec", "target", "--", "true"]);
    assert!(err.contains("cannot exec"), "{err}");
    agent.ok(&["sandbox", "delete", "target"]);
    assert_nothing_left(&agent);
}

#[test]
fn a_killed_supervisor_is_replaced_while_the_agent_runs_if_the_policy_asks() {
    let agent = TestAgent::builder()
        .arg("--reclaim-interval")
        .arg("1s")
        .start();
    let tar = agent.root.join("busybox.tar");
    busybox_rootfs_tar(&tar);
    agent.ok(&["image", "import", IMAGE, tar.to_str().unwrap()]);
    let keeper = agent.run_busybox(&["--restart", "always"], "echo up; sleep 1000");
    let plain = agent.run_busybox(&[], "sleep 1000");
    for id in [&keeper, &plain] {
        agent.wait_sandbox_state(id, "running");
        let dir = agent.data_dir.join("sandboxes").join(id);
        let pidfile = fs::read_to_string(dir.join("supervisor.pid")).unwrap();
        let supervisor: i32 = pidfile.split_whitespace().next().unwrap().parse().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // The next reclaim pass restarts the one whose policy asks for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&agent, &keeper);
        if s["state"] == "running" && s["restarts"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never restarted: {s}");
        sleep(Duration::from_millis(100));
    }
    assert_eq!(logs(&agent, &keeper).matches("up").count(), 2);
    assert_eq!(status(&agent, &plain)["state"], "failed");
    for id in [&keeper, &plain] {
        agent.ok(&["sandbox", "delete", id]);
    }
    assert_nothing_left(&agent);
}
