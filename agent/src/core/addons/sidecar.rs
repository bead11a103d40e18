//! The driver's sidecar steps: a sandbox beside an addon server (PostgreSQL's pooler), owned
//! by `Owner::Sidecar` of the server's owner (found by that, never by name), reachable by the
//! server's apps, admitted by the server, started once the server answers and removed with
//! it. Kind-agnostic: the provider says what runs and how to check it.

use std::time::{Duration, Instant};

use miren_addons::{Credentials, Variant};
use tracing::{info, warn};

use super::host::{ServerLaunch, ServerSandbox};
use super::provider::{AddonProvider, DbClientLimit, ServerConnection};
use super::steps::StepError;
use super::AddonService;
use crate::core::error::Error;
use crate::store::Owner;

/// How long a sidecar that is already running gets to answer before it is replaced (it may
/// be restarting; one that keeps failing has a stale server address or secret).
const KEEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a sidecar is made for.
pub(super) struct SidecarWanted<'a> {
    pub server_owner: &'a Owner,
    pub server: &'a ServerSandbox,
    pub variant: Variant,
    pub tier: miren_addons::Tier,
    /// A session on the server as `admin_login` (the administrator, or a small server's app).
    pub admin: &'a dyn ServerConnection,
    pub admin_login: &'a Credentials,
    /// The apps that reach the server, and so the sidecar.
    pub apps: Vec<String>,
    /// The login its readiness check uses (an app's).
    pub login: &'a Credentials,
    /// Each app's client limit, applied live to a sidecar that is kept.
    pub limits: Vec<DbClientLimit>,
}

impl AddonService {
    /// Makes sure the server has its sidecar (if its kind has one), running and serving
    /// `login`, and that the server admits it. One that does not answer is replaced, after
    /// `prepare_sidecar` gives the new one a fresh secret. Safe to repeat from any point.
    pub(super) async fn ensure_sidecar(
        &self,
        provider: &dyn AddonProvider,
        wanted: SidecarWanted<'_>,
    ) -> Result<(), StepError> {
        if !provider.has_sidecar() {
            return Ok(());
        }
        let owner = Owner::sidecar_of(wanted.server_owner);
        if let Some(existing) = self.host.server_sandbox(&owner)? {
            if !existing.failed {
                self.admit_sidecar(&wanted, &existing).await?;
                match self
                    .wait_sidecar(provider, &existing, wanted.login, KEEP_TIMEOUT)
                    .await
                {
                    Ok(()) => match self
                        .apply_sidecar_limits(provider, &existing, wanted.server, &wanted.limits)
                        .await
                    {
                        Ok(()) => return Ok(()),
                        // A sidecar from an image before live limits: a new one starts with
                        // them in its environment.
                        Err(e) => {
                            warn!(sandbox = %existing.name, error = %e.message, "replacing a sidecar that cannot take client limits")
                        }
                    },
                    Err(reason) => {
                        warn!(sandbox = %existing.name, reason = %reason, "replacing a sidecar that does not answer")
                    }
                }
            }
            self.host.delete_sandbox(&existing.id).await?;
        }
        let secret = miren_addons::generate_password()
            .map_err(|e| StepError::Failed(format!("generating a password: {e}")))?;
        wanted
            .admin
            .prepare_sidecar(wanted.variant, &secret)
            .await
            .map_err(StepError::Failed)?;
        let Some(spec) = provider.sidecar(
            wanted.variant,
            wanted.tier,
            wanted.server.ip()?,
            wanted.admin_login,
            &secret,
            &wanted.limits,
        ) else {
            return Ok(());
        };
        let name = miren_sys::name::shortened(
            &format!("{}-{}", wanted.server.name, spec.name_suffix),
            miren_sys::fnv::fnv1a32(owner.describe().as_bytes()),
        );
        let sidecar = self
            .host
            .run_server(
                &owner,
                ServerLaunch {
                    name,
                    image: spec.image,
                    command: spec.command,
                    env: spec.env,
                    disk: None,
                    allow_from: wanted.apps.clone(),
                    limits: None,
                },
            )
            .await?;
        info!(sandbox = %sidecar.name, server = %wanted.server.name, "started a sidecar");
        self.admit_sidecar(&wanted, &sidecar).await?;
        self.wait_sidecar(provider, &sidecar, wanted.login, self.ready_timeout)
            .await
            .map_err(StepError::Failed)
    }

    /// Gives a running sidecar `limits` (it starts with those of its spec), if its kind has
    /// any. Safe to repeat: the whole set is replaced.
    pub(super) async fn apply_sidecar_limits(
        &self,
        provider: &dyn AddonProvider,
        sidecar: &ServerSandbox,
        server: &ServerSandbox,
        limits: &[DbClientLimit],
    ) -> Result<(), Error> {
        let Some(command) = provider.sidecar_limits(server.ip()?, limits) else {
            return Ok(());
        };
        self.host.exec(&sidecar.id, command).await?;
        info!(sandbox = %sidecar.name, apps = limits.len(), "sidecar client limits applied");
        Ok(())
    }

    /// The sidecar admits the server's apps; the server admits them and the sidecar.
    async fn admit_sidecar(
        &self,
        wanted: &SidecarWanted<'_>,
        sidecar: &ServerSandbox,
    ) -> Result<(), Error> {
        self.host.set_allow_from(&sidecar.id, &wanted.apps).await?;
        let mut allowed = wanted.apps.clone();
        allowed.push(sidecar.name.clone());
        self.host.set_allow_from(&wanted.server.id, &allowed).await
    }

    /// The apps a server admits: `apps` and its sidecar, if it has one.
    pub(super) fn with_sidecar(
        &self,
        server_owner: &Owner,
        mut apps: Vec<String>,
    ) -> Result<Vec<String>, Error> {
        if let Some(sidecar) = self.host.server_sandbox(&Owner::sidecar_of(server_owner))? {
            apps.push(sidecar.name);
        }
        Ok(apps)
    }

    /// Whether the server of `server_owner` has a running sidecar, or needs none.
    pub(super) fn sidecar_healthy(
        &self,
        provider: &dyn AddonProvider,
        server_owner: &Owner,
    ) -> bool {
        !provider.has_sidecar()
            || matches!(
                self.host.server_sandbox(&Owner::sidecar_of(server_owner)),
                Ok(Some(s)) if !s.failed
            )
    }

    /// Removes the server's sidecar, if any.
    pub(super) async fn remove_sidecar(&self, server_owner: &Owner) -> Result<(), Error> {
        self.host
            .delete_owned(&Owner::sidecar_of(server_owner))
            .await
    }

    /// The sidecar's readiness check until it passes or `timeout` passes.
    async fn wait_sidecar(
        &self,
        provider: &dyn AddonProvider,
        sidecar: &ServerSandbox,
        login: &Credentials,
        timeout: Duration,
    ) -> Result<(), String> {
        let ip = sidecar.ip().map_err(|e| e.message)?;
        let deadline = Instant::now() + timeout;
        loop {
            let err = match provider.sidecar_ready(ip, login).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let failed = self.host.sandbox(&sidecar.id).map_or(true, |s| s.failed);
            if failed || Instant::now() >= deadline {
                return Err(format!(
                    "the sidecar in sandbox `{}` did not answer ({err}); its last output: {}",
                    sidecar.name,
                    self.host.log_tail(&sidecar.id, 5)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
