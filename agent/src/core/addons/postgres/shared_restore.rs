//! Point-in-time restore of one app of the shared PostgreSQL server. The whole server is
//! archived; the restore rebuilds it at the point in a temporary sandbox exactly as a
//! dedicated restore does (`restore.rs`: new disk, base backup, WAL replayed, checked), dumps
//! only the app's database there (`pg_dump` in that sandbox, to its own disk), and restores
//! the dump into a new database of the running shared server (`pg_restore` in the shared
//! server's sandbox over its local socket, as the app's owner role). Then one transaction
//! renames the app's database to `<db>_pitr_prev` and the new one to `<db>`: the app sees its
//! old database or the restored one, never half of one. Other apps' databases are not touched.
//!
//! Phases, recorded in the app's row before each step (`extra.pg_restore` with `shared`):
//! `preparing`, `recovering` and `copying` touch only the temporary disk and sandbox and the
//! new database, which a failure or a restarted agent drops; `swapping` is finished forward
//! (the rename is one transaction, so it either happened or did not).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tracing::{info, warn};

use super::archive::rfc3339;
use super::base::list_bases;
use super::restore::{
    choose_base, restore_owner, state_of, Phase, RestorePoint, RestoreState, Source,
};
use crate::core::addons::{credentials, shared_owner, AddonService};
use crate::core::error::Error;
use crate::model::AddonRestored;
use crate::store::addons::AddonRow;

const KIND: &str = "miren-postgresql";
/// The app's database from before its last restore, kept until `--discard-previous`.
const PREVIOUS_DB_KEY: &str = "pg_previous_database";
/// The dump of the app's database, relative to the temporary disk's root.
const DUMP_FILE: &str = "pitr-copy.dump";
/// Where the dump is put on the shared server's disk for `pg_restore`, relative to its root.
const DUMP_DIR: &str = "pitr-copy";
/// The shared server's local socket (the image's default) and its bootstrap superuser, which
/// keeps a local `trust` login whatever the administrator's rotations did.
const SHARED_SOCKET: &str = "/var/run/postgresql";

/// The databases a shared restore swaps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SharedCopy {
    /// Filled with the restored data, then renamed to the app's database.
    pub(super) new_database: String,
    /// What the app's database is renamed to.
    pub(super) previous_database: String,
}

/// `<db>_<suffix>`, within PostgreSQL's 63 bytes (names are `[a-z0-9_]`).
fn derived_name(database: &str, suffix: &str) -> String {
    let keep = 63 - suffix.len() - 1;
    let stem: String = database.chars().take(keep).collect();
    format!("{stem}_{suffix}")
}

/// The dump's path inside the shared server's sandbox.
fn dump_inside_shared(app: &str) -> String {
    format!("{}/{DUMP_DIR}/{app}.dump", super::PG_DATA_MOUNT)
}

async fn database_exists(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some())
}

fn sql_failed(what: &str) -> impl Fn(tokio_postgres::Error) -> Error + '_ {
    move |e| Error::busy(format!("{what}: {}", super::describe(&e)))
}

impl AddonService {
    /// Restores one app's database on the shared server to `point` (the restore lock is held
    /// and an earlier restore's leftovers are gone).
    pub(super) async fn pg_restore_shared(
        self: &Arc<Self>,
        row: &AddonRow,
        point: RestorePoint,
    ) -> Result<AddonRestored, Error> {
        let app = row.app.as_str();
        if let Some(previous) = row.extra.get(PREVIOUS_DB_KEY).and_then(|v| v.as_str()) {
            return Err(Error::conflict(format!(
                "app `{app}` keeps its database from before its last restore (`{previous}` on the shared server); run `miren addon restore {KIND} -a {app} --discard-previous` first"
            )));
        }
        let pitr = self.pitr()?.clone();
        let owner = shared_owner(KIND);
        let server = self
            .archived_server(&pitr, owner.clone(), self.shared_admin_login()?)?
            .ok_or_else(|| Error::busy("the shared PostgreSQL server is not running"))?;
        // What is committed now becomes archivable and is shipped.
        self.flush_archive(&server).await?;
        let bases = list_bases(pitr.target(), &server.id).await?;
        let base = choose_base(&bases, point).ok_or_else(|| {
            Error::not_found(format!(
                "no base backup of the shared server ends before that point; `miren addon backups {KIND} -a {app}` shows the restorable window"
            ))
        })?;
        let disk = self
            .store
            .disk_of(&owner)?
            .ok_or_else(|| Error::busy("the shared server has no disk"))?;
        let copy = SharedCopy {
            new_database: derived_name(&row.database, "pitr_new"),
            previous_database: derived_name(&row.database, "pitr_prev"),
        };
        let mut state = RestoreState {
            phase: Phase::Preparing,
            old_disk: disk.name.clone(),
            base: base.label.clone(),
            shared: Some(copy.clone()),
        };
        self.set_restore_state(row, Some(&state))?;
        info!(app = %app, base = %base.label, ?point, "restoring one app of the shared PostgreSQL server");
        let recovered = self
            .recover_on_new_disk(
                row,
                Source {
                    server: &server,
                    base,
                    app,
                    login: &credentials(row),
                },
                point,
                disk.size_gb,
                &mut state,
            )
            .await;
        let copied = match recovered {
            Ok(_) => {
                state.phase = Phase::Copying;
                match self.set_restore_state(row, Some(&state)) {
                    Ok(()) => self.copy_into_shared(row, &copy).await,
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        if let Err(e) = copied {
            warn!(app = %app, error = %e, "shared restore failed; discarding what it made");
            if let Err(cleanup) = self.discard_shared_restore(row, &copy).await {
                warn!(app = %app, error = %cleanup, "discarding the restore's leftovers failed; the next restore or start retries");
            }
            return Err(e);
        }
        state.phase = Phase::Swapping;
        self.set_restore_state(row, Some(&state))?;
        self.finish_shared_swap(row, &copy).await?;
        Ok(AddonRestored {
            name: KIND.to_string(),
            app: app.to_string(),
            restored_to: match point {
                RestorePoint::Latest => "latest".into(),
                RestorePoint::Time(t) => rfc3339(t),
            },
            base_backup: base.label.clone(),
            disk: disk.name,
            previous_disk: None,
            previous_database: Some(copy.previous_database),
        })
    }

    fn shared_admin_login(&self) -> Result<miren_addons::Credentials, Error> {
        let server = self
            .store
            .server(KIND)?
            .ok_or_else(|| Error::busy("there is no shared PostgreSQL server"))?;
        Ok(self
            .provider(KIND)?
            .admin_login(&server.admin_user, &server.admin_password))
    }

    /// The running shared server: its sandbox and an administrator's session.
    async fn shared_admin(&self) -> Result<(String, Client), Error> {
        let sandbox = self.server(&shared_owner(KIND))?;
        let login = self.shared_admin_login()?;
        let client = super::connect(&super::Login {
            host: sandbox.ip()?,
            user: &login.user,
            password: &login.password,
            database: &login.database,
        })
        .await
        .map_err(|e| {
            Error::busy(format!(
                "connecting to the shared PostgreSQL server: {}",
                super::describe(&e)
            ))
        })?;
        Ok((sandbox.id, client))
    }

    /// In the temporary sandbox: the app's database, dumped to the temporary disk.
    pub(super) async fn dump_recovered(&self, sandbox: &str, database: &str) -> Result<(), Error> {
        let socket = super::recovered::socket_dir_inside();
        let file = format!("{}/{DUMP_FILE}", super::PG_DATA_MOUNT);
        let (code, stderr) = self
            .host
            .exec_status(
                sandbox,
                [
                    "pg_dump",
                    "-h",
                    &socket,
                    "-U",
                    super::ADMIN_USER,
                    "--format=custom",
                    "-f",
                    &file,
                    database,
                ]
                .map(String::from)
                .to_vec(),
            )
            .await?;
        if code != 0 {
            return Err(Error::busy(format!(
                "dumping database `{database}` from the recovered server failed (exit {code}): {}",
                stderr.trim()
            )));
        }
        Ok(())
    }

    /// `copying`: the dump goes onto the shared server's disk and is restored into a new,
    /// empty database owned by the app's owner role.
    async fn copy_into_shared(&self, row: &AddonRow, copy: &SharedCopy) -> Result<(), Error> {
        let pitr = self.pitr()?.clone();
        let temp = self
            .store
            .disk_of(&restore_owner(&row.app))?
            .ok_or_else(|| Error::busy("the restore's disk is gone"))?;
        let temp_mount = pitr
            .mount_of_disk(&temp.name)?
            .ok_or_else(|| Error::busy(format!("disk `{}` is not mounted", temp.name)))?;
        let shared_disk = self
            .store
            .disk_of(&shared_owner(KIND))?
            .ok_or_else(|| Error::busy("the shared server has no disk"))?;
        let shared_mount = pitr
            .mount_of_disk(&shared_disk.name)?
            .ok_or_else(|| Error::busy(format!("disk `{}` is not mounted", shared_disk.name)))?;
        let dir = shared_mount.join(DUMP_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| Error::internal(format!("securing {}: {e}", dir.display())))?;
        let dump = dir.join(format!("{}.dump", row.app));
        tokio::fs::copy(temp_mount.join(DUMP_FILE), &dump)
            .await
            .map_err(|e| Error::internal(format!("copying the dump to {}: {e}", dump.display())))?;

        let (sandbox, admin) = self.shared_admin().await?;
        let owner = super::logins::owner_of(&admin, &row.user, &row.database)
            .await
            .map_err(sql_failed("finding the app's owner role"))?
            .ok_or_else(|| {
                Error::busy(format!(
                    "database `{}` is not on the shared server",
                    row.database
                ))
            })?;
        let new = super::ident(&copy.new_database);
        // A new database each time: what an earlier attempt left is dropped.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {new} WITH (FORCE)"))
            .await
            .map_err(sql_failed("dropping an earlier restore's database"))?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {new} OWNER {} TEMPLATE template0",
                super::ident(&owner)
            ))
            .await
            .map_err(sql_failed("creating the database to restore into"))?;
        admin
            .batch_execute(&format!(
                "REVOKE ALL ON DATABASE {new} FROM PUBLIC; GRANT CONNECT ON DATABASE {new} TO {}",
                super::ident(&owner)
            ))
            .await
            .map_err(sql_failed("securing the database to restore into"))?;
        let (code, stderr) = self
            .host
            .exec_status(
                &sandbox,
                [
                    "pg_restore",
                    "-h",
                    SHARED_SOCKET,
                    "-U",
                    super::ADMIN_USER,
                    "-d",
                    &copy.new_database,
                    "--role",
                    &owner,
                    "--no-owner",
                    "--exit-on-error",
                    "--single-transaction",
                    &dump_inside_shared(&row.app),
                ]
                .map(String::from)
                .to_vec(),
            )
            .await?;
        let _ = std::fs::remove_file(&dump);
        if code != 0 {
            return Err(Error::busy(format!(
                "restoring the app's database into the shared server failed (exit {code}): {}",
                stderr.trim()
            )));
        }
        Ok(())
    }

    /// `swapping`: in one transaction the app's database becomes the previous one and the
    /// restored one takes its name; then the temporary disk goes. Safe to repeat.
    async fn finish_shared_swap(&self, row: &AddonRow, copy: &SharedCopy) -> Result<(), Error> {
        let (_, admin) = self.shared_admin().await?;
        let db = super::ident(&row.database);
        let new = super::ident(&copy.new_database);
        let prev = super::ident(&copy.previous_database);
        let swapped = !database_exists(&admin, &copy.new_database)
            .await
            .map_err(sql_failed("looking at the databases"))?;
        if !swapped {
            // No new sessions of the app (also none of its pooler), then end the ones there
            // are: a database with sessions cannot be renamed.
            admin
                .batch_execute(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"))
                .await
                .map_err(sql_failed("closing the app's database"))?;
            super::retry_concurrent(|| async {
                admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = $1 AND pid <> pg_backend_pid()",
                        &[&row.database],
                    )
                    .await?;
                // Sessions take a moment to end after the signal.
                tokio::time::sleep(Duration::from_millis(100)).await;
                // One query string is one (implicit) transaction: both renames or neither.
                admin
                    .batch_execute(&format!(
                        "ALTER DATABASE {db} RENAME TO {prev}; ALTER DATABASE {new} RENAME TO {db}"
                    ))
                    .await
            })
            .await
            .map_err(sql_failed("swapping the restored database in"))?;
        }
        for name in [&prev, &db] {
            admin
                .batch_execute(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
                .await
                .map_err(sql_failed("opening the databases"))?;
        }
        self.store.edit_addon_extra(&row.app, &row.kind, |extra| {
            extra.remove("pg_restore");
            extra.insert(
                PREVIOUS_DB_KEY.into(),
                copy.previous_database.clone().into(),
            );
        })?;
        self.remove_temporary(row).await;
        info!(app = %row.app, previous = %copy.previous_database, "shared PostgreSQL app restored");
        Ok(())
    }

    /// The temporary sandbox and disk, gone (failures are logged: nothing depends on them).
    async fn remove_temporary(&self, row: &AddonRow) {
        let owner = restore_owner(&row.app);
        if let Err(e) = self.host.delete_owned(&owner).await {
            warn!(app = %row.app, error = %e, "removing the restore's sandbox failed");
        }
        if let Err(e) = self.host.remove_disk(&owner).await {
            warn!(app = %row.app, error = %e, "removing the restore's disk failed");
        }
        if let Ok(Some(disk)) = self.store.disk_of(&shared_owner(KIND)) {
            if let Ok(Some(mount)) = self.pitr().and_then(|p| p.mount_of_disk(&disk.name)) {
                let _ =
                    std::fs::remove_file(mount.join(DUMP_DIR).join(format!("{}.dump", row.app)));
            }
        }
    }

    /// Drops what a shared restore made before its swap: the new database, the temporary
    /// sandbox and disk, the record. The app's database was never touched.
    async fn discard_shared_restore(&self, row: &AddonRow, copy: &SharedCopy) -> Result<(), Error> {
        let owner = restore_owner(&row.app);
        self.host.delete_owned(&owner).await?;
        let (_, admin) = self.shared_admin().await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                super::ident(&copy.new_database)
            ))
            .await
            .map_err(sql_failed("dropping the restore's database"))?;
        // A swap cut short before its rename may have closed the app's database.
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {} ALLOW_CONNECTIONS true",
                super::ident(&row.database)
            ))
            .await
            .map_err(sql_failed("opening the app's database"))?;
        self.remove_temporary(row).await;
        self.set_restore_state(row, None)
    }

    /// Finishes (`swapping`) or discards (any earlier phase) a shared restore left behind.
    pub(super) async fn resume_shared_restore(
        &self,
        row: &AddonRow,
        phase: Phase,
        copy: &SharedCopy,
    ) -> Result<(), Error> {
        if phase == Phase::Swapping {
            info!(app = %row.app, "finishing the swap of a shared restore that was copied");
            self.finish_shared_swap(row, copy).await
        } else {
            info!(app = %row.app, "discarding a shared restore that did not finish; the app's database is as it was");
            self.discard_shared_restore(row, copy).await
        }
    }

    /// At start: a shared restore left behind is resumed once the shared server answers
    /// (the driver starts it after this), retried for up to ten minutes.
    pub(super) fn resume_shared_in_background(self: &Arc<Self>, row: AddonRow) {
        let this = self.clone();
        tokio::spawn(async move {
            for _ in 0..120 {
                let Ok(pitr) = this.pitr().cloned() else {
                    return;
                };
                let _one = pitr.restoring.lock().await;
                // A request may have resumed it meanwhile.
                let Ok(Some(now)) = this.store.addon(&row.app, &row.kind) else {
                    return;
                };
                let Some(state) = state_of(&now) else { return };
                let Some(copy) = &state.shared else { return };
                match this.resume_shared_restore(&now, state.phase, copy).await {
                    Ok(()) => return,
                    Err(e) => {
                        info!(app = %row.app, error = %e, "resuming a shared restore waits for the shared server");
                    }
                }
                drop(_one);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            warn!(app = %row.app, "a shared restore left behind could not be resumed; the next restore of the app retries");
        });
    }

    /// Drops the app's database kept from before its last restore; returns its name.
    pub(super) async fn discard_previous_database(
        &self,
        row: &AddonRow,
    ) -> Result<Option<String>, Error> {
        let Some(previous) = row
            .extra
            .get(PREVIOUS_DB_KEY)
            .and_then(|v| v.as_str())
            .map(str::to_string)
        else {
            return Ok(None);
        };
        let (_, admin) = self.shared_admin().await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                super::ident(&previous)
            ))
            .await
            .map_err(sql_failed("dropping the previous database"))?;
        self.store.edit_addon_extra(&row.app, &row.kind, |extra| {
            extra.remove(PREVIOUS_DB_KEY);
        })?;
        Ok(Some(previous))
    }

    /// An app leaving the shared server: its restore's leftovers and kept database go first
    /// (the owner role cannot be dropped while it owns a database).
    pub(crate) async fn remove_shared_restore_leftovers(
        &self,
        row: &AddonRow,
    ) -> Result<(), Error> {
        if let Some(state) = state_of(row) {
            if let Some(copy) = &state.shared {
                self.discard_shared_restore(row, copy).await?;
            }
        }
        self.host.delete_owned(&restore_owner(&row.app)).await?;
        self.host.remove_disk(&restore_owner(&row.app)).await?;
        self.discard_previous_database(row).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_fit_postgres_identifiers() {
        assert_eq!(derived_name("shop", "pitr_new"), "shop_pitr_new");
        let long = "a".repeat(63);
        let name = derived_name(&long, "pitr_prev");
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("_pitr_prev"));
        assert_ne!(
            derived_name(&long, "pitr_new"),
            derived_name(&long, "pitr_prev")
        );
    }
}
