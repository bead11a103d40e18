//! The sandbox description the agent writes into the state dir (`spec.json`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::SandboxError;

/// Everything the supervisor needs to run one sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Unique id; `[A-Za-z0-9_.-]`, used for the container id and cgroup leaf.
    pub id: String,
    /// Human name (informational).
    pub name: String,
    pub hostname: String,
    /// Read-only layer directories, top-most first (overlayfs `lowerdir` order).
    /// Shared between sandboxes and never written.
    pub lower_dirs: Vec<PathBuf>,
    /// Fully resolved argv (entrypoint + cmd).
    pub args: Vec<String>,
    /// `K=V` entries, each key once (see [`merge_env`]).
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    pub user: User,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub resources: Resources,
    /// Network namespace to join; `None` gives a fresh netns with only `lo` (up).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Contents bound read-only at `/etc/hosts`; `None` leaves the image's file.
    #[serde(default)]
    pub hosts: Option<String>,
    /// Contents bound read-only at `/etc/resolv.conf`; `None` leaves the image's file.
    #[serde(default)]
    pub resolv_conf: Option<String>,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub logs: LogConfig,
    /// Cgroup parent: the sandbox lives in `<prefix>/<id>` under every hierarchy.
    pub cgroup_prefix: String,
    /// Time between SIGTERM and SIGKILL when stopping.
    #[serde(default = "default_grace_ms")]
    pub stop_grace_ms: u64,
    /// The supervisor prepares everything (overlay, bundle) but creates the container only
    /// once the one who launched it says so through the launch's stdin (see
    /// [`super::Launch`]): the agent sets up the sandbox's network endpoint meanwhile.
    #[serde(default)]
    pub start_gate: bool,
    /// Mount roots on the host that hold other sandboxes' mounts (the agent's data dir and
    /// netns dir, see [`super::prepare_private_roots`]): the supervisor runs the sandbox in
    /// a mount namespace of its own where each shows only its top mount and this sandbox's
    /// own mounts. Empty: the host's namespace.
    #[serde(default)]
    pub private_mounts: Vec<PathBuf>,
}

fn default_grace_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for User {
    type Err = SandboxError;
    /// Parses `uid[:gid]` (numeric only; names are resolved by the caller).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SandboxError::InvalidSpec(format!("user {s:?}: want uid:gid"));
        let (u, g) = s.split_once(':').unwrap_or((s, s));
        Ok(User {
            uid: u.parse().map_err(|_| bad())?,
            gid: g.parse().map_err(|_| bad())?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Mount {
    /// Bind a host path (disk mount point, local storage) into the container.
    Bind {
        source: PathBuf,
        destination: String,
        #[serde(default)]
        read_only: bool,
    },
    /// A private tmpfs.
    Tmpfs {
        destination: String,
        #[serde(default)]
        size_bytes: Option<u64>,
    },
}

/// The writable layer of a sandbox that does not ask for a size (spare supervisors make
/// theirs of this size ahead of need).
pub const DEFAULT_WRITABLE_BYTES: u64 = 1 << 30;
/// The smallest writable layer: the overlay's copy-ups need room for more than a few files.
pub const MIN_WRITABLE_BYTES: u64 = 16 << 20;
/// The largest: ext4's limit with 4 KiB blocks, what older layers (an ext4 image each) allow.
pub const MAX_WRITABLE_BYTES: u64 = 16 << 40;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Resources {
    /// Hard memory limit (swap is limited to the same value, so no extra swap).
    pub memory_bytes: Option<u64>,
    /// Fractional CPUs, turned into a CFS quota over a 100 ms period.
    pub cpus: Option<f64>,
    /// Maximum number of tasks.
    pub pids: Option<i64>,
    /// Size of the writable layer (the overlay's upper dir, on an ext4 image of its own).
    /// `None` keeps it in the state dir unbounded: specs written before the bound.
    #[serde(default)]
    pub writable_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RestartPolicy {
    #[default]
    No,
    /// Restart on a non-zero exit, at most `max_retries` times if set.
    OnFailure {
        #[serde(default)]
        max_retries: Option<u32>,
        #[serde(default)]
        backoff: Backoff,
    },
    /// Restart on any exit.
    Always {
        #[serde(default)]
        backoff: Backoff,
    },
}

/// Exponential backoff: `initial_ms * 2^n`, capped at `max_ms`. `n` goes back to 0 when a
/// run lasted at least `reset_after_ms` (a service that ran a while is not crash-looping).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub reset_after_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 100,
            max_ms: 30_000,
            reset_after_ms: 10_000,
        }
    }
}

impl Backoff {
    /// Delay before restart number `n` (0-based) of the current crash streak.
    pub fn delay_ms(&self, n: u32) -> u64 {
        let factor = 1u64.checked_shl(n.min(32)).unwrap_or(u64::MAX);
        self.initial_ms.saturating_mul(factor).min(self.max_ms)
    }
}

/// Per-stream log rotation: `stdout.log` is renamed to `stdout.log.1` (and so on up to
/// `max_files`) once it exceeds `max_bytes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogConfig {
    pub max_bytes: u64,
    pub max_files: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_bytes: 10 << 20,
            max_files: 3,
        }
    }
}

/// Merges `K=V` lists: later lists override earlier ones in place, so every key appears
/// once (libcontainer keeps the *first* duplicate, so appending would not override).
/// Entries without `=` are treated as a key with an empty value.
pub fn merge_env<'a>(lists: impl IntoIterator<Item = &'a [String]>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for list in lists {
        for kv in list {
            let key = kv.split_once('=').map_or(kv.as_str(), |(k, _)| k);
            let entry = if kv.contains('=') {
                kv.clone()
            } else {
                format!("{kv}=")
            };
            match out
                .iter_mut()
                .find(|e| e.split_once('=').map(|(k, _)| k) == Some(key))
            {
                Some(e) => *e = entry,
                None => out.push(entry),
            }
        }
    }
    out
}

impl SandboxSpec {
    /// Rejects what would break the mount options, paths or cgroup layout.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let bad = |m: String| Err(SandboxError::InvalidSpec(m));
        let ok_id = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        };
        if !ok_id(&self.id) {
            return bad(format!("id {:?}", self.id));
        }
        if self.cgroup_prefix.is_empty() || !self.cgroup_prefix.split('/').all(ok_id) {
            return bad(format!("cgroup_prefix {:?}", self.cgroup_prefix));
        }
        if self.args.is_empty() {
            return bad("args is empty".into());
        }
        if self.lower_dirs.is_empty() {
            return bad("lower_dirs is empty".into());
        }
        for d in &self.lower_dirs {
            let s = d.to_string_lossy();
            // Overlay options are comma/colon separated.
            if !d.is_absolute() || s.contains([',', ':', '\\']) {
                return bad(format!("lower dir {s:?} must be absolute without , : \\"));
            }
        }
        if !self.cwd.starts_with('/') {
            return bad(format!("cwd {:?} must be absolute", self.cwd));
        }
        for m in &self.mounts {
            let dest = match m {
                Mount::Bind { destination, .. } | Mount::Tmpfs { destination, .. } => destination,
            };
            if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
                return bad(format!("mount destination {dest:?}"));
            }
        }
        if let Some(c) = self.resources.cpus {
            if !(c > 0.0 && c.is_finite()) {
                return bad(format!("cpus {c}"));
            }
        }
        if let Some(w) = self.resources.writable_bytes {
            if !(MIN_WRITABLE_BYTES..=MAX_WRITABLE_BYTES).contains(&w) {
                return bad(format!(
                    "writable layer size {w}: between {MIN_WRITABLE_BYTES} and {MAX_WRITABLE_BYTES} bytes"
                ));
            }
        }
        for kv in &self.env {
            if !kv.contains('=') {
                return bad(format!("env entry {kv:?} has no '='"));
            }
        }
        Ok(())
    }
}
