//! Credential rotation, the addon's part: record the next login, have the server accept it
//! beside the current one, switch the row to it, and (once the app's services run with it,
//! see `core/app_addons.rs`) retire the previous one. Each step is recorded before the next
//! starts (`store/rotations.rs`), so a rotation cut short at any point is finished at start.

use std::sync::{Arc, Mutex};

use miren_addons::{AddonKind, Credentials, Variant};
use tracing::info;

use super::{credentials, is_shared, shared_owner, AddonService, Key};
use crate::core::error::{Error, ErrorKind};
use crate::store::addons::{AddonRow, AddonStatus};
use crate::store::rotations::{BeginAdminRotation, BeginRotation, Rotation, RotationPhase};
use crate::util::now_rfc3339;

/// Held while a rotation of one addon runs in this agent: a second request for the same addon
/// is refused instead of racing it.
pub struct RotationGuard {
    key: Key,
    running: Arc<Mutex<std::collections::HashSet<Key>>>,
}

impl Drop for RotationGuard {
    fn drop(&mut self) {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// A rotation this agent is now running.
pub struct RotationRun {
    pub kind: String,
    pub previous_user: String,
    pub next_user: String,
    /// It was begun earlier (by a request that failed, or an agent that stopped) and is
    /// being finished.
    pub resumed: bool,
    pub _guard: RotationGuard,
}

impl AddonService {
    fn rotation_guard(&self, app: &str, kind: &str) -> Result<RotationGuard, Error> {
        let key = (app.to_string(), kind.to_string());
        let mut running = self.rotating.lock().unwrap_or_else(|p| p.into_inner());
        if !running.insert(key.clone()) {
            return Err(Error::busy(format!(
                "a credential rotation of {kind} for app `{app}` is running; wait for it to finish"
            )));
        }
        Ok(RotationGuard {
            key,
            running: self.rotating.clone(),
        })
    }

    /// Records a rotation of the app's login (or takes over the one in flight, which a
    /// failed request or a stopped agent left) and returns it, to be finished with
    /// [`Self::add_next_login`], the app's restart, and [`Self::retire_previous_login`].
    pub fn begin_rotation(&self, app: &str, kind_arg: &str) -> Result<RotationRun, Error> {
        let (name, _) = super::split_addon_arg(kind_arg);
        let kind = AddonKind::parse(name)?.name();
        let guard = self.rotation_guard(app, kind)?;
        let row = self.find(app, kind)?;
        let provider = self.provider(kind)?.clone();
        let variant = if is_shared(&row) {
            Variant::Shared
        } else {
            Variant::Small
        };
        let next = provider
            .next_login(variant, app, &credentials(&row))?
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unprocessable,
                    "cannot_rotate",
                    format!(
                        "{} `{}` cannot rotate its credentials yet (`miren addon rotate` covers PostgreSQL and shared MySQL)",
                        provider.display_name(),
                        row.variant
                    ),
                )
            })?;
        let rotation = Rotation {
            phase: RotationPhase::AddingLogin,
            next_user: next.user,
            next_password: next.password,
            previous_user: row.user.clone(),
            started_at: now_rfc3339(),
        };
        let (rotation, resumed) = match self.store.begin_rotation(app, kind, &rotation)? {
            BeginRotation::Begun(rotation) => (rotation, false),
            BeginRotation::Pending(rotation) => (rotation, true),
            BeginRotation::NotActive(status) => {
                return Err(Error::conflict(format!(
                    "{kind} of app `{app}` is {status}, not active; rotate its credentials once `miren addon list -a {app}` shows it active"
                )))
            }
            BeginRotation::Gone => return Err(self.find(app, kind).err().unwrap_or_else(|| {
                Error::not_found(format!("app `{app}` has no {kind} addon"))
            })),
        };
        info!(app = %app, addon = %kind, from = %rotation.previous_user, to = %rotation.next_user, resumed, "rotating credentials");
        Ok(RotationRun {
            kind: kind.to_string(),
            previous_user: rotation.previous_user,
            next_user: rotation.next_user,
            resumed,
            _guard: guard,
        })
    }

    /// Takes over the rotation a previous agent left in flight, if the addon has one.
    pub fn resume_rotation(&self, app: &str, kind: &str) -> Result<Option<RotationRun>, Error> {
        let guard = self.rotation_guard(app, kind)?;
        Ok(self.store.rotation(app, kind)?.map(|rotation| RotationRun {
            kind: kind.to_string(),
            previous_user: rotation.previous_user,
            next_user: rotation.next_user,
            resumed: true,
            _guard: guard,
        }))
    }

    /// Every addon with a rotation in flight, as (app, kind).
    pub fn pending_rotations(&self) -> Result<Vec<(String, String)>, Error> {
        Ok(self.store.pending_rotations()?)
    }

    /// The addon's row once it is `active` (waiting for a driver that is bringing its server
    /// back, as after an agent restart), with the rotation in flight.
    async fn active_rotation(
        self: &Arc<Self>,
        app: &str,
        kind: &str,
    ) -> Result<Option<(AddonRow, Rotation)>, Error> {
        let mut done = self.kick(app, kind);
        let _ = done.wait_for(|d| *d).await;
        let row = self.find(app, kind)?;
        if row.status != AddonStatus::Active {
            return Err(Error::conflict(format!(
                "{kind} of app `{app}` is {} ({}); the rotation goes on once it is active again: run `miren addon rotate {kind} -a {app}` then",
                row.status,
                row.reason.as_deref().unwrap_or("no reason recorded")
            )));
        }
        Ok(self
            .store
            .rotation(app, kind)?
            .map(|rotation| (row, rotation)))
    }

    /// A session on the addon's server that may change logins: the shared server's
    /// administrator, or the app's current login on its own server. On a shared server the
    /// shared lock comes with it, so a step never races a tenant's removal.
    async fn login_admin(
        &self,
        row: &AddonRow,
    ) -> Result<
        (
            Option<tokio::sync::MutexGuard<'_, ()>>,
            Box<dyn super::provider::ServerConnection>,
        ),
        Error,
    > {
        let provider = self.provider(&row.kind)?.clone();
        let shared = if is_shared(row) {
            Some(self.shared.lock().await)
        } else {
            None
        };
        // Still there and active (a destroy may have begun while the lock was awaited).
        let row = self.find(&row.app, &row.kind)?;
        if row.status != AddonStatus::Active {
            return Err(Error::conflict(format!(
                "{} of app `{}` is {}; its credentials are not rotated",
                row.kind, row.app, row.status
            )));
        }
        let (ip, login) = if is_shared(&row) {
            let server = self
                .store
                .server(&row.kind)?
                .ok_or_else(|| Error::busy(format!("the shared {} server is gone", row.kind)))?;
            (
                self.server(&shared_owner(&row.kind))?.ip()?,
                provider.admin_login(&server.admin_user, &server.admin_password),
            )
        } else {
            (
                self.server(&super::server_owner(&row))?.ip()?,
                credentials(&row),
            )
        };
        let session = provider.connect(ip, &login).await.map_err(|e| {
            Error::busy(format!(
                "logging in to the {} server to rotate credentials: {e}",
                provider.display_name()
            ))
        })?;
        Ok((shared, session))
    }

    /// The server accepts the next login beside the current one; then the app's row (and so
    /// the variables its services get) switches to it. Safe to repeat.
    pub async fn add_next_login(self: &Arc<Self>, app: &str, kind: &str) -> Result<(), Error> {
        let Some((row, rotation)) = self.active_rotation(app, kind).await? else {
            return Ok(());
        };
        if rotation.phase == RotationPhase::AddingLogin {
            let current = credentials(&row);
            let next = Credentials {
                user: rotation.next_user.clone(),
                password: rotation.next_password.clone(),
                database: row.database.clone(),
            };
            let (_shared, session) = self.login_admin(&row).await?;
            session
                .add_login(&current, &next)
                .await
                .map_err(Error::busy)?;
            self.store.switch_to_next_login(app, kind)?;
            info!(app = %app, addon = %kind, login = %rotation.next_user, "the server accepts the new login; the app switches to it");
        }
        Ok(())
    }

    /// The previous login stops working; the rotation is over. Call once every service of
    /// the app runs with the new login. Safe to repeat.
    pub async fn retire_previous_login(
        self: &Arc<Self>,
        app: &str,
        kind: &str,
    ) -> Result<(), Error> {
        let Some((row, rotation)) = self.active_rotation(app, kind).await? else {
            return Ok(());
        };
        if rotation.phase != RotationPhase::RetiringPrevious {
            return Err(Error::internal(format!(
                "the rotation of {kind} for app `{app}` has not switched logins yet"
            )));
        }
        if rotation.previous_user != row.user {
            let current = credentials(&row);
            let retired = rotation.previous_user.clone();
            let (_shared, session) = self.login_admin(&row).await?;
            session
                .retire_login(&retired, &current)
                .await
                .map_err(Error::busy)?;
        }
        self.store.end_rotation(app, kind)?;
        info!(app = %app, addon = %kind, retired = %rotation.previous_user, "credential rotation finished");
        Ok(())
    }
}

/// A finished rotation of a shared server's administrator.
pub struct AdminRotated {
    pub kind: String,
    pub previous_user: String,
    pub next_user: String,
    pub resumed: bool,
}

impl AddonService {
    /// Rotates the administrator of the shared server the app's addon lives on: a second
    /// administrator is made, recorded, and then the previous one retired, so the agent always
    /// holds a login the server accepts. A rotation left in flight is finished instead.
    pub async fn rotate_admin_of(
        self: &Arc<Self>,
        app: &str,
        kind_arg: &str,
    ) -> Result<AdminRotated, Error> {
        let (name, _) = super::split_addon_arg(kind_arg);
        let kind = AddonKind::parse(name)?.name();
        let row = self.find(app, kind)?;
        let provider = self.provider(kind)?.clone();
        if !is_shared(&row) {
            return Err(Error::new(
                ErrorKind::Unprocessable,
                "cannot_rotate",
                format!(
                    "app `{app}` has its own {} server (`{}`): the app's login is all it has to rotate; run `miren addon rotate {kind} -a {app}` (--credential user)",
                    provider.display_name(),
                    row.variant
                ),
            ));
        }
        self.rotate_admin(kind).await
    }

    /// Rotates (or finishes rotating) the administrator of the shared server of `kind`.
    pub async fn rotate_admin(self: &Arc<Self>, kind: &str) -> Result<AdminRotated, Error> {
        let _guard = self.rotation_guard("", kind)?;
        let provider = self.provider(kind)?.clone();
        let _shared = self.shared.lock().await;
        let server = self
            .store
            .server(kind)?
            .ok_or_else(|| Error::not_found(format!("this node has no shared {kind} server")))?;
        let next = provider.next_admin(&server.admin_user)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Unprocessable,
                "cannot_rotate",
                format!(
                    "{} cannot rotate its administrator yet",
                    provider.display_name()
                ),
            )
        })?;
        let rotation = Rotation {
            phase: RotationPhase::AddingLogin,
            next_user: next.user,
            next_password: next.password,
            previous_user: server.admin_user.clone(),
            started_at: now_rfc3339(),
        };
        let (rotation, resumed) = match self.store.begin_admin_rotation(kind, &rotation)? {
            BeginAdminRotation::Begun(r) => (r, false),
            BeginAdminRotation::Pending(r) => (r, true),
            BeginAdminRotation::NotServing(status) => {
                return Err(Error::conflict(format!(
                    "the shared {kind} server is {status}; rotate its administrator once it serves"
                )))
            }
            BeginAdminRotation::Gone => {
                return Err(Error::not_found(format!(
                    "this node has no shared {kind} server"
                )))
            }
        };
        info!(addon = %kind, from = %rotation.previous_user, to = %rotation.next_user, resumed, "rotating the shared server's administrator");
        let ip = self.server(&shared_owner(kind))?.ip()?;
        let login_as = |user: &str, password: &str| provider.admin_login(user, password);
        let connect = |login: Credentials| {
            let provider = provider.clone();
            async move {
                provider.connect(ip, &login).await.map_err(|e| {
                    Error::busy(format!(
                        "logging in to the shared {} server as its administrator: {e}",
                        provider.display_name()
                    ))
                })
            }
        };
        if rotation.phase == RotationPhase::AddingLogin {
            let session = connect(login_as(&server.admin_user, &server.admin_password)).await?;
            let next = login_as(&rotation.next_user, &rotation.next_password);
            session.add_admin(&next).await.map_err(Error::busy)?;
            self.store.switch_to_next_admin(kind)?;
        }
        if rotation.previous_user != rotation.next_user {
            let session = connect(login_as(&rotation.next_user, &rotation.next_password)).await?;
            session
                .retire_admin(&rotation.previous_user)
                .await
                .map_err(Error::busy)?;
        }
        self.store.end_admin_rotation(kind)?;
        info!(addon = %kind, retired = %rotation.previous_user, "administrator rotation finished");
        Ok(AdminRotated {
            kind: kind.to_string(),
            previous_user: rotation.previous_user,
            next_user: rotation.next_user,
            resumed,
        })
    }

    /// Kinds whose shared server has an administrator rotation in flight.
    pub fn pending_admin_rotations(&self) -> Result<Vec<String>, Error> {
        Ok(self.store.pending_admin_rotations()?)
    }
}

/// The set of rotations running in this agent.
pub(super) fn running() -> Arc<Mutex<std::collections::HashSet<Key>>> {
    Arc::new(Mutex::new(std::collections::HashSet::new()))
}
