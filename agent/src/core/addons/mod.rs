//! Managed addons on the node's own primitives: an addon's server is a sandbox running the
//! addon's image, with its data on a miren disk and a network endpoint that admits only the
//! apps attached to it.
//!
//! This module is the generic driver; it knows nothing of any product. What a kind of addon
//! is (its server, readiness, tenants, variables) comes from its provider (`provider.rs`;
//! `postgres.rs` is the first), and the node comes through [`host::AddonHost`], so the
//! lifecycle is unit-tested with fakes (`tests.rs`).
//!
//! Provisioning and deprovisioning are step sequences driven by the addon's row: the row is
//! written before anything is made and removed after everything is gone, every step looks
//! before it acts (a disk or sandbox by its owner, a tenant by the server's catalog), and one
//! task per addon drives it. An agent killed at any point resumes each addon from its row on
//! start-up; a failed provisioning removes what it made and leaves the row in `error`, which
//! can always be destroyed. Everything about a shared server (joining, leaving, creating and
//! removing it) happens under one lock, with the membership in the store.

#[cfg(test)]
pub(crate) mod fakes;
pub mod host;
mod memcache;
mod mysql;
mod pooler;
pub mod postgres;
pub mod provider;
pub mod rabbitmq;
pub mod rotate;
mod sidecar;
mod steps;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tier_tests;
mod tiers;
mod valkey;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use miren_addons::{
    AddonKind, Catalogue, CatalogueError, Credentials, Pooling, ResolvedVersion, Variant,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::core::disks::DiskService;
use crate::core::error::Error;
use crate::core::net::NetService;
use crate::core::sandboxes::SandboxService;
use crate::model::{Addon, AddonCatalogEntry, AddonVariantInfo, CreateAddon, EnvVarView};
use crate::store::addons::{AddonRow, AddonStatus, Inserted};
use crate::store::{Owner, Store};
use crate::util::now_rfc3339;
use host::{AddonHost, NodeHost};
use provider::AddonProvider;

/// Attempts at removing an addon before the driver gives up until the next destroy or start.
const REMOVAL_ATTEMPTS: u32 = 5;

impl From<CatalogueError> for Error {
    fn from(err: CatalogueError) -> Self {
        Error::invalid(err.to_string())
    }
}

type Key = (String, String);

pub struct AddonService {
    store: Arc<Store>,
    host: Arc<dyn AddonHost>,
    providers: Vec<Arc<dyn AddonProvider>>,
    /// How long a new server may take to pass its readiness check (initdb included).
    ready_timeout: Duration,
    /// One driver task per addon; its channel turns true when it has nothing left to do.
    tasks: Mutex<HashMap<Key, watch::Sender<bool>>>,
    /// Serializes everything that touches a shared server's lifecycle or membership.
    shared: tokio::sync::Mutex<()>,
    /// Hears the app of every addon whose driver finished (active, deleted, error), so apps
    /// can pick up changed variables (see `AppService::addons_changed`).
    settled: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
    /// The addons whose credential rotation runs in this agent now.
    rotating: Arc<Mutex<std::collections::HashSet<Key>>>,
    /// PostgreSQL's continuous archive and restores (`postgres/archive.rs`); unset in unit tests.
    pitr: std::sync::OnceLock<Arc<postgres::archive::Pitr>>,
}

/// The sandbox and disk name of an app's dedicated server: `<base>-<app>` (`addon-pg-shop`),
/// shortened with a hash when it would pass the 63-character name limit.
pub fn dedicated_server_name(base: &str, app: &str) -> String {
    // The hash is of the app alone (not the prefixed name), as it always was: the name is on disk.
    // App names never start with `-`, so cutting the prefixed name equals cutting the app's part.
    miren_sys::name::shortened(
        &format!("{base}-{app}"),
        miren_sys::fnv::fnv1a32(app.as_bytes()),
    )
}

fn is_shared(row: &AddonRow) -> bool {
    row.variant == Variant::Shared.name()
}

/// Who an addon's server (its sandbox and disk) belongs to: the app's own addon, or the node's
/// shared server of the kind. Servers are found by this, never by name.
pub fn server_owner(row: &AddonRow) -> Owner {
    if is_shared(row) {
        shared_owner(&row.kind)
    } else {
        Owner::Addon {
            app: row.app.clone(),
            kind: row.kind.clone(),
        }
    }
}

fn shared_owner(kind: &str) -> Owner {
    Owner::Shared {
        kind: kind.to_string(),
    }
}

/// What the addon's `DATABASE_URL` points at: as recorded in `extra`, else the variant's
/// default (rows from before pooling).
fn pooling(row: &AddonRow) -> Pooling {
    row.extra
        .get("pooling")
        .and_then(|v| v.as_str())
        .and_then(|p| Pooling::parse(p).ok())
        .unwrap_or_else(|| {
            Pooling::default_for(if is_shared(row) {
                Variant::Shared
            } else {
                Variant::Small
            })
        })
}

/// The app's login, as its row keeps it.
fn credentials(row: &AddonRow) -> Credentials {
    Credentials {
        user: row.user.clone(),
        password: row.password.clone(),
        database: row.database.clone(),
    }
}

pub fn catalogue() -> Vec<AddonCatalogEntry> {
    Catalogue::builtin()
        .addons()
        .into_iter()
        .map(|info| AddonCatalogEntry {
            name: info.name.to_string(),
            description: info.description.to_string(),
            variants: info
                .variants
                .iter()
                .map(|v| AddonVariantInfo {
                    name: v.name.to_string(),
                    description: v.description.to_string(),
                    default: v.is_default,
                    tenancy: match v.tenancy {
                        miren_addons::Tenancy::Dedicated => "dedicated".into(),
                        miren_addons::Tenancy::SharedPerNode => "shared".into(),
                    },
                    disk_size_gb: v.disk_size_gb,
                    disk_filesystem: v.disk_size_gb.map(|_| v.disk_filesystem.to_string()),
                })
                .collect(),
            versions: info.versions.iter().map(|v| v.name.to_string()).collect(),
            default_version: info.default_version.name.to_string(),
        })
        .collect()
}

/// `miren-postgresql:small` -> (`miren-postgresql`, Some(`small`)).
pub fn split_addon_arg(arg: &str) -> (&str, Option<&str>) {
    match arg.split_once(':') {
        Some((name, variant)) => (name, Some(variant)),
        None => (arg, None),
    }
}

impl AddonService {
    pub fn new(
        store: Arc<Store>,
        disks: Arc<DiskService>,
        net: Arc<NetService>,
        sandboxes: Arc<SandboxService>,
    ) -> Arc<AddonService> {
        let host = Arc::new(NodeHost {
            store: store.clone(),
            disks,
            net,
            sandboxes,
        });
        AddonService::with_host(store, host, provider::builtin())
    }

    /// The driver on any host with any providers (unit tests use fakes).
    pub fn with_host(
        store: Arc<Store>,
        host: Arc<dyn AddonHost>,
        providers: Vec<Arc<dyn AddonProvider>>,
    ) -> Arc<AddonService> {
        Arc::new(AddonService {
            store,
            host,
            providers,
            ready_timeout: Duration::from_secs(120),
            tasks: Mutex::new(HashMap::new()),
            shared: tokio::sync::Mutex::new(()),
            settled: std::sync::OnceLock::new(),
            rotating: rotate::running(),
            pitr: std::sync::OnceLock::new(),
        })
    }

    /// Where to report apps whose addon settled (once, at start).
    pub fn on_settled(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        let _ = self.settled.set(tx);
    }

    /// The provider of a kind (as stored: `miren-postgresql`).
    fn provider(&self, kind: &str) -> Result<&Arc<dyn AddonProvider>, Error> {
        self.providers
            .iter()
            .find(|p| p.kind().name() == kind)
            .ok_or_else(|| {
                Error::internal(format!(
                    "addon kind `{kind}` has no provider in this build of miren"
                ))
            })
    }

    /// The name an addon's server is given when it is free.
    fn server_name(&self, row: &AddonRow) -> String {
        let base = self
            .provider(&row.kind)
            .map_or("addon", |p| p.server_base_name());
        if is_shared(row) {
            base.to_string()
        } else {
            dedicated_server_name(base, &row.app)
        }
    }

    fn find(&self, app: &str, kind: &str) -> Result<AddonRow, Error> {
        self.store.addon(app, kind)?.ok_or_else(|| {
            Error::not_found(format!(
                "app `{app}` has no {kind} addon; `miren addon list -a {app}` shows its addons"
            ))
        })
    }

    pub fn get(&self, app: &str, kind: &str) -> Result<Addon, Error> {
        Ok(self.view(&self.find(app, kind)?))
    }

    pub fn list(&self, app: &str) -> Result<Vec<Addon>, Error> {
        Ok(self
            .store
            .addons_of(app)?
            .iter()
            .map(|row| self.view(row))
            .collect())
    }

    /// The addon as the API shows it, naming the server sandbox it really has (found by owner).
    pub fn view(&self, row: &AddonRow) -> Addon {
        let server = match self.store.sandbox_of(&server_owner(row)) {
            Ok(Some(sandbox)) => sandbox.name,
            _ => self.server_name(row),
        };
        let has_pooler = self.provider(&row.kind).is_ok_and(|p| p.has_sidecar());
        let has_tiers = AddonKind::parse(&row.kind).is_ok_and(|k| k.has_tiers());
        let usage = self.host.disk_usage(&server_owner(row)).ok().flatten();
        let pooler = match self
            .store
            .sandbox_of(&Owner::sidecar_of(&server_owner(row)))
        {
            Ok(Some(sandbox)) => Some(sandbox.name),
            _ => None,
        };
        Addon {
            name: row.kind.clone(),
            app: row.app.clone(),
            variant: row.variant.clone(),
            version: row.version.clone(),
            image: row.image.clone(),
            status: row.status,
            reason: row.reason.clone(),
            server,
            pooling: has_pooler.then(|| pooling(row).name().to_string()),
            pooler,
            tier: has_tiers.then(|| tiers::tier(row).name().to_string()),
            client_connections: has_tiers.then(|| tiers::client_connections(row)),
            disk_size_gb: usage.map(|u| u.size_gb),
            disk_used_bytes: usage.map(|u| u.used_bytes),
            last_growth: tiers::last_growth(row),
            archive: self.archive_lag(row),
            source: row.source.clone(),
            created_at: row.created_at.clone(),
            updated_at: row.updated_at.clone(),
        }
    }

    /// Records the addon and starts provisioning it. A create repeated with the same request
    /// returns the existing addon (and retries it if it is in `error`); a different request
    /// for an addon the app has is refused: variants and pinned versions never change
    /// underneath an app.
    pub async fn create(
        self: &Arc<Self>,
        req: &CreateAddon,
        source: &str,
    ) -> Result<(Addon, watch::Receiver<bool>), Error> {
        miren_addons::validate_user_name(&req.app)
            .map_err(|e| Error::invalid(format!("app name: {e}")))?;
        let (name, variant_in_name) = split_addon_arg(&req.addon);
        let variant = req.variant.as_deref().or(variant_in_name);
        let mut resolved = Catalogue::builtin().resolve(name, variant, req.version.as_deref())?;
        let kind = resolved.kind.name();
        let provider = self.provider(kind)?.clone();
        // An addon joining the shared server without a pinned version runs what it runs.
        if resolved.variant == Variant::Shared && req.version.is_none() {
            if let Some(image) = self.store.shared_image(kind)? {
                resolved.version = match resolved.kind.version_of_image(&image) {
                    Some(version) => ResolvedVersion::Catalogue(version),
                    None => ResolvedVersion::Image(image),
                };
            }
        }
        let version = resolved.version.name().to_string();
        let image = resolved.image_ref();
        // The kinds whose variables overlap this one's: the app may have none of them.
        let clashing: Vec<&str> = miren_addons::clashing_kinds(resolved.kind)
            .map(AddonKind::name)
            .collect();
        let asked_pooling = req
            .pooling
            .as_deref()
            .map(|p| resolved.kind.parse_pooling(p))
            .transpose()?;
        let asked_tier = req
            .tier
            .as_deref()
            .map(|t| resolved.kind.parse_tier(t))
            .transpose()?;
        let asked_clients = req
            .client_connections
            .map(|n| resolved.kind.check_client_connections(i64::from(n)))
            .transpose()?;
        let mut extra = serde_json::Map::new();
        if let Some(n) = asked_clients {
            extra.insert(tiers::CLIENT_CONNECTIONS.into(), n.into());
        }
        if resolved.kind.has_pooler() {
            let mode = asked_pooling.unwrap_or(Pooling::default_for(resolved.variant));
            extra.insert("pooling".into(), mode.name().into());
        }
        if resolved.kind.has_tiers() {
            extra.insert(
                tiers::TIER.into(),
                asked_tier.unwrap_or_default().name().into(),
            );
        }
        let creds = provider.app_credentials(&req.app)?;
        let now = now_rfc3339();
        let row = AddonRow {
            app: req.app.clone(),
            kind: kind.to_string(),
            variant: resolved.variant.name().to_string(),
            version: version.clone(),
            image: image.clone(),
            source: source.to_string(),
            status: AddonStatus::Pending,
            reason: None,
            user: creds.user,
            password: creds.password,
            database: creds.database,
            extra,
            created_at: now.clone(),
            updated_at: now,
        };
        let row = loop {
            let existing = match self.store.insert_addon(&row, &clashing)? {
                Inserted::Clashes(other) => {
                    let keys = AddonKind::parse(&other)
                        .ok()
                        .and_then(|o| miren_addons::env_clash(&[o, resolved.kind]))
                        .map(|clash| clash.keys.join(", "))
                        .unwrap_or_default();
                    return Err(Error::conflict(format!(
                        "app `{app}` has {other}, and {kind} would set the same variables ({keys}); an app can have only one of them: `miren addon destroy {other} -a {app}` first, or keep {other}",
                        app = row.app,
                    )));
                }
                Inserted::SharedImageInUse(running) => {
                    return Err(Error::conflict(format!(
                        "the shared {kind} server on this node runs {running}, not {image}; ask for that version (or leave it out), or use `{kind}:small` for a server of your own"
                    )))
                }
                Inserted::New(row) => {
                    info!(app = %row.app, addon = %row.kind, variant = %row.variant, image = %row.image, "addon created");
                    break row;
                }
                Inserted::Existing(existing) => existing,
            };
            if existing.status == AddonStatus::Deprovisioning {
                // A destroy is finishing: let it, then create afresh.
                let mut done = self.kick(&existing.app, kind);
                let _ = done.wait_for(|d| *d).await;
                if let Some(left) = self.store.addon(&existing.app, kind)? {
                    return Err(Error::conflict(format!(
                        "{kind} of app `{}` is still being removed ({}); run `miren addon destroy {kind} -a {}` again, then create it",
                        left.app,
                        left.reason.unwrap_or_else(|| left.status.to_string()),
                        left.app
                    )));
                }
                continue;
            }
            if existing.variant != row.variant {
                return Err(Error::conflict(format!(
                    "app `{}` already has {kind} as `{}`; variants cannot be changed in place: back up its data, `miren addon destroy {kind} -a {}` (this deletes the data), then create it again",
                    row.app, existing.variant, row.app
                )));
            }
            if req.version.is_some() && existing.image != row.image {
                return Err(Error::conflict(format!(
                    "app `{}` already has {kind} running {}; a version is never changed underneath an app: destroy it and create it again to change it",
                    row.app, existing.image
                )));
            }
            if let Some(mode) = asked_pooling.filter(|m| *m != pooling(&existing)) {
                // Only variables change: the app's services pick them up on their next start.
                // One key, so a tier recorded meanwhile is kept.
                self.store.set_addon_extra_key(
                    &existing.app,
                    kind,
                    "pooling",
                    mode.name().into(),
                    &[],
                )?;
                info!(app = %existing.app, addon = %kind, pooling = %mode, "addon pooling changed");
            }
            if let Some(tier) = asked_tier.filter(|t| *t != tiers::tier(&existing)) {
                // Recorded with the work it owes; the driver applies it below.
                self.record_tier(&existing, tier)?;
            }
            // A deploy declares it (none: the tier's); elsewhere none keeps what it has.
            if asked_clients.is_some() || source == "deploy" {
                self.record_client_connections(&existing, asked_clients)?;
            }
            if existing.status == AddonStatus::Error {
                self.store.transition_addon(
                    &existing.app,
                    kind,
                    &[AddonStatus::Error],
                    AddonStatus::Pending,
                    None,
                )?;
            }
            break existing;
        };
        let done = self.kick(&row.app, &row.kind);
        Ok((self.get(&row.app, &row.kind)?, done))
    }

    /// Starts removing an addon (from any status). The receiver turns true when the driver is
    /// done: the row is gone, or removal failed and says why in `reason`.
    pub fn destroy(
        self: &Arc<Self>,
        app: &str,
        kind_arg: &str,
    ) -> Result<Option<watch::Receiver<bool>>, Error> {
        let (name, _) = split_addon_arg(kind_arg);
        let kind = AddonKind::parse(name)?.name();
        if self.store.addon(app, kind)?.is_none() {
            return Ok(None);
        }
        self.store.transition_addon(
            app,
            kind,
            AddonStatus::ALL,
            AddonStatus::Deprovisioning,
            None,
        )?;
        info!(app = %app, addon = %kind, "addon destroy requested");
        Ok(Some(self.kick(app, kind)))
    }

    /// Resumes every addon a previous agent left mid-way, and starts watching their disks.
    pub fn resume(self: &Arc<Self>) -> Result<(), Error> {
        self.watch_disks();
        for row in self.store.all_addons()? {
            if row.status == AddonStatus::Active {
                // A server whose supervisor is gone (the host restarted) or that was deleted
                // underneath: provisioning again is idempotent and brings it back, data intact.
                let server = self.server_name(&row);
                // A tier change whose recording was all that happened (its row says
                // `active`) is owed too.
                let healthy = tiers::tier(&row) == tiers::applied_tier(&row)
                    && matches!(
                        self.host.server_sandbox(&server_owner(&row)),
                        Ok(Some(s)) if !s.failed
                    )
                    && self
                        .provider(&row.kind)
                        .is_ok_and(|p| self.sidecar_healthy(p.as_ref(), &server_owner(&row)));
                if !healthy
                    && self.store.transition_addon(
                        &row.app,
                        &row.kind,
                        &[AddonStatus::Active],
                        AddonStatus::Provisioning,
                        Some("its server was down; starting it again"),
                    )?
                {
                    warn!(app = %row.app, addon = %row.kind, server = %server, "addon server is down; starting it again");
                    self.kick(&row.app, &row.kind);
                }
                continue;
            }
            if row.status.needs_work() {
                info!(app = %row.app, addon = %row.kind, status = %row.status, "resuming addon");
                self.kick(&row.app, &row.kind);
            }
        }
        // A shared server whose removal was cut short, or that lost its last member.
        for server in self.store.servers()? {
            let this = self.clone();
            tokio::spawn(async move {
                let _guard = this.shared.lock().await;
                if let Err(e) = this.remove_server_if_unused(&server.kind).await {
                    warn!(addon = %server.kind, error = %e, "removing the unused shared server failed");
                }
            });
        }
        Ok(())
    }

    /// Ensures a driver runs for the addon; the receiver turns true once it has nothing to do.
    fn kick(self: &Arc<Self>, app: &str, kind: &str) -> watch::Receiver<bool> {
        let key = (app.to_string(), kind.to_string());
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = tasks.get(&key) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(false);
        tasks.insert(key.clone(), tx);
        let this = self.clone();
        tokio::spawn(async move { this.drive(key).await });
        rx
    }

    async fn drive(self: Arc<Self>, key: Key) {
        let (app, kind) = (&key.0, &key.1);
        let mut removal_failures = 0u32;
        loop {
            let row = match self.store.addon(app, kind) {
                Ok(row) => row,
                Err(e) => {
                    warn!(app = %app, addon = %kind, error = %e, "reading the addon failed; the next start retries");
                    None
                }
            };
            let mut failed_removal = false;
            match row {
                Some(row) if row.status.needs_provisioning() => {
                    self.provision(row).await;
                    continue;
                }
                Some(row) if row.status == AddonStatus::Deprovisioning => {
                    if let Err(reason) = self.deprovision(&row).await {
                        removal_failures += 1;
                        if removal_failures < REMOVAL_ATTEMPTS {
                            // Usually transient (a server restarting, a lease being let go).
                            let pause = Duration::from_millis(500 << removal_failures);
                            warn!(app = %app, addon = %kind, reason = %reason, retry_in = ?pause, "addon removal failed; retrying");
                            let _ = self.store.set_addon_reason(
                                app,
                                kind,
                                Some(&format!("removal failed, retrying: {reason}")),
                            );
                            tokio::time::sleep(pause).await;
                            continue;
                        }
                        warn!(app = %app, addon = %kind, reason = %reason, "addon removal failed; destroy again (or restart the agent) to retry");
                        let _ = self.store.set_addon_reason(
                            app,
                            kind,
                            Some(&format!("removal failed, destroy again to retry: {reason}")),
                        );
                        failed_removal = true;
                    } else {
                        continue;
                    }
                }
                _ => {}
            }
            // Done, unless a create or destroy arrived meanwhile (checked under the lock a
            // `kick` takes, so none is lost).
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            let again = !failed_removal
                && matches!(self.store.addon(app, kind), Ok(Some(r)) if r.status.needs_work());
            if again {
                continue;
            }
            if let Some(tx) = tasks.remove(&key) {
                tx.send_replace(true);
            }
            if let Some(settled) = self.settled.get() {
                let _ = settled.send(app.clone());
            }
            return;
        }
    }

    /// The variables an app's active addons inject.
    pub fn env_of(&self, app: &str) -> Result<Vec<(miren_addons::EnvVar, String)>, Error> {
        let mut vars = Vec::new();
        for row in self.store.addons_of(app)? {
            if row.status != AddonStatus::Active {
                continue;
            }
            let provider = self.provider(&row.kind)?;
            let owner = server_owner(&row);
            let ip = self.server(&owner)?.ip()?;
            let login = credentials(&row);
            let env = if provider.has_sidecar() {
                let sidecar = self.server(&Owner::sidecar_of(&owner))?.ip()?;
                provider.env_vars_with_sidecar(ip, sidecar, &login, pooling(&row))
            } else {
                provider.env_vars(ip, &login)
            };
            vars.extend(env.into_iter().map(|v| (v, row.kind.clone())));
        }
        Ok(vars)
    }

    pub fn env_view(&self, app: &str, reveal: bool) -> Result<Vec<EnvVarView>, Error> {
        Ok(self
            .env_of(app)?
            .into_iter()
            .map(|(var, source)| EnvVarView {
                name: var.key.to_string(),
                value: if reveal {
                    var.value.clone()
                } else {
                    var.display_value().to_string()
                },
                sensitive: var.sensitive,
                source,
            })
            .collect())
    }

    /// Addons the app has that are not `active`, as `name (status: reason)`.
    pub fn not_active(&self, app: &str) -> Result<Vec<String>, Error> {
        Ok(self
            .store
            .addons_of(app)?
            .into_iter()
            .filter(|r| r.status != AddonStatus::Active)
            .map(|r| match r.reason {
                Some(reason) => format!("{} ({}: {reason})", r.kind, r.status),
                None => format!("{} ({})", r.kind, r.status),
            })
            .collect())
    }

    /// Whether the tenant of a shared addon still has a database or role (tests, leftovers).
    pub async fn shared_tenant_exists(
        &self,
        kind: &str,
        role: &str,
        database: &str,
    ) -> Result<bool, Error> {
        let Some(server) = self.store.server(kind)? else {
            return Ok(false);
        };
        let provider = self.provider(kind)?;
        let ip = self.server(&shared_owner(kind))?.ip()?;
        let admin_login = provider.admin_login(&server.admin_user, &server.admin_password);
        let admin = provider
            .connect(ip, &admin_login)
            .await
            .map_err(Error::busy)?;
        let tenant = Credentials {
            user: role.to_string(),
            password: String::new(),
            database: database.to_string(),
        };
        admin.tenant_exists(&tenant).await.map_err(Error::busy)
    }
}
