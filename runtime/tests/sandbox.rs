//! Sandbox tests against the real kernel. Run as root:
//! `cargo test -p miren-runtime --test sandbox`

#[allow(dead_code)]
mod sandbox_common {
    //! Shared fixture for the sandbox tests (included with `mod`): a busybox rootfs, specs
    //! named `mrtst<hex>`, and a Drop guard that removes every process, mount and cgroup.

    use std::collections::hash_map::DefaultHasher;
    use std::fs;
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::{Duration, Instant};

    use miren_runtime::sandbox::{
        self, LogConfig, RestartPolicy, SandboxSpec, State, Status, User,
    };

    pub fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("skipping: sandbox tests need root");
        }
        root
    }

    fn random_hex() -> String {
        let mut b = [0u8; 4];
        let f = fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
        f.expect("read /dev/urandom");
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The `supervise` stand-in built by cargo next to the test binary.
    pub fn supervisor_bin() -> PathBuf {
        let exe = std::env::current_exe().expect("current_exe");
        let p = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target dir")
            .join("examples/sandbox-supervise");
        assert!(
            p.exists(),
            "{} missing: run `cargo test` (builds examples)",
            p.display()
        );
        p
    }

    pub struct Fixture {
        pub prefix: String,
        pub tmp: tempfile::TempDir,
        pub lower: PathBuf,
        sandboxes: Vec<PathBuf>,
    }

    impl Fixture {
        pub fn new() -> Fixture {
            let prefix = format!("mrtst{}", random_hex());
            let tmp = tempfile::Builder::new()
                .prefix(&prefix)
                .tempdir_in("/tmp")
                .expect("tempdir");
            let lower = tmp.path().join("lower");
            let bin = lower.join("bin");
            fs::create_dir_all(&bin).expect("mkdir");
            fs::copy("/bin/busybox", bin.join("busybox"))
                .expect("busybox-static must be installed");
            let list = Command::new("/bin/busybox")
                .arg("--list")
                .output()
                .expect("busybox --list");
            for name in String::from_utf8_lossy(&list.stdout).lines() {
                if name != "busybox" {
                    std::os::unix::fs::symlink("busybox", bin.join(name)).expect("symlink");
                }
            }
            for d in ["etc", "tmp", "root", "proc", "sys", "dev"] {
                fs::create_dir_all(lower.join(d)).expect("mkdir");
            }
            fs::set_permissions(lower.join("tmp"), fs::Permissions::from_mode(0o1777))
                .expect("chmod");
            fs::write(lower.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
            Fixture {
                prefix,
                tmp,
                lower,
                sandboxes: vec![],
            }
        }

        pub fn spec(&self, name: &str, script: &str) -> SandboxSpec {
            SandboxSpec {
                id: format!("{}-{name}", self.prefix),
                name: name.into(),
                hostname: name.into(),
                lower_dirs: vec![self.lower.clone()],
                args: vec!["/bin/sh".into(), "-c".into(), script.into()],
                env: vec!["PATH=/bin".into(), "HOME=/root".into()],
                cwd: "/".into(),
                user: User { uid: 0, gid: 0 },
                mounts: vec![],
                resources: Default::default(),
                netns: None,
                hosts: Some("127.0.0.1 localhost\n".into()),
                resolv_conf: Some("nameserver 127.0.0.1\n".into()),
                restart: RestartPolicy::No,
                logs: LogConfig::default(),
                cgroup_prefix: self.prefix.clone(),
                stop_grace_ms: 2000,
                start_gate: false,
                private_mounts: Vec::new(),
            }
        }

        /// Writes the spec and launches the supervisor; returns the state dir.
        pub fn start(&mut self, spec: &SandboxSpec) -> PathBuf {
            let dir = self.prepare(spec);
            let mut cmd = Command::new(supervisor_bin());
            cmd.arg(&dir);
            sandbox::launch(cmd, &dir).expect("launch");
            dir
        }

        pub fn prepare(&mut self, spec: &SandboxSpec) -> PathBuf {
            let dir = self.tmp.path().join("sandboxes").join(&spec.name);
            sandbox::create(&dir, spec).expect("create");
            self.sandboxes.push(dir.clone());
            dir
        }

        /// Cgroup directories of a sandbox that still exist.
        pub fn cgroup_dirs(&self, spec: &SandboxSpec) -> Vec<PathBuf> {
            fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path().join(&self.prefix).join(&spec.id))
                .filter(|p| p.exists())
                .collect()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            for d in &self.sandboxes {
                if let Err(e) = sandbox::delete(d) {
                    eprintln!("cleanup delete {}: {e}", d.display());
                }
            }
            // Belt and braces for a failed test: kill, rmdir, unmount by prefix.
            for root in fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = root.path().join(&self.prefix);
                let Ok(children) = fs::read_dir(&p) else {
                    continue;
                };
                for c in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = fs::write(c.path().join("cgroup.kill"), "1");
                    if let Ok(procs) = fs::read_to_string(c.path().join("cgroup.procs")) {
                        for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                            // SAFETY: plain kill(2).
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                    for _ in 0..50 {
                        if fs::remove_dir(c.path()).is_ok() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                let _ = fs::remove_dir(&p);
            }
            let tmp = self.tmp.path().to_string_lossy().into_owned();
            for m in mounts_under(&tmp).into_iter().rev() {
                let _ = nix::mount::umount2(Path::new(&m), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }

    pub fn mounts_under(prefix: &str) -> Vec<String> {
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(prefix))
            .collect()
    }

    pub fn wait_for(dir: &Path, timeout: Duration, pred: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = sandbox::status(dir) {
                if pred(&s) {
                    return s;
                }
                if Instant::now() >= deadline {
                    panic!("timed out waiting; last status {s:?}");
                }
            } else if Instant::now() >= deadline {
                panic!("timed out waiting; no status");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the sandbox is finished and its supervisor has exited.
    pub fn wait_done(dir: &Path) -> Status {
        wait_for(dir, Duration::from_secs(20), |s| {
            matches!(s.state, State::Exited | State::Failed) && !s.supervisor_alive
        })
    }

    /// Alive and not a zombie: the same rule the runtime uses.
    pub fn alive(pid: i32) -> bool {
        miren_sys::proc::start_time(pid).is_some()
    }

    /// Listing of a directory tree: names, types, modes, owners, sizes, mtimes, content
    /// hashes, link targets (one line per entry, so a failure shows what changed).
    pub fn tree_listing(root: &Path) -> Vec<String> {
        fn walk(p: &Path, out: &mut Vec<String>) {
            let md = fs::symlink_metadata(p).expect("stat");
            let mut extra = String::new();
            if md.file_type().is_symlink() {
                extra = fs::read_link(p).expect("readlink").display().to_string();
            } else if md.is_file() {
                let mut h = DefaultHasher::new();
                fs::read(p).expect("read").hash(&mut h);
                extra = format!("{:x}", h.finish());
            }
            out.push(format!(
                "{} {:o} {}:{} {} {}.{} {extra}",
                p.display(),
                md.mode(),
                md.uid(),
                md.gid(),
                md.size(),
                md.mtime(),
                md.mtime_nsec()
            ));
            if md.is_dir() {
                let mut names: Vec<_> = fs::read_dir(p)
                    .expect("readdir")
                    .flatten()
                    .map(|e| e.path())
                    .collect();
                names.sort();
                for n in names {
                    walk(&n, out);
                }
            }
        }
        let mut out = vec![];
        walk(root, &mut out);
        out
    }

    pub fn read(dir: &Path, file: &str) -> String {
        fs::read_to_string(dir.join(file)).unwrap_or_default()
    }
}

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use miren_runtime::sandbox::{self, Backoff, LogConfig, Mount, Resources, RestartPolicy, State};
use sandbox_common::*;

#[test]
fn merge_env_replaces_in_place() {
    let image = ["PATH=/usr/bin".to_string(), "A=1".to_string()];
    let mine = ["A=2".to_string(), "B=3".to_string(), "PATH=/x".to_string()];
    assert_eq!(
        sandbox::merge_env([&image[..], &mine[..]]),
        vec!["PATH=/x", "A=2", "B=3"]
    );
}

#[test]
fn exit_codes() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    for (name, script, want) in [("t", "true", 0), ("f", "false", 1), ("e3", "exit 3", 3)] {
        let spec = f.spec(name, script);
        let dir = f.start(&spec);
        let st = wait_done(&dir);
        assert_eq!(st.state, State::Exited, "{name}: {st:?}");
        assert_eq!(st.exit_code, Some(want), "{name}");
        assert!(!st.oom_killed);
        assert!(st.started_at.is_some() && st.finished_at.is_some());
        // Nothing left behind by the supervisor's own teardown.
        assert!(f.cgroup_dirs(&spec).is_empty(), "{name}: cgroups left");
        assert!(
            mounts_under(&dir.to_string_lossy()).is_empty(),
            "{name}: mount left"
        );
    }
}

#[test]
fn logs_and_rotation() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("logs", "echo to-out; echo to-err >&2; i=0; while [ $i -lt 300 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done");
    spec.logs = LogConfig {
        max_bytes: 4096,
        max_files: 2,
    };
    let dir = f.start(&spec);
    assert_eq!(wait_done(&dir).exit_code, Some(0));
    assert!(read(&dir, "stderr.log").contains("to-err"));
    let cur = read(&dir, "stdout.log");
    let one = read(&dir, "stdout.log.1");
    let two = read(&dir, "stdout.log.2");
    assert!(cur.contains("line-299-"), "last line in current file");
    assert!(!one.is_empty() && !two.is_empty(), "two rotated files");
    assert!(!dir.join("stdout.log.3").exists(), "only max_files kept");
    for s in [&cur, &one, &two] {
        assert!(s.len() <= 4096, "size capped: {}", s.len());
    }
    // Rotation keeps order: .2 older than .1 older than current.
    let first = |s: &str| {
        s.lines()
            .next()
            .and_then(|l| l.split('-').nth(1))
            .and_then(|n| n.parse::<i32>().ok())
    };
    assert!(first(&two) < first(&one) && first(&one) < first(&cur));
}

#[test]
fn sigkill_reports_137() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let spec = f.spec("k", "sleep 1000");
    let dir = f.start(&spec);
    let st = wait_for(&dir, Duration::from_secs(5), |s| s.state == State::Running);
    let pid = st.pid.expect("pid");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
        .expect("kill");
    let st = wait_done(&dir);
    assert_eq!(st.exit_code, Some(137));
    assert!(!st.oom_killed);
}

#[test]
fn memory_limit_oom_kills() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("oom", "");
    // awk doubles a string until the cgroup limit stops it.
    spec.args = vec![
        "/bin/awk".into(),
        "BEGIN { s = \"x\"; while (1) s = s s }".into(),
    ];
    spec.resources = Resources {
        memory_bytes: Some(32 << 20),
        cpus: Some(0.5),
        pids: Some(64),
        ..Default::default()
    };
    let dir = f.start(&spec);
    let st = wait_done(&dir);
    assert_eq!(
        st.exit_code,
        Some(137),
        "{st:?} {}",
        read(&dir, "stderr.log")
    );
    assert!(st.oom_killed, "{st:?}");
}

#[test]
fn isolation_defaults() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let script = r#"
        grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status
        ls /sys/fs/cgroup 2>/dev/null | grep -q . && echo CGROUP-VISIBLE
        echo 1073741824 > /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null && echo WROTE-CGROUP
        touch /sys/kernel/x 2>/dev/null && echo WROTE-SYS
        echo 1 > /proc/sys/kernel/panic 2>/dev/null && echo WROTE-PROCSYS
        mount -t tmpfs t /mnt 2>/dev/null && echo MOUNT-OK
        mount -t cgroup -o memory cgroup /mnt 2>/dev/null && echo CGMOUNT-OK
        unshare -m true 2>/dev/null && echo UNSHARE-OK
        unshare -U true 2>/dev/null && echo USERNS-OK
        unshare -U -r true 2>/dev/null && echo USERNS-OK
        cat /proc/kcore >/dev/null 2>&1 && head -c1 /proc/kcore | grep -q . && echo KCORE
        hostname
        cat /etc/hosts
        echo done
    "#;
    let mut spec = f.spec("iso", script);
    spec.resources.memory_bytes = Some(64 << 20);
    let dir = f.start(&spec);
    let st = wait_done(&dir);
    let out = read(&dir, "stdout.log");
    assert_eq!(st.exit_code, Some(0), "{out}");
    assert!(out.contains("done"), "{out}");
    for bad in [
        "CGROUP-VISIBLE",
        "WROTE-",
        "MOUNT-OK",
        "CGMOUNT-OK",
        "UNSHARE-OK",
        "USERNS-OK",
        "KCORE",
    ] {
        assert!(!out.contains(bad), "{bad} in:\n{out}");
    }
    assert!(
        out.contains("CapEff:\t00000000a80425fb"),
        "docker default caps:\n{out}"
    );
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(
        out.contains("127.0.0.1 localhost") && out.contains("iso"),
        "{out}"
    );
}

#[test]
fn seccomp_denies_as_root_with_caps() {
    if !is_root() {
        return;
    }
    // Even a process holding CAP_SYS_ADMIN would be stopped by seccomp; here we check
    // the errno: EPERM from the filter, not a missing binary.
    let mut f = Fixture::new();
    let spec = f.spec(
        "sc",
        "unshare -m true; echo rc=$?; mount -t proc p /mnt; echo rc=$?",
    );
    let dir = f.start(&spec);
    wait_done(&dir);
    let out = read(&dir, "stdout.log");
    let err = read(&dir, "stderr.log");
    assert!(out.contains("rc=1\nrc=") && !out.contains("rc=0"), "{out}");
    assert!(err.contains("Operation not permitted"), "{err}");
}

#[test]
fn lower_layer_untouched() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let before = tree_listing(&f.lower);
    let script = r#"
        for d in / /bin /etc /tmp /root; do echo x > $d/new-file; mkdir $d/new-dir; done
        echo changed > /etc/passwd; chmod 700 /bin; chown 1:1 /etc
        rm /bin/ls /bin/cat; ln -sf /nowhere /bin/sh2; touch -d 2000-01-01 /bin/busybox
        mv /tmp /tmp2; echo y >> /bin/busybox
        echo ok
    "#;
    let spec = f.spec("lw", script);
    let dir = f.start(&spec);
    let st = wait_done(&dir);
    assert_eq!(
        read(&dir, "stdout.log").trim(),
        "ok",
        "{}",
        read(&dir, "stderr.log")
    );
    assert_eq!(st.exit_code, Some(0));
    let after = tree_listing(&f.lower);
    let changed: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    let gone: Vec<_> = before.iter().filter(|l| !after.contains(l)).collect();
    assert!(
        changed.is_empty() && gone.is_empty(),
        "lower changed: {changed:?} gone: {gone:?}"
    );
    // The writes went to this sandbox's upper dir.
    assert!(dir.join("upper/etc/new-file").exists());
}

#[test]
fn restart_on_failure_with_backoff() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("rs", "echo run; exit 1");
    spec.restart = RestartPolicy::OnFailure {
        max_retries: Some(3),
        backoff: Backoff {
            initial_ms: 100,
            max_ms: 250,
            reset_after_ms: 10_000,
        },
    };
    let t0 = Instant::now();
    let dir = f.start(&spec);
    let st = wait_done(&dir);
    let took = t0.elapsed();
    assert_eq!(st.restarts, 3, "{st:?}");
    assert_eq!(st.exit_code, Some(1));
    assert_eq!(read(&dir, "stdout.log").matches("run").count(), 4);
    // 100 + 200 + 250 (capped) ms of backoff.
    assert!(took >= Duration::from_millis(550), "{took:?}");

    // A zero exit is not restarted under on-failure.
    let mut ok = f.spec("rs0", "exit 0");
    ok.restart = spec.restart.clone();
    let dir = f.start(&ok);
    assert_eq!(wait_done(&dir).restarts, 0);
}

#[test]
fn restart_always_until_stopped() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("ra", "exit 0");
    spec.restart = RestartPolicy::Always {
        backoff: Backoff {
            initial_ms: 20,
            max_ms: 40,
            reset_after_ms: 10_000,
        },
    };
    let dir = f.start(&spec);
    wait_for(&dir, Duration::from_secs(10), |s| s.restarts >= 3);
    let st = sandbox::stop(&dir, Duration::from_secs(1)).expect("stop");
    assert_eq!(st.state, State::Exited);
    assert!(!st.supervisor_alive);
    let n = st.restarts;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        sandbox::status(&dir).expect("status").restarts,
        n,
        "no restart after stop"
    );
}

#[test]
fn stop_with_grace_then_kill() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    // PID 1 without a handler ignores SIGTERM: only the SIGKILL after the grace works.
    let deaf = f.spec("deaf", "");
    let mut deaf = deaf;
    deaf.args = vec!["/bin/sleep".into(), "1000".into()];
    let dir = f.start(&deaf);
    let t0 = Instant::now();
    let st = sandbox::stop(&dir, Duration::from_millis(500)).expect("stop");
    assert!(t0.elapsed() >= Duration::from_millis(500));
    assert_eq!(st.exit_code, Some(137));
    assert!(f.cgroup_dirs(&deaf).is_empty());
    assert!(mounts_under(&dir.to_string_lossy()).is_empty());

    // A container that handles SIGTERM exits with its own code (7, not the 137
    // of the SIGKILL after the grace). Stop only once the trap is installed:
    // before that the shell, as PID 1, would ignore the SIGTERM.
    let polite = f.spec(
        "polite",
        "trap 'echo bye; exit 7' TERM; echo ready; while true; do sleep 0.05; done",
    );
    let dir = f.start(&polite);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !read(&dir, "stdout.log").contains("ready") {
        assert!(Instant::now() < deadline, "the trap was never installed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = sandbox::stop(&dir, Duration::from_secs(10)).expect("stop");
    assert_eq!(
        st.exit_code,
        Some(7),
        "exited by its handler, not by SIGKILL"
    );
    assert!(read(&dir, "stdout.log").contains("bye"));
    // Stop again: idempotent.
    sandbox::stop(&dir, Duration::from_secs(1)).expect("second stop");
}

#[test]
fn survives_death_of_launching_parent() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let spec = f.spec("orphan", "while true; do echo tick; sleep 0.05; done");
    let dir = f.prepare(&spec);
    // A stand-in agent: launches the supervisor, then lingers; its stdout is a pipe we
    // close when we kill it.
    let mut agent = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "{} {} && echo launched; exec sleep 1000",
            supervisor_bin().display(),
            dir.display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn agent");
    let st = wait_for(&dir, Duration::from_secs(10), |s| s.state == State::Running);
    let agent_pgid =
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(agent.id() as i32))).expect("pgid");
    let sup = nix::unistd::Pid::from_raw(st.supervisor_pid);
    assert_ne!(nix::unistd::getpgid(Some(sup)).expect("pgid"), agent_pgid);
    assert_eq!(
        nix::unistd::getsid(Some(sup)).expect("sid"),
        sup,
        "own session"
    );
    agent.kill().expect("kill -9 agent");
    let _ = agent.wait();
    drop(agent);
    std::thread::sleep(Duration::from_millis(300));
    let st2 = sandbox::status(&dir).expect("status");
    assert!(
        st2.supervisor_alive && st2.state == State::Running,
        "{st2:?}"
    );
    assert!(alive(st.pid.expect("pid")));
    let n = read(&dir, "stdout.log").matches("tick").count();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        read(&dir, "stdout.log").matches("tick").count() > n,
        "still logging"
    );
    sandbox::stop(&dir, Duration::from_millis(100)).expect("stop");
}

#[test]
fn delete_after_supervisor_sigkill_leaves_nothing() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let spec = f.spec("del", "sleep 1000 & sleep 1000");
    let dir = f.start(&spec);
    let st = wait_for(&dir, Duration::from_secs(5), |s| s.state == State::Running);
    let init = st.pid.expect("pid");
    assert!(!f.cgroup_dirs(&spec).is_empty());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(st.supervisor_pid),
        nix::sys::signal::SIGKILL,
    )
    .expect("kill supervisor");
    std::thread::sleep(Duration::from_millis(100));
    let st = sandbox::status(&dir).expect("status");
    assert!(!st.supervisor_alive);
    assert!(
        alive(init),
        "container outlives its supervisor until deleted"
    );
    sandbox::delete(&dir).expect("delete");
    sandbox::delete(&dir).expect("delete is idempotent");
    assert!(!dir.exists());
    assert!(!alive(init));
    assert!(
        f.cgroup_dirs(&spec).is_empty(),
        "{:?}",
        f.cgroup_dirs(&spec)
    );
    assert!(mounts_under(&dir.to_string_lossy()).is_empty());
}

#[test]
fn binds_and_tmpfs() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let data = f.tmp.path().join("data");
    fs::create_dir_all(&data).expect("mkdir");
    fs::write(data.join("in"), "hello").expect("write");
    let mut spec = f.spec("mnt", "cat /data/in; echo out > /data/out; echo t > /scratch/t && grep -q ' /scratch tmpfs' /proc/mounts && echo TMPFS; echo z > /ro/z 2>/dev/null || echo RO");
    spec.mounts = vec![
        Mount::Bind {
            source: data.clone(),
            destination: "/data".into(),
            read_only: false,
        },
        Mount::Bind {
            source: data.clone(),
            destination: "/ro".into(),
            read_only: true,
        },
        Mount::Tmpfs {
            destination: "/scratch".into(),
            size_bytes: Some(1 << 20),
        },
    ];
    let dir = f.start(&spec);
    wait_done(&dir);
    let out = read(&dir, "stdout.log");
    assert!(
        out.contains("hello") && out.contains("TMPFS") && out.contains("RO"),
        "{out}{}",
        read(&dir, "stderr.log")
    );
    assert_eq!(fs::read_to_string(data.join("out")).expect("out"), "out\n");
}

#[test]
fn bad_args_fail_to_start() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("bad", "");
    spec.args = vec!["/no/such/binary".into()];
    let dir = f.prepare(&spec);
    let mut cmd = Command::new(supervisor_bin());
    cmd.arg(&dir);
    let r = sandbox::launch(cmd, &dir);
    let st = wait_done(&dir);
    // libcontainer reports a missing executable either at create or as exit 127.
    assert!(r.is_err() || st.exit_code == Some(127), "{r:?} {st:?}");
    assert!(f.cgroup_dirs(&spec).is_empty());
    assert!(mounts_under(&dir.to_string_lossy()).is_empty());
}

#[test]
fn exec_in_running_sandbox() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("ex", "echo 1 > /tmp/marker; sleep 1000");
    spec.env.push("FROM_SPEC=yes".into());
    spec.resources.memory_bytes = Some(64 << 20);
    let dir = f.start(&spec);
    let st = wait_for(&dir, Duration::from_secs(5), |s| s.state == State::Running);
    let exe = sandbox_common::supervisor_bin().with_file_name("sandbox-exec");
    let out = Command::new(&exe)
        .arg(&dir)
        .args(["/bin/sh", "-c", "cat /tmp/marker; echo $FROM_SPEC $EXEC_MARK; hostname; cat /proc/self/cgroup | grep memory; echo oops >&2; exit 5"])
        .output()
        .expect("run sandbox-exec");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1\nyes 1\nex\n"), "{stdout}");
    // Inside the cgroup namespace the container's own cgroup is "/": anything else
    // (e.g. "/..") would mean the command runs outside the sandbox's cgroup.
    assert!(stdout.contains(":memory:/\n"), "same cgroup: {stdout}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    // The sandbox itself is unaffected.
    assert!(sandbox_common::alive(st.pid.expect("pid")));
    sandbox::stop(&dir, Duration::from_millis(100)).expect("stop");
    let out = Command::new(&exe)
        .arg(&dir)
        .arg("true")
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(125),
        "exec into a stopped sandbox fails"
    );
}

/// Polls `cond` for up to 20 s.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_spare_supervisor_creates_at_the_first_gate_step_and_starts_at_the_second() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("gated", "echo started; sleep 1000");
    spec.start_gate = true;
    let mut cmd = Command::new(supervisor_bin());
    cmd.arg("--spare").arg(f.tmp.path().join("sandboxes"));
    let spare = sandbox::spawn_spare(cmd).expect("spawn a spare");
    let dir = f.prepare(&spec);
    let Ok(mut launch) = spare.assign(&dir) else {
        panic!("a live spare refused its sandbox");
    };
    wait_for(&dir, Duration::from_secs(20), |s| {
        s.state == State::Creating
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        f.cgroup_dirs(&spec).is_empty(),
        "the container was created before the create step"
    );

    launch.allow_create(None);
    eventually("the container is created (its cgroups exist)", || {
        !f.cgroup_dirs(&spec).is_empty()
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !read(&dir, "stdout.log").contains("started"),
        "the process ran before the start step"
    );
    assert_eq!(
        sandbox::status(&dir).expect("status").state,
        State::Creating
    );

    let st = launch.open_gate().expect("start");
    assert_eq!(st.state, State::Running);
    eventually("the process runs", || {
        read(&dir, "stdout.log").contains("started")
    });
}

/// Dirty pages of `pid`'s mappings of its own executable that it shares (`Shared_Dirty`)
/// and that are its own (`Private_Dirty`), in KiB: the binary's relocated data is dirty.
fn executable_dirty_kib(pid: i32) -> (u64, u64) {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut shared, mut private, mut ours) = (0, 0, false);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some(key), Some(kib)) if key == "Shared_Dirty:" && ours => {
                shared += kib.parse::<u64>().expect("KiB")
            }
            (Some(key), Some(kib)) if key == "Private_Dirty:" && ours => {
                private += kib.parse::<u64>().expect("KiB")
            }
            (Some(range), Some(_)) if range.contains('-') && !range.ends_with(':') => {
                ours = line.ends_with(&*exe.to_string_lossy());
            }
            _ => {}
        }
    }
    (shared, private)
}

#[test]
fn spares_forked_by_the_factory_share_its_relocated_pages_and_launch_through_the_gate() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut cmd = Command::new(supervisor_bin());
    cmd.arg("--factory").arg(f.tmp.path().join("sandboxes"));
    let factory = sandbox::SpareFactory::start(cmd).expect("start the factory");

    let mut spec = f.spec("forked", "echo started; sleep 1000");
    spec.start_gate = true;
    let dir = f.prepare(&spec);
    let spare = factory.spare().expect("a spare from the factory");
    let Ok(launch) = spare.assign(&dir) else {
        panic!("a live forked spare refused its sandbox");
    };
    let st = launch.open_gate().expect("start");
    assert_eq!(st.state, State::Running);
    eventually("the process runs", || {
        read(&dir, "stdout.log").contains("started")
    });
    // Its relocated data is the factory's pages, not copies of its own.
    let (shared, private) = executable_dirty_kib(st.supervisor_pid);
    assert!(
        shared > private,
        "the supervisor's dirty pages of the binary: shared {shared} KiB, private {private} KiB"
    );

    // A start that fails says why, as an exec'd launcher does.
    let mut broken = f.spec("forked-broken", "sleep 1000");
    broken.start_gate = true;
    broken.args = vec!["/no/such/program".into()];
    let dir = f.prepare(&broken);
    let spare = factory.spare().expect("a second spare");
    let Ok(launch) = spare.assign(&dir) else {
        panic!("a live forked spare refused its sandbox");
    };
    let err = launch.open_gate().expect_err("a missing program");
    assert!(err.to_string().contains("/no/such/program"), "{err}");

    // An unused spare goes when its gate closes; the factory when the agent's end does,
    // and the sandbox it made goes on.
    factory.spare().expect("a third spare").retire();
    let factory_pid = factory.pid();
    drop(factory);
    assert!(
        !sandbox_common::alive(factory_pid),
        "the factory outlived its socket"
    );
    assert!(sandbox_common::alive(st.pid.expect("pid")));
}

#[test]
fn a_cancelled_gate_removes_the_created_container() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut spec = f.spec("cancelled", "echo started; sleep 1000");
    spec.start_gate = true;
    let dir = f.prepare(&spec);
    let mut cmd = Command::new(supervisor_bin());
    cmd.arg(&dir);
    let mut launch = sandbox::spawn(cmd, &dir).expect("spawn");
    launch.allow_create(None);
    eventually("the container is created", || {
        !f.cgroup_dirs(&spec).is_empty()
    });
    launch.cancel();
    let st = wait_done(&dir);
    assert_eq!(st.state, State::Failed);
    assert!(
        st.error
            .as_deref()
            .unwrap_or_default()
            .contains("cancelled"),
        "{st:?}"
    );
    assert!(!read(&dir, "stdout.log").contains("started"));
    assert!(f.cgroup_dirs(&spec).is_empty(), "cgroups left behind");
    assert!(mounts_under(&dir.to_string_lossy()).is_empty());
    if let Some(pid) = st.pid {
        assert!(!alive(pid), "the container's init outlived the cancel");
    }
}

#[test]
fn wait_returns_the_recorded_end_and_times_out_while_running() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let done = f.spec("done", "sleep 0.3; exit 3");
    let dir = f.start(&done);
    let st = sandbox::wait(&dir, Some(Duration::from_secs(20))).expect("wait");
    assert_eq!((st.state, st.exit_code), (State::Exited, Some(3)));

    let forever = f.spec("forever", "sleep 1000");
    let dir = f.start(&forever);
    match sandbox::wait(&dir, Some(Duration::from_millis(300))) {
        Err(sandbox::SandboxError::Timeout(_)) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    // Stopped meanwhile: the waiter hears of it.
    let waiter = {
        let dir = dir.clone();
        std::thread::spawn(move || sandbox::wait(&dir, None))
    };
    std::thread::sleep(Duration::from_millis(200));
    sandbox::stop(&dir, Duration::from_millis(100)).expect("stop");
    let st = waiter.join().expect("waiter").expect("wait");
    assert_eq!((st.state, st.exit_code), (State::Exited, Some(137)));
}

#[test]
fn a_sandbox_whose_supervisor_died_unrecorded_is_relaunched_if_its_policy_asks() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let mut always = f.spec("always", "echo run; sleep 1000");
    always.restart = RestartPolicy::Always {
        backoff: Backoff::default(),
    };
    let never = f.spec("never", "echo run; sleep 1000");
    let mut stopped = f.spec("stopped", "sleep 1000");
    stopped.restart = always.restart.clone();
    let dirs: Vec<_> = [&always, &never, &stopped]
        .iter()
        .map(|spec| f.start(spec))
        .collect();
    sandbox::stop(&dirs[2], Duration::from_millis(100)).expect("stop");
    assert!(
        !sandbox::needs_relaunch(&dirs[0]),
        "a live supervisor is left alone"
    );
    // What a host restart does to a running sandbox: supervisor and container gone,
    // nothing recorded.
    for dir in &dirs[..2] {
        let st = wait_for(dir, Duration::from_secs(20), |s| s.state == State::Running);
        for pid in [st.supervisor_pid, st.pid.expect("pid")] {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        wait_for(dir, Duration::from_secs(20), |s| !s.supervisor_alive);
    }
    assert!(sandbox::needs_relaunch(&dirs[0]));
    assert!(!sandbox::needs_relaunch(&dirs[1]), "restart policy no");
    assert!(!sandbox::needs_relaunch(&dirs[2]), "its end was recorded");

    let mut cmd = Command::new(supervisor_bin());
    cmd.arg(&dirs[0]);
    let st = sandbox::relaunch(cmd, &dirs[0]).expect("relaunch");
    assert_eq!((st.state, st.restarts), (State::Running, 1));
    let again = wait_for(&dirs[0], Duration::from_secs(20), |s| {
        read(&dirs[0], "stdout.log").matches("run").count() == 2 && s.state == State::Running
    });
    assert!(again.supervisor_alive);
    assert!(
        alive(again.pid.expect("pid")),
        "the new run's process lives"
    );
}

/// A network namespace bound at `path` (unmounted by the fixture's drop, like every mount
/// under its temp dir).
fn bound_netns(path: &std::path::Path) {
    fs::write(path, "").expect("netns file");
    let target = path.to_path_buf();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind netns");
    })
    .join()
    .expect("netns thread");
}

#[test]
fn sys_shows_the_sandboxs_netns_read_only_also_when_the_image_makes_it_a_symlink() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let netns = f.tmp.path().join("netns");
    bound_netns(&netns);
    let script = "ls /sys/class/net; touch /sys/kernel/x 2>/dev/null && echo WROTE; true";

    // Without a sysfs from the agent, the supervisor makes one inside the namespace: it has
    // only `lo` (the host's links are not there).
    let mut spec = f.spec("plain", script);
    spec.netns = Some(netns.clone());
    let dir = f.start(&spec);
    assert_eq!(wait_done(&dir).exit_code, Some(0));
    assert_eq!(read(&dir, "stdout.log"), "lo\n");

    // An image whose /sys is a symlink to a host directory: left to libcontainer, which
    // resolves it inside the rootfs (and here refuses to start, the target not being
    // there); the host directory is untouched either way.
    let host_dir = f.tmp.path().join("host-dir");
    fs::create_dir(&host_dir).expect("mkdir");
    let top = f.tmp.path().join("top");
    fs::create_dir(&top).expect("mkdir");
    std::os::unix::fs::symlink(&host_dir, top.join("sys")).expect("symlink");
    let mut spec = f.spec("symlinked", script);
    spec.netns = Some(netns.clone());
    spec.lower_dirs = vec![top, f.lower.clone()];
    let dir = f.prepare(&spec);
    let mut cmd = Command::new(supervisor_bin());
    cmd.arg(&dir);
    if sandbox::launch(cmd, &dir).is_ok() {
        assert_eq!(wait_done(&dir).exit_code, Some(0));
        assert_eq!(read(&dir, "stdout.log"), "lo\n");
    }
    assert_eq!(fs::read_dir(&host_dir).expect("host dir").count(), 0);
    assert!(mounts_under(&host_dir.to_string_lossy()).is_empty());
}

/// A bounded layer is a subvolume of the data dir's store, bounded by a quota (EDQUOT past
/// it) and removed with the sandbox; a sandbox whose state dir already has a layer image (made
/// by an earlier version, an ext4 of its own) keeps it, with its bound (ENOSPC past it).
#[test]
fn bounded_layers_are_subvolumes_of_the_store_and_older_images_are_kept() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new();
    let fill = "dd if=/dev/zero of=/fill bs=1M count=48 2>&1; echo rc=$?";
    let mut specs = Vec::new();
    for name in ["subvolume", "image"] {
        let mut spec = f.spec(name, fill);
        spec.resources = Resources {
            writable_bytes: Some(32 << 20),
            ..Default::default()
        };
        specs.push(spec);
    }
    let new = f.prepare(&specs[0]);
    let old = f.prepare(&specs[1]);
    let image = old.join(sandbox::LAYER_IMAGE);
    miren_disks::create_sparse_image(&image, 32 << 20).expect("image");
    miren_disks::make_fixed_size_filesystem(miren_disks::Filesystem::Ext4, &image).expect("mkfs");
    for dir in [&new, &old] {
        let mut cmd = Command::new(supervisor_bin());
        cmd.arg(dir);
        sandbox::launch(cmd, dir).expect("launch");
        wait_done(dir);
    }
    let out = read(&new, "stdout.log");
    assert!(
        out.contains("Disk quota exceeded") && out.contains("rc=1"),
        "{out}"
    );
    let out = read(&old, "stdout.log");
    assert!(
        out.contains("No space left on device") && out.contains("rc=1"),
        "{out}"
    );
    let store = f.tmp.path().join(sandbox::LAYERS_DIR);
    assert!(store.join("subvolume").join("upper/fill").exists());
    assert!(
        !store.join("image").exists(),
        "the old layer got a subvolume too"
    );
    sandbox::delete(&new).expect("delete");
    sandbox::delete(&old).expect("delete");
    assert!(
        !store.join("subvolume").exists(),
        "the subvolume outlived its sandbox"
    );

    // A store whose quotas are off (a run killed before it turned them on) gets them back.
    let off = Command::new("btrfs")
        .args(["quota", "disable"])
        .arg(&store)
        .status()
        .expect("btrfs quota disable");
    assert!(off.success());
    let mut spec = f.spec("again", fill);
    spec.resources = Resources {
        writable_bytes: Some(32 << 20),
        ..Default::default()
    };
    let again = f.start(&spec);
    wait_done(&again);
    let out = read(&again, "stdout.log");
    assert!(
        out.contains("Disk quota exceeded") && out.contains("rc=1"),
        "{out}"
    );
}
