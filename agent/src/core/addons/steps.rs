//! The driver's steps: provisioning an addon (its dedicated server, or its tenant on the
//! shared one) and removing it. Product details come from the addon's provider.

use std::time::{Duration, Instant};

use miren_addons::{Tier, Variant};
use tracing::{info, warn};

use super::host::{ServerLaunch, ServerSandbox};
use super::provider::{AddonProvider, ServerConnection};
use super::sidecar::SidecarWanted;
use super::tiers::{self, applied_tier, tier, APPLIED_TIER};
use super::{credentials, is_shared, server_owner, shared_owner, AddonService};
use crate::core::error::Error;
use crate::store::addons::{AddonRow, AddonStatus, ServerRow, ServerStatus};
use crate::store::Owner;
use crate::util::now_rfc3339;

/// Restarts while waiting for readiness after which a server is declared broken.
const MAX_START_RESTARTS: u32 = 3;

/// Why a provisioning step stopped.
pub(super) enum StepError {
    /// The addon is no longer being provisioned (a destroy arrived): stop quietly.
    Superseded,
    Failed(String),
}

impl From<Error> for StepError {
    fn from(err: Error) -> Self {
        StepError::Failed(err.message)
    }
}

impl From<crate::store::StoreError> for StepError {
    fn from(err: crate::store::StoreError) -> Self {
        Error::from(err).into()
    }
}

/// The server sandbox to make sure of: who owns it, what it runs, and for whom.
struct ServerWanted<'a> {
    owner: &'a Owner,
    name: &'a str,
    image: &'a str,
    variant: Variant,
    login: &'a miren_addons::Credentials,
    allow_from: Vec<String>,
    /// It never answered: a half-made data directory is discarded before it starts.
    never_ready: bool,
    /// The tier it is sized for.
    tier: Tier,
    /// A running server was made for another tier: it (and its sidecar) is replaced.
    resize: bool,
}

impl AddonService {
    pub(super) async fn provision(&self, row: AddonRow) {
        let (app, kind) = (row.app.as_str(), row.kind.as_str());
        match self.store.transition_addon(
            app,
            kind,
            AddonStatus::PROVISIONING_OWED,
            AddonStatus::Provisioning,
            None,
        ) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(app = %app, error = %e, "recording provisioning failed");
                return;
            }
        }
        let started = Instant::now();
        let result = if is_shared(&row) {
            self.provision_shared(&row).await
        } else {
            self.provision_dedicated(&row).await
        };
        match result {
            Ok(()) => {
                // A tier change recorded while this ran: the drive loop provisions again.
                if matches!(self.store.addon(app, kind), Ok(Some(now)) if tier(&now) != tier(&row))
                {
                    info!(app = %app, addon = %kind, "its tier changed meanwhile; applying it");
                    return;
                }
                if let Ok(true) = self.store.transition_addon(
                    app,
                    kind,
                    &[AddonStatus::Provisioning],
                    AddonStatus::Active,
                    None,
                ) {
                    info!(app = %app, addon = %kind, variant = %row.variant, seconds = started.elapsed().as_secs_f64(), "addon active");
                }
            }
            Err(StepError::Superseded) => {}
            Err(StepError::Failed(reason)) => {
                let keep = self.store.addon_ever_active(app, kind).unwrap_or(true);
                let reason = if keep {
                    // A server (or tenant) that ever answered holds the app's data (a tier
                    // change or a restart failed): nothing of it is removed.
                    warn!(app = %app, addon = %kind, reason = %reason, "provisioning an existing server failed; its data is kept");
                    format!("{reason} (its data is kept; fix the cause and run `miren addon update` or the create again)")
                } else {
                    warn!(app = %app, addon = %kind, reason = %reason, "provisioning failed; removing what it made");
                    match self.remove_resources(&row).await {
                        Ok(()) => reason,
                        Err(e) => format!(
                            "{reason} (cleaning up also failed: {e}; `miren addon destroy {kind} -a {app}` retries it)"
                        ),
                    }
                };
                let _ = self.store.transition_addon(
                    app,
                    kind,
                    &[AddonStatus::Provisioning],
                    AddonStatus::Error,
                    Some(&reason),
                );
                if is_shared(&row) && !keep {
                    let _guard = self.shared.lock().await;
                    if let Err(e) = self.remove_server_if_unused(kind).await {
                        warn!(addon = %kind, error = %e, "removing the unused shared server failed");
                    }
                }
            }
        }
    }

    /// Fails with `Superseded` once the addon is no longer being provisioned.
    fn still_wanted(&self, row: &AddonRow) -> Result<(), StepError> {
        match self.store.addon(&row.app, &row.kind)? {
            Some(r) if r.status == AddonStatus::Provisioning => Ok(()),
            _ => Err(StepError::Superseded),
        }
    }

    async fn provision_dedicated(&self, row: &AddonRow) -> Result<(), StepError> {
        let provider = self.provider(&row.kind)?.clone();
        let name = self.server_name(row);
        let owner = server_owner(row);
        let login = credentials(row);
        let tier = tier(row);
        let server = self
            .ensure_server_sandbox(
                provider.as_ref(),
                ServerWanted {
                    owner: &owner,
                    name: &name,
                    image: &row.image,
                    variant: Variant::Small,
                    login: &login,
                    allow_from: self.with_sidecar(&owner, vec![row.app.clone()])?,
                    never_ready: !self.store.addon_ever_active(&row.app, &row.kind)?,
                    tier,
                    resize: applied_tier(row) != tier,
                },
                || self.still_wanted(row),
            )
            .await?;
        self.still_wanted(row)?;
        let session = self.wait_ready(provider.as_ref(), &server, &login).await?;
        self.sync_data(&server).await?;
        if let Some(size) = provider.server_size(Variant::Small, tier) {
            session
                .apply_settings(&size.live_settings)
                .await
                .map_err(StepError::Failed)?;
        }
        self.still_wanted(row)?;
        // On a small server the app's login is the administrator.
        self.ensure_sidecar(
            provider.as_ref(),
            SidecarWanted {
                server_owner: &owner,
                server: &server.sandbox,
                variant: Variant::Small,
                tier,
                admin: session.as_ref(),
                admin_login: &login,
                apps: vec![row.app.clone()],
                login: &login,
                limits: vec![tiers::db_client_limit(row)],
            },
        )
        .await?;
        self.record_applied_tier(row, tier)?;
        Ok(())
    }

    /// The tier the addon's server (or tenant) now has: a later run restarts nothing for it.
    fn record_applied_tier(&self, row: &AddonRow, tier: Tier) -> Result<(), Error> {
        self.store.set_addon_extra_key(
            &row.app,
            &row.kind,
            APPLIED_TIER,
            tier.name().into(),
            &[],
        )?;
        Ok(())
    }

    /// Flushes a server's disk: initdb ran with `--no-sync` (an fsync per file, ~1000 files,
    /// costs seconds on a loop device), so one `syncfs` makes the new cluster durable before
    /// the addon is called `active`.
    async fn sync_data(&self, server: &RunningServer) -> Result<(), Error> {
        match &server.disk {
            Some(disk) => self.host.sync_disk(disk).await,
            None => Ok(()),
        }
    }

    async fn provision_shared(&self, row: &AddonRow) -> Result<(), StepError> {
        let _guard = self.shared.lock().await;
        self.still_wanted(row)?;
        let provider = self.provider(&row.kind)?.clone();
        let (server_row, admin) = self.ensure_shared_server(&row.kind, row).await?;
        self.sync_shared_allow_from(&row.kind).await?;
        self.still_wanted(row)?;
        let server = self.server(&shared_owner(&row.kind))?;
        let login = credentials(row);
        admin
            .ensure_tenant(&login)
            .await
            .map_err(StepError::Failed)?;
        let tier = tier(row);
        if provider.kind().has_tiers() {
            admin
                .limit_tenant(&login, tier.limits().client_connections)
                .await
                .map_err(StepError::Failed)?;
        }
        let server = RunningServer {
            sandbox: server,
            disk: None,
        };
        self.wait_ready(provider.as_ref(), &server, &login).await?;
        self.still_wanted(row)?;
        let owner = shared_owner(&row.kind);
        self.ensure_sidecar(
            provider.as_ref(),
            SidecarWanted {
                server_owner: &owner,
                server: &server.sandbox,
                variant: Variant::Shared,
                tier,
                admin: admin.as_ref(),
                admin_login: &provider
                    .admin_login(&server_row.admin_user, &server_row.admin_password),
                apps: self.store.shared_members(&row.kind)?,
                login: &login,
                limits: self.shared_client_limits(&row.kind)?,
            },
        )
        .await?;
        self.record_applied_tier(row, tier)?;
        Ok(())
    }

    /// The server sandbox `owner` runs.
    pub(super) fn server(&self, owner: &Owner) -> Result<ServerSandbox, Error> {
        self.host.server_sandbox(owner)?.ok_or_else(|| {
            Error::busy(format!(
                "the server of {} is not running; `miren addon list` shows its status",
                owner.describe()
            ))
        })
    }

    /// The shared server, running and ready, created if this is its first member. Call with
    /// the shared lock held.
    async fn ensure_shared_server(
        &self,
        kind: &str,
        member: &AddonRow,
    ) -> Result<(ServerRow, Box<dyn ServerConnection>), StepError> {
        let provider = self.provider(kind)?.clone();
        if let Some(server) = self.store.server(kind)? {
            if server.status.is_going() {
                self.finish_server_removal(kind).await?;
            }
        }
        let server = match self.store.server(kind)? {
            Some(server) => server,
            None => {
                let admin = provider
                    .admin_credentials()
                    .map_err(|e| StepError::Failed(e.message))?;
                let server = ServerRow {
                    kind: kind.to_string(),
                    version: member.version.clone(),
                    image: member.image.clone(),
                    status: ServerStatus::Provisioning,
                    admin_user: admin.user,
                    admin_password: admin.password,
                    created_at: now_rfc3339(),
                };
                self.store.insert_server(&server)?;
                info!(addon = %kind, image = %server.image, "creating the shared server");
                server
            }
        };
        if server.image != member.image {
            return Err(StepError::Failed(format!(
                "the shared {kind} server runs {}, not {}; ask for that version, or use `{kind}:small`",
                server.image, member.image
            )));
        }
        let owner = shared_owner(kind);
        let login = provider.admin_login(&server.admin_user, &server.admin_password);
        let name = provider.server_base_name();
        let sandbox = self
            .ensure_server_sandbox(
                provider.as_ref(),
                ServerWanted {
                    owner: &owner,
                    name,
                    image: &server.image,
                    variant: Variant::Shared,
                    login: &login,
                    allow_from: self.with_sidecar(&owner, self.store.shared_members(kind)?)?,
                    never_ready: !server.status.serves(),
                    // Sized for the node, whatever its tenants' tiers.
                    tier: Tier::default(),
                    resize: false,
                },
                || Ok(()),
            )
            .await?;
        let admin = self.wait_ready(provider.as_ref(), &sandbox, &login).await?;
        if !server.status.serves() {
            admin.prepare_shared().await.map_err(StepError::Failed)?;
            self.sync_data(&sandbox).await?;
            self.store.set_server_status(kind, ServerStatus::Active)?;
        }
        Ok((server, admin))
    }

    /// Lets exactly the shared server's members reach it.
    async fn sync_shared_allow_from(&self, kind: &str) -> Result<(), Error> {
        let members = self.store.shared_members(kind)?;
        let owner = shared_owner(kind);
        if let Some(sandbox) = self.host.server_sandbox(&owner)? {
            let allowed = self.with_sidecar(&owner, members.clone())?;
            self.host.set_allow_from(&sandbox.id, &allowed).await?;
        }
        if let Some(sidecar) = self.host.server_sandbox(&Owner::sidecar_of(&owner))? {
            self.host.set_allow_from(&sidecar.id, &members).await?;
        }
        Ok(())
    }

    /// Removes the shared server if no addon uses it. Call with the shared lock held.
    pub(super) async fn remove_server_if_unused(&self, kind: &str) -> Result<(), Error> {
        let deleting = matches!(self.store.server(kind)?, Some(s) if s.status.is_going());
        if deleting || self.store.begin_server_removal_if_unused(kind)? {
            self.finish_server_removal(kind).await?;
        }
        Ok(())
    }

    async fn finish_server_removal(&self, kind: &str) -> Result<(), Error> {
        info!(addon = %kind, "removing the shared server: its last app left");
        let owner = shared_owner(kind);
        self.remove_sidecar(&owner).await?;
        self.host.delete_owned(&owner).await?;
        self.host.remove_disk(&owner).await?;
        self.store.remove_server(kind)?;
        Ok(())
    }

    pub(super) async fn deprovision(&self, row: &AddonRow) -> Result<(), String> {
        self.remove_resources(row)
            .await
            .map_err(|e| e.to_string())?;
        if is_shared(row) {
            let _guard = self.shared.lock().await;
            self.store
                .remove_addon(&row.app, &row.kind)
                .map_err(|e| e.to_string())?;
            self.sync_shared_allow_from(&row.kind)
                .await
                .map_err(|e| e.to_string())?;
            self.remove_server_if_unused(&row.kind)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            self.store
                .remove_addon(&row.app, &row.kind)
                .map_err(|e| e.to_string())?;
        }
        info!(app = %row.app, addon = %row.kind, "addon deleted");
        Ok(())
    }

    /// Everything the addon has: its server (dedicated) or its tenant (shared).
    /// Safe to repeat; the row itself stays.
    async fn remove_resources(&self, row: &AddonRow) -> Result<(), Error> {
        if !is_shared(row) {
            let owner = server_owner(row);
            self.remove_sidecar(&owner).await?;
            self.host.delete_owned(&owner).await?;
            self.host.remove_disk(&owner).await?;
            if row.kind == "miren-postgresql" && self.pitr.get().is_some() {
                // A restore's leftovers: its temporary disk and the disk kept from before it.
                self.remove_restore_disks(&row.app).await?;
            }
            return Ok(());
        }
        let _guard = self.shared.lock().await;
        let Some(server) = self.store.server(&row.kind)? else {
            return Ok(()); // no server, so no tenant either
        };
        if !server.status.serves() {
            // Tenants are only made on a server that became ready (`active`).
            return Ok(());
        }
        // The server may be down (or mid-creation): bring it up to drop the tenant.
        let (_, admin) = self
            .ensure_shared_server(
                &row.kind,
                &AddonRow {
                    image: server.image.clone(),
                    ..row.clone()
                },
            )
            .await
            .map_err(|e| match e {
                StepError::Failed(m) => Error::busy(format!("the shared server: {m}")),
                StepError::Superseded => Error::busy("the shared server is going away"),
            })?;
        if row.kind == "miren-postgresql" && self.pitr.get().is_some() {
            // A restore's leftovers and the database kept from before one.
            self.remove_shared_restore_leftovers(row).await?;
        }
        admin
            .drop_tenant(&credentials(row))
            .await
            .map_err(Error::busy)?;
        self.release_shared_client_limit(&row.kind).await
    }

    /// The server's sandbox (and its disk), running: kept if it is (or is restarting),
    /// replaced if it failed. `still_wanted` is asked between making the disk and the sandbox.
    async fn ensure_server_sandbox(
        &self,
        provider: &dyn AddonProvider,
        wanted: ServerWanted<'_>,
        still_wanted: impl Fn() -> Result<(), StepError>,
    ) -> Result<RunningServer, StepError> {
        let mut spec = provider.server(wanted.variant, wanted.login);
        let size = provider.server_size(wanted.variant, wanted.tier);
        if let Some(size) = &size {
            spec.command.extend(size.args.iter().cloned());
            if let Some(data) = spec.data.as_mut() {
                data.size_gb = size.disk_size_gb;
            }
        }
        if wanted.resize {
            self.replace_for_tier(wanted.owner).await?;
        }
        let disk = match &spec.data {
            Some(data) => Some(
                self.host
                    .ensure_disk_as(
                        wanted.owner,
                        wanted.name,
                        data.size_gb,
                        provider.data_filesystem(),
                    )
                    .await?,
            ),
            None => None,
        };
        still_wanted()?;
        let sandbox = match self.host.server_sandbox(wanted.owner)? {
            Some(s) if !s.failed => s,
            found => {
                if let Some(failed) = found {
                    warn!(sandbox = %failed.name, "replacing a failed addon server");
                    self.host.delete_sandbox(&failed.id).await?;
                }
                // The server a previous agent ran before owners were recorded.
                self.host.remove_unowned_server(wanted.name).await?;
                if let (true, Some(disk), Some(dir)) = (
                    wanted.never_ready,
                    &disk,
                    spec.data.as_ref().and_then(|d| d.discard_if_never_ready),
                ) {
                    // An initdb cut short (the agent killed, the server replaced) leaves a
                    // data directory the image would try to start instead of initializing:
                    // a server that never answered has nothing worth keeping there.
                    self.host.discard_dir(disk, dir).await?;
                }
                self.host
                    .run_server(
                        wanted.owner,
                        ServerLaunch {
                            name: wanted.name.to_string(),
                            image: wanted.image.to_string(),
                            command: spec.command.clone(),
                            env: spec.env.clone(),
                            disk: disk
                                .clone()
                                .zip(spec.data.as_ref().map(|d| d.mount_path.to_string())),
                            allow_from: wanted.allow_from,
                            limits: size.as_ref().map(|s| (s.memory_bytes, s.cpus)),
                        },
                    )
                    .await?
            }
        };
        Ok(RunningServer { sandbox, disk })
    }

    /// Checks readiness as `login` until it passes, the server gives up, or the timeout
    /// passes; returns the session that answered.
    async fn wait_ready(
        &self,
        provider: &dyn AddonProvider,
        server: &RunningServer,
        login: &miren_addons::Credentials,
    ) -> Result<Box<dyn ServerConnection>, StepError> {
        let sandbox = server.sandbox.id.as_str();
        let ip = server.sandbox.ip()?;
        let deadline = Instant::now() + self.ready_timeout;
        let mut last_check = Instant::now();
        // Restarts from before this wait (earlier crashes, host restarts) do not count.
        let restarts_before = self.host.sandbox(sandbox).map_or(0, |s| s.restarts);
        loop {
            let err = match provider.connect(ip, login).await {
                Ok(session) => return Ok(session),
                Err(e) => e,
            };
            if last_check.elapsed() > Duration::from_millis(500) {
                last_check = Instant::now();
                let state = self.host.sandbox(sandbox)?;
                if state.failed
                    || state.restarts >= restarts_before.saturating_add(MAX_START_RESTARTS)
                {
                    return Err(StepError::Failed(format!(
                        "the {} server in sandbox `{sandbox}` keeps exiting ({}); its last output: {}",
                        provider.display_name(),
                        state.exit_code.map_or("no exit code".into(), |c| format!("exit code {c}")),
                        self.host.log_tail(sandbox, 5)
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(StepError::Failed(format!(
                    "{} in sandbox `{sandbox}` did not answer {} within {}s ({err}); its last output: {}",
                    provider.display_name(),
                    provider.readiness_check(),
                    self.ready_timeout.as_secs(),
                    self.host.log_tail(sandbox, 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
}

/// A server sandbox and the disk it keeps its data on.
pub(super) struct RunningServer {
    sandbox: ServerSandbox,
    disk: Option<String>,
}
