//! Managed addons on the node's own primitives: a PostgreSQL server is a sandbox running the
//! addon's image, with its data on a miren disk and a network endpoint that admits only the
//! apps attached to it.
//!
//! Provisioning and deprovisioning are step sequences driven by the addon's row: the row is
//! written before anything is made and removed after everything is gone, every step looks
//! before it acts (a disk or sandbox by its deterministic name, a role by `pg_roles`), and one
//! task per addon drives it. An agent killed at any point resumes each addon from its row on
//! start-up; a failed provisioning removes what it made and leaves the row in `error`, which
//! can always be destroyed. Everything about the shared server (joining, leaving, creating and
//! removing it) happens under one lock, with the membership in the store.

pub mod postgres;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use miren_addons::{
    AddonKind, Catalogue, CatalogueError, Credentials, PostgresConnection, ResolvedVersion, Variant,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::core::disks::DiskService;
use crate::core::error::Error;
use crate::core::net::NetService;
use crate::core::sandboxes::SandboxService;
use crate::model::{
    Addon, AddonCatalogEntry, AddonVariantInfo, CreateAddon, CreateDisk, EnvVarView,
    FilesystemKind, RunSandbox, Sandbox,
};
use crate::store::addons::{AddonRow, AddonStatus, Inserted, ServerRow, ServerStatus};
use crate::store::{Owner, Store};
use crate::util::now_rfc3339;

/// Where the official postgres image keeps its data; the disk is mounted here.
const PG_DATA_MOUNT: &str = "/var/lib/postgresql/data";
/// A subdirectory, because initdb refuses a mount point's non-empty root (`lost+found`).
const PG_DATA_DIR: &str = "/var/lib/postgresql/data/pgdata";
/// The shared server's sandbox and disk.
const SHARED_SERVER: &str = "addon-pg";
/// How long a new server may take to accept its first `SELECT 1` (initdb included).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts at removing an addon before the driver gives up until the next destroy or start.
const REMOVAL_ATTEMPTS: u32 = 5;
/// Restarts while waiting for readiness after which a server is declared broken.
const MAX_START_RESTARTS: u32 = 3;

impl From<CatalogueError> for Error {
    fn from(err: CatalogueError) -> Self {
        Error::invalid(err.to_string())
    }
}

/// Why a provisioning step stopped.
enum StepError {
    /// The addon is no longer being provisioned (a destroy arrived): stop quietly.
    Superseded,
    Failed(String),
}

impl From<Error> for StepError {
    fn from(err: Error) -> Self {
        StepError::Failed(err.message)
    }
}

type Key = (String, String);

pub struct AddonService {
    store: Arc<Store>,
    disks: Arc<DiskService>,
    net: Arc<NetService>,
    sandboxes: Arc<SandboxService>,
    /// One driver task per addon; its channel turns true when it has nothing left to do.
    tasks: Mutex<HashMap<Key, watch::Sender<bool>>>,
    /// Serializes everything that touches a shared server's lifecycle or membership.
    shared: tokio::sync::Mutex<()>,
    /// Hears the app of every addon whose driver finished (active, deleted, error), so apps
    /// can pick up changed variables (see `AppService::addons_changed`).
    settled: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<String>>,
}

/// The sandbox and disk name of an app's dedicated server: `addon-pg-<app>`, shortened with a
/// hash when it would pass the 63-character name limit.
pub fn small_server_name(app: &str) -> String {
    // The hash is of the app alone (not the prefixed name), as it always was: the name is on disk.
    // App names never start with `-`, so cutting the prefixed name equals cutting the app's part.
    miren_sys::name::shortened(
        &format!("addon-pg-{app}"),
        miren_sys::fnv::fnv1a32(app.as_bytes()),
    )
}

/// Who an addon's server (its sandbox and disk) belongs to: the app's own addon, or the node's
/// shared server of the kind. Servers are found by this, never by name.
pub fn server_owner(row: &AddonRow) -> Owner {
    if row.variant == Variant::Shared.name() {
        Owner::Shared {
            kind: row.kind.clone(),
        }
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

/// The name an addon's server is given when it is free (see [`SandboxService::free_name`]).
pub fn server_name(variant: &str, app: &str) -> String {
    if variant == Variant::Shared.name() {
        SHARED_SERVER.to_string()
    } else {
        small_server_name(app)
    }
}

fn credentials(row: &AddonRow) -> Credentials {
    Credentials {
        user: row.db_user.clone(),
        password: row.db_password.clone(),
        database: row.db_name.clone(),
    }
}

pub fn view(row: &AddonRow) -> Addon {
    Addon {
        name: row.kind.clone(),
        app: row.app.clone(),
        variant: row.variant.clone(),
        version: row.version.clone(),
        image: row.image.clone(),
        status: row.status.to_string(),
        reason: row.reason.clone(),
        server: server_name(&row.variant, &row.app),
        source: row.source.clone(),
        created_at: row.created_at.clone(),
        updated_at: row.updated_at.clone(),
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
                    disk_filesystem: v.disk_filesystem.to_string(),
                })
                .collect(),
            versions: info.versions.iter().map(|v| v.to_string()).collect(),
            default_version: info.default_version.to_string(),
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
        Arc::new(AddonService {
            store,
            disks,
            net,
            sandboxes,
            tasks: Mutex::new(HashMap::new()),
            shared: tokio::sync::Mutex::new(()),
            settled: std::sync::OnceLock::new(),
        })
    }

    /// Where to report apps whose addon settled (once, at start).
    pub fn on_settled(&self, tx: tokio::sync::mpsc::UnboundedSender<String>) {
        let _ = self.settled.set(tx);
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

    /// [`view`], naming the server sandbox the addon really has (found by owner).
    pub fn view(&self, row: &AddonRow) -> Addon {
        let mut addon = view(row);
        if let Ok(Some(sandbox)) = self.store.sandbox_of(&server_owner(row)) {
            addon.server = sandbox.name;
        }
        addon
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
        // An addon joining the shared server without a pinned version runs what it runs.
        if resolved.variant == Variant::Shared && req.version.is_none() {
            if let Some(image) = self.store.shared_image(kind)? {
                resolved.version = match image.strip_prefix("postgres:").map(str::parse::<u8>) {
                    Some(Ok(major)) => ResolvedVersion::Major(major),
                    _ => ResolvedVersion::Image(image),
                };
            }
        }
        let version = match &resolved.version {
            ResolvedVersion::Major(m) => m.to_string(),
            ResolvedVersion::Image(image) => image.clone(),
        };
        let image = resolved.image_ref();
        let creds = Credentials::generate(&req.app)
            .map_err(|e| Error::internal(format!("generating a password: {e}")))?;
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
            db_user: creds.user,
            db_password: creds.password,
            db_name: creds.database,
            created_at: now.clone(),
            updated_at: now,
        };
        let row = loop {
            let inserted = self.store.insert_addon(&row, |running| {
                Error::conflict(format!(
                    "the shared {kind} server on this node runs {running}, not {image}; ask for that version (or leave it out), or use `{kind}:small` for a server of your own"
                ))
            })?;
            let existing = match inserted {
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

    /// Resumes every addon a previous agent left mid-way.
    pub fn resume(self: &Arc<Self>) -> Result<(), Error> {
        for row in self.store.all_addons()? {
            if row.status == AddonStatus::Active {
                // A server whose supervisor is gone (the host restarted) or that was deleted
                // underneath: provisioning again is idempotent and brings it back, data intact.
                let server = server_name(&row.variant, &row.app);
                let healthy = matches!(
                    self.sandboxes.get_owned(&server_owner(&row)),
                    Ok(Some(s)) if !s.state.is_failed()
                );
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

    async fn provision(&self, row: AddonRow) {
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
        let result = if row.variant == Variant::Shared.name() {
            self.provision_shared(&row).await
        } else {
            self.provision_small(&row).await
        };
        match result {
            Ok(()) => {
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
                warn!(app = %app, addon = %kind, reason = %reason, "provisioning failed; removing what it made");
                let reason = match self.remove_resources(&row).await {
                    Ok(()) => reason,
                    Err(e) => format!(
                        "{reason} (cleaning up also failed: {e}; `miren addon destroy {kind} -a {app}` retries it)"
                    ),
                };
                let _ = self.store.transition_addon(
                    app,
                    kind,
                    &[AddonStatus::Provisioning],
                    AddonStatus::Error,
                    Some(&reason),
                );
                if row.variant == Variant::Shared.name() {
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

    async fn provision_small(&self, row: &AddonRow) -> Result<(), StepError> {
        let name = small_server_name(&row.app);
        let owner = server_owner(row);
        let disk = self
            .ensure_disk(&owner, &name, Variant::Small.disk_size_gb())
            .await?;
        self.still_wanted(row)?;
        let env = vec![
            format!("POSTGRES_USER={}", row.db_user),
            format!("POSTGRES_PASSWORD={}", row.db_password),
            format!("POSTGRES_DB={}", row.db_name),
        ];
        let server = self
            .ensure_server_sandbox(
                &owner,
                &name,
                &disk,
                &row.image,
                env,
                vec![row.app.clone()],
                !self.store.addon_ever_active(&row.app, &row.kind)?,
            )
            .await?;
        self.still_wanted(row)?;
        self.wait_ready(
            &server.id,
            &postgres::Login {
                host: sandbox_ip(&server)?,
                user: &row.db_user,
                password: &row.db_password,
                database: &row.db_name,
            },
        )
        .await?;
        self.sync_disk(&disk).await?;
        Ok(())
    }

    async fn discard_data_dir(&self, disk: &str) -> Result<(), Error> {
        let view = self.disks.view_one(&self.disks.find(disk)?)?;
        let Some(mount) = view.mount_path else {
            return Err(Error::busy(format!("disk `{disk}` is not mounted")));
        };
        let data = std::path::Path::new(&mount).join(
            PG_DATA_DIR
                .strip_prefix(PG_DATA_MOUNT)
                .unwrap_or("/pgdata")
                .trim_start_matches('/'),
        );
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&data) {
            Ok(()) => {
                info!(dir = %data.display(), "discarded the data directory of a server that never answered");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::internal(format!(
                "removing {}: {e}",
                data.display()
            ))),
        })
        .await
        .map_err(|e| Error::internal(format!("discarding a data directory: {e}")))?
    }

    /// Flushes a server's disk: initdb ran with `--no-sync` (an fsync per file, ~1000 files,
    /// costs seconds on a loop device), so one `syncfs` makes the new cluster durable before
    /// the addon is called `active`.
    async fn sync_disk(&self, name: &str) -> Result<(), Error> {
        let disk = self.disks.view_one(&self.disks.find(name)?)?;
        let Some(mount) = disk.mount_path else {
            return Err(Error::busy(format!("disk `{name}` is not mounted")));
        };
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            let dir = std::fs::File::open(&mount)
                .map_err(|e| Error::internal(format!("opening {mount}: {e}")))?;
            nix::unistd::syncfs(&dir).map_err(|e| Error::internal(format!("syncing {mount}: {e}")))
        })
        .await
        .map_err(|e| Error::internal(format!("syncing a disk: {e}")))?
    }

    async fn provision_shared(&self, row: &AddonRow) -> Result<(), StepError> {
        let _guard = self.shared.lock().await;
        self.still_wanted(row)?;
        let (_, admin) = self.ensure_shared_server(&row.kind, row).await?;
        self.sync_shared_allow_from(&row.kind).await?;
        self.still_wanted(row)?;
        let server = self.server(&shared_owner(&row.kind))?;
        postgres::ensure_tenant(&admin, &row.db_user, &row.db_password, &row.db_name)
            .await
            .map_err(|e| {
                StepError::Failed(format!(
                    "creating the role and database: {}",
                    postgres::describe(&e)
                ))
            })?;
        self.wait_ready(
            &server.id,
            &postgres::Login {
                host: sandbox_ip(&server)?,
                user: &row.db_user,
                password: &row.db_password,
                database: &row.db_name,
            },
        )
        .await?;
        Ok(())
    }

    /// The server sandbox `owner` runs.
    fn server(&self, owner: &Owner) -> Result<Sandbox, Error> {
        self.sandboxes.get_owned(owner)?.ok_or_else(|| {
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
    ) -> Result<(ServerRow, tokio_postgres::Client), StepError> {
        if let Some(server) = self.store.server(kind)? {
            if server.status == ServerStatus::Deleting {
                self.finish_server_removal(kind).await?;
            }
        }
        let server = match self.store.server(kind)? {
            Some(server) => server,
            None => {
                let password = miren_addons::generate_password()
                    .map_err(|e| StepError::Failed(format!("generating a password: {e}")))?;
                let server = ServerRow {
                    kind: kind.to_string(),
                    version: member.version.clone(),
                    image: member.image.clone(),
                    status: ServerStatus::Provisioning,
                    admin_user: "postgres".into(),
                    admin_password: password,
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
        let disk = self
            .ensure_disk(&owner, SHARED_SERVER, Variant::Shared.disk_size_gb())
            .await?;
        let env = vec![
            format!("POSTGRES_USER={}", server.admin_user),
            format!("POSTGRES_PASSWORD={}", server.admin_password),
        ];
        let members = self.store.shared_members(kind)?;
        let sandbox = self
            .ensure_server_sandbox(
                &owner,
                SHARED_SERVER,
                &disk,
                &server.image,
                env,
                members,
                server.status != ServerStatus::Active,
            )
            .await?;
        let admin = self
            .wait_ready(
                &sandbox.id,
                &postgres::Login {
                    host: sandbox_ip(&sandbox)?,
                    user: &server.admin_user,
                    password: &server.admin_password,
                    database: "postgres",
                },
            )
            .await?;
        if server.status != ServerStatus::Active {
            // Tenants get their own database; the maintenance ones are for the agent only.
            admin
                .batch_execute(
                    "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC; \
                     REVOKE CONNECT ON DATABASE template1 FROM PUBLIC",
                )
                .await
                .map_err(|e| {
                    StepError::Failed(format!(
                        "securing the shared server: {}",
                        postgres::describe(&e)
                    ))
                })?;
            self.sync_disk(&disk).await?;
            self.store.set_server_status(kind, ServerStatus::Active)?;
        }
        Ok((server, admin))
    }

    /// Lets exactly the shared server's members reach it.
    async fn sync_shared_allow_from(&self, kind: &str) -> Result<(), Error> {
        let members = self.store.shared_members(kind)?;
        if let Some(sandbox) = self.sandboxes.get_owned(&shared_owner(kind))? {
            self.net.set_allow_from(&sandbox.id, &members).await?;
        }
        Ok(())
    }

    /// Removes the shared server if no addon uses it. Call with the shared lock held.
    async fn remove_server_if_unused(&self, kind: &str) -> Result<(), Error> {
        let deleting =
            matches!(self.store.server(kind)?, Some(s) if s.status == ServerStatus::Deleting);
        if deleting || self.store.begin_server_removal_if_unused(kind)? {
            self.finish_server_removal(kind).await?;
        }
        Ok(())
    }

    async fn finish_server_removal(&self, kind: &str) -> Result<(), Error> {
        info!(addon = %kind, "removing the shared server: its last app left");
        let owner = shared_owner(kind);
        self.sandboxes.delete_owned(&owner).await?;
        self.remove_disk(&owner).await?;
        self.store.remove_server(kind)?;
        Ok(())
    }

    async fn deprovision(&self, row: &AddonRow) -> Result<(), String> {
        self.remove_resources(row)
            .await
            .map_err(|e| e.to_string())?;
        if row.variant == Variant::Shared.name() {
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

    /// Everything the addon has: its server (small) or its database and role (shared).
    /// Safe to repeat; the row itself stays.
    async fn remove_resources(&self, row: &AddonRow) -> Result<(), Error> {
        if row.variant != Variant::Shared.name() {
            let owner = server_owner(row);
            self.sandboxes.delete_owned(&owner).await?;
            self.remove_disk(&owner).await?;
            return Ok(());
        }
        let _guard = self.shared.lock().await;
        let Some(server) = self.store.server(&row.kind)? else {
            return Ok(()); // no server, so no database or role either
        };
        if server.status != ServerStatus::Active {
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
        postgres::drop_tenant(&admin, &row.db_user, &row.db_name)
            .await
            .map_err(|e| {
                Error::busy(format!(
                    "dropping database `{}` and role `{}`: {}",
                    row.db_name,
                    row.db_user,
                    postgres::describe(&e)
                ))
            })?;
        Ok(())
    }

    /// The server's disk, owned by `owner` (named `name` when free); returns its name.
    async fn ensure_disk(&self, owner: &Owner, name: &str, size_gb: u64) -> Result<String, Error> {
        let disks = self.disks.clone();
        let req = CreateDisk {
            name: name.to_string(),
            size_gb,
            filesystem: Some(FilesystemKind::Ext4),
            read_only: false,
        };
        let owner = owner.clone();
        tokio::task::spawn_blocking(move || disks.ensure_for_addon(&req, &owner))
            .await
            .map_err(|e| Error::internal(format!("creating a disk: {e}")))?
    }

    /// Deletes `owner`'s disk (and its data), if it has one.
    async fn remove_disk(&self, owner: &Owner) -> Result<(), Error> {
        let Some(row) = self.store.disk_of(owner)? else {
            return Ok(());
        };
        let disks = self.disks.clone();
        tokio::task::spawn_blocking(move || match disks.delete(&row.id) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        })
        .await
        .map_err(|e| Error::internal(format!("deleting a disk: {e}")))?
    }

    /// The server's sandbox, running: kept if it is (or is restarting), replaced if it failed.
    /// Found by `owner`; `name` is the display name it gets when free, `disk` its data disk.
    #[allow(clippy::too_many_arguments)]
    async fn ensure_server_sandbox(
        &self,
        owner: &Owner,
        name: &str,
        disk: &str,
        image: &str,
        env: Vec<String>,
        allow_from: Vec<String>,
        never_ready: bool,
    ) -> Result<Sandbox, Error> {
        let sandbox = match self.sandboxes.get_owned(owner)? {
            Some(s) if !s.state.is_failed() => s,
            found => {
                if let Some(failed) = found {
                    warn!(sandbox = %failed.name, error = ?failed.error, "replacing a failed addon server");
                    self.sandboxes.delete(&failed.id).await?;
                }
                // The server a previous agent ran before owners were recorded: users cannot
                // name sandboxes in the addon space, so an unowned one there is ours.
                if let Some(old) = self.store.sandbox(name)? {
                    if old.owner.is_none() && old.app == old.name {
                        warn!(sandbox = %name, "replacing an addon server recorded without an owner");
                        self.sandboxes.delete(&old.id).await?;
                    }
                }
                let name = self.sandboxes.free_name(name, owner)?;
                if never_ready {
                    // An initdb cut short (the agent killed, the server replaced) leaves a
                    // data directory the image would try to start instead of initializing:
                    // a server that never answered has nothing worth keeping there.
                    self.discard_data_dir(disk).await?;
                }
                let mut env = env;
                env.push(format!("PGDATA={PG_DATA_DIR}"));
                env.push("POSTGRES_HOST_AUTH_METHOD=scram-sha-256".into());
                // Durability comes from one syncfs of the disk once the server is ready.
                env.push("POSTGRES_INITDB_ARGS=--no-sync".into());
                // The network app is the server's own name, in the addon name space no app
                // can take, so no app's sandboxes count as the server's for isolation.
                self.sandboxes
                    .run_as(
                        RunSandbox {
                            image: image.to_string(),
                            name: Some(name.clone()),
                            app: Some(name.clone()),
                            env,
                            disks: vec![format!("{disk}:{PG_DATA_MOUNT}")],
                            lease_timeout_secs: Some(30.0),
                            restart: Some("always".into()),
                            allow_from,
                            ..Default::default()
                        },
                        Some(owner.clone()),
                    )
                    .await?
            }
        };
        Ok(sandbox)
    }

    /// Polls `SELECT 1` as `login` until it works, the server gives up, or the timeout passes;
    /// returns the session that answered.
    async fn wait_ready(
        &self,
        sandbox: &str,
        login: &postgres::Login<'_>,
    ) -> Result<tokio_postgres::Client, StepError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_check = Instant::now();
        // Restarts from before this wait (earlier crashes, host restarts) do not count.
        let restarts_before = self.sandboxes.get(sandbox).map_or(0, |s| s.restarts);
        loop {
            let err = match postgres::select_one(login).await {
                Ok(client) => return Ok(client),
                Err(e) => postgres::describe(&e),
            };
            if last_check.elapsed() > Duration::from_millis(500) {
                last_check = Instant::now();
                let state = self.sandboxes.get(sandbox)?;
                if state.state.is_failed()
                    || state.restarts >= restarts_before.saturating_add(MAX_START_RESTARTS)
                {
                    return Err(StepError::Failed(format!(
                        "the PostgreSQL server in sandbox `{sandbox}` keeps exiting ({}); its last output: {}",
                        state.exit_code.map_or("no exit code".into(), |c| format!("exit code {c}")),
                        self.log_tail(sandbox, 5)
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(StepError::Failed(format!(
                    "PostgreSQL in sandbox `{sandbox}` did not answer `SELECT 1` within {}s ({err}); its last output: {}",
                    READY_TIMEOUT.as_secs(),
                    self.log_tail(sandbox, 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }

    fn log_tail(&self, sandbox: &str, lines: usize) -> String {
        let Ok((stdout, stderr)) = self.sandboxes.log_files(sandbox) else {
            return "(no logs)".into();
        };
        let mut text = String::new();
        for file in stdout.iter().chain(stderr.iter()) {
            if let Ok(content) = std::fs::read_to_string(file) {
                text.push_str(&content);
            }
        }
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        if tail.is_empty() {
            return "(nothing)".into();
        }
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// The variables an app's active addons inject.
    pub fn env_of(&self, app: &str) -> Result<Vec<(miren_addons::EnvVar, String)>, Error> {
        let mut vars = Vec::new();
        for row in self.store.addons_of(app)? {
            if row.status != AddonStatus::Active {
                continue;
            }
            let sandbox = self.server(&server_owner(&row))?;
            let ip = sandbox_ip(&sandbox)?;
            let conn = PostgresConnection::new(ip.to_string(), postgres::PORT, &credentials(&row));
            vars.extend(conn.env_vars().into_iter().map(|v| (v, row.kind.clone())));
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
        let sandbox = self.server(&shared_owner(kind))?;
        let ip = sandbox_ip(&sandbox)?;
        let admin = postgres::connect(&postgres::Login {
            host: ip,
            user: &server.admin_user,
            password: &server.admin_password,
            database: "postgres",
        })
        .await
        .map_err(|e| Error::busy(postgres::describe(&e)))?;
        postgres::tenant_exists(&admin, role, database)
            .await
            .map_err(|e| Error::busy(postgres::describe(&e)))
    }
}

fn sandbox_ip(sandbox: &Sandbox) -> Result<Ipv4Addr, Error> {
    sandbox
        .ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| {
            Error::internal(format!(
                "addon server `{}` has no network address",
                sandbox.name
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_fit_the_name_rule() {
        assert_eq!(small_server_name("myapp"), "addon-pg-myapp");
        let long = "a".repeat(63);
        let name = small_server_name(&long);
        assert!(name.len() <= 63, "{name}");
        assert!(miren_addons::validate_name(&name).is_ok());
        assert_ne!(name, small_server_name(&format!("{}b", "a".repeat(62))));
        assert_eq!(server_name("shared", "x"), "addon-pg");
        // No app's dedicated server can be called like the shared one.
        assert_ne!(server_name("small", ""), server_name("shared", "x"));
    }

    #[test]
    fn addon_args_split_into_name_and_variant() {
        assert_eq!(
            split_addon_arg("miren-postgresql:shared"),
            ("miren-postgresql", Some("shared"))
        );
        assert_eq!(
            split_addon_arg("miren-postgresql"),
            ("miren-postgresql", None)
        );
    }
}
