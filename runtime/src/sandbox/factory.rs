//! The spare factory: one exec'd, single-threaded process that forks the agent's spare
//! supervisors, instead of the agent exec'ing the binary once for each.
//!
//! Why: an exec'd `miren` is a position-independent binary with about 65,000 relative
//! relocations. The dynamic loader writes them into `.data.rel.ro` and the GOT (1.1 MB), so
//! every exec'd supervisor had those pages as private copies: two thirds of its proportional
//! set size, and, on every start, 1.1 MB of fresh pages to fault in and the loader's work
//! beside the start (bench/density, docs/sandbox.md "Cost"). A fork of the factory shares
//! the factory's relocated pages (read-only after relocation, so never copied again) and
//! skips the exec and the loader altogether.
//!
//! Protocol, over a `SOCK_SEQPACKET` socket pair (the factory's stdin): the agent sends one
//! byte with two descriptors, the read end of the new spare's gate (its stdin) and the write
//! end of its result pipe (its stdout); the factory forks and answers with one byte and a
//! pidfd of the spare. The spare goes on as [`supervise_spare`]; once it has been given a
//! sandbox, its launcher writes `0` (the container runs) or `1` (it failed, the status says
//! why) to the result pipe before it exits. The factory exits when the agent's end closes
//! (the agent gone, killed or not); spares already forked go on.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{signal, SigHandler, Signal};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::{fork, ForkResult};

use super::control::Spare;
use super::spare::supervise_spare;
use super::SandboxError;

/// The byte a request and an answer carry (a message needs one).
const MESSAGE: &[u8] = b"s";
/// A launcher's result on its result pipe.
pub(crate) const LAUNCHED: u8 = b'0';
pub(crate) const LAUNCH_FAILED: u8 = b'1';

/// The agent's handle on a running factory.
pub struct SpareFactory {
    child: Child,
    socket: Option<OwnedFd>,
}

impl SpareFactory {
    /// Starts `cmd` (`miren supervise --factory --sandboxes-dir ROOT ...`, see [`run`]) with
    /// its end of a socket pair as stdin.
    pub fn start(mut cmd: Command) -> Result<SpareFactory, SandboxError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| SandboxError::sys("socketpair for the spare factory", e))?;
        let child = cmd
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| SandboxError::io("start the spare factory", e))?;
        Ok(SpareFactory {
            child,
            socket: Some(ours),
        })
    }

    /// The factory's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A new spare, forked by the factory. An error means the factory is gone or broken:
    /// drop it (and exec spares, or start another).
    pub fn spare(&self) -> Result<Spare, SandboxError> {
        let Some(socket) = &self.socket else {
            return Err(SandboxError::StartFailed(
                "the spare factory is closed".into(),
            ));
        };
        let (gate_r, gate_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::sys("pipe", e))?;
        let (result_r, result_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| SandboxError::sys("pipe", e))?;
        let fds = [gate_r.as_raw_fd(), result_w.as_raw_fd()];
        sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(MESSAGE)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| SandboxError::sys("ask the spare factory for a spare", e))?;
        // The spare holds its own copies now.
        drop((gate_r, result_w));
        let pidfds = received_fds(socket.as_fd(), 1)
            .map_err(|e| SandboxError::sys("the spare factory's answer", e))?;
        let pidfd = pidfds
            .and_then(|mut fds| fds.pop())
            .ok_or_else(|| SandboxError::StartFailed("the spare factory gave no spare".into()))?;
        Ok(Spare::forked(
            pidfd,
            File::from(gate_w),
            File::from(result_r),
        ))
    }
}

impl Drop for SpareFactory {
    /// Closes our end (the factory exits) and reaps it.
    fn drop(&mut self) {
        self.socket = None;
        let _ = self.child.wait();
    }
}

/// Receives one message on `socket`; its descriptors (`None` at end of file). More than
/// `max` descriptors, or a message cut short, is an error (those received are closed).
fn received_fds(socket: BorrowedFd<'_>, max: usize) -> nix::Result<Option<Vec<OwnedFd>>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = loop {
        match recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: descriptors the kernel just installed in this process for us; nobody
            // else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) || fds.len() > max {
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    if msg.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(fds))
}

/// Entry point of `miren supervise --factory --sandboxes-dir ROOT`: forks a spare (see
/// [`supervise_spare`], same arguments) for each request on stdin, until stdin closes. Call
/// it in a freshly exec'd, single-threaded process.
pub fn run(
    sandboxes_dir: &Path,
    private_mounts: &[PathBuf],
    mount_template: Option<&Path>,
) -> Result<(), SandboxError> {
    // Spares are reaped by the kernel as they exit (each resets this after the fork).
    // SAFETY: installs SIG_IGN, no handler code runs.
    unsafe { signal(Signal::SIGCHLD, SigHandler::SigIgn) }
        .map_err(|e| SandboxError::sys("ignore SIGCHLD", e))?;
    let socket = std::io::stdin();
    let socket = socket.as_fd();
    loop {
        let fds = match received_fds(socket, 2) {
            Ok(None) => return Ok(()), // the agent is gone
            Ok(Some(fds)) => fds,
            Err(e) => return Err(SandboxError::sys("read a spare request", e)),
        };
        let Ok([gate, result]) = <[OwnedFd; 2]>::try_from(fds) else {
            // Not a request we can serve: an answer without a spare, so the asker is not left
            // waiting.
            answer(socket, None)?;
            continue;
        };
        // SAFETY: this process is single-threaded (documented requirement).
        match unsafe { fork() }.map_err(|e| SandboxError::sys("fork a spare", e))? {
            ForkResult::Child => {
                let code = spare_child(gate, result, sandboxes_dir, private_mounts, mount_template);
                std::process::exit(code)
            }
            ForkResult::Parent { child } => {
                drop((gate, result));
                // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1;
                // the child cannot have been reaped yet (it is ours, and we have not waited).
                let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, child.as_raw(), 0) };
                if rc < 0 {
                    return Err(SandboxError::io(
                        "pidfd_open of a spare",
                        std::io::Error::last_os_error(),
                    ));
                }
                // SAFETY: a descriptor the kernel just returned, owned by nobody else.
                let pidfd = unsafe { OwnedFd::from_raw_fd(rc as RawFd) };
                answer(socket, Some(&pidfd))?;
            }
        }
    }
}

/// The factory's answer to a request: the new spare's pidfd, or none.
fn answer(socket: BorrowedFd<'_>, pidfd: Option<&OwnedFd>) -> Result<(), SandboxError> {
    let fds: Vec<RawFd> = pidfd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(MESSAGE)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(drop)
    .map_err(|e| SandboxError::sys("answer a spare request", e))
}

/// The forked spare: the gate on stdin, the result pipe on stdout (stderr stays the
/// factory's `/dev/null`), then a spare as an exec'd one is. Its exit code.
fn spare_child(
    gate: OwnedFd,
    result: OwnedFd,
    sandboxes_dir: &Path,
    private_mounts: &[PathBuf],
    mount_template: Option<&Path>,
) -> i32 {
    // SAFETY: restores the default disposition (its own children, mkfs say, are waited for).
    if unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) }.is_err() {
        return 1;
    }
    // SAFETY: dup2 onto the standard descriptors; both sources are open and ours. The
    // factory's socket on stdin is closed by it.
    let moved =
        unsafe { libc::dup2(gate.as_raw_fd(), 0) == 0 && libc::dup2(result.as_raw_fd(), 1) == 1 };
    if !moved {
        return 1;
    }
    drop((gate, result));
    let outcome = match supervise_spare(sandboxes_dir, private_mounts, mount_template) {
        Ok(false) => return 0, // never given a sandbox
        Ok(true) => LAUNCHED,
        Err(e) => {
            eprintln!("spare supervisor: {e}");
            LAUNCH_FAILED
        }
    };
    let _ = nix::unistd::write(std::io::stdout(), &[outcome]);
    i32::from(outcome != LAUNCHED)
}
