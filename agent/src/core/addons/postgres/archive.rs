//! Continuous archiving of every PostgreSQL server the agent runs.
//!
//! The server's `archive_command` copies each finished WAL segment into a spool directory on
//! its own data disk (`wal-spool/`, beside `pgdata/`), fsyncs it and renames it into place;
//! when that fails PostgreSQL keeps the segment and retries. One agent task ships the spools
//! of all servers to the default backup target with `object_store` (the disk is mounted on the
//! host, so the agent reads the spool directly: no network path from a sandbox to the agent,
//! and the target's credentials never enter a sandbox), and deletes a spooled file only once
//! its upload completed. The same task takes base backups (`base.rs`) and prunes (`prune`).
//!
//! Object layout under the target: `postgres/<server id>/wal/<segment>` and
//! `postgres/<server id>/base/<label>/{base.tar.zst,info.json}`. The server id is the server's
//! owner plus the cluster's system identifier (`app-shop-7436...`, `shared-7436...`): a
//! restore keeps the identifier (and continues on a new timeline in the same archive), an
//! addon made again gets a new one.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::core::addons::{is_shared, AddonService};
use crate::core::disks::DiskService;
use crate::core::error::Error;
use crate::core::targets::{Target, Targets};
use crate::model::ArchiveLag;
use crate::store::addons::AddonStatus;
use crate::store::Owner;

/// The spool directory, relative to the data disk's root.
pub const SPOOL_DIR: &str = "wal-spool";
/// How often the spools are looked at.
const SHIP_INTERVAL: Duration = Duration::from_secs(2);
/// How often expired objects are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);
/// The bound on how much committed work a server may hold unarchived (seconds).
pub const ARCHIVE_TIMEOUT_SECS: u64 = 60;
const KIND: &str = "miren-postgresql";

/// Retention and schedule, from the agent's flags.
#[derive(Debug, Clone, Copy)]
pub struct PitrSettings {
    /// How far back a point-in-time restore reaches.
    pub retention: Duration,
    /// How long base backups are kept.
    pub base_retention: Duration,
    /// How often a base backup is taken.
    pub base_interval: Duration,
}

impl Default for PitrSettings {
    fn default() -> Self {
        PitrSettings {
            retention: Duration::from_secs(7 * 86400),
            base_retention: Duration::from_secs(30 * 86400),
            base_interval: Duration::from_secs(86400),
        }
    }
}

/// The server's arguments that turn archiving on (appended to the image's `postgres`).
pub fn server_args() -> Vec<String> {
    let spool = format!("{}/{SPOOL_DIR}", super::PG_DATA_MOUNT);
    // cp to a temporary name, fsync it, rename, fsync the directory: a segment is in the spool
    // whole and durable, or not at all (and PostgreSQL retries). Archiving a segment again
    // (after a crash) overwrites it with the same bytes.
    let command = format!(
        "cp %p {spool}/%f.part && sync {spool}/%f.part && mv {spool}/%f.part {spool}/%f && sync {spool}"
    );
    let mut args = vec!["docker-entrypoint.sh".to_string(), "postgres".to_string()];
    for setting in [
        "wal_level=replica".to_string(),
        "archive_mode=on".to_string(),
        format!("archive_command={command}"),
        format!("archive_timeout={ARCHIVE_TIMEOUT_SECS}"),
        // A start after a crash (a kill -9, a restore's server taken over) first syncs the
        // data directory: one syncfs of the server's own disk instead of an fsync per file
        // (8 s of a restore's swap in bench/pitr). PostgreSQL 14+, as the catalogue.
        "recovery_init_sync_method=syncfs".to_string(),
    ] {
        args.push("-c".into());
        args.push(setting);
    }
    args
}

/// One archived server as the shipper sees it.
#[derive(Debug, Clone)]
pub(crate) struct ArchivedServer {
    pub owner: Owner,
    /// The data disk's host mount.
    pub mount: PathBuf,
    pub id: String,
    pub timeline: u32,
    /// The superuser login and the server's address, for base backups.
    pub login: miren_addons::Credentials,
}

/// What the shipper knows of a server, for status.
#[derive(Debug, Clone, Default)]
struct ShipState {
    last_shipped: Option<String>,
    last_shipped_at: Option<SystemTime>,
    last_error: Option<String>,
    /// The newest base backup's (finish time, timeline), once looked up.
    last_base: Option<Option<(SystemTime, u32)>>,
    base_running: bool,
}

/// The shipping task's state, shared with status and restore.
pub struct Pitr {
    pub(crate) disks: Arc<DiskService>,
    pub(crate) targets: Arc<Targets>,
    pub(crate) settings: PitrSettings,
    state: Mutex<HashMap<String, ShipState>>,
    /// One restore at a time on this agent.
    pub(crate) restoring: tokio::sync::Mutex<()>,
}

impl Pitr {
    pub fn new(disks: Arc<DiskService>, targets: Arc<Targets>, settings: PitrSettings) -> Pitr {
        Pitr {
            disks,
            targets,
            settings,
            state: Mutex::new(HashMap::new()),
            restoring: tokio::sync::Mutex::new(()),
        }
    }

    pub fn target(&self) -> &Arc<Target> {
        self.targets.default_target()
    }

    fn with_state<T>(&self, id: &str, f: impl FnOnce(&mut ShipState) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(state.entry(id.to_string()).or_default())
    }

    /// The host mount of a disk, if it is mounted.
    pub(crate) fn mount_of_disk(&self, name: &str) -> Result<Option<PathBuf>, Error> {
        let row = self.disks.find(name)?;
        Ok(self.disks.view_one(&row)?.mount_path.map(PathBuf::from))
    }

    /// The lag of a server's archive: what waits in its spool, what was shipped last.
    pub(crate) fn lag(&self, server: &ArchivedServer) -> ArchiveLag {
        let pending = spooled(&server.mount.join(SPOOL_DIR)).unwrap_or_default();
        let now = SystemTime::now();
        let state = self.with_state(&server.id, |s| s.clone());
        ArchiveLag {
            pending_segments: pending.len() as u64,
            pending_bytes: pending.iter().map(|p| p.2).sum(),
            oldest_pending_seconds: pending
                .iter()
                .map(|p| p.1)
                .min()
                .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
            last_shipped: state.last_shipped,
            last_shipped_at: state.last_shipped_at.map(rfc3339),
            last_error: state.last_error,
        }
    }

    pub(crate) fn base_done(&self, id: &str, finished: SystemTime, timeline: u32) {
        self.with_state(id, |s| s.last_base = Some(Some((finished, timeline))));
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The spooled segments, oldest name first: (name, modified, bytes). Half-copied `.part`
/// files are PostgreSQL's to finish or retry.
fn spooled(spool: &Path) -> std::io::Result<Vec<(String, SystemTime, u64)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(spool)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".part") {
            continue;
        }
        let meta = entry.metadata()?;
        if meta.is_file() {
            files.push((name, meta.modified()?, meta.len()));
        }
    }
    files.sort();
    Ok(files)
}

/// The cluster's system identifier and current timeline, from `global/pg_control` (the
/// identifier is its first 8 bytes; the checkpoint's timeline is at byte 48, little-endian on
/// this platform, the same in PostgreSQL 15 and 17).
pub(crate) fn control_data(pgdata: &Path) -> std::io::Result<(u64, u32)> {
    let mut head = [0u8; 52];
    std::fs::File::open(pgdata.join("global/pg_control"))?.read_exact(&mut head)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&head[0..8]);
    let mut tli = [0u8; 4];
    tli.copy_from_slice(&head[48..52]);
    Ok((u64::from_le_bytes(id), u32::from_le_bytes(tli)))
}

/// `app-shop` / `shared`, the owner's part of a server id.
fn owner_part(owner: &Owner) -> String {
    match owner {
        Owner::Addon { app, .. } => format!("app-{app}"),
        _ => "shared".to_string(),
    }
}

pub(crate) fn wal_prefix(id: &str) -> String {
    format!("postgres/{id}/wal")
}

pub(crate) fn base_prefix(id: &str) -> String {
    format!("postgres/{id}/base")
}

impl AddonService {
    /// Turns on archiving and base backups for every PostgreSQL server (once, at start).
    pub fn enable_pitr(self: &Arc<Self>, pitr: Pitr) {
        if self.pitr.set(Arc::new(pitr)).is_err() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move { this.ship_loop().await });
    }

    /// The archive lag of an addon's server, for its view; None for other kinds.
    pub(crate) fn archive_lag(&self, row: &crate::store::addons::AddonRow) -> Option<ArchiveLag> {
        if row.kind != KIND {
            return None;
        }
        let pitr = self.pitr.get()?;
        let server = self
            .archived_server(
                pitr,
                super::super::server_owner(row),
                super::super::credentials(row),
            )
            .ok()??;
        Some(pitr.lag(&server))
    }

    pub(crate) fn pitr(&self) -> Result<&Arc<Pitr>, Error> {
        self.pitr
            .get()
            .ok_or_else(|| Error::internal("continuous archiving is not enabled in this agent"))
    }

    /// The PostgreSQL servers that archive now: dedicated ones of active addons and the
    /// shared one, each with its disk mounted and a cluster on it.
    pub(crate) fn archived_servers(&self) -> Result<Vec<ArchivedServer>, Error> {
        let pitr = self.pitr()?;
        let provider = self.provider(KIND)?.clone();
        let mut wanted: Vec<(Owner, miren_addons::Credentials)> = Vec::new();
        for row in self.store.all_addons()? {
            if row.kind != KIND || is_shared(&row) || row.status != AddonStatus::Active {
                continue;
            }
            wanted.push((
                super::super::server_owner(&row),
                super::super::credentials(&row),
            ));
        }
        if let Some(server) = self.store.server(KIND)? {
            if server.status.serves() {
                wanted.push((
                    Owner::Shared { kind: KIND.into() },
                    provider.admin_login(&server.admin_user, &server.admin_password),
                ));
            }
        }
        let mut servers = Vec::new();
        for (owner, login) in wanted {
            if let Some(server) = self.archived_server(pitr, owner, login)? {
                servers.push(server);
            }
        }
        Ok(servers)
    }

    pub(crate) fn archived_server(
        &self,
        pitr: &Pitr,
        owner: Owner,
        login: miren_addons::Credentials,
    ) -> Result<Option<ArchivedServer>, Error> {
        let Some(disk) = self.store.disk_of(&owner)? else {
            return Ok(None);
        };
        let Some(mount) = pitr.mount_of_disk(&disk.name)? else {
            return Ok(None);
        };
        let Ok((sysid, timeline)) = control_data(&mount.join(super::PG_DATA_SUBDIR)) else {
            return Ok(None); // no cluster yet (initdb runs)
        };
        Ok(Some(ArchivedServer {
            id: format!("{}-{sysid}", owner_part(&owner)),
            owner,
            mount,
            timeline,
            login,
        }))
    }

    async fn ship_loop(self: Arc<Self>) {
        let mut last_prune: Option<std::time::Instant> = None;
        loop {
            match self.archived_servers() {
                Ok(servers) => {
                    for server in &servers {
                        self.ship_server(server).await;
                        self.maybe_base_backup(server).await;
                    }
                    if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL) {
                        last_prune = Some(std::time::Instant::now());
                        for server in &servers {
                            if let Err(e) = self.prune(&server.id).await {
                                warn!(server = %server.id, error = %e, "pruning expired backups failed; retrying later");
                            }
                        }
                    }
                }
                Err(e) => warn!(error = %e, "listing the archived PostgreSQL servers failed"),
            }
            tokio::time::sleep(SHIP_INTERVAL).await;
        }
    }

    /// Ships one server's spool, oldest first, stopping at the first failure (the rest waits).
    pub(crate) async fn ship_server(&self, server: &ArchivedServer) {
        let Ok(pitr) = self.pitr() else { return };
        let spool = server.mount.join(SPOOL_DIR);
        if let Err(e) = ensure_spool(&server.mount, &spool) {
            warn!(spool = %spool.display(), error = %e, "preparing the WAL spool failed");
            return;
        }
        let files = match spooled(&spool) {
            Ok(files) => files,
            Err(e) => {
                warn!(spool = %spool.display(), error = %e, "reading the WAL spool failed");
                return;
            }
        };
        let target = pitr.target().clone();
        for (name, _, _) in files {
            let file = spool.join(&name);
            match ship_file(&target, &server.id, &name, &file).await {
                Ok(()) => {
                    // Only now is the spooled copy expendable.
                    if let Err(e) = std::fs::remove_file(&file) {
                        warn!(file = %file.display(), error = %e, "removing a shipped WAL file failed");
                    }
                    pitr.with_state(&server.id, |s| {
                        s.last_shipped = Some(name.clone());
                        s.last_shipped_at = Some(SystemTime::now());
                        s.last_error = None;
                    });
                }
                Err(e) => {
                    let message = format!("shipping {name} to {}: {e}", target.describe());
                    let first = pitr.with_state(&server.id, |s| {
                        let first = s.last_error.is_none();
                        s.last_error = Some(message.clone());
                        first
                    });
                    if first {
                        warn!(server = %server.id, error = %message, "WAL shipping failed; the segments stay spooled and are retried");
                    }
                    return;
                }
            }
        }
    }

    async fn maybe_base_backup(self: &Arc<Self>, server: &ArchivedServer) {
        let Ok(pitr) = self.pitr() else { return };
        let known = pitr.with_state(&server.id, |s| (s.last_base, s.base_running));
        if known.1 {
            return;
        }
        let last = match known.0 {
            Some(last) => last,
            None => match super::base::newest_base(pitr.target(), &server.id).await {
                Ok(last) => {
                    let last = last.map(|b| (b.finished_time(), b.timeline));
                    pitr.with_state(&server.id, |s| s.last_base = Some(last));
                    last
                }
                Err(e) => {
                    warn!(server = %server.id, error = %e, "listing base backups failed");
                    return;
                }
            },
        };
        let due = match last {
            None => true,
            Some((finished, timeline)) => {
                timeline != server.timeline
                    || SystemTime::now()
                        .duration_since(finished)
                        .unwrap_or_default()
                        >= pitr.settings.base_interval
            }
        };
        if !due {
            return;
        }
        pitr.with_state(&server.id, |s| s.base_running = true);
        let this = self.clone();
        let server = server.clone();
        tokio::spawn(async move {
            let result = this.base_backup(&server).await;
            let Ok(pitr) = this.pitr() else { return };
            pitr.with_state(&server.id, |s| s.base_running = false);
            match result {
                Ok(info) => {
                    info!(server = %server.id, label = %info.label, bytes = info.size_bytes, "base backup taken");
                    // A new base backup is what lets older objects expire.
                    if let Err(e) = this.prune(&server.id).await {
                        warn!(server = %server.id, error = %e, "pruning expired backups failed; retrying later");
                    }
                }
                Err(e) => {
                    // Retried on the next pass; a server not answering yet is the usual cause.
                    warn!(server = %server.id, error = %e, "base backup failed; retrying");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        });
    }

    /// Deletes base backups past their retention (always keeping the newest) and the WAL no
    /// kept base backup within the point-in-time window needs.
    pub(crate) async fn prune(&self, id: &str) -> Result<(), Error> {
        let pitr = self.pitr()?;
        let target = pitr.target();
        let mut bases = super::base::list_bases(target, id).await?;
        if bases.is_empty() {
            return Ok(());
        }
        bases.sort_by_key(|b| b.finished_time());
        let now = SystemTime::now();
        let age =
            |b: &super::base::BaseInfo| now.duration_since(b.finished_time()).unwrap_or_default();
        let newest = bases.len() - 1;
        for (i, base) in bases.iter().enumerate() {
            if i != newest && age(base) > pitr.settings.base_retention {
                info!(server = %id, label = %base.label, "pruning an expired base backup");
                delete_prefix(target, &format!("{}/{}", base_prefix(id), base.label)).await?;
            }
        }
        // The oldest point still restorable is now - retention: WAL from the newest base
        // backup finished before it (else the oldest one) is needed, older segments are not.
        let keep_from = bases
            .iter()
            .rev()
            .find(|b| age(b) >= pitr.settings.retention)
            .unwrap_or(&bases[0]);
        let keep_segment = &keep_from.start_wal;
        let store = target.store();
        let prefix = target.path(&wal_prefix(id))?;
        let mut listing = store.list(Some(&prefix));
        let mut expired = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| Error::busy(format!("listing WAL: {e}")))?;
            let Some(name) = meta.location.filename() else {
                continue;
            };
            if is_segment(name) && name[8..] < keep_segment[8..] {
                expired.push(meta.location.clone());
            }
        }
        for location in expired {
            store
                .delete(&location)
                .await
                .map_err(|e| Error::busy(format!("pruning {location}: {e}")))?;
        }
        Ok(())
    }
}

/// A WAL segment's name: 24 hex digits (timeline, log, segment).
pub(crate) fn is_segment(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The spool directory, made and given to the cluster's owner (the server runs as the
/// image's `postgres`, which cannot write the disk's root).
fn ensure_spool(mount: &Path, spool: &Path) -> std::io::Result<()> {
    let owner = std::fs::metadata(mount.join(super::PG_DATA_SUBDIR))?;
    match std::fs::metadata(spool) {
        Ok(meta) if meta.uid() == owner.uid() => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(spool)?,
        Err(e) => return Err(e),
    }
    std::os::unix::fs::chown(spool, Some(owner.uid()), Some(owner.gid()))?;
    std::fs::set_permissions(spool, std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

/// Uploads one spooled file (segments are 16 MiB, history files tiny: one request each).
async fn ship_file(target: &Target, id: &str, name: &str, file: &Path) -> Result<(), String> {
    let path = target
        .path(&format!("{}/{name}", wal_prefix(id)))
        .map_err(|e| e.message)?;
    let data = tokio::fs::read(file).await.map_err(|e| e.to_string())?;
    target
        .store()
        .put(&path, PutPayload::from(data))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

pub(crate) async fn delete_prefix(target: &Target, prefix: &str) -> Result<(), Error> {
    let store = target.store();
    let prefix = target.path(prefix)?;
    let mut listing = store.list(Some(&prefix));
    let mut found = Vec::new();
    while let Some(meta) = listing.next().await {
        found.push(
            meta.map_err(|e| Error::busy(format!("listing {prefix}: {e}")))?
                .location,
        );
    }
    for location in found {
        store
            .delete(&location)
            .await
            .map_err(|e| Error::busy(format!("deleting {location}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_command_spools_durably() {
        let args = server_args();
        assert_eq!(args[..2], ["docker-entrypoint.sh", "postgres"]);
        let command = args
            .iter()
            .find(|a| a.starts_with("archive_command="))
            .unwrap();
        assert!(command.contains("sync"));
        assert!(command.contains(".part"));
        assert!(is_segment("000000010000000000000003"));
        assert!(!is_segment("00000002.history"));
    }
}
