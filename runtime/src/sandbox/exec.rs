//! Running a command inside a running sandbox (its namespaces, cgroups, seccomp, caps).

use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use libcgroups::common::CgroupConfig;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::error::LibcontainerError;
use libcontainer::notify_socket::{NotifyListener, NotifySocket};
use libcontainer::process::args::{ContainerArgs, ContainerType};
use libcontainer::process::container_main_process::container_main_process;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::user_ns::UserNamespaceConfig;
use libcontainer::utils::get_cgroup_path;
use libcontainer::workload::default::get_executor;
use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, Spec};

use super::supervisor::poll_fds;
use super::{cgroup, merge_env, read_spec, status, SandboxError, State, YOUKI_DIR};
use miren_sys::proc;

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
        && matches!((st.pid, st.pid_start_time), (Some(p), Some(t)) if proc::is_same_process(p, t));
    if !running {
        return Err(SandboxError::NotRunning);
    }
    if args.is_empty() {
        return Err(SandboxError::InvalidSpec("exec: empty args".into()));
    }
    let container = Container::load(state_dir.join(YOUKI_DIR).join(&spec.id))?;
    let init_pid = container
        .pid()
        .filter(|_| container.status() == ContainerStatus::Running)
        .ok_or(SandboxError::NotRunning)?
        .as_raw();
    let tenant = tenant_spec(&container, init_pid, args, env)?;

    // Join the hybrid cgroup2 leaf (ours, for cgroup.kill and the process list) before
    // forking, so the command is in it from its first instruction; libcontainer moves it
    // into the v1 hierarchies itself.
    if let Some(u) = cgroup::unified_dir(&spec) {
        fs::write(u.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| SandboxError::io(format!("join {}", u.display()), e))?;
    }
    let (out_r, out_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
    let (err_r, err_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
    let null = File::open("/dev/null").map_err(|e| SandboxError::io("open /dev/null", e))?;
    let pid = start_tenant(&container, tenant, [null.into(), out_w, err_w])?;
    collect(pid, out_r, err_r)
}

/// The command's OCI spec: the init's own spec (the bundle's `config.json`, the very
/// object the init was created from) with only the argv and env replaced and the
/// namespaces pointed at the init's. So the command gets exactly the init's seccomp
/// profile, capabilities (all five sets), no_new_privs, rlimits, user and groups.
///
/// libcontainer's `as_tenant()` builder cannot do this: it rebuilds `linux` from the
/// namespaces, cgroups path, personality and time offsets alone (dropping seccomp) and
/// the process from its own setters (dropping rlimits and the user, so root).
fn tenant_spec(
    container: &Container,
    init_pid: i32,
    args: &[String],
    env: &[String],
) -> Result<Spec, SandboxError> {
    let mut spec = Spec::load(container.bundle().join("config.json"))
        .map_err(|e| SandboxError::Corrupt(format!("bundle config.json: {e}")))?;
    spec.canonicalize_rootfs(container.bundle())
        .map_err(|e| SandboxError::Corrupt(format!("bundle rootfs: {e}")))?;
    let mut process = spec
        .process()
        .clone()
        .ok_or_else(|| SandboxError::Corrupt("bundle config.json has no process".into()))?;
    let base_env = process.env().clone().unwrap_or_default();
    process
        .set_args(Some(args.to_vec()))
        .set_env(Some(merge_env([base_env.as_slice(), env])))
        // As before: exec starts in `/`, not in the image's working directory.
        .set_cwd(PathBuf::from("/"))
        .set_terminal(Some(false));
    let mut linux = spec
        .linux()
        .clone()
        .ok_or_else(|| SandboxError::Corrupt("bundle config.json has no linux".into()))?;
    let joined = linux
        .namespaces()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|ns| {
            let path = PathBuf::from(format!("/proc/{}/ns/{}", init_pid, ns_proc_name(ns.typ())));
            LinuxNamespaceBuilder::default()
                .typ(ns.typ())
                .path(path)
                .build()
                .map_err(|e| SandboxError::InvalidSpec(format!("namespace: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Resources, masked/read-only paths and sysctls are the init's to set up; the command
    // only joins what they made.
    linux
        .set_namespaces(Some(joined))
        .set_resources(None)
        .set_masked_paths(None)
        .set_readonly_paths(None)
        .set_sysctl(None);
    spec.set_process(Some(process))
        .set_linux(Some(linux))
        .set_hooks(None)
        .set_mounts(None);
    Ok(spec)
}

/// The name of a namespace under `/proc/<pid>/ns/`.
fn ns_proc_name(typ: LinuxNamespaceType) -> &'static str {
    match typ {
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Time => "time",
    }
}

/// What `TenantContainerBuilder::build` does after it made its spec, with ours: clone the
/// process into the init's namespaces and cgroups, let it exec, and report its setup error.
fn start_tenant(
    container: &Container,
    spec: Spec,
    [stdin, stdout, stderr]: [OwnedFd; 3],
) -> Result<Pid, SandboxError> {
    let cdir = container.root.clone();
    // A name per helper process: execs of one sandbox may run side by side.
    let notify_path = cdir.join(format!("exec-notify-{}.sock", std::process::id()));
    let _ = fs::remove_file(&notify_path);
    let notify_listener = NotifyListener::new(&notify_path).map_err(LibcontainerError::from)?;
    let result = (|| {
        let linux = spec
            .linux()
            .as_ref()
            .ok_or_else(|| SandboxError::Corrupt("no linux".into()))?;
        let cgroup_config = CgroupConfig {
            cgroup_path: get_cgroup_path(linux.cgroups_path(), container.id()),
            systemd_cgroup: container.systemd(),
            container_name: container.id().to_string(),
        };
        let user_ns_config = UserNamespaceConfig::new(&spec).map_err(LibcontainerError::from)?;
        let rootfs = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| SandboxError::Corrupt("no root".into()))?;
        let (notify_r, notify_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| SandboxError::sys("pipe", e))?;
        // Non-dumpable before joining: processes in the sandbox must not ptrace or read
        // this helper's memory while it sits in their namespaces.
        nix::sys::prctl::set_dumpable(false).map_err(|e| SandboxError::sys("set_dumpable", e))?;
        let args = ContainerArgs {
            container_type: ContainerType::TenantContainer {
                exec_notify_fd: notify_w.as_raw_fd(),
            },
            syscall: SyscallType::default(),
            spec: Rc::new(spec.clone()),
            rootfs,
            console_socket: None,
            notify_listener,
            preserve_fds: 0,
            // Its state is what the seccomp listener metadata is built from.
            container: Some(container.clone()),
            user_ns_config,
            cgroup_config,
            detached: true,
            executor: get_executor(),
            no_pivot: false,
            stdin: Some(stdin.as_raw_fd()),
            stdout: Some(stdout.as_raw_fd()),
            stderr: Some(stderr.as_raw_fd()),
            as_sibling: false,
            pid_file: None,
        };
        let pid = container_main_process(&args).map_err(LibcontainerError::MainProcess)?;
        drop(args);
        drop((stdin, stdout, stderr));
        NotifySocket::new(notify_path.clone())
            .notify_container_start()
            .map_err(LibcontainerError::from)?;
        drop(notify_w);
        // The command's setup writes its error here; EOF alone means it exec'd.
        let mut failure = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match nix::unistd::read(&notify_r, &mut buf) {
                Ok(0) => break,
                Ok(n) => failure.extend_from_slice(&buf[..n]),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(SandboxError::sys("read exec notify", e)),
            }
        }
        if !failure.is_empty() {
            let _ = waitpid(Pid::from_raw(pid.as_raw()), None);
            return Err(SandboxError::StartFailed(
                String::from_utf8_lossy(&failure).into_owned(),
            ));
        }
        Ok(Pid::from_raw(pid.as_raw()))
    })();
    let _ = fs::remove_file(&notify_path);
    result
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
