//! Point-in-time restore of a dedicated PostgreSQL server: a new data disk from the nearest
//! base backup before the point, WAL replayed to it in a temporary sandbox (`restore_command`
//! reads a directory the agent fills from the target while recovery runs, `wal_fetch.rs`;
//! `recovery_target_action = promote`), checked to have finished recovery and to answer, shut
//! down cleanly, and only then swapped in.
//!
//! Phases are recorded in the addon's row (`extra.pg_restore`) before each step:
//! `preparing` and `recovering` touch only the new disk and the temporary sandbox, so a
//! failure or a killed agent discards them and the running server is as it was; `swapping`
//! is finished forward (the disk owners change in one transaction, `store/pitr.rs`). The old
//! disk is kept under the owner `<kind>+previous` until `--discard-previous`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::archive::{ArchivedServer, SPOOL_DIR};
use super::base::{list_bases, unpack_base, BaseInfo};
use super::wal_fetch::RESTORE_WAL_DIR;
use crate::core::addons::host::ServerLaunch;
use crate::core::addons::{
    credentials, dedicated_server_name, is_shared, server_owner, AddonService,
};
use crate::core::error::Error;
use crate::model::AddonRestored;
use crate::store::addons::{AddonRow, AddonStatus};
use crate::store::Owner;

const KIND: &str = "miren-postgresql";
const STATE_KEY: &str = "pg_restore";
const PREVIOUS_KEY: &str = "pg_previous_disk";
/// How long recovery may take before the restore gives up (and leaves the server as it was).
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long the recovered server may take to shut down cleanly (its shutdown checkpoint comes
/// right after one of ours) before it is killed; then the first start on the disk is a crash
/// recovery.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(120);

/// What a restore recovers from: a server's archive, one of its base backups, and the login
/// the recovered cluster knows.
pub(super) struct Source<'a> {
    pub(super) server: &'a ArchivedServer,
    pub(super) base: &'a BaseInfo,
    /// The app whose data it is, and its login now.
    pub(super) app: &'a str,
    pub(super) login: &'a miren_addons::Credentials,
}

/// The point a restore goes to.
#[derive(Debug, Clone, Copy)]
pub enum RestorePoint {
    Time(SystemTime),
    /// Everything archived.
    Latest,
}

/// A restore in flight, as its row records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RestoreState {
    pub(super) phase: Phase,
    /// The server's disk before the restore (kept as the previous one).
    pub(super) old_disk: String,
    pub(super) base: String,
    /// A restore of one app of the shared server: the databases it swaps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) shared: Option<super::shared_restore::SharedCopy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Phase {
    Preparing,
    Recovering,
    /// Shared server: the recovered database is copied into a new database there.
    Copying,
    Swapping,
}

pub(super) fn restore_owner(app: &str) -> Owner {
    Owner::Addon {
        app: app.to_string(),
        kind: format!("{KIND}+restore"),
    }
}

fn previous_owner(app: &str) -> Owner {
    Owner::Addon {
        app: app.to_string(),
        kind: format!("{KIND}+previous"),
    }
}

pub(super) fn state_of(row: &AddonRow) -> Option<RestoreState> {
    row.extra
        .get(STATE_KEY)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// `2026-12-01 23:59:59.123456+00`, PostgreSQL's own form of a UTC time.
fn pg_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t)
        .to_string()
        .replace('T', " ")
        .replace('Z', "+00")
}

impl AddonService {
    pub(super) fn set_restore_state(
        &self,
        row: &AddonRow,
        state: Option<&RestoreState>,
    ) -> Result<(), Error> {
        let value = state
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| Error::internal(format!("recording the restore: {e}")))?;
        self.store
            .edit_addon_extra(&row.app, &row.kind, |extra| match value {
                Some(value) => {
                    extra.insert(STATE_KEY.into(), value);
                }
                None => {
                    extra.remove(STATE_KEY);
                }
            })?;
        Ok(())
    }

    /// The PostgreSQL addon of `app` that can be restored.
    pub(super) fn restorable(&self, app: &str, addon_arg: &str) -> Result<AddonRow, Error> {
        let (name, _) = super::super::split_addon_arg(addon_arg);
        if name != KIND {
            return Err(Error::new(
                crate::core::error::ErrorKind::Unprocessable,
                "unprocessable",
                format!("point-in-time restore is for {KIND}; `{name}` has no continuous archive"),
            ));
        }
        self.find(app, KIND)
    }

    /// Restores an app's dedicated PostgreSQL to `point`; returns once the restored server
    /// is the app's and answers.
    pub async fn pg_restore(
        self: &Arc<Self>,
        app: &str,
        addon_arg: &str,
        point: RestorePoint,
    ) -> Result<AddonRestored, Error> {
        let pitr = self.pitr()?.clone();
        let _one = pitr.restoring.lock().await;
        let row = self.restorable(app, addon_arg)?;
        if let Some(state) = state_of(&row) {
            // What an earlier failed or cut-short restore left.
            self.resume_restore(&row, &state).await?;
        }
        let row = self.find(app, KIND)?;
        if row.status != AddonStatus::Active {
            return Err(Error::conflict(format!(
                "{KIND} of app `{app}` is {}; restore it once it is active",
                row.status
            )));
        }
        if is_shared(&row) {
            return self.pg_restore_shared(&row, point).await;
        }
        if let Some(previous) = row.extra.get(PREVIOUS_KEY).and_then(|v| v.as_str()) {
            return Err(Error::conflict(format!(
                "app `{app}` keeps the disk from before its last restore (`{previous}`); run `miren addon restore {KIND} -a {app} --discard-previous` first"
            )));
        }
        let owner = server_owner(&row);
        let server = self
            .archived_server(&pitr, owner.clone(), credentials(&row))?
            .ok_or_else(|| Error::busy(format!("the server of app `{app}` is not running")))?;
        // What is committed now becomes archivable (a segment switch) and is shipped.
        self.flush_archive(&server).await?;
        let target = pitr.target().clone();
        let bases = list_bases(&target, &server.id).await?;
        let base = choose_base(&bases, point).ok_or_else(|| {
            Error::not_found(match point {
                RestorePoint::Latest => format!("app `{app}` has no base backup yet; one is taken right after provisioning, try again in a minute"),
                RestorePoint::Time(t) => format!(
                    "no base backup of app `{app}` ends before {}; `miren addon backups {KIND} -a {app}` shows the restorable window",
                    super::archive::rfc3339(t)
                ),
            })
        })?;
        let old_disk = self
            .store
            .disk_of(&owner)?
            .ok_or_else(|| Error::busy(format!("app `{app}`'s server has no disk")))?;
        let mut state = RestoreState {
            phase: Phase::Preparing,
            old_disk: old_disk.name.clone(),
            base: base.label.clone(),
            shared: None,
        };
        self.set_restore_state(&row, Some(&state))?;
        info!(app = %app, base = %base.label, ?point, "restoring PostgreSQL");
        let recovered = self
            .recover_on_new_disk(
                &row,
                Source {
                    server: &server,
                    base,
                    app,
                    login: &credentials(&row),
                },
                point,
                old_disk.size_gb,
                &mut state,
            )
            .await;
        let disk = match recovered {
            Ok(disk) => disk,
            Err(e) => {
                warn!(app = %app, error = %e, "restore failed; discarding what it made");
                if let Err(cleanup) = self.discard_restore(&row).await {
                    warn!(app = %app, error = %cleanup, "discarding the restore's disk failed; the next restore or start retries");
                }
                return Err(e);
            }
        };
        state.phase = Phase::Swapping;
        self.set_restore_state(&row, Some(&state))?;
        self.swap_in(&row, &state).await?;
        Ok(AddonRestored {
            name: KIND.to_string(),
            app: app.to_string(),
            restored_to: match point {
                RestorePoint::Latest => "latest".into(),
                RestorePoint::Time(t) => super::archive::rfc3339(t),
            },
            base_backup: base.label.clone(),
            disk,
            previous_disk: Some(state.old_disk.clone()),
            previous_database: None,
        })
    }

    /// Switches the server to a new WAL segment and waits until its spool is shipped, so
    /// everything committed before now can be restored. A server that does not answer is
    /// restored from what was archived.
    pub(super) async fn flush_archive(&self, server: &ArchivedServer) -> Result<(), Error> {
        // The last segment holding what is committed now, once the switch closed it.
        let mut wait_for: Option<(tokio_postgres::Client, String)> = None;
        if let Ok(ip) = self.server(&server.owner).and_then(|s| s.ip()) {
            if let Ok(client) = super::connect(&super::Login {
                host: ip,
                user: &server.login.user,
                password: &server.login.password,
                database: &server.login.database,
            })
            .await
            {
                match client
                    .query_one("SELECT pg_walfile_name(pg_switch_wal() - 1)", &[])
                    .await
                {
                    Ok(row) => wait_for = Some((client, row.get(0))),
                    Err(e) => {
                        warn!(error = %super::describe(&e), "switching WAL before a restore failed")
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // Archived (spooled) by the server first, then shipped by us.
            let archived = match &wait_for {
                None => true,
                Some((client, segment)) => client
                    .query_one(
                        "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver",
                        &[],
                    )
                    .await
                    .map(|r| {
                        let last: String = r.get(0);
                        last.len() >= 24 && last[8..24] >= segment[8..]
                    })
                    .unwrap_or(false),
            };
            self.ship_server(server).await;
            let lag = self.pitr()?.lag(server);
            if archived && lag.pending_segments == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::busy(format!(
                    "the server's newest WAL could not be archived and shipped ({} files waiting: {}); restore when the target is reachable again",
                    lag.pending_segments,
                    lag.last_error.unwrap_or_else(|| "still pending".into())
                )));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Builds the restored server on a new disk and recovers it to `point` in a temporary
    /// sandbox; returns the new disk's name. Touches nothing of the running server.
    pub(super) async fn recover_on_new_disk(
        &self,
        row: &AddonRow,
        from: Source<'_>,
        point: RestorePoint,
        size_gb: u64,
        state: &mut RestoreState,
    ) -> Result<String, Error> {
        let Source {
            server,
            base,
            app: source_app,
            login: recovered_login,
        } = from;
        let variant = if is_shared(row) {
            miren_addons::Variant::Shared
        } else {
            miren_addons::Variant::Small
        };
        let pitr = self.pitr()?.clone();
        let target = pitr.target().clone();
        let owner = restore_owner(&row.app);
        let name = dedicated_server_name("addon-pgr", &row.app);
        let started = Instant::now();
        let disk = self.host.ensure_disk(&owner, &name, size_gb).await?;
        let mount = pitr
            .mount_of_disk(&disk)?
            .ok_or_else(|| Error::busy(format!("disk `{disk}` is not mounted")))?;
        let pgdata = mount.join(super::PG_DATA_SUBDIR);
        let wal_dir = mount.join(RESTORE_WAL_DIR);
        for dir in [&pgdata, &wal_dir, &mount.join(SPOOL_DIR)] {
            match std::fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::internal(format!("clearing {}: {e}", dir.display())))
                }
                _ => {}
            }
        }
        // With `--latest`, what the server wrote but did not archive yet (it crashed, or does
        // not answer) is on its data disk: replayed too, so `--latest` loses nothing committed.
        let server_wal = server.mount.join(super::PG_DATA_SUBDIR).join("pg_wal");
        let unarchived = matches!(point, RestorePoint::Latest)
            .then_some((server_wal.as_path(), server.timeline));
        // The WAL is fetched while the base is unpacked and recovery runs; recovery waits for
        // each file it asks for.
        let mut fetching =
            super::wal_fetch::plan(&target, &server.id, &base.start_wal, &wal_dir, unarchived)
                .await?
                .start(target.clone());
        unpack_base(&target, &server.id, &base.label, pgdata.clone()).await?;
        info!(app = %row.app, elapsed = ?started.elapsed(), "restore: base backup unpacked; starting recovery");
        write_recovery_settings(&pgdata, point)?;
        let local_only = super::recovered::prepare(&mount)?;
        state.phase = Phase::Recovering;
        self.set_restore_state(row, Some(state))?;
        let provider = self.provider(KIND)?.clone();
        let mut spec = provider.server(variant, &credentials(row));
        // Sized as the server it replaces: the tier's memory, CPU and settings.
        let size = provider.server_size(variant, crate::core::addons::tiers::tier(row));
        if let Some(size) = &size {
            spec.command.extend(size.args.iter().cloned());
        }
        spec.command.extend(local_only);
        let sandbox = self
            .host
            .run_server(
                &owner,
                ServerLaunch {
                    name,
                    image: row.image.clone(),
                    command: spec.command,
                    env: spec.env,
                    disk: Some((disk.clone(), super::PG_DATA_MOUNT.to_string())),
                    allow_from: Vec::new(),
                    limits: size.as_ref().map(|s| (s.memory_bytes, s.cpus)),
                },
            )
            .await?;
        // The cluster's superuser: the shared server's, or the source app's owner role that
        // made a dedicated cluster (its login now may not exist at the point).
        let owner_role = miren_addons::PgIdentifiers::for_app(source_app).role;
        let superusers = [super::ADMIN_USER, &owner_role, &recovered_login.user];
        let client = {
            let promoted = self.wait_promoted(&sandbox.id, &mount, &superusers);
            tokio::pin!(promoted);
            tokio::select! {
                client = &mut promoted => client?,
                failed = fetching.failure() => return Err(failed),
            }
        };
        // Recovery is over: what it did not ask for is not needed.
        fetching.finish().await;
        info!(app = %row.app, elapsed = ?started.elapsed(), "restore: recovered to the point");
        // The recovery settings served once; a later crash recovery must not see them.
        // One statement each: ALTER SYSTEM refuses to run in a (multi-statement) transaction.
        for statement in [
            "ALTER SYSTEM RESET restore_command",
            "ALTER SYSTEM RESET recovery_target_time",
            "ALTER SYSTEM RESET recovery_target_action",
            "SELECT pg_reload_conf()",
        ] {
            client
                .simple_query(statement)
                .await
                .map_err(|e| Error::busy(format!("finishing recovery: {}", super::describe(&e))))?;
        }
        if is_shared(row) {
            // Only this app's database goes back, as a dump read from this disk.
            self.dump_recovered(&sandbox.id, &row.database).await?;
        } else if recovered_login.user != row.user {
            // A fork: the copy becomes the other app's login and database.
            super::fork::adopt(&client, recovered_login, &credentials(row)).await?;
        } else {
            // The catalog has the logins of the point: the app's current one must work.
            super::recovered::apply_current_login(&client, recovered_login).await?;
        }
        client
            .simple_query("CHECKPOINT")
            .await
            .map_err(|e| Error::busy(format!("finishing recovery: {}", super::describe(&e))))?;
        drop(client);
        // A clean shutdown: deleting the sandbox kills PostgreSQL, and the first start of the
        // restored disk would then be a crash recovery (with a sync of the data directory).
        if let Err(e) = self.host.stop_sandbox(&sandbox.id, SHUTDOWN_GRACE).await {
            warn!(sandbox = %sandbox.id, error = %e, "stopping the recovered server failed; its first start on the restored disk recovers from a crash");
        }
        info!(app = %row.app, elapsed = ?started.elapsed(), "restore: recovered server shut down");
        if let Err(e) = std::fs::remove_dir_all(&wal_dir) {
            warn!(dir = %wal_dir.display(), error = %e, "removing the replayed WAL failed");
        }
        self.host.delete_owned(&owner).await?;
        super::recovered::remove(&mount);
        Ok(disk)
    }

    /// Waits until the temporary server finished recovery (promoted) and answers; fails when
    /// it keeps exiting (recovery could not reach the point) or the timeout passes.
    async fn wait_promoted(
        &self,
        sandbox: &str,
        mount: &Path,
        superusers: &[&str],
    ) -> Result<tokio_postgres::Client, Error> {
        let deadline = Instant::now() + RECOVERY_TIMEOUT;
        let before = self.host.sandbox(sandbox).map_or(0, |s| s.restarts);
        loop {
            let state = self.host.sandbox(sandbox)?;
            if state.failed || state.restarts >= before + 2 {
                // The lines that say why (FATAL/PANIC), else the last ones.
                let tail = self.host.log_tail(sandbox, 60);
                let why: Vec<&str> = tail
                    .split(" | ")
                    .filter(|l| {
                        l.contains("FATAL") || l.contains("PANIC") || l.contains("recovery")
                    })
                    .collect();
                let why = if why.is_empty() {
                    self.host.log_tail(sandbox, 6)
                } else {
                    why.join(" | ")
                };
                return Err(Error::new(crate::core::error::ErrorKind::Unprocessable, "unprocessable", format!(
                    "recovery did not finish: PostgreSQL stopped ({}); nothing was changed. It said: {why}",
                    state.exit_code.map_or("no exit code".into(), |c| format!("exit code {c}")),
                )));
            }
            if let Ok(client) = super::recovered::connect_superuser(mount, superusers).await {
                if let Ok(row) = client.query_one("SELECT pg_is_in_recovery()", &[]).await {
                    if !row.get::<_, bool>(0) {
                        return Ok(client);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::busy(format!(
                    "recovery did not finish within {}s; nothing was changed. Its last output: {}",
                    RECOVERY_TIMEOUT.as_secs(),
                    self.host.log_tail(sandbox, 6)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes what a restore made before its swap (the temporary sandbox and disk).
    pub(super) async fn discard_restore(&self, row: &AddonRow) -> Result<(), Error> {
        let owner = restore_owner(&row.app);
        self.host.delete_owned(&owner).await?;
        self.host.remove_disk(&owner).await?;
        self.set_restore_state(row, None)
    }

    /// Makes the restored disk the server's: the server (and its pooler) stop, the owners
    /// swap in one transaction, and the driver starts the server again on the restored disk.
    pub(super) async fn swap_in(
        self: &Arc<Self>,
        row: &AddonRow,
        state: &RestoreState,
    ) -> Result<(), Error> {
        let owner = server_owner(row);
        self.remove_sidecar(&owner).await?;
        self.host.delete_owned(&owner).await?;
        self.host.delete_owned(&restore_owner(&row.app)).await?;
        self.store.swap_restored_disk(
            &owner,
            &restore_owner(&row.app),
            &previous_owner(&row.app),
        )?;
        self.store.edit_addon_extra(&row.app, &row.kind, |extra| {
            extra.remove(STATE_KEY);
            extra.insert(PREVIOUS_KEY.into(), state.old_disk.clone().into());
        })?;
        self.store.transition_addon(
            &row.app,
            &row.kind,
            &[AddonStatus::Active, AddonStatus::Error],
            AddonStatus::Provisioning,
            Some("restored; starting the server on the restored disk"),
        )?;
        let mut done = self.kick(&row.app, &row.kind);
        let _ = done.wait_for(|d| *d).await;
        let now = self.find(&row.app, &row.kind)?;
        if now.status != AddonStatus::Active {
            return Err(Error::busy(format!(
                "the restored server did not start: {}",
                now.reason.unwrap_or_else(|| now.status.to_string())
            )));
        }
        info!(app = %row.app, previous = %state.old_disk, "PostgreSQL restored");
        Ok(())
    }

    /// Finishes or discards a restore a failure or a stopped agent left.
    async fn resume_restore(
        self: &Arc<Self>,
        row: &AddonRow,
        state: &RestoreState,
    ) -> Result<(), Error> {
        if let Some(copy) = &state.shared {
            return self.resume_shared_restore(row, state.phase, copy).await;
        }
        match state.phase {
            Phase::Preparing | Phase::Recovering | Phase::Copying => {
                info!(app = %row.app, "discarding a restore that did not finish; the server is as it was");
                self.discard_restore(row).await
            }
            Phase::Swapping => {
                info!(app = %row.app, "finishing the swap of a restore that recovered");
                self.swap_in(row, state).await
            }
        }
    }

    /// At start (before the addons resume): every restore left mid-way is finished or
    /// discarded.
    pub async fn resume_pg_restores(self: &Arc<Self>) -> Result<(), Error> {
        for row in self.store.all_addons()? {
            if row.kind != KIND {
                continue;
            }
            if let Some(state) = state_of(&row) {
                if state.shared.is_some() {
                    // Needs the shared server up, which the driver starts after this.
                    self.resume_shared_in_background(row);
                } else if state.phase == Phase::Swapping {
                    // The driver must not start the old server first: swap now, in the
                    // background the driver then starts the restored one.
                    let this = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = this.resume_restore(&row, &state).await {
                            warn!(app = %row.app, error = %e, "finishing a restore failed");
                        }
                    });
                } else {
                    self.resume_restore(&row, &state).await?;
                }
            }
        }
        Ok(())
    }

    /// Deletes the disk (a shared server's app: the database) kept from before the last
    /// restore; returns (disk, database) deleted.
    pub async fn pg_discard_previous(
        &self,
        app: &str,
        addon_arg: &str,
    ) -> Result<(Option<String>, Option<String>), Error> {
        let row = self.restorable(app, addon_arg)?;
        if is_shared(&row) {
            return Ok((None, self.discard_previous_database(&row).await?));
        }
        let previous = row
            .extra
            .get(PREVIOUS_KEY)
            .and_then(|v| v.as_str())
            .map(str::to_string);
        self.host.remove_disk(&previous_owner(app)).await?;
        self.store.edit_addon_extra(app, KIND, |extra| {
            extra.remove(PREVIOUS_KEY);
        })?;
        Ok((previous, None))
    }

    /// Removes a restore's leftovers of an addon being destroyed.
    pub(crate) async fn remove_restore_disks(&self, app: &str) -> Result<(), Error> {
        self.host.delete_owned(&restore_owner(app)).await?;
        self.host.remove_disk(&restore_owner(app)).await?;
        self.host.remove_disk(&previous_owner(app)).await
    }
}

/// The newest base backup that ends before the point.
pub(super) fn choose_base(bases: &[BaseInfo], point: RestorePoint) -> Option<&BaseInfo> {
    bases
        .iter()
        .filter(|b| match point {
            RestorePoint::Latest => true,
            RestorePoint::Time(t) => b.finished_time() <= t,
        })
        .max_by_key(|b| b.finished_time())
}

/// `recovery.signal` and the recovery settings, in the restored data directory.
fn write_recovery_settings(pgdata: &Path, point: RestorePoint) -> Result<(), Error> {
    let mut settings = format!(
        "\n# miren point-in-time restore\nrestore_command = '{}'\nrecovery_target_action = 'promote'\n",
        super::wal_fetch::restore_command()
    );
    if let RestorePoint::Time(t) = point {
        settings.push_str(&format!("recovery_target_time = '{}'\n", pg_time(t)));
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let mut text = std::fs::read_to_string(&auto).unwrap_or_default();
    text.push_str(&settings);
    let write = |path: &Path, text: &str| -> Result<(), Error> {
        std::fs::write(path, text)
            .map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))?;
        std::os::unix::fs::chown(path, Some(super::PG_UID), Some(super::PG_UID))
            .map_err(|e| Error::internal(format!("chown {}: {e}", path.display())))
    };
    write(&auto, &text)?;
    write(&pgdata.join("recovery.signal"), "")?;
    // Directories the base backup left empty, as PostgreSQL expects them.
    for dir in ["pg_wal", "pg_wal/archive_status"] {
        let path = pgdata.join(dir);
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::internal(format!("creating {}: {e}", path.display())))?;
        std::os::unix::fs::chown(&path, Some(super::PG_UID), Some(super::PG_UID))
            .map_err(|e| Error::internal(format!("chown {}: {e}", path.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_postgres_utc() {
        let t = humantime::parse_rfc3339("2026-12-01T23:59:58.123456Z").unwrap();
        assert_eq!(pg_time(t), "2026-12-01 23:59:58.123456+00");
    }
}
