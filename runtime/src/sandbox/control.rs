//! Agent-side helpers: everything works from the state dir alone and is idempotent.

use std::fs::{self, File};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::status::{read_status, write_replace, write_status};
use super::supervisor::StopRequest;
use super::{cgroup, read_spec, SandboxError, SandboxSpec, State, Status};
use super::{PID_FILE, ROOTFS_DIR, SPEC_FILE, STOP_FILE, YOUKI_DIR};
use miren_sys::proc;

/// Validates `spec` and writes it to `<state_dir>/spec.json` (creating the dir). Not forced
/// to disk: a sandbox does not outlive a host crash (nothing restarts a supervisor), and a
/// state dir whose spec was lost is still deleted whole.
pub fn create(state_dir: &Path, spec: &SandboxSpec) -> Result<(), SandboxError> {
    spec.validate()?;
    fs::create_dir_all(state_dir)
        .map_err(|e| SandboxError::io(format!("mkdir {}", state_dir.display()), e))?;
    let json = serde_json::to_vec_pretty(spec)
        .map_err(|e| SandboxError::InvalidSpec(format!("serialize: {e}")))?;
    write_replace(&state_dir.join(SPEC_FILE), &json)
}

/// Runs the supervisor command (e.g. `miren supervise --state-dir DIR`) and waits for
/// its launcher half, which exits once the container runs or failed to start. The
/// supervisor itself keeps running detached. Blocking: call from a blocking context.
pub fn launch(cmd: Command, state_dir: &Path) -> Result<Status, SandboxError> {
    spawn(cmd, state_dir)?.open_gate()
}

/// Starts the supervisor command without waiting for it. With `start_gate` in the spec, the
/// supervisor prepares the sandbox meanwhile, creates the container only after
/// [`Launch::allow_create`] and starts its process only after [`Launch::open_gate`];
/// [`Launch::cancel`] makes it fail and clean up instead.
pub fn spawn(cmd: Command, state_dir: &Path) -> Result<Launch, SandboxError> {
    let mut child = spawn_gated(cmd, "spawn supervisor")?;
    Ok(Launch {
        gate: child.stdin.take().map(|s| File::from(OwnedFd::from(s))),
        process: Process::Exec(child),
        create_allowed: false,
        state_dir: state_dir.to_path_buf(),
    })
}

/// Starts a spare supervisor (e.g. `miren supervise --sandboxes-dir ROOT`, see
/// [`super::supervise_spare`]): exec'd and waiting, so a later start skips that part.
/// It exits when dropped unused (its stdin closes).
pub fn spawn_spare(cmd: Command) -> Result<Spare, SandboxError> {
    let mut child = spawn_gated(cmd, "spawn a spare supervisor")?;
    let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
    Ok(Spare {
        process: Process::Exec(child),
        stdin,
    })
}

/// A supervisor launcher's process: exec'd by us (our child), or forked by the spare factory
/// (`factory.rs`), which tells its end through a pidfd and its outcome on a pipe.
enum Process {
    Exec(std::process::Child),
    Forked { pidfd: OwnedFd, result: File },
}

impl Process {
    fn is_running(&mut self) -> bool {
        match self {
            Process::Exec(child) => matches!(child.try_wait(), Ok(None)),
            Process::Forked { pidfd, .. } => !exited(pidfd, 0),
        }
    }

    /// Waits for it to exit: `None` when it launched its sandbox (the container runs), else
    /// how it ended.
    fn wait(&mut self) -> Result<Option<String>, SandboxError> {
        match self {
            Process::Exec(child) => child
                .wait()
                .map(|st| (!st.success()).then(|| format!("supervisor launcher {st}")))
                .map_err(|e| SandboxError::io("wait for the supervisor launcher", e)),
            Process::Forked { pidfd, result } => {
                let mut outcome = [0u8; 1];
                // One byte, or end of file if it died first.
                let read = loop {
                    match std::io::Read::read(result, &mut outcome) {
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        other => break other,
                    }
                };
                exited(pidfd, -1);
                Ok(match read {
                    Ok(1) if outcome[0] == super::factory::LAUNCHED => None,
                    Ok(1) => Some("the supervisor launcher failed".to_string()),
                    _ => Some("the supervisor launcher ended without a result".to_string()),
                })
            }
        }
    }
}

/// Whether the process behind `pidfd` has exited, waiting up to `timeout_ms` (-1: until it
/// does).
fn exited(pidfd: &OwnedFd, timeout_ms: i32) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::NONE);
    loop {
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(n) => return n > 0,
            Err(_) => return true,
        }
    }
}

/// A supervisor process whose stdin is a pipe from us (the gate), its stdout and stderr
/// `/dev/null` (it logs to its state dir).
fn spawn_gated(mut cmd: Command, what: &str) -> Result<std::process::Child, SandboxError> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| SandboxError::io(what, e))
}

/// A supervisor started by [`spawn_spare`], not yet given a sandbox.
pub struct Spare {
    process: Process,
    stdin: Option<File>,
}

impl Spare {
    /// A spare the factory forked: `gate` is its stdin, `result` its launcher's outcome.
    pub(crate) fn forked(pidfd: OwnedFd, gate: File, result: File) -> Spare {
        Spare {
            process: Process::Forked { pidfd, result },
            stdin: Some(gate),
        }
    }

    /// Hands it the sandbox whose state dir is `state_dir` (a child of the spare's
    /// sandboxes dir, spec already written by [`create`]). Gives the spare back when it is
    /// gone, so the caller can [`spawn`] one instead.
    pub fn assign(mut self, state_dir: &Path) -> Result<Launch, Spare> {
        let Some(id) = state_dir.file_name().and_then(|n| n.to_str()) else {
            return Err(self);
        };
        if !self.process.is_running() {
            return Err(self);
        }
        let Some(mut stdin) = self.stdin.take() else {
            return Err(self);
        };
        // With the moment it was handed over, so the spare can tell how long the start
        // waited for it (its writable layer still being made, say).
        let line = format!("{id} {}\n", miren_sys::timeline::monotonic_ns());
        if std::io::Write::write_all(&mut stdin, line.as_bytes()).is_err() {
            return Err(self);
        }
        Ok(Launch {
            process: self.process,
            gate: Some(stdin),
            create_allowed: false,
            state_dir: state_dir.to_path_buf(),
        })
    }

    /// Tells it to exit, and reaps it.
    pub fn retire(mut self) {
        self.stdin = None;
        let _ = self.process.wait();
    }
}

/// A supervisor launcher started by [`spawn`] or [`Spare::assign`].
pub struct Launch {
    process: Process,
    gate: Option<File>,
    create_allowed: bool,
    state_dir: std::path::PathBuf,
}

impl Launch {
    /// Lets a gated supervisor create the container (its network namespace exists), but
    /// not start its process yet. `sysfs`: where the supervisor can clone a detached sysfs
    /// made in that namespace (`/proc/PID/fd/N`, valid until the start is over), to be the
    /// container's `/sys`; without it the supervisor makes one. Does not block.
    pub fn allow_create(&mut self, sysfs: Option<&Path>) {
        if let (Some(gate), false) = (self.gate.as_mut(), self.create_allowed) {
            let message = match sysfs.map(|p| p.as_os_str().as_bytes()) {
                Some(path) if !path.contains(&b'\n') => {
                    [&[super::supervisor::GATE_CREATE_WITH_SYSFS], path, b"\n"].concat()
                }
                _ => vec![super::supervisor::GATE_CREATE],
            };
            // A broken pipe means the supervisor is gone already: `wait` reports it.
            let _ = std::io::Write::write_all(gate, &message);
        }
        self.create_allowed = true;
    }

    /// Lets a gated supervisor create and start the container, then waits as [`launch`]
    /// does.
    pub fn open_gate(mut self) -> Result<Status, SandboxError> {
        self.allow_create(None);
        if let Some(mut gate) = self.gate.take() {
            let _ = std::io::Write::write_all(&mut gate, &[super::supervisor::GATE_START]);
        }
        self.wait()
    }

    /// Tells a gated supervisor not to start, and waits for it to give up.
    pub fn cancel(mut self) {
        self.gate = None;
        let _ = self.wait();
    }

    fn wait(mut self) -> Result<Status, SandboxError> {
        self.gate = None;
        let failed = self.process.wait()?;
        let status = status(&self.state_dir);
        if let Some(ended) = failed {
            let why = status.ok().and_then(|s| s.error).unwrap_or(ended);
            return Err(SandboxError::StartFailed(why));
        }
        status
    }
}

/// The last recorded status, with `supervisor_alive` checked against /proc.
pub fn status(state_dir: &Path) -> Result<Status, SandboxError> {
    let mut s = read_status(state_dir)?
        .ok_or_else(|| SandboxError::NoStatus(state_dir.display().to_string()))?;
    s.supervisor_alive = proc::is_same_process(s.supervisor_pid, s.supervisor_start_time);
    Ok(s)
}

/// Inotify instances kept for reuse: closing one waits for an SRCU grace period in the
/// kernel (fsnotify group teardown, ~10 ms here), removing a watch does not.
static INOTIFY_POOL: std::sync::Mutex<Vec<nix::sys::inotify::Inotify>> =
    std::sync::Mutex::new(Vec::new());

/// Waits until the sandbox is over: its supervisor recorded the end (`exited` or `failed`,
/// no restart to come) or is gone. Woken by the supervisor's status writes (inotify on the
/// state dir), so it returns as soon as the end is on record. [`SandboxError::Timeout`]
/// after `timeout`.
pub fn wait(state_dir: &Path, timeout: Option<Duration>) -> Result<Status, SandboxError> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let pooled = INOTIFY_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let inotify = match pooled {
        Some(i) => i,
        None => Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map_err(|e| SandboxError::sys("inotify_init", e))?,
    };
    // Watch before the first look, so no write between the two is missed.
    let watch = inotify
        .add_watch(
            state_dir,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_DELETE_SELF,
        )
        .map_err(|e| SandboxError::sys(format!("watch {}", state_dir.display()), e));
    let result = match watch {
        Ok(wd) => {
            let result = wait_watched(state_dir, timeout, &inotify);
            let _ = inotify.rm_watch(wd); // fails if the dir went, which removed it already
            result
        }
        Err(e) => Err(e),
    };
    let mut pool = INOTIFY_POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < 16 {
        pool.push(inotify);
    }
    result
}

fn wait_watched(
    state_dir: &Path,
    timeout: Option<Duration>,
    inotify: &nix::sys::inotify::Inotify,
) -> Result<Status, SandboxError> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let st = status(state_dir)?;
        if matches!(st.state, State::Exited | State::Failed) || !st.supervisor_alive {
            return Ok(st);
        }
        let mut wait_ms = 200; // also notices a supervisor that died without a word
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SandboxError::Timeout(format!(
                    "the sandbox is still {:?} after {:?}",
                    st.state,
                    timeout.unwrap_or_default()
                )));
            }
            wait_ms = wait_ms.min(left.as_millis().max(1) as u16);
        }
        let mut fds = [nix::poll::PollFd::new(
            inotify.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(wait_ms));
        // Any event (also a stale one of an earlier user of this instance) means: look again.
        while inotify.read_events().is_ok_and(|events| !events.is_empty()) {}
    }
}

/// For a sandbox whose supervisor is gone without having recorded an end (the host restarted,
/// or it was killed): true if its restart policy asks for another run (`always`, or
/// `on-failure`: an end nobody recorded is a failure). A recorded end, `stop` included, is
/// final.
pub fn needs_relaunch(state_dir: &Path) -> bool {
    let Ok(st) = status(state_dir) else {
        return false;
    };
    if st.supervisor_alive || matches!(st.state, State::Exited | State::Failed) {
        return false;
    }
    read_spec(state_dir).is_ok_and(|spec| !matches!(spec.restart, super::RestartPolicy::No))
}

/// Starts a sandbox of [`needs_relaunch`] again with the supervisor command `cmd`: what the
/// old run left (processes, libcontainer state, cgroups, the overlay mount) goes first; its
/// logs and writable layer stay. Opens a start gate at once: the caller has the sandbox's
/// network namespace and disks in place. Blocking.
pub fn relaunch(cmd: Command, state_dir: &Path) -> Result<Status, SandboxError> {
    cleanup_without_supervisor(state_dir)?;
    launch(cmd, state_dir)
}

/// Asks the supervisor to stop: SIGTERM to the container, SIGKILL after `grace`, then it
/// deletes the container (cgroups, overlay mount) and exits. Waits for that. If the
/// supervisor is gone (or does not finish in time) the cleanup is done here.
pub fn stop(state_dir: &Path, grace: Duration) -> Result<Status, SandboxError> {
    let st = match status(state_dir) {
        Ok(s) => s,
        Err(SandboxError::NoStatus(_)) => {
            cleanup_without_supervisor(state_dir)?;
            return Err(SandboxError::NotRunning);
        }
        Err(e) => return Err(e),
    };
    if st.supervisor_alive {
        let req = serde_json::to_vec(&StopRequest {
            grace_ms: grace.as_millis() as u64,
        })
        .map_err(|e| SandboxError::InvalidSpec(e.to_string()))?;
        write_replace(&state_dir.join(STOP_FILE), &req)?;
        let _ = kill(Pid::from_raw(st.supervisor_pid), Signal::SIGTERM);
        let deadline = Instant::now() + grace + Duration::from_secs(10);
        while proc::is_same_process(st.supervisor_pid, st.supervisor_start_time) {
            if Instant::now() >= deadline {
                let _ = kill(Pid::from_raw(st.supervisor_pid), Signal::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    cleanup_without_supervisor(state_dir)?;
    let mut st = status(state_dir)?;
    if matches!(
        st.state,
        State::Creating | State::Running | State::Restarting
    ) {
        // The supervisor died before recording the end.
        st.state = State::Exited;
        st.error
            .get_or_insert_with(|| "supervisor gone; container killed".into());
        write_status(state_dir, &st)?;
    }
    Ok(st)
}

/// Stops (without grace) and removes everything: processes, cgroups, the overlay
/// mount and the state dir. Safe to repeat and after a SIGKILLed supervisor.
pub fn delete(state_dir: &Path) -> Result<(), SandboxError> {
    if !state_dir.exists() {
        return Ok(());
    }
    if let Ok(st) = status(state_dir) {
        if st.supervisor_alive && matches!(st.state, State::Exited | State::Failed) {
            // It recorded the end and is tearing down (cgroups, overlay): let it finish.
            let deadline = Instant::now() + Duration::from_secs(2);
            while proc::is_same_process(st.supervisor_pid, st.supervisor_start_time)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if proc::is_same_process(st.supervisor_pid, st.supervisor_start_time) {
            let _ = kill(Pid::from_raw(st.supervisor_pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while proc::is_same_process(st.supervisor_pid, st.supervisor_start_time)
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    cleanup_without_supervisor(state_dir)?;
    // Before the state dir: a failure leaves the sandbox there for a retry to find.
    super::layer::remove_own_subvolume(state_dir)?;
    fs::remove_dir_all(state_dir)
        .map_err(|e| SandboxError::io(format!("remove {}", state_dir.display()), e))
}

/// What the supervisor's teardown does, for when it cannot: kill by cgroup (and the
/// recorded init pid), drop libcontainer state, remove cgroups, unmount the rootfs.
fn cleanup_without_supervisor(state_dir: &Path) -> Result<(), SandboxError> {
    if let Ok(Some(st)) = read_status(state_dir) {
        if proc::is_same_process(st.supervisor_pid, st.supervisor_start_time) {
            // Still running (e.g. refused to die within the deadline): leave it alone.
            return Err(SandboxError::Timeout("supervisor still running".into()));
        }
        if let (Some(p), Some(t)) = (st.pid, st.pid_start_time) {
            if proc::is_same_process(p, t) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
    }
    if let Ok(spec) = read_spec(state_dir) {
        forget_container(state_dir, &spec);
        cgroup::remove_all(&spec).map_err(|e| SandboxError::io("remove cgroups", e))?;
    }
    let rootfs = state_dir.join(ROOTFS_DIR);
    if is_mounted(&rootfs) {
        unmount(&rootfs)?;
    }
    super::layer::unmount_layer(state_dir)?;
    let _ = fs::remove_file(state_dir.join(PID_FILE));
    Ok(())
}

/// Drops libcontainer's state of a container that is not running (or is being torn
/// down): every process in its cgroups killed, its state dir removed. Never through
/// `Container::delete`: that signals the pid recorded in the container's state.json after
/// checking only that some process has it, and pids wrap (at 32768 on this machine; after a
/// host restart or a supervisor's crash the recorded pid may belong to any process, another
/// agent's included). Our cgroups know exactly which processes are the container's.
pub(crate) fn forget_container(state_dir: &Path, spec: &SandboxSpec) {
    cgroup::kill_all(spec, Duration::from_secs(5));
    let cdir = state_dir.join(YOUKI_DIR).join(&spec.id);
    if cdir.exists() {
        let _ = fs::remove_dir_all(&cdir);
    }
}

/// True if `path` is a mount point in our mount namespace; a path that cannot be resolved or
/// read counts as not mounted. Asks the kernel about the path itself (`statx`'s
/// `STATX_ATTR_MOUNT_ROOT`): reading /proc/self/mountinfo costs a line per mount on the host,
/// several per sandbox, and was a start's cost growing with the number of sandboxes.
pub(crate) fn is_mounted(path: &Path) -> bool {
    match mount_root_attr(path) {
        Some(is_root) => is_root,
        None => miren_sys::mountinfo::is_mount_point(path).unwrap_or(false),
    }
}

/// `Some(is a mount's root)` from `statx`, `None` when the kernel does not report it (< 5.8).
fn mount_root_attr(path: &Path) -> Option<bool> {
    use std::os::unix::ffi::OsStrExt;
    const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `stx` is a writable statx
    // buffer the kernel fills; no other memory is touched.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            0, // follow symlinks, as the mountinfo comparison did
            0,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Some(false);
    }
    // SAFETY: statx succeeded, so the kernel initialized the buffer (zeroed before anyway).
    let stx = unsafe { stx.assume_init() };
    (stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT != 0)
        .then_some(stx.stx_attributes & STATX_ATTR_MOUNT_ROOT != 0)
}

/// Unmounts `path` (all stacked mounts); lazily if it is still busy: the sandbox's processes are
/// already gone or going, and its state directory must be removable now.
pub(crate) fn unmount(path: &Path) -> Result<(), SandboxError> {
    use miren_sys::unmount::{unmount, Unmounted, WhenBusy};
    let fail = |e| SandboxError::sys(format!("umount {}", path.display()), e);
    while is_mounted(path) {
        match unmount(path, WhenBusy::Detach) {
            Ok(Unmounted::Removed) => {}
            // mountinfo lists it but the kernel says it is not a mount point here: stop rather
            // than spin (the old loop failed with the same EINVAL).
            Ok(Unmounted::NotMounted) => return Err(fail(nix::errno::Errno::EINVAL)),
            Err(e) => {
                return Err(fail(nix::errno::Errno::from_raw(
                    e.raw_os_error().unwrap_or(libc::EIO),
                )))
            }
        }
    }
    Ok(())
}
