//! Running a command inside a running sandbox (its namespaces, cgroups, seccomp, caps).

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::status::same_process;
use super::supervisor::poll_fds;
use super::{cgroup, read_spec, status, SandboxError, State, YOUKI_DIR};

/// How long to keep reading after the command exited (its children may hold the pipes).
const DRAIN: Duration = Duration::from_secs(2);

/// Bytes of each stream an exec keeps; the rest is read and dropped, so a command printing
/// without end costs no memory. One byte more than this tells a caller the output was cut.
pub const EXEC_OUTPUT_LIMIT: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// 128+signal for a signal death.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `args` in the running sandbox and collects its exit code and output (in
/// memory, at most [`EXEC_OUTPUT_LIMIT`] + 1 bytes of each stream: meant for short commands). `env` entries (`K=V`) override the sandbox's.
///
/// Like [`super::supervise`], call it from a single-threaded process (e.g. a hidden
/// `miren exec-helper` subcommand), never from the agent's tokio runtime: libcontainer
/// clones with clone3, and the command becomes the caller's child, reaped here.
pub fn exec(state_dir: &Path, args: &[String], env: &[String]) -> Result<ExecOutput, SandboxError> {
    let spec = read_spec(state_dir)?;
    let st = status(state_dir)?;
    let running = st.state == State::Running
        && matches!((st.pid, st.pid_start_time), (Some(p), Some(t)) if same_process(p, t));
    if !running {
        return Err(SandboxError::NotRunning);
    }
    if args.is_empty() {
        return Err(SandboxError::InvalidSpec("exec: empty args".into()));
    }
    let env: HashMap<String, String> = env
        .iter()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (out_r, out_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
    let null = File::open("/dev/null").map_err(|e| SandboxError::io("open /dev/null", e))?;
    let pid = ContainerBuilder::new(spec.id.clone(), SyscallType::default())
        .with_root_path(state_dir.join(YOUKI_DIR))?
        .with_stdin(null)
        .with_stdout(out_w)
        .with_stderr(err_w)
        .as_tenant()
        .with_container_args(args.to_vec())
        .with_env(env)
        .with_detach(true)
        .build()?;
    let pid = Pid::from_raw(pid.as_raw());
    // libcontainer joins the v1 cgroups; add the hybrid cgroup2 leaf we kill by.
    if let Some(u) = cgroup::unified_dir(&spec) {
        let _ = fs::write(u.join("cgroup.procs"), pid.to_string());
    }
    collect(pid, out_r, err_r)
}

fn collect(pid: Pid, out_r: OwnedFd, err_r: OwnedFd) -> Result<ExecOutput, SandboxError> {
    let mut fds = [Some(out_r), Some(err_r)];
    let mut bufs = [Vec::new(), Vec::new()];
    let mut exit: Option<(i32, Instant)> = None;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let raw: Vec<_> = fds.iter().flatten().map(|f| f.as_raw_fd()).collect();
        if !raw.is_empty() {
            poll_fds(&raw, if exit.is_some() { 50 } else { 100 });
        }
        for (fd, buf) in fds.iter_mut().zip(bufs.iter_mut()) {
            let Some(f) = fd.as_ref() else { continue };
            // poll said readable (or hung up), so one read does not block.
            let mut p = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, zero timeout.
            if unsafe { libc::poll(&mut p, 1, 0) } <= 0 {
                continue;
            }
            match nix::unistd::read(f, &mut chunk) {
                Ok(0) => *fd = None,
                Ok(n) => {
                    let keep = n.min((EXEC_OUTPUT_LIMIT + 1).saturating_sub(buf.len()));
                    buf.extend_from_slice(&chunk[..keep]);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => *fd = None,
            }
        }
        if exit.is_none() {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, c)) => exit = Some((c, Instant::now())),
                Ok(WaitStatus::Signaled(_, s, _)) => exit = Some((128 + s as i32, Instant::now())),
                Ok(_) => {}
                Err(e) => return Err(SandboxError::sys("waitpid exec", e)),
            }
        }
        if let Some((code, at)) = exit {
            if fds.iter().all(Option::is_none) || at.elapsed() >= DRAIN {
                let [stdout, stderr] = bufs;
                return Ok(ExecOutput {
                    exit_code: code,
                    stdout,
                    stderr,
                });
            }
        }
    }
}
