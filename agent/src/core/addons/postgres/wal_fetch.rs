//! The WAL a restore replays, fetched beside recovery instead of before it.
//!
//! Before the temporary server starts, the agent lists what it will fetch (the archived
//! segments from the base backup's first one on, every timeline history, and for `--latest`
//! the server's unarchived segments) into `wal-restore/expected` on the restore's disk, with
//! the `restore_command` script beside it. The server starts at once; the fetch runs in the
//! agent, in segment order, a few objects in flight and at most `AHEAD` files past the one
//! recovery asked for last (the script records it), each written under a temporary name and
//! renamed. The script answers PostgreSQL's requests: a listed file is waited for and copied,
//! any other (a history file of a timeline that does not exist, the segment after the end)
//! fails at once, as by hand. Once recovery finished, the fetch stops.
//!
//! A killed agent leaves the temporary server waiting in the script; the restore is then
//! discarded at start (its phase is `recovering`), sandbox and disk with it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use object_store::ObjectStoreExt;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tracing::warn;

use super::archive::{is_segment, wal_prefix};
use super::base::unreachable_target;
use crate::core::error::Error;
use crate::core::targets::Target;

/// Where the WAL a restore replays goes, relative to the disk's root.
pub(super) const RESTORE_WAL_DIR: &str = "wal-restore";
/// The names the fetch will place, one a line.
const EXPECTED_FILE: &str = "expected";
const SCRIPT_FILE: &str = "restore.sh";
/// Objects downloaded at once (each up to a 16 MiB segment in memory).
const IN_FLIGHT: usize = 4;
/// The last name the script was asked for (by the server), which the fetch keeps ahead of.
const ASKED_FILE: &str = "asked";
/// How many files the fetch runs ahead of what recovery asked for: enough to keep replay fed,
/// few enough not to take the cores and the disk from the unpacking and the replay (nor to fetch
/// much past the point).
const AHEAD: usize = 8;

/// `$1` is `%f`, `$2` is `%p`. Waits only for what the agent listed: PostgreSQL asks for
/// files that do not exist, which must fail fast.
const SCRIPT: &str = "#!/bin/sh\n\
# miren restore_command: waits for a file the agent fetches, fails for any other\n\
d=$(dirname \"$0\")\n\
grep -qxF -e \"$1\" \"$d/expected\" || exit 1\n\
echo \"$1\" > \"$d/asked\"\n\
while [ ! -f \"$d/$1\" ]; do sleep 0.02; done\n\
exec cp \"$d/$1\" \"$2\"\n";

/// The `restore_command` that reads the fetched WAL, as the sandbox sees the disk.
pub(super) fn restore_command() -> String {
    format!(
        "sh {}/{RESTORE_WAL_DIR}/{SCRIPT_FILE} %f %p",
        super::PG_DATA_MOUNT
    )
}

/// Where one file comes from.
enum From {
    Object(object_store::path::Path),
    /// A segment of the server's own `pg_wal` the archive lacks.
    Local(PathBuf),
}

/// What a restore fetches, in the order it does.
pub(super) struct WalPlan {
    dir: PathBuf,
    files: Vec<(String, From)>,
}

/// Segments of one number sort together, oldest timeline first: the order replay asks.
fn fetch_order(name: &str) -> (u8, String, String) {
    if is_segment(name) {
        (1, name[8..].to_string(), name[..8].to_string())
    } else {
        (0, name.to_string(), String::new())
    }
}

/// Lists the WAL from `start` on (every timeline) and the timeline histories; with
/// `unarchived` (the server's `pg_wal` and timeline, for `--latest`), also its segments the
/// archive lacks (the newest, unarchived ones; recycled segments past the end hold stale
/// pages, at which replay stops as PostgreSQL's own crash recovery does). Writes the list and
/// the script into `dir` before anything is fetched.
pub(super) async fn plan(
    target: &Target,
    id: &str,
    start: &str,
    dir: &Path,
    unarchived: Option<(&Path, u32)>,
) -> Result<WalPlan, Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
    let store = target.store();
    let prefix = target.path(&wal_prefix(id))?;
    let mut listing = store.list(Some(&prefix));
    let mut files = Vec::new();
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| unreachable_target(target, &e))?;
        let Some(name) = meta.location.filename().map(str::to_string) else {
            continue;
        };
        if (is_segment(&name) && name[8..] >= start[8..]) || name.ends_with(".history") {
            files.push((name, From::Object(meta.location.clone())));
        }
    }
    if let Some((pg_wal, timeline)) = unarchived {
        let archived: HashSet<String> = files.iter().map(|(n, _)| n.clone()).collect();
        files.extend(
            unarchived_segments(pg_wal, start, timeline)
                .into_iter()
                .filter(|(name, _)| !archived.contains(name))
                .map(|(name, path)| (name, From::Local(path))),
        );
    }
    files.sort_by_cached_key(|(name, _)| fetch_order(name));
    let expected: String = files.iter().map(|(name, _)| format!("{name}\n")).collect();
    write_owned(&dir.join(EXPECTED_FILE), expected.as_bytes())?;
    write_owned(&dir.join(SCRIPT_FILE), SCRIPT.as_bytes())?;
    chown(dir)?;
    Ok(WalPlan {
        dir: dir.to_path_buf(),
        files,
    })
}

fn unarchived_segments(pg_wal: &Path, start: &str, timeline: u32) -> Vec<(String, PathBuf)> {
    let entries = match std::fs::read_dir(pg_wal) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(dir = %pg_wal.display(), error = %e, "reading the server's pg_wal failed; restoring what was archived");
            return Vec::new();
        }
    };
    let tli = format!("{timeline:08X}");
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().to_string();
            (is_segment(&name) && name.starts_with(&tli) && name[8..] >= start[8..])
                .then(|| (name, entry.path()))
        })
        .collect()
}

fn chown(path: &Path) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(super::PG_UID), Some(super::PG_UID))
        .map_err(|e| Error::internal(format!("chown {}: {e}", path.display())))
}

/// Writes `name` whole: under a temporary name, renamed once complete, so the script never
/// copies half a file.
fn write_owned(path: &Path, data: &[u8]) -> Result<(), Error> {
    let part = path.with_extension("part");
    std::fs::write(&part, data)
        .map_err(|e| Error::internal(format!("writing {}: {e}", part.display())))?;
    chown(&part)?;
    std::fs::rename(&part, path)
        .map_err(|e| Error::internal(format!("renaming {}: {e}", part.display())))
}

impl WalPlan {
    /// Starts fetching in the background.
    pub(super) fn start(self, target: Arc<Target>) -> Fetching {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(fetch(self, target, stop.clone()));
        Fetching {
            handle: Some(handle),
            stop,
        }
    }
}

/// The position in the fetch order of the file recovery asked for last (`last` while it
/// asked for none, or the file is being rewritten).
fn asked_position(dir: &Path, positions: &HashMap<String, usize>, last: usize) -> usize {
    std::fs::read_to_string(dir.join(ASKED_FILE))
        .ok()
        .and_then(|name| positions.get(name.trim()).copied())
        .map_or(last, |p| p.max(last))
}

async fn fetch(plan: WalPlan, target: Arc<Target>, stop: Arc<AtomicBool>) -> Result<(), Error> {
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    let positions: HashMap<String, usize> = plan
        .files
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), i))
        .collect();
    let mut asked = 0;
    'files: for (position, (name, from)) in plan.files.into_iter().enumerate() {
        // In order, so every file up to the one asked for is fetched: no wait can block.
        loop {
            asked = asked_position(&plan.dir, &positions, asked);
            if position <= asked + AHEAD {
                break;
            }
            if stop.load(Ordering::Relaxed) {
                break 'files;
            }
            // A file that failed is one recovery may be waiting for.
            while let Some(done) = tasks.try_join_next() {
                done.map_err(|e| Error::internal(format!("fetching WAL: {e}")))??;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::internal(format!("fetching WAL: {e}")))?;
        // A task that failed ends the fetch at once.
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| Error::internal(format!("fetching WAL: {e}")))??;
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let target = target.clone();
        let to = plan.dir.join(&name);
        tasks.spawn(async move {
            let _permit = permit;
            let data = match from {
                From::Object(location) => target
                    .store()
                    .get(&location)
                    .await
                    .map_err(|e| unreachable_target(&target, &e))?
                    .bytes()
                    .await
                    .map_err(|e| unreachable_target(&target, &e))?,
                From::Local(path) => tokio::fs::read(&path)
                    .await
                    .map_err(|e| Error::internal(format!("reading {}: {e}", path.display())))?
                    .into(),
            };
            tokio::task::spawn_blocking(move || write_owned(&to, &data))
                .await
                .map_err(|e| Error::internal(format!("writing WAL: {e}")))?
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| Error::internal(format!("fetching WAL: {e}")))??;
    }
    Ok(())
}

/// A fetch running beside recovery; stopped (and its in-flight writes ended) when dropped.
pub(super) struct Fetching {
    handle: Option<JoinHandle<Result<(), Error>>>,
    stop: Arc<AtomicBool>,
}

impl Fetching {
    /// Resolves only when the fetch failed (a complete fetch never resolves), so recovery
    /// waiting for a file that will not come is cut short.
    pub(super) async fn failure(&mut self) -> Error {
        if let Some(handle) = self.handle.as_mut() {
            let result = handle.await;
            self.handle = None;
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return e,
                Err(e) => return Error::internal(format!("fetching WAL: {e}")),
            }
        }
        std::future::pending().await
    }

    /// Stops fetching (recovery is over) and waits for what is in flight, so the directory
    /// can go.
    pub(super) async fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetches_in_replay_order() {
        let mut names = vec![
            "000000020000000000000005",
            "000000010000000000000006",
            "00000002.history",
            "000000010000000000000005",
            "000000020000000000000006",
        ];
        names.sort_by_cached_key(|n| fetch_order(n));
        assert_eq!(
            names,
            [
                "00000002.history",
                "000000010000000000000005",
                "000000020000000000000005",
                "000000010000000000000006",
                "000000020000000000000006",
            ]
        );
    }
}
