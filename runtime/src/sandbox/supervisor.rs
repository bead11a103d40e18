//! The per-sandbox supervisor process.
//!
//! Single-threaded on purpose: libcontainer clones with raw clone3, and the container
//! init is our child (CLONE_PARENT), so we alone reap it with waitpid. Events (signals,
//! log pipes, child exit) are multiplexed with poll(2) and a self-pipe.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use miren_sys::timeline::Timeline;
use nix::fcntl::OFlag;
use nix::sys::signal::{self, kill, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use serde::Deserialize;

use super::control::{is_mounted, unmount};
use super::layer::{self, SpareLayer};
use super::logs::RotatingLog;
use super::mountns;
use super::status::{now_ms, read_status, write_replace, write_status};
use super::{cgroup, oci, read_spec, RestartPolicy, SandboxError, SandboxSpec, State, Status};
use super::{
    BUNDLE_DIR, HOSTS_FILE, PID_FILE, RESOLV_FILE, ROOTFS_DIR, STDERR_LOG, STDOUT_LOG, STOP_FILE,
    SUPERVISOR_LOG, YOUKI_DIR,
};
use miren_sys::proc;

/// Gate steps (see [`super::Launch`]): the network namespace exists, so the container may
/// be created; the endpoint is complete, so its process may start.
pub(crate) const GATE_CREATE: u8 = b'c';
/// [`GATE_CREATE`] followed by a line: where to clone the namespace's sysfs from.
pub(crate) const GATE_CREATE_WITH_SYSFS: u8 = b'C';
pub(crate) const GATE_START: u8 = b's';

/// How long to keep draining log pipes after the init exited.
const DRAIN: Duration = Duration::from_secs(2);
/// How often to look again while draining (the pipes may stay open for `DRAIN`).
const DRAIN_POLL_MS: i32 = 50;

/// Write end of the self-pipe used by the signal handler.
static SIG_PIPE_W: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIG_PIPE_W.load(Ordering::Relaxed);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local byte.
        unsafe { libc::write(fd, &b as *const u8 as *const libc::c_void, 1) };
    }
}

/// Sent by [`super::stop`] before SIGTERM to override the spec's grace period.
#[derive(Deserialize, serde::Serialize)]
pub(crate) struct StopRequest {
    pub grace_ms: u64,
}

/// Entry point of `miren supervise --state-dir DIR`.
///
/// Call it in a freshly exec'd, single-threaded process. It forks: the returned-to
/// process only waits until the first start attempt is over (Ok = the container is
/// running) and should then exit; the forked supervisor runs in its own session and
/// never returns (it exits the process when the sandbox is done).
pub fn supervise(state_dir: &Path) -> Result<(), SandboxError> {
    supervise_with(state_dir, None, None, None)
}

/// `waited`: how long the sandbox waited for the spare this supervisor was (the first step
/// of its start's timeline).
pub(crate) fn supervise_with(
    state_dir: &Path,
    spare_layer: Option<SpareLayer>,
    prepared_ns: Option<mountns::Prepared>,
    waited: Option<Duration>,
) -> Result<(), SandboxError> {
    let checked = fs::canonicalize(state_dir)
        .map_err(|e| SandboxError::io(format!("state dir {}", state_dir.display()), e))
        .and_then(|dir| {
            let spec = read_spec(&dir)?;
            spec.validate()?;
            Ok((dir, spec))
        });
    let (state_dir, spec) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            if let Some(l) = spare_layer {
                l.discard();
            }
            return Err(e);
        }
    };
    let mut steps = Timeline::start();
    if let Some(layer) = &spare_layer {
        steps.push_all(&layer.steps);
    }
    if let Some(waited) = waited {
        steps.push("spare", waited);
    }
    let (ready_r, ready_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
    // SAFETY: called in a single-threaded process (documented requirement).
    match unsafe { fork() }.map_err(|e| SandboxError::sys("fork", e))? {
        ForkResult::Parent { .. } => {
            drop(ready_w);
            let mut b = [0u8; 1];
            let n = File::from(ready_r).read(&mut b).unwrap_or(0);
            if n == 1 && b[0] == b'1' {
                return Ok(());
            }
            let why = read_status(&state_dir)
                .ok()
                .flatten()
                .and_then(|s| s.error)
                .unwrap_or_else(|| "supervisor exited during start".into());
            Err(SandboxError::StartFailed(why))
        }
        ForkResult::Child => {
            drop(ready_r);
            let code = match Supervisor::new(state_dir.clone(), spec, ready_w) {
                Ok(mut s) => {
                    steps.mark("setup");
                    s.spare_layer = spare_layer;
                    s.prepared_ns = prepared_ns;
                    s.steps = Some(steps);
                    s.run()
                }
                Err(e) => {
                    if let Some(l) = spare_layer {
                        l.discard();
                    }
                    eprintln!("supervisor setup: {e}");
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

struct Run {
    pid: Pid,
    started: Instant,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
}

struct Supervisor {
    dir: PathBuf,
    spec: SandboxSpec,
    status: Status,
    ready: Option<OwnedFd>,
    sig_r: OwnedFd,
    _sig_w: OwnedFd,
    stdout: RotatingLog,
    stderr: RotatingLog,
    /// Set once SIGTERM arrived: SIGKILL deadline.
    stopping: Option<Instant>,
    /// Last status written, to skip redundant fsyncs.
    saved: Option<Status>,
    /// With `spec.start_gate`: the launch's stdin, read before the first create and start.
    gate: Option<File>,
    /// A ready writable layer this supervisor made while it was a spare.
    spare_layer: Option<SpareLayer>,
    /// Where the agent holds a sysfs of the sandbox's network namespace (from the gate).
    sysfs_source: Option<PathBuf>,
    /// The container's `/sys` is ours to mount (`oci::supervisor_mounts_sys`).
    mounts_sys: bool,
    /// The mount namespace its spare made (we are in it), if any.
    prepared_ns: Option<mountns::Prepared>,
    /// Where that layer was, once taken over: empty directories removed at the end.
    spare_dir: Option<PathBuf>,
    /// The steps of the first start so far (from the supervisor's own start); later starts
    /// time only their own steps.
    steps: Option<Timeline>,
}

impl Supervisor {
    fn new(dir: PathBuf, spec: SandboxSpec, ready: OwnedFd) -> Result<Self, SandboxError> {
        let gate = if spec.start_gate {
            // Kept (close-on-exec) before stdin becomes /dev/null.
            let fd = nix::fcntl::fcntl(std::io::stdin(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))
                .map_err(|e| SandboxError::sys("dup stdin", e))?;
            // SAFETY: a descriptor fcntl just made for us alone.
            Some(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        } else {
            None
        };
        detach_and_redirect(&dir)?;
        let (sig_r, sig_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| SandboxError::sys("pipe", e))?;
        SIG_PIPE_W.store(sig_w.as_raw_fd(), Ordering::Relaxed);
        install_signal_handlers()?;

        let me = std::process::id() as i32;
        // A status already there is a predecessor's that ended without recording an end
        // (see `relaunch`): this start counts as one more restart.
        let restarts = read_status(&dir)
            .ok()
            .flatten()
            .map_or(0, |s| s.restarts.saturating_add(1));
        let status = Status {
            state: State::Creating,
            supervisor_pid: me,
            supervisor_start_time: proc::start_time(me).unwrap_or(0),
            pid: None,
            pid_start_time: None,
            exit_code: None,
            oom_killed: false,
            restarts,
            started_at: None,
            finished_at: None,
            error: None,
            start_steps: None,
            supervisor_alive: true,
        };
        write_replace(
            &dir.join(PID_FILE),
            format!(
                "{} {}\n",
                status.supervisor_pid, status.supervisor_start_time
            )
            .as_bytes(),
        )?;
        write_status(&dir, &status)?;
        let saved = Some(status.clone());
        let logio = |e| SandboxError::io("open logs", e);
        let stdout = RotatingLog::open(
            &dir.join(STDOUT_LOG),
            spec.logs.max_bytes,
            spec.logs.max_files,
        )
        .map_err(logio)?;
        let stderr = RotatingLog::open(
            &dir.join(STDERR_LOG),
            spec.logs.max_bytes,
            spec.logs.max_files,
        )
        .map_err(logio)?;
        Ok(Supervisor {
            dir,
            spec,
            status,
            ready: Some(ready),
            sig_r,
            _sig_w: sig_w,
            stdout,
            stderr,
            stopping: None,
            saved,
            gate,
            spare_layer: None,
            sysfs_source: None,
            mounts_sys: false,
            prepared_ns: None,
            spare_dir: None,
            steps: None,
        })
    }

    fn save(&mut self) {
        if self.saved.as_ref() == Some(&self.status) {
            return;
        }
        match write_status(&self.dir, &self.status) {
            Ok(()) => self.saved = Some(self.status.clone()),
            Err(e) => eprintln!("write status: {e}"),
        }
    }

    fn signal_ready(&mut self, ok: bool) {
        if let Some(fd) = self.ready.take() {
            let _ = File::from(fd).write_all(if ok { b"1" } else { b"0" });
        }
    }

    /// Whole life of the sandbox; returns the process exit code.
    fn run(&mut self) -> i32 {
        let code = match self.prepare() {
            Ok(()) => self.run_loop(),
            Err(e) => {
                self.status.state = State::Failed;
                self.status.error = Some(e.to_string());
                self.status.finished_at = Some(now_ms());
                self.save();
                1
            }
        };
        self.signal_ready(false);
        self.teardown();
        code
    }

    fn prepare(&mut self) -> Result<(), SandboxError> {
        let d = &self.dir;
        let rootfs = d.join(ROOTFS_DIR);
        for sub in [ROOTFS_DIR, BUNDLE_DIR, YOUKI_DIR] {
            fs::create_dir_all(d.join(sub))
                .map_err(|e| SandboxError::io(format!("mkdir {sub}"), e))?;
        }
        // A crashed predecessor may have left its overlay mounted (and its /sys on it).
        mountns::detach_sysfs(&rootfs.join("sys"));
        if is_mounted(&rootfs) {
            unmount(&rootfs)?;
        }
        let bounded = self.spec.resources.writable_bytes;
        let spare = self.spare_layer.take();
        let mut adopted = None;
        if let Some(size) = bounded {
            if let Some(l) = spare {
                let dir = l.dir().to_path_buf();
                adopted = l.adopt(d, size).then_some(dir);
            }
        } else if let Some(l) = spare {
            l.discard();
        }
        self.mark("layer");
        let needed = self.paths_needed();
        let mut prepared = self.prepared_ns.take();
        if prepared
            .as_ref()
            .is_some_and(|p| !p.fits(&self.spec.private_mounts, &needed))
        {
            // The adopted layer is mounted in that namespace only: unmounted before we
            // leave it (mounted again below, in ours), never mounted twice.
            layer::unmount_layer(&self.dir)?;
            if let Some(p) = prepared.take() {
                p.leave()?;
            }
        }
        let binds = self
            .spec
            .mounts
            .iter()
            .any(|m| matches!(m, super::Mount::Bind { .. }));
        // A layer that is not here (adopted in the spare's namespace, which we still use) is
        // its subvolume in the store, which only the host's namespace shows: cloned there with
        // the disks. A layer adopted on the host (a spare without a namespace) is kept.
        let layer_from_store = bounded.is_some() && !(adopted.is_some() && prepared.is_some());
        match prepared {
            // Its disks: looked up in the host's namespace, where they are mounted.
            Some(p) if binds || layer_from_store => p.bring(|| {
                let mut keep = self.mounts_to_keep(false);
                if layer_from_store {
                    keep.extend(self.layer_to_keep()?);
                }
                Ok(keep)
            })?,
            Some(_) => {}
            None => {
                let mut keep = self.mounts_to_keep(true);
                if layer_from_store {
                    keep.extend(self.layer_to_keep()?);
                }
                mountns::enter(&self.spec.private_mounts, &keep, &needed)?;
            }
        }
        self.mark("mountns");
        let d = &self.dir;
        if let Some(size) = bounded {
            // Here already (adopted, brought, or a crashed predecessor's), or an image of its
            // own, or (no namespace of its own) bound on the host.
            layer::mount(d, size)?;
        }
        let (upper, work) = layer::upper_and_work(d, bounded.is_some());
        for sub in [&upper, &work] {
            fs::create_dir_all(sub)
                .map_err(|e| SandboxError::io(format!("mkdir {}", sub.display()), e))?;
        }
        let lower: Vec<String> = self
            .spec
            .lower_dirs
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(opts.as_str()),
        )
        .map_err(|e| SandboxError::sys(format!("mount overlay on {}", rootfs.display()), e))?;
        self.mark("overlay");
        let d = &self.dir;
        if let Some(h) = &self.spec.hosts {
            write_replace(&d.join(HOSTS_FILE), h.as_bytes())?;
        }
        if let Some(r) = &self.spec.resolv_conf {
            write_replace(&d.join(RESOLV_FILE), r.as_bytes())?;
        }
        self.spare_dir = adopted;
        let d = &self.dir;
        self.mounts_sys = oci::supervisor_mounts_sys(&self.spec, &rootfs);
        let oci = oci::build(&self.spec, &rootfs, d)?;
        oci.save(d.join(BUNDLE_DIR).join("config.json"))
            .map_err(|e| SandboxError::InvalidSpec(format!("save config.json: {e}")))?;
        self.mark("bundle");
        Ok(())
    }

    /// Ends a step of the current start (see `steps`).
    fn mark(&mut self, step: &'static str) {
        self.steps.get_or_insert_with(Timeline::start).mark(step);
    }

    /// What of the host's this sandbox needs in its own mount namespace: its disks (bind
    /// sources that are mounts under a private root) and, `with_layer`, a writable layer
    /// mounted on the host (adopted from a spare that made no namespace of its own, or a
    /// crashed predecessor's), which the host gives up.
    fn mounts_to_keep(&self, with_layer: bool) -> Vec<mountns::Keep> {
        let roots = &self.spec.private_mounts;
        let mut keep: Vec<mountns::Keep> = Vec::new();
        for m in &self.spec.mounts {
            let super::Mount::Bind { source, .. } = m else {
                continue;
            };
            // The mount that holds the source: itself, or the nearest mounted parent below
            // a root (a root's own files stay visible through its top mount).
            let held = source
                .ancestors()
                .take_while(|p| !roots.iter().any(|r| r == p))
                .find(|p| is_mounted(p));
            let under_root = roots.iter().any(|r| source.starts_with(r));
            if let Some(p) = held.filter(|_| under_root) {
                if !keep.iter().any(|k| k.source == p) {
                    keep.push(mountns::Keep {
                        source: p.to_path_buf(),
                        target: p.to_path_buf(),
                        take: false,
                    });
                }
            }
        }
        let layer = self.dir.join(layer::LAYER_DIR);
        if with_layer && self.spec.resources.writable_bytes.is_some() && is_mounted(&layer) {
            keep.push(mountns::Keep {
                source: layer.clone(),
                target: layer,
                take: true,
            });
        }
        keep
    }

    /// The sandbox's subvolume, to clone into its namespace as its `layer/` (made now if
    /// missing); none when its layer is mounted on the host already (a crashed
    /// predecessor's, kept by [`Self::mounts_to_keep`]) or is an image of its own (mounted
    /// in the namespace). Call in the host's mount namespace.
    fn layer_to_keep(&self) -> Result<Option<mountns::Keep>, SandboxError> {
        let Some(size) = self.spec.resources.writable_bytes else {
            return Ok(None);
        };
        let target = self.dir.join(layer::LAYER_DIR);
        if is_mounted(&target) || layer::has_own_image(&self.dir) {
            return Ok(None);
        }
        Ok(Some(mountns::Keep {
            source: layer::own_subvolume(&self.dir, size)?,
            target,
            take: false,
        }))
    }

    /// The host paths this sandbox reads in its own mount namespace (see
    /// `mountns::enter`): its dir, its image layers, its bind sources, its netns file.
    fn paths_needed(&self) -> Vec<PathBuf> {
        let mut needed = vec![self.dir.clone()];
        needed.extend(self.spec.lower_dirs.iter().cloned());
        needed.extend(self.spec.netns.iter().cloned());
        needed.extend(self.spec.mounts.iter().filter_map(|m| match m {
            super::Mount::Bind { source, .. } => Some(source.clone()),
            _ => None,
        }));
        needed
    }

    /// With a start gate: blocks until the launcher's caller writes `step`
    /// ([`GATE_CREATE`], then [`GATE_START`]) or closes the pipe (cancel: its part of the
    /// setup, the network endpoint, failed). The gate is gone after the start step, so
    /// restarts never wait.
    fn pass_gate(&mut self, step: u8) -> Result<(), SandboxError> {
        let Some(gate) = self.gate.as_mut() else {
            return Ok(());
        };
        let mut sysfs = None;
        let mut read_byte = || -> Option<u8> {
            let mut b = [0u8; 1];
            loop {
                match gate.read(&mut b) {
                    Ok(1) => return Some(b[0]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    _ => return None,
                }
            }
        };
        let passed = match read_byte() {
            Some(GATE_CREATE_WITH_SYSFS) if step == GATE_CREATE => {
                let mut line = Vec::new();
                let complete = loop {
                    match read_byte() {
                        Some(b'\n') => break true,
                        Some(b) if line.len() < 4096 => line.push(b),
                        _ => break false,
                    }
                };
                if complete {
                    sysfs = Some(PathBuf::from(std::ffi::OsString::from_vec(line)));
                }
                complete
            }
            Some(b) => b == step,
            None => false,
        };
        if sysfs.is_some() {
            self.sysfs_source = sysfs;
        }
        if !passed || step == GATE_START {
            self.gate = None;
        }
        if passed {
            Ok(())
        } else {
            Err(SandboxError::StartFailed(
                "start cancelled: the agent could not finish setting up the sandbox".into(),
            ))
        }
    }

    fn run_loop(&mut self) -> i32 {
        let mut streak: u32 = 0;
        loop {
            self.status.state = State::Creating;
            self.save();
            let mut run = match self.start_once() {
                Ok(r) => r,
                Err(e) => {
                    self.status.state = State::Failed;
                    self.status.error = Some(e.to_string());
                    self.status.finished_at = Some(now_ms());
                    self.save();
                    return 1;
                }
            };
            self.signal_ready(true);
            let code = self.pump(&mut run);
            let oom = cgroup::oom_kills(&self.spec) > 0;
            let ran = run.started.elapsed();
            self.status.exit_code = Some(code);
            self.status.oom_killed = oom;
            self.status.finished_at = Some(now_ms());
            self.status.state = State::Exited;

            let (restart, backoff) = match &self.spec.restart {
                RestartPolicy::No => (false, None),
                RestartPolicy::OnFailure {
                    max_retries,
                    backoff,
                } => (
                    code != 0 && max_retries.is_none_or(|m| self.status.restarts < m),
                    Some(backoff.clone()),
                ),
                RestartPolicy::Always { backoff } => (true, Some(backoff.clone())),
            };
            let last = !restart || self.stopping.is_some();
            if last {
                // The exit is known: record it (durably) before the container's cgroups and
                // state go, which takes a while and changes nothing about the outcome.
                self.save();
            }
            // The init is reaped: its pid may be anyone's by now (see `forget_container`).
            drop(run);
            super::control::forget_container(&self.dir, &self.spec);
            if let Err(e) = cgroup::remove_all(&self.spec) {
                eprintln!("remove cgroups: {e}");
            }
            if last {
                return 0;
            }
            let backoff = backoff.unwrap_or_default();
            if ran.as_millis() as u64 >= backoff.reset_after_ms {
                streak = 0;
            }
            let delay = Duration::from_millis(backoff.delay_ms(streak));
            streak = streak.saturating_add(1);
            self.status.state = State::Restarting;
            self.save();
            // Sleep, but wake for SIGTERM.
            let until = Instant::now() + delay;
            while Instant::now() < until && self.stopping.is_none() {
                let ms = until.saturating_duration_since(Instant::now()).as_millis() as i32;
                let _ = poll_fds(&[self.sig_r.as_raw_fd()], ms.max(1));
                self.handle_signals(None);
            }
            if self.stopping.is_some() {
                self.status.state = State::Exited;
                self.save();
                return 0;
            }
            self.status.restarts += 1;
        }
    }

    fn start_once(&mut self) -> Result<Run, SandboxError> {
        let root = self.dir.join(YOUKI_DIR);
        // Leftover libcontainer state from a crash or the previous run blocks build().
        if root.join(&self.spec.id).exists() {
            super::control::forget_container(&self.dir, &self.spec);
        }
        let (out_r, out_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
        let null = File::open("/dev/null").map_err(|e| SandboxError::io("open /dev/null", e))?;
        self.mark("pipes");
        self.pass_gate(GATE_CREATE)?;
        self.mark("gate");
        mountns::follow_host_mount(self.spec.netns.as_deref())?;
        if let (Some(netns), true) = (&self.spec.netns, self.mounts_sys) {
            let target = self.dir.join(ROOTFS_DIR).join("sys");
            let cloned =
                mountns::attach_sysfs(&target, self.sysfs_source.take().as_deref(), netns)?;
            // `sysfs`: the agent's, cloned; `sysfs.made`: made here.
            self.mark(if cloned { "sysfs" } else { "sysfs.made" });
        }
        let mut container = ContainerBuilder::new(self.spec.id.clone(), SyscallType::default())
            .with_root_path(root)?
            .with_stdin(null)
            .with_stdout(out_w)
            .with_stderr(err_w)
            .as_init(self.dir.join(BUNDLE_DIR))
            .with_systemd(false)
            .with_detach(true)
            .build()?;
        self.mark("create");
        let pid = container
            .pid()
            .map(|p| Pid::from_raw(p.as_raw()))
            .ok_or_else(|| SandboxError::StartFailed("container has no pid".into()))?;
        // From here on a failure must not leave the created init behind.
        let r = self
            .before_start(pid)
            .inspect(|()| self.mark("cgroup2"))
            .and_then(|()| self.pass_gate(GATE_START))
            .inspect(|()| self.mark("gate2"))
            .and_then(|()| container.start().map_err(SandboxError::from));
        if let Err(e) = r {
            let _ = container.delete(true);
            let _ = waitpid(pid, None);
            return Err(e);
        }
        for fd in [&out_r, &err_r] {
            set_nonblock(fd.as_raw_fd());
        }
        self.status.state = State::Running;
        self.status.pid = Some(pid.as_raw());
        self.status.pid_start_time = proc::start_time(pid.as_raw());
        self.status.exit_code = None;
        self.status.oom_killed = false;
        self.status.error = None;
        self.status.started_at = Some(now_ms());
        self.status.finished_at = None;
        self.mark("start");
        self.status.start_steps = self.steps.take().map(|t| t.to_string());
        self.save();
        Ok(Run {
            pid,
            started: Instant::now(),
            out: Some(out_r),
            err: Some(err_r),
        })
    }

    /// Between create and start: join our cgroup2 leaf and bring up `lo`.
    fn before_start(&self, pid: Pid) -> Result<(), SandboxError> {
        if let Some(u) = cgroup::unified_dir(&self.spec) {
            fs::create_dir_all(&u)
                .map_err(|e| SandboxError::io(format!("mkdir {}", u.display()), e))?;
            fs::write(u.join("cgroup.procs"), pid.to_string())
                .map_err(|e| SandboxError::io(format!("join {}", u.display()), e))?;
        }
        if self.spec.netns.is_none() {
            loopback_up(pid)?;
        }
        Ok(())
    }

    /// Copies output to the logs until the init exited and the pipes are drained.
    /// Returns the exit code (128+signal for a signal).
    fn pump(&mut self, run: &mut Run) -> i32 {
        let mut exit: Option<(i32, Instant)> = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut fds = vec![self.sig_r.as_raw_fd()];
            fds.extend(run.out.as_ref().map(|f| f.as_raw_fd()));
            fds.extend(run.err.as_ref().map(|f| f.as_raw_fd()));
            // No timeout while the sandbox just runs: SIGCHLD and SIGTERM reach `sig_r`, so
            // an idle supervisor never wakes (a 1 s tick cost a node of 500 sandboxes 500
            // wakeups a second).
            let mut timeout: Option<i32> = None;
            if let Some(d) = self.stopping {
                timeout = Some(d.saturating_duration_since(Instant::now()).as_millis() as i32);
            }
            if exit.is_some() {
                timeout = Some(timeout.map_or(DRAIN_POLL_MS, |t| t.min(DRAIN_POLL_MS)));
            }
            let _ = poll_fds(&fds, timeout.map_or(-1, |t| t.max(0)));
            self.handle_signals(Some(run.pid));

            for (fd, log) in [
                (&mut run.out, &mut self.stdout),
                (&mut run.err, &mut self.stderr),
            ] {
                // Read until EAGAIN so we never miss data between polls.
                while let Some(f) = fd.as_ref() {
                    match nix::unistd::read(f, &mut buf) {
                        Ok(0) => *fd = None,
                        Ok(n) => {
                            if let Err(e) = log.write(&buf[..n]) {
                                eprintln!("log write: {e}");
                            }
                        }
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(_) => break,
                    }
                }
            }

            // Reap everything (we are a subreaper); remember only our init.
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(p, c)) if p == run.pid => {
                        exit = Some((c, Instant::now()))
                    }
                    Ok(WaitStatus::Signaled(p, s, _)) if p == run.pid => {
                        exit = Some((128 + s as i32, Instant::now()))
                    }
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            }

            if exit.is_none() {
                if let Some(d) = self.stopping {
                    if Instant::now() >= d {
                        let _ = kill(run.pid, Signal::SIGKILL);
                        cgroup::kill_all(&self.spec, Duration::ZERO);
                    }
                }
            }
            if let Some((code, at)) = exit {
                if (run.out.is_none() && run.err.is_none()) || at.elapsed() >= DRAIN {
                    return code;
                }
            }
        }
    }

    /// Drains the self-pipe; on SIGTERM/SIGINT starts the stop sequence.
    fn handle_signals(&mut self, init: Option<Pid>) {
        let mut b = [0u8; 32];
        while let Ok(n) = nix::unistd::read(&self.sig_r, &mut b) {
            if n == 0 {
                break;
            }
            for &s in &b[..n] {
                let s = s as i32;
                if (s == libc::SIGTERM || s == libc::SIGINT) && self.stopping.is_none() {
                    let grace = fs::read(self.dir.join(STOP_FILE))
                        .ok()
                        .and_then(|d| serde_json::from_slice::<StopRequest>(&d).ok())
                        .map_or(self.spec.stop_grace_ms, |r| r.grace_ms);
                    self.stopping = Some(Instant::now() + Duration::from_millis(grace));
                    if let Some(p) = init {
                        let _ = kill(
                            p,
                            if grace == 0 {
                                Signal::SIGKILL
                            } else {
                                Signal::SIGTERM
                            },
                        );
                    }
                }
            }
        }
    }

    /// Last step whatever happened: no processes, cgroups or mounts left behind.
    /// The upper dir (container writes) and logs stay until `delete`.
    fn teardown(&mut self) {
        super::control::forget_container(&self.dir, &self.spec);
        if let Err(e) = cgroup::remove_all(&self.spec) {
            eprintln!("remove cgroups: {e}");
        }
        // Reap whatever the kill produced.
        while let Ok(ws) = waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            if ws == WaitStatus::StillAlive {
                break;
            }
        }
        let rootfs = self.dir.join(ROOTFS_DIR);
        mountns::detach_sysfs(&rootfs.join("sys"));
        if is_mounted(&rootfs) {
            if let Err(e) = unmount(&rootfs) {
                eprintln!("{e}");
            }
        }
        if let Err(e) = layer::unmount_layer(&self.dir) {
            eprintln!("{e}");
        }
        if let Some(dir) = self.spare_dir.take() {
            layer::remove_spare_dirs(&dir);
        }
        let _ = fs::remove_file(self.dir.join(PID_FILE));
        if matches!(
            self.status.state,
            State::Creating | State::Running | State::Restarting
        ) {
            self.status.state = State::Exited;
        }
        self.save();
    }
}

/// New session (no controlling terminal, not in the agent's process group), no inherited
/// pipes (a dead agent must not SIGPIPE us), cwd `/`, child subreaper, clean signal mask.
fn detach_and_redirect(dir: &Path) -> Result<(), SandboxError> {
    let _ = nix::unistd::setsid(); // EPERM only if already a group leader
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| SandboxError::io("open /dev/null", e))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(SUPERVISOR_LOG))
        .map_err(|e| SandboxError::io("open supervisor.log", e))?;
    // SAFETY: dup2 onto the standard descriptors; both sources are open files.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(null.as_raw_fd(), 1);
        libc::dup2(log.as_raw_fd(), 2);
    }
    let _ = std::env::set_current_dir("/");
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(SandboxError::io(
            "PR_SET_CHILD_SUBREAPER",
            std::io::Error::last_os_error(),
        ));
    }
    // The mask is inherited by the container: it must be empty.
    signal::sigprocmask(
        signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    )
    .map_err(|e| SandboxError::sys("sigprocmask", e))?;
    Ok(())
}

/// Handlers (not SIG_IGN) so exec in the container resets them to the default; this
/// also covers SIGPIPE, which Rust ignores and which would otherwise leak.
fn install_signal_handlers() -> Result<(), SandboxError> {
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGCHLD,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: the handler only calls write(2).
        unsafe { signal::sigaction(s, &act) }.map_err(|e| SandboxError::sys("sigaction", e))?;
    }
    Ok(())
}

fn set_nonblock(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// poll(2) for readability; returns the number of ready descriptors.
pub(crate) fn poll_fds(fds: &[RawFd], timeout_ms: i32) -> i32 {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of pollfd of the given length.
    unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) }
}

/// Sets IFF_UP on `lo` inside the container's fresh network namespace.
fn loopback_up(pid: Pid) -> Result<(), SandboxError> {
    use nix::sched::{setns, CloneFlags};
    let io = |c: &str, e| SandboxError::io(c.to_string(), e);
    let own = File::open("/proc/self/ns/net").map_err(|e| io("open own netns", e))?;
    let target =
        File::open(format!("/proc/{pid}/ns/net")).map_err(|e| io("open container netns", e))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| SandboxError::sys("setns", e))?;
    let r = set_lo_up();
    setns(&own, CloneFlags::CLONE_NEWNET).map_err(|e| SandboxError::sys("setns back", e))?;
    r
}

fn set_lo_up() -> Result<(), SandboxError> {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq naming "lo".
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(SandboxError::io("socket", std::io::Error::last_os_error()));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut ifr);
        if r == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = std::io::Error::last_os_error();
        libc::close(s);
        if r != 0 {
            return Err(SandboxError::io("bring up lo", err));
        }
    }
    Ok(())
}
