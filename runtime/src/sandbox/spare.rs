//! Spare supervisors: exec'd ahead of need, each makes a writable layer of the default size
//! while it waits, then takes a sandbox id on stdin and goes on as a supervisor.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::layer::{SpareLayer, LAYER_DIR};
use super::mountns::{self, Keep};
use super::supervisor::supervise_with;
use super::SandboxError;

/// The nice value a spare makes its writable layer at (the mkfs it runs inherits it).
const SPARE_LAYER_NICE: i32 = 10;

/// Sets this (single-threaded) process's nice value; whether it took.
fn set_nice(nice: i32) -> bool {
    // SAFETY: setpriority only reads its integer arguments; `who` 0 is the calling thread,
    // which is the whole process here.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0 }
}

/// Entry point of `miren supervise --sandboxes-dir ROOT`: a spare supervisor, started
/// ahead of need so a sandbox start does not wait for an exec. It reads one line from
/// stdin, the id of the sandbox to supervise (its state dir is `ROOT/ID`, spec written),
/// (and the `CLOCK_MONOTONIC` nanoseconds at which it was handed over, after a space),
/// then goes on as [`supervise`] (stdin stays the start gate). `Ok(false)` when stdin
/// closed first: the agent is gone or no longer needs this spare.
/// `mount_template`: a [`super::MountTemplate`]'s path, the namespace the spare copies its
/// own from (the host's when it is `None` or cannot be joined).
pub fn supervise_spare(
    sandboxes_dir: &Path,
    private_mounts: &[PathBuf],
    mount_template: Option<&Path>,
) -> Result<bool, SandboxError> {
    // Made while nobody waits for this spare; see `SpareLayer`. At a low priority: the spare
    // is exec'd right after a start, and its mkfs must not take the CPU from that sandbox's
    // first milliseconds (this host has two cores).
    let lowered = set_nice(SPARE_LAYER_NICE);
    let spare_layer = SpareLayer::make(sandboxes_dir, super::DEFAULT_WRITABLE_BYTES);
    // A sandbox must never inherit the low priority: without a way back (no CAP_SYS_NICE),
    // this spare retires and the agent starts a fresh supervisor.
    let restored = !lowered || set_nice(0);
    // The mount namespace too (see `mountns::Prepared`), at the normal priority: the copy
    // of the host's table holds the kernel's global mount lock, which a start's mounts wait
    // for; at a low priority it stayed held while the start ran (bench/density, one run:
    // libcontainer's create grew 10.8 -> 19.7 ms over 500 sandboxes, 9.6 -> 13.6 at nice 0).
    let prepared = if !restored || private_mounts.is_empty() {
        Ok(None)
    } else {
        let keep: Vec<Keep> = spare_layer
            .iter()
            .map(|l| Keep {
                source: l.dir().join(LAYER_DIR),
                target: l.dir().join(LAYER_DIR),
                take: true,
            })
            .collect();
        mountns::prepare(private_mounts, &keep, mount_template)
    };
    let prepared = match prepared {
        Ok(p) if restored => p,
        // Nor may it use a namespace half made.
        other => {
            if let Err(e) = other {
                eprintln!("spare supervisor: {e}");
            }
            if let Some(l) = spare_layer {
                l.discard();
            }
            return Ok(false);
        }
    };
    let id = read_assigned_id();
    let (id, waited) = match id {
        Ok(Some(assigned)) => assigned,
        other => {
            if let Some(l) = spare_layer {
                l.discard();
            }
            return other.map(|_| false);
        }
    };
    supervise_with(&sandboxes_dir.join(id), spare_layer, prepared, waited).map(|()| true)
}

/// The sandbox id a spare is given on stdin and how long ago it was given; None at EOF.
fn read_assigned_id() -> Result<Option<(String, Option<Duration>)>, SandboxError> {
    use std::os::fd::AsFd;
    let mut id = Vec::new();
    let stdin = std::io::stdin();
    let mut b = [0u8; 1];
    // Unbuffered, byte by byte: the gate steps that follow the line must stay in the pipe.
    loop {
        match nix::unistd::read(stdin.as_fd(), &mut b) {
            Ok(0) => return Ok(None),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if id.len() < 255 => id.push(b[0]),
            Ok(_) => return Err(SandboxError::InvalidSpec("sandbox id too long".into())),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(SandboxError::sys("read the sandbox id", e)),
        }
    }
    let line = String::from_utf8(id).unwrap_or_default();
    let (id, at) = line.split_once(' ').unwrap_or((line.as_str(), ""));
    let waited = at
        .parse::<u64>()
        .ok()
        .map(|at| Duration::from_nanos(miren_sys::timeline::monotonic_ns().saturating_sub(at)));
    if id.is_empty() || id.contains('/') || id == "." || id == ".." {
        return Err(SandboxError::InvalidSpec(
            "a spare supervisor got a bad sandbox id".into(),
        ));
    }
    Ok(Some((id.to_string(), waited)))
}
