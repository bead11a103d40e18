//! Apps: what `miren deploy` declared (`.miren/app.toml`), made real. A deploy records the
//! declaration, creates missing disks, provisions the declared addons and removes the ones a
//! previous deploy made that are no longer declared, waits until every addon is `active`, and
//! only then (re)starts the services with the addons' variables in their environment.
//!
//! The declaration is stored before anything is made, with the app in `deploying`; an agent
//! killed mid-deploy finishes it on start-up.

use std::sync::Arc;
use std::time::Duration;

use miren_disks::Filesystem;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::core::addons::provider::BoxFuture;
use crate::core::addons::AddonService;
use crate::core::disks::DiskService;
use crate::core::error::Error;
use crate::core::sandboxes::{DiskMount, SandboxRequest, SandboxService};
use crate::model::{
    App, AppDeleted, AppServiceView, CreateAddon, CreateDisk, DeployApp, PublishPort, Sandbox,
};
use crate::store::addons::{AddonStatus, AppStatus};
use crate::store::{Owner, Store};
use miren_runtime::sandbox::RestartPolicy;
use miren_sys::name::Name;

/// The port a service listens on unless its env sets `PORT`.
pub const DEFAULT_PORT: u16 = 3000;

mod health;
mod spec;
mod switch;
use spec::spec_from_config;
pub use spec::{
    service_sandbox_name, AddonSpec, AppSpec, BuiltSpec, DiskSpec, HealthSpec, ProbeSpec,
    ServiceLimitsSpec, ServiceSpec, Strategy,
};

/// The disks an app declares, as deploys use them: the disk service (fakes in unit tests).
pub trait AppDisks: Send + Sync {
    /// The app's disk: made for it, or claimed if nobody owns it; another owner's is refused.
    fn ensure_for_app(&self, req: &CreateDisk, app: &str) -> Result<(), Error>;
    /// Refuses a disk another app or an addon owns, before anything is recorded.
    fn check_for_app(&self, name: &str, app: &str) -> Result<(), Error>;
}

impl AppDisks for DiskService {
    fn ensure_for_app(&self, req: &CreateDisk, app: &str) -> Result<(), Error> {
        DiskService::ensure_for_app(self, req, app)
    }

    fn check_for_app(&self, name: &str, app: &str) -> Result<(), Error> {
        DiskService::check_for_app(self, name, app)
    }
}

/// The sandboxes that run an app's services, found by owner: the sandbox service (fakes in
/// unit tests).
pub trait ServiceSandboxes: Send + Sync {
    fn run_request(
        &self,
        req: SandboxRequest,
        owner: Option<Owner>,
    ) -> BoxFuture<'_, Result<Sandbox, Error>>;
    fn get_owned(&self, owner: &Owner) -> Result<Option<Sandbox>, Error>;
    /// None is fine.
    fn delete_owned<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>>;
    fn free_name(&self, preferred: &str, owner: &Owner) -> Result<Name, Error>;
    /// One health check of sandbox `id` at `ip`; Err carries its output.
    fn probe<'a>(
        &'a self,
        id: &'a str,
        ip: Option<std::net::Ipv4Addr>,
        probe: &'a ProbeSpec,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Kills the sandbox's process so its supervisor restarts it per its restart policy.
    fn restart_process(&self, id: &str) -> Result<(), Error>;
    /// SIGTERM, SIGKILL after `grace`; the sandbox stays (stopped).
    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, Result<(), Error>>;
    /// Moves published ports from sandbox `from` to `to` in one atomic rules change.
    fn switch_published<'a>(
        &'a self,
        from: &'a str,
        to: &'a str,
        publish: &'a [miren_netns::PublishedPort],
    ) -> BoxFuture<'a, Result<(), Error>>;
    /// The switch's ownership step: the next sandbox of `service` serves, the serving one
    /// retires (and the switch is recorded as draining).
    fn promote_next(&self, app: &str, service: &str) -> Result<(), Error>;
}

impl ServiceSandboxes for SandboxService {
    fn run_request(
        &self,
        req: SandboxRequest,
        owner: Option<Owner>,
    ) -> BoxFuture<'_, Result<Sandbox, Error>> {
        Box::pin(SandboxService::run_request(self, req, owner))
    }

    fn get_owned(&self, owner: &Owner) -> Result<Option<Sandbox>, Error> {
        SandboxService::get_owned(self, owner)
    }

    fn delete_owned<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(SandboxService::delete_owned(self, owner))
    }

    fn free_name(&self, preferred: &str, owner: &Owner) -> Result<Name, Error> {
        SandboxService::free_name(self, preferred, owner)
    }

    fn probe<'a>(
        &'a self,
        id: &'a str,
        ip: Option<std::net::Ipv4Addr>,
        probe: &'a ProbeSpec,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(health::probe(self, id, ip, probe))
    }

    fn restart_process(&self, id: &str) -> Result<(), Error> {
        SandboxService::kill_process(self, id)
    }

    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move { SandboxService::stop(self, id, Some(grace)).await.map(drop) })
    }

    fn switch_published<'a>(
        &'a self,
        from: &'a str,
        to: &'a str,
        publish: &'a [miren_netns::PublishedPort],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(SandboxService::switch_published(self, from, to, publish))
    }

    fn promote_next(&self, app: &str, service: &str) -> Result<(), Error> {
        SandboxService::promote_next(self, app, service)
    }
}

pub struct AppService {
    store: Arc<Store>,
    disks: Arc<dyn AppDisks>,
    sandboxes: Arc<dyn ServiceSandboxes>,
    addons: Arc<AddonService>,
    /// One deploy, restart or delete at a time per app.
    locks: crate::util::KeyedLocks,
    /// The services' health checks, by sandbox id.
    health: Arc<health::HealthBoard>,
}

impl AppService {
    pub fn new(
        store: Arc<Store>,
        disks: Arc<dyn AppDisks>,
        sandboxes: Arc<dyn ServiceSandboxes>,
        addons: Arc<AddonService>,
    ) -> Arc<AppService> {
        Arc::new(AppService {
            store,
            disks,
            sandboxes,
            addons,
            locks: Default::default(),
            health: Default::default(),
        })
    }

    fn spec_of(&self, app: &str) -> Result<AppSpec, Error> {
        let row = self.store.app(app)?.ok_or_else(|| {
            Error::not_found(format!(
                "no app `{app}`; `miren app list` shows the apps, `miren deploy` creates one"
            ))
        })?;
        serde_json::from_str(&row.spec)
            .map_err(|e| Error::internal(format!("app `{app}`: stored declaration: {e}")))
    }

    pub async fn deploy(&self, req: DeployApp) -> Result<App, Error> {
        let source = req.source.as_deref().unwrap_or(".miren/app.toml");
        let config = miren_addons::parse_app_toml(&req.app_toml, source)
            .map_err(|e| Error::invalid(e.to_string()))?;
        for p in &req.publish {
            if config.service(&p.service).is_none() {
                let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::invalid(format!(
                    "--publish names service `{}`, which {source} does not declare; its services: {}",
                    p.service,
                    names.join(", ")
                )));
            }
        }
        let spec = spec_from_config(&config, &req.publish, &req.built, source)?;
        let app = config.name.clone();
        // Refuse what would change an addon underneath the app before anything is recorded.
        for wanted in &spec.addons {
            if let Some(existing) = self.store.addon(&app, &wanted.kind)? {
                if existing.variant != wanted.variant {
                    return Err(Error::conflict(format!(
                        "{source}: [addons.{kind}] asks for variant `{}`, but app `{app}` has it as `{}`; variants cannot be changed in place: back up its data, `miren addon destroy {kind} -a {app}`, then deploy again",
                        wanted.variant,
                        existing.variant,
                        kind = wanted.kind
                    )));
                }
            }
        }
        // Addons the deploy keeps (made with `addon create`) must not set the declared ones'
        // variables either.
        let mut kinds: Vec<miren_addons::AddonKind> =
            config.addons.iter().map(|a| a.kind).collect();
        for row in self.store.addons_of(&app)? {
            if row.source != "deploy" && row.status != AddonStatus::Deprovisioning {
                if let Ok(kind) = miren_addons::AddonKind::parse(&row.kind) {
                    kinds.push(kind);
                }
            }
        }
        if let Some(clash) = miren_addons::env_clash(&kinds) {
            return Err(Error::conflict(format!(
                "{source}: {clash} (app `{app}` has {} from `miren addon create`; `miren addon destroy {} -a {app}` to replace it)",
                clash.second, clash.second
            )));
        }
        // Another app's or an addon's disk is refused before anything is recorded.
        for service in &spec.services {
            for disk in service.disks.iter().filter(|d| !d.local) {
                self.disks
                    .check_for_app(&disk.name, &app)
                    .map_err(|e| e.with_context(format!("{source}: services.{}", service.name)))?;
            }
        }
        let lock = self.locks.of(&app);
        let _guard = lock.lock().await;
        let old = self.spec_of(&app).ok();
        let text = serde_json::to_string(&spec)
            .map_err(|e| Error::internal(format!("recording the app: {e}")))?;
        self.store.put_app(&app, &text, AppStatus::Deploying)?;
        info!(app = %app, services = spec.services.len(), addons = spec.addons.len(), "deploying");
        let notes = self.converge(&app, &spec, old.as_ref()).await?;
        let mut view = self.get(&app)?;
        view.notes = notes;
        Ok(view)
    }

    /// Finishes deploys a previous agent was killed in, and restarts running apps whose
    /// addons changed while it was not looking.
    pub fn resume(self: &Arc<Self>) -> Result<(), Error> {
        let this = self.clone();
        tokio::spawn(async move {
            // Switches first: a deploy resumed below must find exactly one version serving.
            if let Err(e) = this.resume_switches().await {
                warn!(error = %e, "resuming redeploy switches failed");
            }
            if let Err(e) = this.resume_apps() {
                warn!(error = %e, "resuming apps failed");
            }
        });
        Ok(())
    }

    fn resume_apps(self: &Arc<Self>) -> Result<(), Error> {
        for row in self.store.apps()? {
            if let Ok(spec) = self.spec_of(&row.name) {
                for service in &spec.services {
                    if let Err(e) = self.ensure_tracked(&row.name, service) {
                        warn!(app = %row.name, service = %service.name, error = %e, "health check not started");
                    }
                }
            }
            if row.status.can_restart() {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.addons_changed(&row.name).await {
                        warn!(app = %row.name, error = %e, "restarting the app for its addons' variables failed");
                    }
                });
                continue;
            }
            if !row.status.needs_work() {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                let lock = this.locks.of(&row.name);
                let _guard = lock.lock().await;
                info!(app = %row.name, "finishing a deploy cut short");
                match this.spec_of(&row.name) {
                    Ok(spec) => {
                        if let Err(e) = this.converge(&row.name, &spec, None).await {
                            warn!(app = %row.name, error = %e, "finishing the deploy failed");
                        }
                    }
                    Err(e) => warn!(app = %row.name, error = %e, "finishing the deploy failed"),
                }
            });
        }
        Ok(())
    }

    /// Records the outcome on the app row.
    async fn converge(
        &self,
        app: &str,
        spec: &AppSpec,
        old: Option<&AppSpec>,
    ) -> Result<Vec<String>, Error> {
        match self.converge_steps(app, spec, old).await {
            Ok(notes) => {
                self.store.set_app_status(app, AppStatus::Running, None)?;
                info!(app = %app, "deployed");
                Ok(notes)
            }
            Err(e) => {
                self.store
                    .set_app_status(app, AppStatus::Error, Some(&e.message))?;
                Err(e)
            }
        }
    }

    async fn converge_steps(
        &self,
        app: &str,
        spec: &AppSpec,
        old: Option<&AppSpec>,
    ) -> Result<Vec<String>, Error> {
        // Disks first: they are cheap, and an addon failing should not hide a bad disk.
        for service in &spec.services {
            for disk in service.disks.iter().filter(|d| !d.local) {
                self.ensure_disk(app, disk).await?;
            }
        }

        let mut pending = Vec::new();
        // Removals first, so an addon replacing another that set the same variables (say
        // MySQL for PostgreSQL) is not refused as a clash with the one going away.
        for row in self.store.addons_of(app)? {
            let declared = spec.addons.iter().any(|a| a.kind == row.kind);
            if !declared && row.source == "deploy" {
                info!(app = %app, addon = %row.kind, "no longer declared: deprovisioning");
                if let Some(done) = self.addons.destroy(app, &row.kind)? {
                    pending.push(done);
                }
            }
        }
        for wanted in &spec.addons {
            let (_, done) = self
                .addons
                .create(
                    &CreateAddon {
                        app: app.to_string(),
                        addon: wanted.kind.clone(),
                        variant: Some(wanted.variant.clone()),
                        version: wanted.version.clone(),
                        pooling: wanted.pooling.clone(),
                        tier: wanted.tier.clone(),
                        client_connections: wanted.client_connections,
                        wait: true,
                    },
                    "deploy",
                )
                .await?;
            pending.push(done);
        }
        for mut done in pending {
            let _ = done.wait_for(|d| *d).await;
        }
        let mut not_ready = self.addons.not_active(app)?;
        for wanted in &spec.addons {
            if self.store.addon(app, &wanted.kind)?.is_none() {
                not_ready.push(format!("{} (removed while the deploy waited)", wanted.kind));
            }
        }
        if !not_ready.is_empty() {
            return Err(Error::conflict(format!(
                "app `{app}` was not started: its addons are not all active: {}. Fix the cause and deploy again, or remove the addon",
                not_ready.join("; ")
            )));
        }

        // Services of the previous declaration that are gone now.
        if let Some(old) = old {
            for service in &old.services {
                if !spec.services.iter().any(|s| s.name == service.name) {
                    self.remove_service(app, &service.name).await?;
                }
            }
        }
        self.start_services(app, spec, old, switch::Drain::Background)
            .await
    }

    /// The app's disk: made for it, or claimed if nobody owns it; another owner's is refused.
    async fn ensure_disk(&self, app: &str, disk: &DiskSpec) -> Result<(), Error> {
        let disks = self.disks.clone();
        let req = CreateDisk {
            name: disk.name.clone(),
            size_gb: disk.size_gb,
            filesystem: Some(disk.filesystem.unwrap_or_default().into()),
            read_only: false,
        };
        let app = app.to_string();
        tokio::task::spawn_blocking(move || disks.ensure_for_app(&req, &app))
            .await
            .map_err(|e| Error::internal(format!("creating a disk: {e}")))?
    }

    /// The service's sandbox and any a redeploy left beside it.
    async fn remove_service(&self, app: &str, service: &str) -> Result<(), Error> {
        use crate::core::owner::ReplacingRole;
        for role in [ReplacingRole::Next, ReplacingRole::Retiring] {
            self.remove_owned(&Owner::replacing(app, service, role))
                .await?;
        }
        self.remove_owned(&Owner::service(app, service)).await?;
        self.store.end_switch(app, service)?;
        Ok(())
    }

    /// The addons' variables for the app's services, and their digest.
    fn addon_env(&self, app: &str) -> Result<(Vec<String>, String), Error> {
        use sha2::Digest;
        let env: Vec<String> = self
            .addons
            .env_of(app)?
            .into_iter()
            .map(|(var, _)| format!("{}={}", var.key, var.value))
            .collect();
        let mut sorted = env.clone();
        sorted.sort();
        let digest = sha2::Sha256::digest(sorted.join("\n").as_bytes());
        Ok((env, format!("{digest:x}")))
    }

    pub async fn restart(&self, app: &str) -> Result<App, Error> {
        let lock = self.locks.of(app);
        let _guard = lock.lock().await;
        self.restart_locked(app).await
    }

    async fn restart_locked(&self, app: &str) -> Result<App, Error> {
        let spec = self.spec_of(app)?;
        let not_ready = self.addons.not_active(app)?;
        if !not_ready.is_empty() {
            return Err(Error::conflict(format!(
                "app `{app}` cannot start until its addons are active: {}",
                not_ready.join("; ")
            )));
        }
        let notes = self
            .start_services(app, &spec, None, switch::Drain::Wait)
            .await?;
        self.store.set_app_status(app, AppStatus::Running, None)?;
        info!(app = %app, "restarted");
        let mut view = self.get(app)?;
        view.notes = notes;
        Ok(view)
    }

    /// Restarts a running app whose services were started with other addon variables than
    /// its addons have now (an addon attached, removed or moved outside a deploy), so they see
    /// the new ones. A no-op when nothing changed: safe to call after any addon event.
    pub async fn addons_changed(&self, app: &str) -> Result<(), Error> {
        let lock = self.locks.of(app);
        let _guard = lock.lock().await;
        match self.store.app(app)? {
            Some(row) if row.status.can_restart() => {
                let (_, now) = self.addon_env(app)?;
                match self.store.app_addon_env(app)? {
                    Some(then) if then == now => return Ok(()),
                    // Started by an agent that did not record it (before migration 7).
                    None => return Ok(self.store.set_app_addon_env(app, &now)?),
                    Some(_) => {}
                }
                info!(app = %app, "addons changed: restarting the app's services");
                self.restart_locked(app).await.map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// Removes the app's services and its record. Disks and addons stay, with their data.
    pub async fn delete(&self, app: &str) -> Result<AppDeleted, Error> {
        let lock = self.locks.of(app);
        let _guard = lock.lock().await;
        let spec = self.spec_of(app)?;
        let mut removed = Vec::new();
        for service in &spec.services {
            if let Some(sandbox) = self
                .sandboxes
                .get_owned(&Owner::service(app, &service.name))?
            {
                self.remove_service(app, &service.name).await?;
                removed.push(sandbox.name);
            }
        }
        self.store.remove_app(app)?;
        info!(app = %app, "app deleted; its disks and addons stay");
        let mut disks_kept: Vec<String> = spec
            .services
            .iter()
            .flat_map(|s| s.disks.iter().filter(|d| !d.local).map(|d| d.name.clone()))
            .collect();
        disks_kept.dedup();
        Ok(AppDeleted {
            name: app.to_string(),
            sandboxes: removed,
            addons_kept: self
                .store
                .addons_of(app)?
                .into_iter()
                .map(|r| r.kind)
                .collect(),
            disks_kept,
        })
    }

    pub fn get(&self, app: &str) -> Result<App, Error> {
        let row = self.store.app(app)?.ok_or_else(|| {
            Error::not_found(format!(
                "no app `{app}`; `miren app list` shows the apps, `miren deploy` creates one"
            ))
        })?;
        let spec: AppSpec = serde_json::from_str(&row.spec).unwrap_or_default();
        let services = spec
            .services
            .iter()
            .map(|s| {
                let sandbox = self
                    .sandboxes
                    .get_owned(&Owner::service(app, &s.name))
                    .ok()
                    .flatten();
                AppServiceView {
                    name: s.name.clone(),
                    sandbox: sandbox
                        .as_ref()
                        .map_or_else(|| service_sandbox_name(app, &s.name), |x| x.name.clone()),
                    image: s.image.clone(),
                    image_digest: s.built.as_ref().map(|b| b.digest.clone()),
                    built_from_source: s.built.as_ref().map(|b| b.stack.clone()),
                    state: sandbox.as_ref().map(|x| x.state),
                    ip: sandbox.as_ref().and_then(|x| x.ip.clone()),
                    restarts: sandbox.as_ref().map(|x| x.restarts),
                    health: sandbox.as_ref().and_then(|x| self.health.view(&x.id)),
                }
            })
            .collect();
        Ok(App {
            name: row.name.clone(),
            status: row.status,
            reason: row.reason.clone(),
            services,
            addons: self
                .store
                .addons_of(app)?
                .iter()
                .map(|row| self.addons.view(row))
                .collect(),
            created_at: row.created_at,
            updated_at: row.updated_at,
            notes: Vec::new(),
        })
    }

    pub fn list(&self) -> Result<Vec<App>, Error> {
        self.store
            .apps()?
            .iter()
            .map(|row| self.get(&row.name))
            .collect()
    }

    /// The app's environment as its services get it: addon variables, then app.toml's.
    pub fn env(&self, app: &str, reveal: bool) -> Result<Vec<crate::model::EnvVarView>, Error> {
        let mut vars = self.addons.env_view(app, reveal)?;
        if let Ok(spec) = self.spec_of(app) {
            for service in &spec.services {
                for (key, value) in &service.env {
                    if !vars.iter().any(|v| &v.name == key) {
                        vars.push(crate::model::EnvVarView {
                            name: key.clone(),
                            value: value.clone(),
                            sensitive: false,
                            source: format!("app.toml (services.{})", service.name),
                        });
                    }
                }
            }
        }
        Ok(vars)
    }
}

#[cfg(test)]
mod convergence_tests;

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashed names name sandboxes and disks on disk and in the database: they never change.
    #[test]
    fn stored_disk_specs_read_in_every_form_they_were_written() {
        let read = |fs: &str| -> Option<Filesystem> {
            let json = format!(
                r#"{{"name":"d","mount_path":"/d","read_only":false,"local":false,"size_gb":1,"filesystem":{fs},"lease_timeout_secs":null}}"#
            );
            serde_json::from_str::<DiskSpec>(&json).unwrap().filesystem
        };
        assert_eq!(read(r#""xfs""#), Some(Filesystem::Xfs));
        // Local storage was stored with an empty name; now it is null.
        assert_eq!(read(r#""""#), None);
        assert_eq!(read("null"), None);
        let json = r#"{"name":"d","mount_path":"/d","read_only":false,"local":false,"size_gb":1,"filesystem":"zfs","lease_timeout_secs":null}"#;
        assert!(serde_json::from_str::<DiskSpec>(json).is_err());
        let written = serde_json::to_string(&DiskSpec {
            name: "d".into(),
            mount_path: "/d".into(),
            read_only: false,
            local: false,
            size_gb: 1,
            filesystem: Some(Filesystem::Btrfs),
            lease_timeout_secs: None,
        })
        .unwrap();
        assert!(written.contains(r#""filesystem":"btrfs""#), "{written}");
    }

    #[test]
    fn hashed_names_are_pinned() {
        let long = "a".repeat(60);
        assert_eq!(
            service_sandbox_name(&long, "worker"),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-076a6cfa"
        );
        assert_eq!(
            crate::core::disks::hashed_name("data", "app `shop`").unwrap(),
            "data-aa85ec62"
        );
        assert_eq!(
            crate::core::disks::hashed_name(&"d-".repeat(40), "x").unwrap(),
            "d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-d-bea246e5"
        );
        assert_eq!(
            crate::core::addons::dedicated_server_name("addon-pg", &"b".repeat(63)),
            "addon-pg-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-29a2c225"
        );
    }

    #[test]
    fn service_names_fit() {
        assert_eq!(service_sandbox_name("my-app", "web"), "my-app-web");
        let long = service_sandbox_name(&"a".repeat(60), "worker");
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, service_sandbox_name(&"a".repeat(60), "worker2"));
    }

    #[test]
    fn a_declaration_becomes_a_spec() {
        let config = miren_addons::parse_app_toml(
            r#"
name = "shop"
[services.web]
image = "oven/bun:1"
command = "bun run index.ts"
[[services.web.env]]
key = "MODE"
value = "prod"
[[services.web.disks]]
name = "shop-data"
mount_path = "/data"
size_gb = 2
[addons.miren-postgresql]
variant = "shared"
"#,
            "app.toml",
        )
        .unwrap();
        let spec = spec_from_config(
            &config,
            &[crate::model::ServicePublish {
                service: "web".into(),
                host_ip: None,
                host_port: 8080,
                port: 3000,
            }],
            &[],
            "app.toml",
        )
        .unwrap();
        let web = &spec.services[0];
        assert_eq!(web.command, ["bun", "run", "index.ts"]);
        assert_eq!(web.env, [("MODE".to_string(), "prod".to_string())]);
        assert_eq!(web.disks[0].size_gb, 2);
        assert_eq!(web.publish[0].host_port, 8080);
        assert_eq!(
            spec.addons,
            [AddonSpec {
                kind: "miren-postgresql".into(),
                variant: "shared".into(),
                version: None,
                pooling: None,
                tier: Some("small".into()),
                client_connections: None,
            }]
        );
    }
}
