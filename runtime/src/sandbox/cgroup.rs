//! Cgroup paths of a sandbox and cleanup that does not depend on libcontainer's state.
//!
//! On this project's hosts cgroups are hybrid: v1 controllers under /sys/fs/cgroup/<ctrl>
//! (managed by libcontainer) and a controller-less cgroup2 at /sys/fs/cgroup/unified,
//! which we use ourselves for `cgroup.kill` and to find every process of a sandbox.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::SandboxSpec;

const ROOT: &str = "/sys/fs/cgroup";

/// The `cgroupsPath` given to libcontainer.
pub(crate) fn cgroups_path(spec: &SandboxSpec) -> String {
    format!("/{}/{}", spec.cgroup_prefix, spec.id)
}

/// Makes the v1 cpuset parent of every sandbox (`<prefix>`) hand its CPUs and memory nodes
/// to each child cgroup as the kernel creates it (`cgroup.clone_children`). Without it,
/// libcgroups writes `cpuset.cpus` and `cpuset.mems` into each new sandbox cgroup, and the
/// kernel checks each such write against every sibling cpuset (`validate_change`) and then
/// rebuilds the scheduler's domains over every cpuset on the host: work that grows with
/// the number of sandboxes, on each start's path. With the values already there libcgroups
/// leaves them alone. Idempotent; called at agent start. Nothing to do without a v1 cpuset
/// hierarchy (pure cgroup2 has no per-child copy).
pub fn prepare_parent(prefix: &str) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let root = Path::new(ROOT).join("cpuset");
    if pure_v2() || !root.join("cpuset.cpus").exists() {
        return Ok(());
    }
    let mut dir = root;
    for component in Path::new(prefix).components() {
        let std::path::Component::Normal(name) = component else {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("cgroup prefix {prefix:?} must be relative names only"),
            ));
        };
        let parent = dir.clone();
        dir.push(name);
        match fs::create_dir(&dir) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(with_path(&dir, e)),
            _ => {}
        }
        // A cpuset with no CPUs or memory nodes takes no tasks (and hands nothing down).
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = fs::read_to_string(dir.join(file)).map_err(|e| with_path(&dir, e))?;
            if own.trim().is_empty() {
                let inherited =
                    fs::read_to_string(parent.join(file)).map_err(|e| with_path(&parent, e))?;
                fs::write(dir.join(file), inherited.trim()).map_err(|e| with_path(&dir, e))?;
            }
        }
    }
    fs::write(dir.join("cgroup.clone_children"), "1").map_err(|e| with_path(&dir, e))
}

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// True if /sys/fs/cgroup is itself a cgroup2 mount (pure v2 host).
fn pure_v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// The hybrid-mode cgroup2 directory we manage ourselves (None on v1-only or pure v2).
pub(crate) fn unified_dir(spec: &SandboxSpec) -> Option<PathBuf> {
    let u = Path::new(ROOT).join("unified");
    if pure_v2() || !u.join("cgroup.procs").exists() {
        return None;
    }
    Some(u.join(&spec.cgroup_prefix).join(&spec.id))
}

/// Every directory this sandbox may have, one per mounted hierarchy.
pub(crate) fn all_dirs(spec: &SandboxSpec) -> Vec<PathBuf> {
    let rel = Path::new(&spec.cgroup_prefix).join(&spec.id);
    if pure_v2() {
        return vec![Path::new(ROOT).join(rel)];
    }
    let Ok(entries) = fs::read_dir(ROOT) else {
        return vec![];
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .map(|p| p.join(&rel))
        .collect()
}

/// OOM kills recorded for this sandbox's memory cgroup (v1 `memory.oom_control` or v2
/// `memory.events`).
pub(crate) fn oom_kills(spec: &SandboxSpec) -> u64 {
    let rel = Path::new(&spec.cgroup_prefix).join(&spec.id);
    let (file, key) = if pure_v2() {
        (Path::new(ROOT).join(rel).join("memory.events"), "oom_kill")
    } else {
        (
            Path::new(ROOT)
                .join("memory")
                .join(rel)
                .join("memory.oom_control"),
            "oom_kill",
        )
    };
    fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Pids in any of the sandbox's cgroups.
pub(crate) fn all_procs(spec: &SandboxSpec) -> Vec<i32> {
    let mut v: Vec<i32> = all_dirs(spec).iter().flat_map(|d| procs(d)).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// SIGKILLs every process in the sandbox's cgroups until they are empty (or `timeout`).
pub(crate) fn kill_all(spec: &SandboxSpec, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(u) = unified_dir(spec) {
            let _ = fs::write(u.join("cgroup.kill"), "1");
        }
        let pids = all_procs(spec);
        if pids.is_empty() {
            return true;
        }
        for p in pids {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills what is left and removes the sandbox's leaf cgroups (not the shared prefix).
pub(crate) fn remove_all(spec: &SandboxSpec) -> std::io::Result<()> {
    kill_all(spec, Duration::from_secs(5));
    let mut last = Ok(());
    for d in all_dirs(spec) {
        // A just-killed task can keep the cgroup busy for a moment.
        for attempt in 0..50 {
            match fs::remove_dir(&d) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if attempt == 49 => {
                    // Say which cgroup and who is still in it (a task in D state, say).
                    let left: Vec<String> = procs(&d)
                        .iter()
                        .map(|&p| format!("{p} ({})", miren_sys::proc::state(p).unwrap_or('?')))
                        .collect();
                    last = Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}; tasks in it: {left:?}", d.display()),
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    last
}

/// Moves this process into the cgroup it is already in (a no-op migration), for its side
/// effect: the first cgroup migration after a quiet spell waits for an RCU grace period
/// (the kernel flips cgroup_threadgroup_rwsem into writer mode; measured 6-8 ms here), and
/// migrations within a grace period of each other do not. Called when a start request
/// arrives, that wait overlaps the start's other work instead of delaying libcontainer's
/// own migration of the container into its cgroups. Blocking; best effort.
pub fn prime_migrations() {
    let Ok(own) = fs::read_to_string("/proc/self/cgroup") else {
        return;
    };
    let unified = own.lines().find_map(|l| l.strip_prefix("0::"));
    let target = match unified {
        Some(path) if pure_v2() => Path::new(ROOT).join(path.trim_start_matches('/')),
        Some(path) if Path::new(ROOT).join("unified/cgroup.procs").exists() => Path::new(ROOT)
            .join("unified")
            .join(path.trim_start_matches('/')),
        _ => match own.lines().find_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            controllers.split(',').any(|c| c == "pids").then_some(path)
        }) {
            Some(path) => Path::new(ROOT)
                .join("pids")
                .join(path.trim_start_matches('/')),
            None => return,
        },
    };
    let _ = fs::write(target.join("cgroup.procs"), std::process::id().to_string());
}
