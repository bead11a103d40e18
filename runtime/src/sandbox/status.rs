//! `status.json`: the supervisor's durable record of the sandbox, and small file helpers.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{SandboxError, STATUS_FILE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Supervisor is setting up or creating the container.
    Creating,
    Running,
    /// Exited and waiting out the restart backoff.
    Restarting,
    /// Exited for good (or stopped); `exit_code` is set.
    Exited,
    /// Could not be created or started; `error` says why.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    /// Supervisor pid and its start time (clock ticks since boot, from /proc/pid/stat) so
    /// a reused pid is never mistaken for it.
    pub supervisor_pid: i32,
    pub supervisor_start_time: u64,
    /// Host pid of the container's init for the current/last run.
    pub pid: Option<i32>,
    pub pid_start_time: Option<u64>,
    /// 0-255; 128+signal for a signal death (137 for SIGKILL).
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    /// Number of restarts done by the restart policy.
    pub restarts: u32,
    /// Unix milliseconds.
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub error: Option<String>,
    /// How long each step of the last start took (`step=ms ...`, see
    /// `miren_sys::timeline`): the agent logs it with the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_steps: Option<String>,
    /// Not stored: filled in by [`super::status`] from /proc.
    #[serde(skip)]
    pub supervisor_alive: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `path` via temp file + rename: readers see the old or the new content, never a
/// partial one, but nothing is forced to disk. For files whose loss in a host crash does not
/// matter (every process they describe dies with the host).
pub(crate) fn write_replace(path: &Path, data: &[u8]) -> Result<(), SandboxError> {
    write_file(path, data, false)
}

/// Temp file + rename; with `durable`, fsync before the rename and of the directory after it,
/// so a crash leaves either the old or the new content.
fn write_file(path: &Path, data: &[u8], durable: bool) -> Result<(), SandboxError> {
    let io = |e| SandboxError::io(format!("write {}", path.display()), e);
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    if durable {
        f.sync_all().map_err(io)?;
    }
    fs::rename(&tmp, path).map_err(io)?;
    if durable {
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
    }
    Ok(())
}

/// Records `st`. Only the end of a sandbox (`exited`, `failed`: the exit code, the error) is
/// forced to disk; the states in between describe processes that a host crash ends anyway, and
/// after one the supervisor is seen dead whatever the file says.
pub(crate) fn write_status(state_dir: &Path, st: &Status) -> Result<(), SandboxError> {
    let json = serde_json::to_vec_pretty(st)
        .map_err(|e| SandboxError::InvalidSpec(format!("status json: {e}")))?;
    let durable = matches!(st.state, State::Exited | State::Failed);
    write_file(&state_dir.join(STATUS_FILE), &json, durable)
}

pub(crate) fn read_status(state_dir: &Path) -> Result<Option<Status>, SandboxError> {
    let path = state_dir.join(STATUS_FILE);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| SandboxError::Corrupt(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(SandboxError::io(format!("read {}", path.display()), e)),
    }
}
