//! Addons as an app sees them: creating or destroying one changes the variables its services
//! get, so the app's services are restarted once the addon has settled.

use std::sync::Arc;

use tracing::{info, warn};

use crate::core::addons::{split_addon_arg, AddonService};
use crate::core::apps::AppService;
use crate::core::error::Error;
use crate::model::{
    Addon, AddonDestroyed, AddonRotated, AddonUpdated, CreateAddon, CredentialKind, UpdateAddon,
};
use crate::store::addons::AddonStatus;

/// How often a rotation left in flight is tried at start (every 5 s) before it waits for a
/// request to retry it.
const RESUME_ATTEMPTS: u32 = 60;

/// Addon changes requested for an app, followed through to the app's services.
pub struct AddonsOfApps {
    addons: Arc<AddonService>,
    apps: Arc<AppService>,
}

impl AddonsOfApps {
    pub fn new(addons: Arc<AddonService>, apps: Arc<AppService>) -> Arc<Self> {
        Arc::new(AddonsOfApps { addons, apps })
    }

    /// From now on, an addon settling outside a request (in the background, or resumed after
    /// a restart) restarts its app's services if their variables changed.
    pub fn restart_apps_when_addons_settle(&self) {
        let (settled_tx, mut settled_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        self.addons.on_settled(settled_tx);
        let apps = self.apps.clone();
        tokio::spawn(async move {
            while let Some(app) = settled_rx.recv().await {
                let apps = apps.clone();
                tokio::spawn(async move {
                    if let Err(e) = apps.addons_changed(&app).await {
                        warn!(app = %app, error = %e, "restarting the app for its addons' variables failed");
                    }
                });
            }
        });
    }

    /// Records the addon and starts provisioning it. With `req.wait`, returns once it has
    /// settled; an addon that became active restarts the app's services with its variables.
    pub async fn create(&self, req: &CreateAddon, source: &str) -> Result<Addon, Error> {
        let (addon, mut done) = self.addons.create(req, source).await?;
        if !req.wait {
            return Ok(addon);
        }
        let _ = done.wait_for(|done| *done).await;
        let addon = self.addons.get(&addon.app, &addon.name)?;
        if addon.status == AddonStatus::Active {
            self.apps.addons_changed(&addon.app).await?;
        }
        Ok(addon)
    }

    /// Changes the addon in place (its tier), waits until the driver applied it, then restarts
    /// the app's services if their variables changed (a restarted server may have a new
    /// address).
    pub async fn update(
        &self,
        app: &str,
        addon_arg: &str,
        req: &UpdateAddon,
    ) -> Result<AddonUpdated, Error> {
        let (from, restarts, mut done) = self.addons.update(app, addon_arg, req)?;
        let _ = done.wait_for(|done| *done).await;
        let (name, _) = split_addon_arg(addon_arg);
        let kind = miren_addons::AddonKind::parse(name)?.name().to_string();
        let updated = self.addons.updated(app, &kind, from, restarts)?;
        self.apps.addons_changed(app).await?;
        Ok(updated)
    }

    /// Removes the addon (its server or database, role, disk and data), waits for the removal
    /// to finish, then restarts the app's services without its variables. An addon the app
    /// does not have is answered with `deleted: false`.
    pub async fn destroy(&self, app: &str, addon_arg: &str) -> Result<AddonDestroyed, Error> {
        let (name, _) = split_addon_arg(addon_arg);
        let kind = miren_addons::AddonKind::parse(name)?.name().to_string();
        let Some(mut done) = self.addons.destroy(app, &kind)? else {
            return Ok(AddonDestroyed {
                name: kind,
                app: app.to_string(),
                deleted: false,
            });
        };
        let _ = done.wait_for(|done| *done).await;
        if let Ok(left) = self.addons.get(app, &kind) {
            return Err(Error::conflict(format!(
                "{kind} of app `{app}` is not fully removed yet: {}",
                left.reason.unwrap_or_else(|| left.status.to_string())
            )));
        }
        self.apps.addons_changed(app).await?;
        Ok(AddonDestroyed {
            name: kind,
            app: app.to_string(),
            deleted: true,
        })
    }

    /// Rotates the app's credentials for an addon without a moment in which its services hold
    /// a login the server refuses: the server accepts a second login, the app's services are
    /// restarted with it, and only then the previous login is retired. A rotation left in
    /// flight (a failed request, a stopped agent) is finished instead of starting another.
    pub async fn rotate(
        &self,
        app: &str,
        addon_arg: &str,
        credential: CredentialKind,
    ) -> Result<AddonRotated, Error> {
        if credential == CredentialKind::Root {
            // The administrator is the agent's alone: no service of any app uses it.
            let rotated = self.addons.rotate_admin_of(app, addon_arg).await?;
            return Ok(AddonRotated {
                name: rotated.kind,
                app: app.to_string(),
                credential,
                user: rotated.next_user,
                previous_user: rotated.previous_user,
                resumed: rotated.resumed,
            });
        }
        let run = self.addons.begin_rotation(app, addon_arg)?;
        self.finish_rotation(app, &run).await?;
        Ok(AddonRotated {
            name: run.kind.clone(),
            app: app.to_string(),
            credential,
            user: run.next_user.clone(),
            previous_user: run.previous_user.clone(),
            resumed: run.resumed,
        })
    }

    async fn finish_rotation(
        &self,
        app: &str,
        run: &crate::core::addons::rotate::RotationRun,
    ) -> Result<(), Error> {
        self.addons.add_next_login(app, &run.kind).await?;
        // Every service runs with the new login before the old one stops working.
        self.apps.addons_changed(app).await?;
        self.addons.retire_previous_login(app, &run.kind).await
    }

    /// Finishes, in the background, every rotation a previous agent left in flight.
    pub fn resume_rotations(self: &Arc<Self>) -> Result<(), Error> {
        for kind in self.addons.pending_admin_rotations()? {
            let addons = self.addons.clone();
            tokio::spawn(async move {
                // The shared server may still be starting again (after a host restart).
                for attempt in 1..=RESUME_ATTEMPTS {
                    match addons.rotate_admin(&kind).await {
                        Ok(_) => return,
                        Err(e) if attempt < RESUME_ATTEMPTS => {
                            info!(addon = %kind, error = %e, "an administrator rotation waits for its server");
                            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                        }
                        Err(e) => {
                            warn!(addon = %kind, error = %e, "finishing an administrator rotation failed; `miren addon rotate --credential root` retries it")
                        }
                    }
                }
            });
        }
        for (app, kind) in self.addons.pending_rotations()? {
            let this = self.clone();
            tokio::spawn(async move {
                let run = match this.addons.resume_rotation(&app, &kind) {
                    Ok(Some(run)) => run,
                    Ok(None) => return,
                    Err(e) => {
                        warn!(app = %app, addon = %kind, error = %e, "resuming a credential rotation failed");
                        return;
                    }
                };
                info!(app = %app, addon = %kind, to = %run.next_user, "finishing a credential rotation a previous agent began");
                if let Err(e) = this.finish_rotation(&app, &run).await {
                    warn!(app = %app, addon = %kind, error = %e, "finishing a credential rotation failed; `miren addon rotate` retries it");
                }
            });
        }
        Ok(())
    }
}

impl AddonsOfApps {
    /// Restores an app's PostgreSQL to a point (or discards the disk kept from the last
    /// restore), then restarts the app's services so they reconnect to the restored server.
    pub async fn restore(
        &self,
        app: &str,
        addon_arg: &str,
        req: &crate::model::RestoreAddon,
    ) -> Result<crate::model::AddonRestored, Error> {
        use crate::core::addons::postgres::restore::RestorePoint;
        if req.discard_previous {
            if req.latest || req.to_time.is_some() || req.to_app.is_some() {
                return Err(Error::invalid(
                    "--discard-previous deletes the disk kept from the last restore; give it alone",
                ));
            }
            let (previous_disk, previous_database) =
                self.addons.pg_discard_previous(app, addon_arg).await?;
            return Ok(crate::model::AddonRestored {
                name: split_addon_arg(addon_arg).0.to_string(),
                app: app.to_string(),
                restored_to: String::new(),
                base_backup: String::new(),
                disk: String::new(),
                previous_disk,
                previous_database,
            });
        }
        let point = match (&req.to_time, req.latest) {
            (Some(_), true) | (None, false) => {
                return Err(Error::invalid(
                    "give exactly one of --to-time RFC3339 (e.g. 2026-12-01T23:59:59Z) and --latest",
                ))
            }
            (None, true) => RestorePoint::Latest,
            (Some(t), false) => RestorePoint::Time(humantime::parse_rfc3339_weak(t).map_err(|e| {
                Error::invalid(format!(
                    "--to-time `{t}` is not an RFC 3339 UTC time ({e}); write e.g. 2026-12-01T23:59:59Z"
                ))
            })?),
        };
        let (app, restored) = match &req.to_app {
            Some(other) => (
                other.as_str(),
                self.addons.pg_fork(app, addon_arg, other, point).await?,
            ),
            None => (app, self.addons.pg_restore(app, addon_arg, point).await?),
        };
        match self.apps.restart(app).await {
            Ok(_) => info!(app = %app, "restarted the app's services on the restored database"),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                warn!(app = %app, error = %e, "restarting the app after a restore failed; `miren app restart` retries")
            }
        }
        Ok(restored)
    }
}
