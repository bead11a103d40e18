//! The hidden commands the agent starts itself: a sandbox's supervisor, a command inside a
//! sandbox, and the freeze helper of a backup. Each runs single-threaded, with no runtime.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The supervisor must stay single-threaded (libcontainer clones with raw clone3 and its
/// container init is our child): no runtime, no threads, before this call.
pub(crate) fn supervise(
    state_dir: Option<&Path>,
    sandboxes_dir: Option<&Path>,
    private_mounts: &[PathBuf],
    mount_template: Option<&Path>,
    factory: bool,
) -> ExitCode {
    let supervised = match (state_dir, sandboxes_dir) {
        (Some(dir), _) => miren_runtime::sandbox::supervise(dir),
        (None, Some(root)) if factory => {
            miren_runtime::sandbox::run_spare_factory(root, private_mounts, mount_template)
        }
        (None, Some(root)) => {
            miren_runtime::sandbox::supervise_spare(root, private_mounts, mount_template).map(drop)
        }
        (None, None) => Ok(()), // refused by clap
    };
    match supervised {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The freeze helper: single-threaded, its only job is to thaw whatever happens to the agent.
pub(crate) fn freeze_hold(mount: &Path, max_seconds: u64) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    let held = miren_snapshot::hold_freeze(
        mount,
        Duration::from_secs(max_seconds),
        &std::io::stdin(),
        &mut stdout,
    );
    match held {
        Ok(_) => ExitCode::SUCCESS,
        Err(err) => {
            let kind = if matches!(err, miren_snapshot::Error::AlreadyFrozen { .. }) {
                "busy"
            } else {
                "error"
            };
            let _ = writeln!(stdout, "{kind} {err}");
            ExitCode::FAILURE
        }
    }
}

/// Same for exec: the command becomes this process's child, so no other threads here.
pub(crate) fn exec_in(state_dir: &Path, env: &[String], cmd: &[String]) -> ExitCode {
    match miren_runtime::sandbox::exec(state_dir, cmd, env) {
        Ok(out) => {
            let _ = std::io::stdout().write_all(&out.stdout);
            let _ = std::io::stderr().write_all(&out.stderr);
            ExitCode::from(out.exit_code.clamp(0, 255) as u8)
        }
        Err(err) => {
            eprintln!("{}{err}", crate::core::sandboxes::EXEC_ERROR_MARK);
            ExitCode::from(125)
        }
    }
}
