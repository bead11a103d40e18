//! `miren addon fork`: an app's PostgreSQL at a point in time, as a new dedicated addon of
//! another app (a staging copy of production). The other app's addon is made as usual, then
//! its disk is replaced by the copy exactly as a restore replaces one (`restore.rs`), and the
//! copy's login and database become the other app's.

use std::sync::Arc;

use miren_addons::Credentials;
use tracing::info;

use super::archive::rfc3339;
use super::base::list_bases;
use super::restore::{choose_base, Phase, RestorePoint, RestoreState, Source};
use crate::core::addons::{credentials, server_owner, AddonService};
use crate::core::error::Error;
use crate::model::{AddonRestored, CreateAddon};
use crate::store::addons::AddonStatus;

const KIND: &str = "miren-postgresql";

/// Makes the recovered copy (reached as its superuser, `recovered.rs`) the other app's: its
/// login (a superuser, as on every small server) and its database; `source` can no longer log
/// in.
pub(super) async fn adopt(
    client: &tokio_postgres::Client,
    source: &Credentials,
    other: &Credentials,
) -> Result<(), Error> {
    let exists = !client
        .query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&other.user])
        .await
        .map_err(|e| Error::busy(super::describe(&e)))?
        .is_empty();
    let verb = if exists { "ALTER" } else { "CREATE" };
    let mut statements = vec![format!(
        "{verb} ROLE {} LOGIN SUPERUSER PASSWORD {}",
        super::ident(&other.user),
        super::literal(&other.password)
    )];
    if source.database != other.database {
        statements.push(format!(
            "ALTER DATABASE {} RENAME TO {}",
            super::ident(&source.database),
            super::ident(&other.database)
        ));
    }
    statements.push(format!(
        "ALTER DATABASE {} OWNER TO {}",
        super::ident(&other.database),
        super::ident(&other.user)
    ));
    statements.push(format!(
        "ALTER ROLE {} PASSWORD NULL",
        super::ident(&source.user)
    ));
    for statement in statements {
        client
            .simple_query(&statement)
            .await
            .map_err(|e| Error::busy(format!("adopting the copy: {}", super::describe(&e))))?;
    }
    Ok(())
}

impl AddonService {
    /// Copies `app`'s PostgreSQL at `point` into a new dedicated addon of `to_app`.
    pub async fn pg_fork(
        self: &Arc<Self>,
        app: &str,
        addon_arg: &str,
        to_app: &str,
        point: RestorePoint,
    ) -> Result<AddonRestored, Error> {
        miren_addons::validate_user_name(to_app)
            .map_err(|e| Error::invalid(format!("app name: {e}")))?;
        let pitr = self.pitr()?.clone();
        let source = self.restorable(app, addon_arg)?;
        if crate::core::addons::is_shared(&source) {
            // The shared server's copy would hold every app's database.
            return Err(Error::new(crate::core::error::ErrorKind::Unprocessable, "unprocessable", format!(
                "app `{app}` uses the shared PostgreSQL server: a fork copies a dedicated server, and a copy of the shared one would hold every app's data. Restore it in place (`miren addon restore {KIND} -a {app}`), or move it to `{KIND}:small` first"
            )));
        }
        if source.status != AddonStatus::Active {
            return Err(Error::conflict(format!(
                "{KIND} of app `{app}` is {}; fork it once it is active",
                source.status
            )));
        }
        if self.store.addon(to_app, KIND)?.is_some() {
            return Err(Error::conflict(format!(
                "app `{to_app}` already has {KIND}; a fork makes a new one: `miren addon destroy {KIND} -a {to_app}` first, or fork to another app"
            )));
        }
        let server = self
            .archived_server(&pitr, server_owner(&source), credentials(&source))?
            .ok_or_else(|| Error::busy(format!("the server of app `{app}` is not running")))?;
        self.flush_archive(&server).await?;
        let bases = list_bases(pitr.target(), &server.id).await?;
        let base = choose_base(&bases, point)
            .ok_or_else(|| {
                Error::not_found(format!(
                    "no base backup of app `{app}` ends before that point; `miren addon backups {KIND} -a {app}` shows the restorable window"
                ))
            })?
            .clone();
        // The other app's addon, made as any other (same version), then replaced by the copy.
        let (_, mut done) = self
            .create(
                &CreateAddon {
                    app: to_app.to_string(),
                    addon: format!("{KIND}:small"),
                    variant: None,
                    version: Some(source.version.clone()),
                    pooling: None,
                    // The copy holds the source's data: the same tier gives it room.
                    tier: Some(crate::core::addons::tiers::tier(&source).name().to_string()),
                    client_connections: None,
                    wait: true,
                },
                "fork",
            )
            .await?;
        let _ = done.wait_for(|d| *d).await;
        let _one = pitr.restoring.lock().await;
        let row = self.find(to_app, KIND)?;
        if row.status != AddonStatus::Active {
            return Err(Error::busy(format!(
                "{KIND} of app `{to_app}` did not start: {}",
                row.reason.unwrap_or_else(|| row.status.to_string())
            )));
        }
        let fresh = self
            .store
            .disk_of(&server_owner(&row))?
            .ok_or_else(|| Error::busy(format!("app `{to_app}`'s server has no disk")))?;
        let mut state = RestoreState {
            phase: Phase::Preparing,
            old_disk: fresh.name.clone(),
            base: base.label.clone(),
            shared: None,
        };
        self.set_restore_state(&row, Some(&state))?;
        info!(app = %app, to_app = %to_app, base = %base.label, ?point, "forking PostgreSQL");
        let size = self
            .store
            .disk_of(&server_owner(&source))?
            .map_or(fresh.size_gb, |d| d.size_gb);
        let disk = match self
            .recover_on_new_disk(
                &row,
                Source {
                    server: &server,
                    base: &base,
                    app,
                    login: &credentials(&source),
                },
                point,
                size,
                &mut state,
            )
            .await
        {
            Ok(disk) => disk,
            Err(e) => {
                let _ = self.discard_restore(&row).await;
                return Err(e);
            }
        };
        state.phase = Phase::Swapping;
        self.set_restore_state(&row, Some(&state))?;
        self.swap_in(&row, &state).await?;
        // The fresh server's disk held nothing: not worth keeping.
        self.pg_discard_previous(to_app, KIND).await?;
        Ok(AddonRestored {
            name: KIND.to_string(),
            app: to_app.to_string(),
            restored_to: match point {
                RestorePoint::Latest => "latest".into(),
                RestorePoint::Time(t) => rfc3339(t),
            },
            base_backup: base.label.clone(),
            disk,
            previous_disk: None,
            previous_database: None,
        })
    }
}
