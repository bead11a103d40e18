//! Starting and replacing an app's services. A service that runs already is replaced beside
//! itself: the next sandbox starts (owner `Replacing { Next }`, its own address, no published
//! ports), its health check passes, its ports are switched to it in one nftables transaction,
//! ownership moves to it, and the previous sandbox drains (a pause for requests in flight,
//! SIGTERM, SIGKILL after the grace period) and is removed. Each phase is recorded
//! (`store/switches.rs`) before it is acted on; [`AppService::resume_switches`] finishes or
//! undoes a switch an agent was killed in, so exactly one version serves.
//!
//! A service with a disk under an exclusive lease (or `strategy = "recreate"`) is replaced
//! stop-then-start: two sandboxes cannot hold the lease.

use std::time::Duration;

use tracing::{info, warn};

use super::health::{log_healthy, until_healthy};
use super::*;
use crate::core::owner::ReplacingRole;
use crate::core::status::SwitchPhase;

/// How long the previous sandbox keeps running after the switch before SIGTERM: requests it
/// accepted just before finish (new connections already go to the next one).
const DRAIN_PAUSE: Duration = Duration::from_secs(1);
/// SIGTERM to SIGKILL for the previous sandbox.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Kills the agent at a named point of a switch when the file `MIREN_CRASH_AT_FILE` names
/// holds that point's name (vm-tests' kill -9 at each phase; unset in production).
fn crash_point(point: &str) {
    let Some(file) = std::env::var_os("MIREN_CRASH_AT_FILE") else {
        return;
    };
    if std::fs::read_to_string(file).is_ok_and(|p| p.trim() == point) {
        warn!(point, "MIREN_CRASH_AT_FILE: killing the agent");
        // SAFETY: raising a signal on our own pid; SIGKILL cannot be caught.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Whether a replacement returns before or after the previous sandbox is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
    /// A deploy is done once the new version serves.
    Background,
    /// A restart for new addon variables (a credential rotation retires the previous login
    /// next): no sandbox with the previous variables may be left when it returns.
    Wait,
}

/// Why a service is replaced stop-then-start, if it is.
fn recreate_reason(service: &ServiceSpec) -> Option<String> {
    if let Some(disk) = service.disks.iter().find(|d| !d.local) {
        return Some(format!(
            "service `{}` holds disk `{}` under an exclusive lease: replaced stop-then-start (a short outage)",
            service.name, disk.name
        ));
    }
    (service.strategy == Strategy::Recreate).then(|| {
        format!(
            "service `{}` has strategy = \"recreate\": replaced stop-then-start",
            service.name
        )
    })
}

impl AppService {
    /// (Re)starts every service with the addons' current variables; with `old` (a deploy),
    /// services whose spec and variables did not change and whose sandbox runs are left
    /// alone. Returns notes for the deploy's output.
    pub(super) async fn start_services(
        &self,
        app: &str,
        spec: &AppSpec,
        old: Option<&AppSpec>,
        drain: Drain,
    ) -> Result<Vec<String>, Error> {
        let (addon_env, digest) = self.addon_env(app)?;
        let env_same = self.store.app_addon_env(app)?.as_deref() == Some(digest.as_str());
        let mut notes = Vec::new();
        for service in &spec.services {
            let unchanged = env_same
                && old.is_some_and(|o| o.services.iter().any(|s| s == service))
                && self
                    .sandboxes
                    .get_owned(&Owner::service(app, &service.name))?
                    .is_some_and(|s| s.state == crate::core::status::SandboxState::Running);
            if unchanged {
                self.ensure_tracked(app, service)?;
                continue;
            }
            let req = self.service_request(app, service, &addon_env)?;
            if let Some(note) = self.replace_service(app, service, req, drain).await? {
                notes.push(note);
            }
        }
        self.store.set_app_addon_env(app, &digest)?;
        Ok(notes)
    }

    fn service_request(
        &self,
        app: &str,
        service: &ServiceSpec,
        addon_env: &[String],
    ) -> Result<SandboxRequest, Error> {
        let mut env = addon_env.to_vec();
        if !service.env.iter().any(|(k, _)| k == "PORT") {
            env.push(format!("PORT={DEFAULT_PORT}"));
        }
        env.extend(service.env.iter().map(|(k, v)| format!("{k}={v}")));
        let mut req = SandboxRequest::new(service.image.clone());
        req.app = Some(crate::core::validate::to_name("app", app)?);
        req.env = env;
        req.disks = service
            .disks
            .iter()
            .filter(|d| !d.local)
            .map(|d| DiskMount {
                disk: d.name.clone(),
                path: d.mount_path.clone(),
                read_only: d.read_only,
            })
            .collect();
        if let Some(secs) = service
            .disks
            .iter()
            .filter_map(|d| d.lease_timeout_secs)
            .reduce(f64::max)
            .filter(|s| s.is_finite() && *s >= 0.0)
        {
            req.lease_timeout = Duration::from_secs_f64(secs);
        }
        req.local_dir = service
            .disks
            .iter()
            .find(|d| d.local)
            .map(|d| d.mount_path.clone());
        req.restart = RestartPolicy::Always {
            backoff: Default::default(),
        };
        req.publish = service
            .publish
            .iter()
            .map(crate::core::net::published_port)
            .collect::<Result<_, _>>()?;
        req.cmd = service.command.clone();
        let limits = &service.limits;
        if let Some(bytes) = limits.memory_bytes {
            req.resources.memory_bytes = Some(bytes);
        }
        if let Some(millicpus) = limits.millicpus {
            req.resources.cpus = Some(f64::from(millicpus) / 1000.0);
        }
        if let Some(pids) = limits.pids {
            req.resources.pids = Some(i64::from(pids));
        }
        if let Some(bytes) = limits.disk_bytes {
            req.resources.writable_bytes = Some(bytes);
        }
        Ok(req)
    }

    /// Runs `req` for `owner` under a free display name.
    async fn run_service(
        &self,
        app: &str,
        service: &str,
        mut req: SandboxRequest,
        owner: Owner,
    ) -> Result<Sandbox, Error> {
        let preferred = service_sandbox_name(app, service);
        let name = self.sandboxes.free_name(&preferred, &owner)?;
        req.name = Some(name.clone());
        match self
            .sandboxes
            .run_request(req.clone(), Some(owner.clone()))
            .await
        {
            // Another sandbox took the free name meanwhile: the hashed one is ours.
            Err(e) if e.is_name_taken() => {
                let hashed = crate::core::disks::hashed_name(&preferred, &owner.describe())?;
                if hashed == name {
                    Err(e)
                } else {
                    req.name = Some(hashed);
                    self.sandboxes.run_request(req, Some(owner)).await
                }
            }
            other => other,
        }
        .map_err(|e| e.with_context(format!("service `{service}`")))
    }

    /// Starts checking a running service's sandbox unless it is checked already.
    pub(super) fn ensure_tracked(&self, app: &str, service: &ServiceSpec) -> Result<(), Error> {
        let Some(check) = &service.health else {
            return Ok(());
        };
        if let Some(sandbox) = self
            .sandboxes
            .get_owned(&Owner::service(app, &service.name))?
        {
            if !self.health.is_tracked(&sandbox.id) {
                self.health.track(
                    self.sandboxes.clone(),
                    &sandbox.id,
                    ip_of(&sandbox),
                    check,
                    true,
                );
            }
        }
        Ok(())
    }

    /// Waits for `sandbox`'s check (none: it runs); Err says what failed and what to do.
    async fn wait_healthy(
        &self,
        app: &str,
        service: &ServiceSpec,
        sandbox: &Sandbox,
        serving: bool,
    ) -> Result<(), Error> {
        let Some(check) = &service.health else {
            return Ok(());
        };
        let rx = self.health.track(
            self.sandboxes.clone(),
            &sandbox.id,
            ip_of(sandbox),
            check,
            serving,
        );
        match until_healthy(rx).await {
            Ok(()) => {
                log_healthy(app, &service.name, &sandbox.id);
                Ok(())
            }
            Err(output) => Err(Error::new(
                crate::core::error::ErrorKind::Conflict,
                "unhealthy",
                format!(
                "service `{}` of app `{app}` did not become healthy ({}, {} failures in a row after its {} start period): {output}. See `miren logs {}`; fix the service or its [services.{}.health] and deploy again",
                service.name,
                check.probe.describe(),
                check.failure_threshold,
                humantime::format_duration(Duration::from_millis(check.start_period_ms)),
                sandbox.name,
                service.name,
            ),
            )),
        }
    }

    /// Replaces (or first starts) one service; Some(note) when it was stop-then-start.
    async fn replace_service(
        &self,
        app: &str,
        service: &ServiceSpec,
        req: SandboxRequest,
        drain: Drain,
    ) -> Result<Option<String>, Error> {
        let owner = Owner::service(app, &service.name);
        let next_owner = Owner::replacing(app, &service.name, ReplacingRole::Next);
        // Leftovers of a switch given up on are never served: remove them first.
        self.remove_owned(&next_owner).await?;
        let previous = self
            .sandboxes
            .get_owned(&owner)?
            .filter(|s| s.state == crate::core::status::SandboxState::Running);
        let reason = recreate_reason(service);
        let Some(previous) = previous.filter(|_| reason.is_none()) else {
            let had = self.sandboxes.get_owned(&owner)?.is_some();
            self.remove_owned(&owner).await?;
            let sandbox = self.run_service(app, &service.name, req, owner).await?;
            info!(app = %app, service = %service.name, sandbox = %sandbox.id, "service started");
            self.wait_healthy(app, service, &sandbox, true).await?;
            return Ok(reason.filter(|_| had));
        };

        // A previous switch's sandbox still draining has had its time. Its drain may be
        // waiting out the grace (holding the sandbox's lock): its process is killed first so
        // that stop ends now.
        let retiring = Owner::replacing(app, &service.name, ReplacingRole::Retiring);
        if let Some(old) = self.sandboxes.get_owned(&retiring)? {
            if let Err(e) = self.sandboxes.restart_process(&old.id) {
                warn!(sandbox = %old.id, error = %e.message, "ending a drain early failed");
            }
        }
        self.remove_owned(&retiring).await?;
        self.store.begin_switch(app, &service.name, &previous.id)?;
        crash_point("switch-recorded");
        let publish = req.publish.clone();
        let mut next_req = req;
        next_req.publish = Vec::new();
        let next = self
            .run_service(app, &service.name, next_req, next_owner.clone())
            .await;
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                self.store.end_switch(app, &service.name)?;
                return Err(e);
            }
        };
        info!(app = %app, service = %service.name, sandbox = %next.id, previous = %previous.id, "next sandbox started beside the serving one");
        crash_point("next-started");
        if let Err(e) = self.wait_healthy(app, service, &next, false).await {
            warn!(app = %app, service = %service.name, error = %e.message, "next sandbox unhealthy: removing it; the previous one keeps serving");
            self.health.forget(&next.id);
            self.remove_owned(&next_owner).await?;
            self.store.end_switch(app, &service.name)?;
            return Err(e);
        }
        self.store
            .set_switch_phase(app, &service.name, SwitchPhase::Switching, Some(&next.id))?;
        crash_point("switching");
        self.finish_switch(app, &service.name, &previous.id, &next.id, &publish, drain)
            .await?;
        Ok(None)
    }

    /// From `switching` on: ports, ownership, drain. Each step may be repeated.
    async fn finish_switch(
        &self,
        app: &str,
        service: &str,
        previous: &str,
        next: &str,
        publish: &[miren_netns::PublishedPort],
        drain: Drain,
    ) -> Result<(), Error> {
        self.sandboxes
            .switch_published(previous, next, publish)
            .await?;
        crash_point("ports-switched");
        self.sandboxes.promote_next(app, service)?;
        self.health.set_serving(next);
        info!(app = %app, service = %service, sandbox = %next, previous = %previous, "switched to the next sandbox; draining the previous one");
        crash_point("draining");
        match drain {
            Drain::Background => {
                self.drain_in_background(app, service);
                Ok(())
            }
            Drain::Wait => self.drain(app, service).await,
        }
    }

    /// Stops the retiring sandbox (pause, SIGTERM, SIGKILL after the grace) and removes it,
    /// then the switch row.
    async fn drain(&self, app: &str, service: &str) -> Result<(), Error> {
        drain(
            self.sandboxes.clone(),
            self.store.clone(),
            self.health.clone(),
            app.to_string(),
            service.to_string(),
        )
        .await
    }

    /// [`Self::drain`] in the background: the deploy is done once the next sandbox serves
    /// (the row in `draining` covers an agent killed meanwhile, and a later replacement of the
    /// service removes a retiring sandbox still there first).
    fn drain_in_background(&self, app: &str, service: &str) {
        let task = drain(
            self.sandboxes.clone(),
            self.store.clone(),
            self.health.clone(),
            app.to_string(),
            service.to_string(),
        );
        let (app, service) = (app.to_string(), service.to_string());
        tokio::spawn(async move {
            if let Err(e) = task.await {
                warn!(app = %app, service = %service, error = %e, "draining the previous sandbox failed; the next start retries");
            }
        });
    }

    pub(super) async fn remove_owned(&self, owner: &Owner) -> Result<(), Error> {
        if let Some(s) = self.sandboxes.get_owned(owner)? {
            self.health.forget(&s.id);
        }
        self.sandboxes.delete_owned(owner).await
    }

    /// Finishes or undoes the switches an agent was killed in: before the next sandbox was
    /// healthy, it is removed (the previous one still serves; the deploy, if it was one, is
    /// resumed as a whole); from `switching` on, the switch is finished.
    pub(super) async fn resume_switches(&self) -> Result<(), Error> {
        for row in self.store.switches()? {
            let lock = self.locks.of(&row.app);
            let _guard = lock.lock().await;
            let (app, service) = (row.app.as_str(), row.service.as_str());
            info!(app, service, phase = %row.phase, "resuming a redeploy's switch");
            let next_owner = Owner::replacing(app, service, ReplacingRole::Next);
            let result = match (row.phase, row.next_sandbox.as_deref()) {
                (SwitchPhase::Starting, _) | (SwitchPhase::Switching, None) => {
                    match self.remove_owned(&next_owner).await {
                        Ok(()) => self.store.end_switch(app, service).map_err(Error::from),
                        Err(e) => Err(e),
                    }
                }
                (SwitchPhase::Switching, Some(next)) => {
                    let next_alive = self.sandboxes.get_owned(&next_owner)?.is_some();
                    let publish = self.spec_of(app).ok().and_then(|spec| {
                        spec.services
                            .iter()
                            .find(|s| s.name == service)
                            .map(|s| s.publish.clone())
                    });
                    match (next_alive, publish) {
                        (true, Some(publish)) => {
                            match publish
                                .iter()
                                .map(crate::core::net::published_port)
                                .collect::<Result<Vec<_>, _>>()
                            {
                                Ok(publish) => {
                                    self.finish_switch(
                                        app,
                                        service,
                                        &row.previous_sandbox,
                                        next,
                                        &publish,
                                        Drain::Wait,
                                    )
                                    .await
                                }
                                Err(e) => Err(e),
                            }
                        }
                        // The next sandbox is gone: the previous one still has its ports.
                        _ => match self.remove_owned(&next_owner).await {
                            Ok(()) => self.store.end_switch(app, service).map_err(Error::from),
                            Err(e) => Err(e),
                        },
                    }
                }
                (SwitchPhase::Draining, _) => self.drain(app, service).await,
            };
            if let Err(e) = result {
                warn!(app, service, error = %e, "resuming the switch failed; the next start retries");
            }
        }
        Ok(())
    }
}

async fn drain(
    sandboxes: Arc<dyn ServiceSandboxes>,
    store: Arc<Store>,
    health: Arc<super::health::HealthBoard>,
    app: String,
    service: String,
) -> Result<(), Error> {
    let retiring = Owner::replacing(&app, &service, ReplacingRole::Retiring);
    let Some(old) = sandboxes.get_owned(&retiring)? else {
        store.end_switch(&app, &service)?;
        return Ok(());
    };
    health.forget(&old.id);
    tokio::time::sleep(DRAIN_PAUSE).await;
    if let Err(e) = sandboxes.stop(&old.id, DRAIN_GRACE).await {
        warn!(sandbox = %old.id, error = %e.message, "stopping the previous sandbox failed; deleting it");
    }
    // Only the sandbox this drain began with: a later switch may have retired another.
    if sandboxes
        .get_owned(&retiring)?
        .is_some_and(|s| s.id == old.id)
    {
        sandboxes.delete_owned(&retiring).await?;
    }
    store.end_switch_of(&app, &service, &old.id)?;
    info!(app = %app, service = %service, sandbox = %old.id, "previous sandbox drained and removed");
    Ok(())
}

fn ip_of(sandbox: &Sandbox) -> Option<std::net::Ipv4Addr> {
    sandbox.ip.as_deref().and_then(|ip| ip.parse().ok())
}
