//! Harness for privileged end-to-end tests: starts real `miren agent` processes on temporary
//! data dirs and cleans up every mount, loop device and process they made, also when a test
//! fails (the cleanup runs in `Drop`, which runs during a panic's unwinding).
//!
//! Every resource is recognisable: data dirs are `/tmp/mrtst-*` and name prefixes `mrtst*`, so
//! `scripts/cleanup` can remove what a killed test run left behind.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod addons;
pub mod pitr;
pub mod s3;

/// The `miren` binary under test: `MIREN_BIN`, or the one next to this test's build.
pub fn miren_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("MIREN_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/miren
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("miren"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build --bin miren` (scripts/test does)",
        bin.display()
    );
    bin
}

pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "vm-tests need root: they attach loop devices and mount filesystems"
    );
}

pub fn random_hex(len: usize) -> String {
    let mut bytes = vec![0u8; len.div_ceil(2)];
    getrandom::fill(&mut bytes).expect("randomness");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex[..len].to_string()
}

/// A running agent on its own data dir, socket and name prefix.
pub struct TestAgent {
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub socket: PathBuf,
    pub prefix: String,
    /// A /24 no other test agent of this run uses.
    pub subnet: String,
    pub log: PathBuf,
    extra_env: Vec<(String, String)>,
    extra_args: Vec<String>,
    child: Option<Child>,
}

pub struct AgentBuilder {
    env: Vec<(String, String)>,
    args: Vec<String>,
    data_dir: Option<PathBuf>,
}

impl AgentBuilder {
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }
    /// Keep the data dir somewhere else (e.g. on a small filesystem to fill up).
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }
    pub fn start(self) -> TestAgent {
        require_root();
        let id = loop {
            let id = random_hex(6);
            if claim(&format!("prefix-{}", &id[..3])) {
                break id;
            }
        };
        let root = PathBuf::from(format!("/tmp/mrtst-{id}"));
        fs::create_dir_all(&root).expect("test root");
        let mut agent = TestAgent {
            data_dir: self.data_dir.unwrap_or_else(|| root.join("data")),
            run_dir: root.join("run"),
            subnet: unique_subnet(),
            socket: root.join("agent.sock"),
            log: root.join("agent.log"),
            prefix: format!("mrtst{}", &id[..3]),
            root,
            extra_env: self.env,
            extra_args: self.args,
            child: None,
        };
        agent.spawn();
        agent
    }
}

impl TestAgent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            env: Vec::new(),
            args: Vec::new(),
            data_dir: None,
        }
    }

    pub fn start() -> TestAgent {
        Self::builder().start()
    }

    /// Starts the agent process and waits until its socket answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let mut cmd = Command::new(miren_bin());
        cmd.arg("agent")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--name-prefix")
            .arg(&self.prefix)
            .arg("--subnet")
            .arg(&self.subnet)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .args(&self.extra_args)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn agent"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "agent exited during start-up ({status}):\n{}",
                        self.log_text()
                    );
                }
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                self.log_text()
            );
            sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// What a host restart does to this agent's world, short of rebooting: the agent, every
    /// supervisor and sandbox process, cgroup, mount, loop device, network namespace, link
    /// and nftables table of its prefix gone, and its run dir (tmpfs) emptied; its data dir
    /// (files on disk) stays. Call [`TestAgent::spawn`] to boot it again.
    pub fn lose_everything_a_host_restart_loses(&mut self) {
        self.kill9();
        kill_processes_under(&self.data_dir, &self.prefix);
        remove_cgroups(&self.prefix);
        for dir in [&self.data_dir, &self.run_dir] {
            if let Ok(mounts) = miren_disks::mounts_under(dir) {
                for m in mounts.iter().rev() {
                    let _ = nix::mount::umount2(&m.target, nix::mount::MntFlags::MNT_DETACH);
                }
            }
        }
        if let Ok(loops) = miren_disks::loops_under(&self.data_dir) {
            for l in loops {
                let _ = miren_disks::detach(&l.device);
            }
        }
        remove_network_leftovers(&self.prefix);
        let _ = fs::remove_dir_all(&self.run_dir);
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to a minute) until the agent's log says `text`.
    pub fn wait_for_log(&self, text: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.log_text().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "the agent never logged {text:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// A `miren` client command pointed at this agent.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(miren_bin());
        cmd.args(args).env("MIREN_SOCKET", &self.socket);
        cmd
    }

    /// Starts a CLI command in the background with its output discarded: a client that the
    /// kill -9 tests leave hanging when they kill the agent under it.
    pub fn spawn_cli(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run miren")
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run miren")
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`miren {}` failed: {}\nagent log:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a CLI command that must fail; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "`miren {}` should have failed but printed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let text = self.ok(args);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}\n{text}"))
    }

    pub fn disks(&self) -> Vec<Value> {
        match self.json(&["debug", "disk", "list", "--json"]) {
            Value::Array(disks) => disks,
            other => panic!("disk list is not an array: {other}"),
        }
    }

    /// Raw HTTP over the socket with curl, as an operator would: (status, body).
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(&self.socket)
            .args(["-X", method, "-H", "content-type: application/json"]);
        if body.is_some() {
            cmd.args(["--data-binary", "@-"]);
        }
        cmd.arg(format!("http://agent{path}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("curl (apt-get install curl)");
        if let (Some(body), Some(mut stdin)) = (body, child.stdin.take()) {
            use std::io::Write;
            let _ = stdin.write_all(body.as_bytes());
        }
        let out = child.wait_with_output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("disks")
    }
    pub fn mounts_dir(&self) -> PathBuf {
        self.data_dir.join("mounts")
    }

    /// Asserts the kernel matches the agent's list exactly: every disk attached through one
    /// loop device and mounted once at its mount path; no other loop device, mount, image or
    /// mount point under this agent's data dir; nothing half-created or half-deleted.
    pub fn assert_converged(&self) {
        let disks = self.disks();
        let loops = miren_disks::loops_under(&self.images_dir()).expect("loops");
        let mounts = miren_disks::mounts_under(&self.mounts_dir()).expect("mounts");
        let mut expected_images = Vec::new();
        let mut expected_mounts = Vec::new();
        for disk in disks.iter().filter(|d| d["provider"] == "miren") {
            let name = &disk["name"];
            assert_eq!(
                disk["status"], "attached",
                "disk {name} not attached: {disk}"
            );
            let image = PathBuf::from(disk["image_path"].as_str().expect("image_path"));
            let mount = PathBuf::from(disk["mount_path"].as_str().expect("mount_path"));
            let device = disk["device"].as_str().expect("device");
            let its_loops: Vec<_> = loops.iter().filter(|l| l.backing_file == image).collect();
            assert_eq!(
                its_loops.len(),
                1,
                "disk {name} attached {} times",
                its_loops.len()
            );
            assert_eq!(its_loops[0].device, Path::new(device));
            let its_mounts: Vec<_> = mounts.iter().filter(|m| m.target == mount).collect();
            assert_eq!(
                its_mounts.len(),
                1,
                "disk {name} mounted {} times",
                its_mounts.len()
            );
            assert_eq!(its_mounts[0].source, device);
            expected_images.push(image);
            expected_mounts.push(mount);
        }
        for l in &loops {
            assert!(
                expected_images.contains(&l.backing_file),
                "stray loop device {l:?}"
            );
        }
        for m in &mounts {
            assert!(expected_mounts.contains(&m.target), "stray mount {m:?}");
        }
        for entry in fs::read_dir(self.images_dir())
            .expect("images dir")
            .flatten()
        {
            assert!(
                expected_images.contains(&entry.path()),
                "stray image {}",
                entry.path().display()
            );
        }
        for entry in fs::read_dir(self.mounts_dir())
            .expect("mounts dir")
            .flatten()
        {
            assert!(
                expected_mounts.contains(&entry.path()),
                "stray mount point {}",
                entry.path().display()
            );
        }
    }
}

impl TestAgent {
    /// The agent's own way to remove its endpoints, gateway link and nftables table.
    pub fn uninstall_network(&self) -> Output {
        Command::new(miren_bin())
            .args(["agent", "--uninstall-network", "--data-dir"])
            .arg(&self.data_dir)
            .arg("--socket")
            .arg(&self.socket)
            .args([
                "--name-prefix",
                &self.prefix,
                "--subnet",
                &self.subnet,
                "--run-dir",
            ])
            .arg(&self.run_dir)
            .output()
            .expect("run miren agent --uninstall-network")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The agent's own account of what went wrong goes with the data dir: show its end.
            let log = self.log_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("--- last lines of {} ---\n{tail}\n---", self.log.display());
        }
        self.kill9();
        // Sandboxes outlive their agent by design: a test that failed before deleting its
        // sandboxes leaves supervisors and containers running. Kill them by state dir and
        // by cgroup.
        kill_processes_under(&self.data_dir, &self.prefix);
        let _ = self.uninstall_network();
        remove_network_leftovers(&self.prefix);
        remove_cgroups(&self.prefix);
        if !self.data_dir.starts_with(&self.root) {
            remove_everything_under(&self.data_dir);
        }
        remove_everything_under(&self.root);
    }
}

/// A small loop-backed ext4 filesystem, to run out of space on purpose.
pub struct SmallFs {
    pub root: PathBuf,
    pub mount: PathBuf,
}

impl SmallFs {
    pub fn new(size_mb: u64) -> SmallFs {
        require_root();
        let root = PathBuf::from(format!("/tmp/mrtst-fs-{}", random_hex(6)));
        let mount = root.join("mnt");
        fs::create_dir_all(&mount).expect("small fs dir");
        let image = root.join("fs.img");
        let fs = SmallFs { root, mount };
        let run = |args: &[&str]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .expect("run");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let image_s = image.display().to_string();
        run(&["truncate", "-s", &format!("{size_mb}M"), &image_s]);
        let dev = run(&["losetup", "-f", "--show", &image_s]);
        run(&["mkfs.ext4", "-q", "-F", &dev]);
        run(&["mount", &dev, &fs.mount.display().to_string()]);
        // The mount holds the device; let the kernel detach it when unmounted.
        run(&["losetup", "-d", &dev]);
        fs
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        remove_everything_under(&self.root);
    }
}

/// Subnets for test agents: 10.250-254.x.0/24, different for every agent of a test process
/// (and very likely across processes, which start from their pid).
pub fn unique_subnet() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) + std::process::id() * 7;
        let subnet = format!("10.{}.{}.0/24", 250 + (n / 256) % 5, n % 256);
        if claim(&format!("subnet-{subnet}")) {
            return subnet;
        }
    }
}

/// Claims `name` for this test process, across every test process on the machine: an
/// abstract Unix socket bound until the process exits (the kernel frees it then, so a killed
/// run leaves nothing to clean). Two agents that ran side by side with one name prefix or
/// subnet would share nftables tables, cgroup parents and bridges, and tear down each
/// other's; random picks alone collide now and then (3 hex digits of prefix).
fn claim(name: &str) -> bool {
    use std::os::linux::net::SocketAddrExt;
    let Ok(addr) =
        std::os::unix::net::SocketAddr::from_abstract_name(format!("miren-vm-tests-{name}"))
    else {
        return false;
    };
    match std::os::unix::net::UnixListener::bind_addr(&addr) {
        Ok(listener) => {
            // Held until the process exits.
            std::mem::forget(listener);
            true
        }
        Err(_) => false,
    }
}

/// Kills `miren supervise` processes whose state dir is under `data_dir`, and every process
/// in the cgroups under `<prefix>`.
pub fn kill_processes_under(data_dir: &Path, prefix: &str) {
    let mut victims = Vec::new();
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().any(|a| a == "supervise")
                && args.iter().any(|a| Path::new(a).starts_with(data_dir))
            {
                victims.push(pid);
            }
        }
    }
    if let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let mut dirs = vec![h.path().join(prefix)];
            while let Some(dir) = dirs.pop() {
                if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                    victims.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
                if let Ok(entries) = fs::read_dir(&dir) {
                    dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
                }
            }
        }
    }
    for pid in &victims {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while victims
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        sleep(Duration::from_millis(10));
    }
}

/// The agent's cgroup parent `<prefix>` (and anything left below it) in every hierarchy.
pub fn remove_cgroups(prefix: &str) {
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let top = h.path().join(prefix);
        if !top.is_dir() {
            continue;
        }
        // Deepest first: a cgroup directory can only go once it has no children.
        let mut dirs = vec![top.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = fs::read_dir(&dirs[i]) {
                dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// Links and nftables tables named with `prefix`, in case the agent could not remove them.
pub fn remove_network_leftovers(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or("");
            if name.starts_with(prefix) {
                let _ = Command::new("ip").args(["link", "delete", name]).status();
            }
        }
    }
    for family in ["inet", "bridge"] {
        let _ = Command::new("nft")
            .args(["delete", "table", family, prefix])
            .stderr(Stdio::null())
            .status();
    }
}

/// Unmounts every mount under `dir`, detaches every loop device backed by a file under it,
/// and removes it. Used by every test's cleanup, whether it passed or not.
pub fn remove_everything_under(dir: &Path) {
    if let Ok(mounts) = miren_disks::mounts_under(dir) {
        for m in mounts.iter().rev() {
            let _ = nix::mount::umount2(&m.target, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    if let Ok(loops) = miren_disks::loops_under(dir) {
        for l in loops {
            let _ = miren_disks::detach(&l.device);
        }
    }
    let _ = fs::remove_dir_all(dir);
}

/// The bound of each writable layer in the store of `data_dir` (`<data dir>/layers`, one
/// btrfs subvolume per sandbox, or `.spare-<pid>` per spare), by subvolume name, in bytes;
/// from `btrfs qgroup show`. Deleted subvolumes whose space is still being freed are left out.
pub fn layer_bounds(data_dir: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = Command::new("btrfs")
        .args(["qgroup", "show", "-r", "--raw"])
        .arg(data_dir.join("layers"))
        .output()
        .expect("run btrfs qgroup show");
    assert!(
        out.status.success(),
        "btrfs qgroup show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let [id, _, _, max, name] = cols[..] else {
                return None;
            };
            let bound = max.parse().ok()?;
            (id.starts_with("0/") && !name.starts_with('<')).then(|| (name.to_string(), bound))
        })
        .collect()
}

/// A child process killed and reaped on drop (e.g. a lease holder `pid:N`).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

/// The image `TestAgent::start_with_busybox` imports: `busybox_rootfs_tar`'s root filesystem.
pub const BUSYBOX_IMAGE: &str = "local/busybox:test";

impl TestAgent {
    /// An agent with the tiny busybox image imported as [`BUSYBOX_IMAGE`].
    pub fn start_with_busybox() -> TestAgent {
        let agent = TestAgent::start();
        let tar = agent.root.join("busybox.tar");
        busybox_rootfs_tar(&tar);
        agent.ok(&["image", "import", BUSYBOX_IMAGE, tar.to_str().unwrap()]);
        agent
    }

    /// `miren sandbox run --image BUSYBOX_IMAGE EXTRA.. -- sh -c CMD`; returns the sandbox id.
    pub fn run_busybox(&self, extra: &[&str], cmd: &str) -> String {
        let mut args = vec!["sandbox", "run", "--image", BUSYBOX_IMAGE];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "sh", "-c", cmd]);
        self.ok(&args).trim().to_string()
    }

    /// Waits up to 30 s for the sandbox to reach `state`; returns its status.
    pub fn wait_sandbox_state(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.json(&["sandbox", "status", id, "--json"]);
            if s["state"] == state {
                return s;
            }
            assert!(Instant::now() < deadline, "{id} never reached {state}: {s}");
            sleep(Duration::from_millis(50));
        }
    }
}

/// Files and directories (`path`, `Some(contents)` or `None` for a directory, symlink target)
/// of a tiny busybox root filesystem, from Debian's busybox-static: enough for sandbox tests.
pub fn busybox_rootfs_tar(out: &Path) {
    let root = out.with_extension("d");
    let _ = fs::remove_dir_all(&root);
    for dir in ["bin", "etc", "tmp", "proc", "sys", "dev", "data", "www"] {
        fs::create_dir_all(root.join(dir)).expect("rootfs dir");
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (apt-get install busybox-static)");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )
    .expect("passwd");
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("group");
    let status = Command::new("tar")
        .arg("-cf")
        .arg(out)
        .arg("-C")
        .arg(&root)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success());
    let _ = fs::remove_dir_all(&root);
}

/// The test image mirror (`MIREN_IMAGE_MIRROR`, set by scripts/test), or None when a developer
/// runs a test without it and the test is skipped. Under CI (`CI` set) a missing mirror is a
/// broken setup, not a reason to pass: it panics.
pub fn image_mirror() -> Option<String> {
    match std::env::var("MIREN_IMAGE_MIRROR") {
        Ok(mirror) => Some(mirror),
        Err(_) if std::env::var_os("CI").is_some() => {
            panic!("MIREN_IMAGE_MIRROR is not set under CI: scripts/test must export it (scripts/images)")
        }
        Err(_) => {
            eprintln!("skipped: MIREN_IMAGE_MIRROR is not set (run scripts/images)");
            None
        }
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on now (the kernel's pick), for `--publish`.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}
