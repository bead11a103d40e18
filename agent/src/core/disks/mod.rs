//! Disks as the agent manages them: the state store says what should exist, `miren_disks` makes
//! it so. Every operation first records its intent in one transaction, then changes the kernel,
//! then records the outcome; `reconcile` finishes or rolls back whatever a crash interrupted.

mod leases;
mod resize;

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use miren_disks::{self as kernel, Filesystem, LoopInfo, MountEntry, GIB};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::core::error::Error;
use crate::core::owner::{self, Holder};
use crate::model::{self, CreateDisk, Disk, Lease, LeaseInfo, ReleaseResult};
use crate::store::{DiskRow, DiskStatus, LeaseAttempt, LeaseRow, Owner, Store};
use crate::util::{new_id, now_rfc3339};
use miren_sys::name::Name;

/// The largest disk we agree to make: 64 TiB of apparent size.
pub const MAX_SIZE_GB: u64 = 64 * 1024;
pub const DEFAULT_LEASE_TIMEOUT: Duration = Duration::from_secs(300);

/// The operations under way on each disk (by id), one at a time per disk: a backup's freeze
/// helper, an online grow or a restore's swap hold the mount, and a delete running beside
/// them would find it busy halfway through.
static UNDER_WAY: std::sync::Mutex<Vec<(String, &'static str)>> = std::sync::Mutex::new(Vec::new());

/// A disk's one operation under way; ends when dropped.
pub(crate) struct DiskOperation {
    id: String,
}

impl DiskOperation {
    /// Starts `what` on the disk, or refuses (409 busy) while another operation runs on it.
    pub(crate) fn begin(row: &DiskRow, what: &'static str) -> Result<DiskOperation, Error> {
        let mut under_way = UNDER_WAY.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, running)) = under_way.iter().find(|(id, _)| *id == row.id) {
            return Err(Error::busy(format!(
                "disk `{}` is busy: {running} is under way; retry the {what} when it ends",
                row.name
            )));
        }
        under_way.push((row.id.clone(), what));
        Ok(DiskOperation { id: row.id.clone() })
    }
}

impl Drop for DiskOperation {
    fn drop(&mut self) {
        let mut under_way = UNDER_WAY.lock().unwrap_or_else(|p| p.into_inner());
        under_way.retain(|(id, _)| *id != self.id);
    }
}

pub struct DiskService {
    pub cfg: AgentConfig,
    store: Arc<Store>,
    lease_released: Notify,
}

/// One read of the kernel's loop devices and mounts, shared by every disk in a listing.
struct KernelView {
    loops: Vec<LoopInfo>,
    mounts: Vec<MountEntry>,
}

impl KernelView {
    fn read(cfg: &AgentConfig) -> Result<KernelView, Error> {
        Ok(KernelView {
            loops: kernel::loops_under(&cfg.images_dir())?,
            mounts: kernel::mounts_under(&cfg.mounts_dir())?,
        })
    }
    fn loop_of(&self, image: &Path) -> Option<&LoopInfo> {
        self.loops.iter().find(|l| l.backing_file == image)
    }
    fn mount_at(&self, target: &Path) -> Option<&MountEntry> {
        self.mounts.iter().rev().find(|m| m.target == target)
    }
}

/// Why the disk service could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiskServiceError {
    #[error("creating {}: {error}", dir.display())]
    CreateDir {
        dir: std::path::PathBuf,
        error: std::io::Error,
    },
}

impl DiskService {
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    pub fn new(cfg: AgentConfig, store: Arc<Store>) -> Result<DiskService, DiskServiceError> {
        for dir in [cfg.images_dir(), cfg.mounts_dir(), cfg.local_dir()] {
            fs::create_dir_all(&dir).map_err(|error| DiskServiceError::CreateDir {
                dir: dir.clone(),
                error,
            })?;
        }
        Ok(DiskService {
            cfg,
            store,
            lease_released: Notify::new(),
        })
    }

    /// Looks a disk up by id (`disk_...`) or by name (ignoring case).
    pub fn find(&self, id_or_name: &str) -> Result<DiskRow, Error> {
        let row = if id_or_name.starts_with("disk_") {
            self.store.disk(id_or_name)?
        } else {
            self.store.disk_by_name(id_or_name)?
        };
        row.ok_or_else(|| {
            Error::not_found(format!(
                "no disk `{id_or_name}`; `miren debug disk list` shows the disks this agent has"
            ))
        })
    }

    /// A disk a user asks for (`debug disk create`): unowned until an app deploys with it, and
    /// never in the name space of the agent's own disks.
    pub fn create(&self, req: &CreateDisk) -> Result<Disk, Error> {
        kernel::validate_name(&req.name).map_err(|e| Error::invalid(e.to_string()))?;
        refuse_reserved("disk name", &req.name)?;
        self.create_as(req, None)
    }

    fn create_as(&self, req: &CreateDisk, owner: Option<&Owner>) -> Result<Disk, Error> {
        kernel::validate_name(&req.name).map_err(|e| Error::invalid(e.to_string()))?;
        if req.size_gb == 0 || req.size_gb > MAX_SIZE_GB {
            return Err(Error::invalid(format!(
                "size_gb must be between 1 and {MAX_SIZE_GB}, got {}",
                req.size_gb
            )));
        }
        let fs: Filesystem = req.filesystem.unwrap_or(model::FilesystemKind::Ext4).into();
        self.check_size_fits(fs, req.size_gb, None)?;
        let row = DiskRow {
            id: new_id("disk"),
            name: req.name.clone(),
            size_gb: req.size_gb,
            filesystem: fs.as_str().to_string(),
            read_only: req.read_only,
            status: DiskStatus::Creating,
            error: None,
            created_at: now_rfc3339(),
        };
        self.store.insert_creating_disk_owned(&row, owner)?;
        if let Err(err) = self.build(&row, fs) {
            warn!(disk = %row.name, error = %err, "create failed; removing what it made");
            if let Err(cleanup) = self.teardown(&row) {
                // The row stays in `creating`, so the next reconciliation retries the cleanup.
                warn!(disk = %row.name, error = %cleanup, "cleanup after failed create failed");
                return Err(err);
            }
            self.store.remove_disk(&row.id)?;
            return Err(err);
        }
        self.store.set_status(&row.id, DiskStatus::Ready, None)?;
        info!(disk = %row.name, id = %row.id, size_gb = row.size_gb, filesystem = %fs, "disk created");
        self.view_one(&self.find(&row.id)?)
    }

    /// Image, loop device, filesystem, mount: each step undone by `teardown`.
    fn build(&self, row: &DiskRow, fs: Filesystem) -> Result<(), Error> {
        let image = self.cfg.image_path(&row.id);
        kernel::create_sparse_image(&image, row.size_gb * GIB)?;
        // Held open until mounted: if we die before that, autoclear detaches the device.
        let attached = kernel::attach(&image)?;
        kernel::make_filesystem(fs, &attached.path)?;
        kernel::mount(
            &attached.path,
            &self.cfg.mount_path(&row.id),
            fs,
            row.read_only,
        )?;
        Ok(())
    }

    /// Removes everything a disk has on the host: mount, loop devices, image. Safe to repeat.
    pub(crate) fn teardown(&self, row: &DiskRow) -> Result<(), Error> {
        let image = self.cfg.image_path(&row.id);
        let mount_path = self.cfg.mount_path(&row.id);
        kernel::unmount(&mount_path)?;
        remove_dir_if_present(&mount_path)?;
        for lo in kernel::loops_backed_by(&image)? {
            kernel::detach(&lo.device)?;
        }
        // Detaching a device that is still open (a tool killed with the previous agent, still
        // exiting) only schedules it; wait until the kernel has really let go.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !kernel::loops_backed_by(&image)?.is_empty() {
            if Instant::now() >= deadline {
                return Err(Error::busy(format!(
                    "disk `{}`: its loop device is still in use; stop whatever holds it and retry",
                    row.name
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        kernel::remove_image(&image)?;
        Ok(())
    }

    /// Creates the disk unless one of that name exists (kept as it is: size and filesystem
    /// of an existing disk are never changed here).
    pub fn ensure(&self, req: &CreateDisk) -> Result<(), Error> {
        match self.find(&req.name) {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => self.create(req).map(|_| ()),
            Err(e) => Err(e),
        }
    }

    /// The disk an app names in its app.toml, as the app's: made (owned) if missing, claimed if
    /// nobody owns it yet, used if the app owns it; refused if another app or an addon does.
    pub fn ensure_for_app(&self, req: &CreateDisk, app: &str) -> Result<(), Error> {
        let owner = Owner::app(app);
        let row = match self.find(&req.name) {
            Ok(row) => row,
            Err(e) if e.is_not_found() => {
                return match self.create_as(req, Some(&owner)) {
                    Ok(_) => Ok(()),
                    // Made meanwhile by someone else: look again.
                    Err(e) if e.is_conflict() => self.ensure_for_app(req, app),
                    Err(e) => Err(e),
                };
            }
            Err(e) => Err(e)?,
        };
        match self.store.claim_disk(&row.id, &owner)? {
            Some(now) if now == owner => Ok(()),
            other => Err(not_yours(&row.name, other.as_ref(), &owner)),
        }
    }

    /// Whether `app` may deploy with the disk called `name`: it is missing, nobody owns it, or
    /// the app does. Checked before a deploy records anything; `ensure_for_app` decides.
    pub fn check_for_app(&self, name: &str, app: &str) -> Result<(), Error> {
        let row = match self.find(name) {
            Ok(row) => row,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        let owner = Owner::app(app);
        match self.store.disk_owner(&row.id)? {
            None => Ok(()),
            Some(o) if o == owner => Ok(()),
            other => Err(not_yours(&row.name, other.as_ref(), &owner)),
        }
    }

    /// The disk of an addon's server, returning its name: found by owner whatever it is
    /// called; otherwise `preferred` is made for it, or adopted if nobody owns it (a disk this
    /// agent made before owners were recorded, or restored from a backup). If another owner
    /// has that name, a name with the owner's hash is used instead.
    pub fn ensure_for_addon(&self, req: &CreateDisk, owner: &Owner) -> Result<String, Error> {
        if let Some(row) = self.store.disk_of(owner)? {
            return Ok(row.name);
        }
        let name = match self.find(&req.name) {
            Ok(row) => match self.store.claim_disk(&row.id, owner)? {
                Some(now) if &now == owner => return Ok(row.name),
                _ => hashed_name(&req.name, &owner.describe())?.into_string(),
            },
            Err(e) if e.is_not_found() => req.name.clone(),
            Err(e) => Err(e)?,
        };
        let req = CreateDisk {
            name,
            ..req.clone()
        };
        match self.find(&req.name) {
            Ok(row) if self.store.disk_owner(&row.id)?.as_ref() == Some(owner) => Ok(row.name),
            Ok(row) => Err(not_yours(
                &row.name,
                self.store.disk_owner(&row.id)?.as_ref(),
                owner,
            )),
            Err(e) if e.is_not_found() => Ok(self.create_as(&req, Some(owner))?.name),
            Err(e) => Err(e),
        }
    }

    /// Refuses to give `owner` (the one a sandbox runs for) a disk someone else owns. A disk
    /// nobody owns may be used by anyone (and is not claimed by that).
    pub fn check_attach(&self, id_or_name: &str, owner: &Owner) -> Result<(), Error> {
        let row = self.find(id_or_name)?;
        match self.store.disk_owner(&row.id)? {
            None => Ok(()),
            Some(o) if o == owner.as_disk_owner() => Ok(()),
            other => Err(not_yours(&row.name, other.as_ref(), owner)),
        }
    }

    pub fn delete(&self, id_or_name: &str) -> Result<(), Error> {
        let row = self.find(id_or_name)?;
        let _only = DiskOperation::begin(&row, "delete")?;
        let before = self.store.begin_delete(&row.id)?;
        // Unmounting is the step a user's process can refuse (a shell inside the mount); until
        // it succeeds nothing is gone, so the disk goes back to how it was.
        if let Err(err) = kernel::unmount(&self.cfg.mount_path(&row.id)) {
            if before.status != DiskStatus::Deleting {
                self.store
                    .set_status(&row.id, before.status, before.error.as_deref())?;
            }
            return Err(err.into());
        }
        let row = before;
        self.teardown(&row)?;
        self.store.remove_disk(&row.id)?;
        info!(disk = %row.name, id = %row.id, "disk deleted");
        Ok(())
    }

    /// Makes sure the disk is attached exactly once and mounted at its mount path; returns the
    /// loop device. An existing loop device of the image is always reused: mounting the same
    /// filesystem through a second device would corrupt it.
    pub(crate) fn ensure_attached(&self, row: &DiskRow) -> Result<PathBuf, Error> {
        let fs = parse_fs(&row.filesystem)?;
        let image = self.cfg.image_path(&row.id);
        let mount_path = self.cfg.mount_path(&row.id);
        if !image.exists() {
            return Err(Error::internal(format!(
                "disk `{}` has lost its image file {}; restore it from a backup or delete the disk",
                row.name,
                image.display()
            )));
        }
        let mounted = kernel::mount_point_of(&mount_path)?;
        let loops = kernel::loops_backed_by(&image)?;
        let in_use = mounted
            .as_ref()
            .and_then(|m| loops.iter().find(|l| Path::new(&m.source) == l.device));
        let device = match (in_use, loops.first()) {
            (Some(lo), _) => lo.device.clone(),
            (None, Some(lo)) => {
                if mounted.is_some() {
                    kernel::unmount(&mount_path)?;
                }
                kernel::mount(&lo.device, &mount_path, fs, row.read_only)?;
                lo.device.clone()
            }
            (None, None) => {
                if mounted.is_some() {
                    kernel::unmount(&mount_path)?;
                }
                let attached = kernel::attach(&image)?;
                kernel::mount(&attached.path, &mount_path, fs, row.read_only)?;
                info!(disk = %row.name, device = %attached.path.display(), "disk re-attached");
                attached.path.clone()
            }
        };
        for extra in loops.iter().filter(|l| l.device != device) {
            warn!(disk = %row.name, device = %extra.device.display(), "detaching a second loop device of the same image");
            kernel::detach(&extra.device)?;
        }
        if let Some(m) = kernel::mount_point_of(&mount_path)? {
            if m.read_only != row.read_only {
                kernel::remount(&mount_path, fs, row.read_only)?;
            }
        }
        Ok(device)
    }

    /// Brings the kernel in line with the state store after a start or a crash: rolls back
    /// creates, finishes deletes and resizes, re-attaches what should be attached, and removes
    /// loop devices and mounts of disks that no longer exist.
    pub fn reconcile(&self) -> Result<(), Error> {
        let rows = self.store.disks()?;
        for row in &rows {
            let result = match row.status {
                DiskStatus::Creating => {
                    info!(disk = %row.name, "rolling back a create interrupted by a restart");
                    self.teardown(row)
                        .and_then(|()| Ok(self.store.remove_disk(&row.id)?))
                }
                DiskStatus::Deleting => {
                    info!(disk = %row.name, "finishing a delete interrupted by a restart");
                    self.teardown(row)
                        .and_then(|()| Ok(self.store.remove_disk(&row.id)?))
                }
                // One attempt per start: a growth that fails now is rolled back instead of
                // being retried at every start for ever.
                DiskStatus::Resizing => match self.grow(row) {
                    Ok(()) => {
                        info!(disk = %row.name, size_gb = row.size_gb, "finished an interrupted resize");
                        Ok(self.store.set_status(&row.id, DiskStatus::Ready, None)?)
                    }
                    Err(failed) => {
                        warn!(disk = %row.name, error = %failed.error, "an interrupted resize cannot finish; rolling it back");
                        // The size before it is not recorded: an image is never cut back here.
                        self.roll_back_resize(row, None, &failed)
                    }
                },
                DiskStatus::Restoring => self.finish_interrupted_restore(row),
                DiskStatus::Ready | DiskStatus::Error => self.ensure_attached(row).and_then(|_| {
                    if row.status == DiskStatus::Error {
                        Ok(self.store.set_status(&row.id, DiskStatus::Ready, None)?)
                    } else {
                        Ok(())
                    }
                }),
            };
            if let Err(err) = result {
                warn!(disk = %row.name, error = %err, "reconciliation could not repair this disk");
                if matches!(row.status, DiskStatus::Ready | DiskStatus::Error) {
                    self.store
                        .set_status(&row.id, DiskStatus::Error, Some(&err.message))?;
                }
            }
        }
        self.remove_strays()?;
        self.recover_backups()
    }

    /// Mounts, mount points and loop devices under our directories that no disk owns.
    fn remove_strays(&self) -> Result<(), Error> {
        let known: HashSet<String> = self.store.disks()?.into_iter().map(|d| d.id).collect();
        let owner_of = |file_stem: &str| -> Option<String> {
            let id = file_stem
                .strip_prefix(&format!("{}-", self.cfg.name_prefix))
                .unwrap_or(file_stem);
            Some(id.trim_end_matches(".img").to_string())
        };
        for m in kernel::mounts_under(&self.cfg.mounts_dir())?
            .into_iter()
            .rev()
        {
            let name = m.target.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !owner_of(name).is_some_and(|id| known.contains(&id)) {
                warn!(mount = %m.target.display(), "unmounting a mount no disk owns");
                kernel::unmount(&m.target)?;
            }
        }
        if let Ok(entries) = fs::read_dir(self.cfg.mounts_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !owner_of(&name).is_some_and(|id| known.contains(&id)) {
                    remove_dir_if_present(&entry.path())?;
                }
            }
        }
        // Images without a row never finished being created (or were being deleted when the
        // power went): no user data lives in them.
        if let Ok(entries) = fs::read_dir(self.cfg.images_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("restore-") && name.ends_with(".img.tmp") {
                    // A restore that never reached its swap: every restoring row was settled above.
                    warn!(image = %entry.path().display(), "removing an unfinished restore");
                    kernel::remove_image(&entry.path())?;
                    continue;
                }
                let Some(id) = name.strip_suffix(".img") else {
                    continue;
                };
                if id.starts_with("disk_") && !known.contains(id) {
                    warn!(image = %entry.path().display(), "removing an image no disk owns");
                    kernel::remove_image(&entry.path())?;
                }
            }
        }
        for lo in kernel::loops_under(&self.cfg.images_dir())? {
            let name = lo
                .backing_file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            if !owner_of(name).is_some_and(|id| known.contains(&id)) {
                warn!(device = %lo.device.display(), image = %lo.backing_file.display(), "detaching a loop device no disk owns");
                kernel::detach(&lo.device)?;
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<Disk>, Error> {
        let kernel = KernelView::read(&self.cfg)?;
        let mut disks = self
            .store
            .disks()?
            .iter()
            .map(|row| self.view(row, &kernel))
            .collect::<Result<Vec<_>, _>>()?;
        for (app, created_at) in self.store.local_storage()? {
            disks.push(self.local_view(&app, created_at));
        }
        Ok(disks)
    }

    pub fn view_one(&self, row: &DiskRow) -> Result<Disk, Error> {
        self.view(row, &KernelView::read(&self.cfg)?)
    }

    fn view(&self, row: &DiskRow, kernel: &KernelView) -> Result<Disk, Error> {
        let image = self.cfg.image_path(&row.id);
        let mount_path = self.cfg.mount_path(&row.id);
        let device = kernel.loop_of(&image).map(|l| l.device.clone());
        let mounted = kernel.mount_at(&mount_path).is_some();
        let status = match row.status {
            DiskStatus::Ready if mounted => "attached",
            DiskStatus::Ready => "detached",
            other => other.as_str(),
        };
        let lease = self.store.lease(&row.id)?.map(|l| LeaseInfo {
            holder: l.holder,
            acquired_at: l.acquired_at,
        });
        Ok(Disk {
            id: row.id.clone(),
            name: row.name.clone(),
            provider: "miren".into(),
            size_gb: Some(row.size_gb),
            filesystem: parse_fs(&row.filesystem).ok().map(Into::into),
            read_only: row.read_only,
            status: status.into(),
            error: row.error.clone(),
            allocated_bytes: kernel::allocated_bytes(&image).unwrap_or(0),
            image_path: Some(image.display().to_string()),
            device: device.map(|d| d.display().to_string()),
            mount_path: mounted.then(|| mount_path.display().to_string()),
            lease,
            created_at: row.created_at.clone(),
        })
    }

    fn local_view(&self, app: &str, created_at: String) -> Disk {
        let dir = self.cfg.local_dir().join(app);
        Disk {
            id: format!("local_{app}"),
            name: app.to_string(),
            provider: "local".into(),
            size_gb: None,
            filesystem: None,
            read_only: false,
            status: DiskStatus::Ready.to_string(),
            error: None,
            allocated_bytes: dir_allocated_bytes(&dir),
            image_path: None,
            device: None,
            mount_path: Some(dir.display().to_string()),
            lease: None,
            created_at,
        }
    }

    /// An app's local storage: a plain directory shared by all of its sandboxes, made on first
    /// use. No size, no lease.
    pub fn ensure_local_storage(&self, app: &str) -> Result<Disk, Error> {
        kernel::validate_name(app)
            .map_err(|e| Error::invalid(format!("app name: {e}").replace("disk name", "name")))?;
        let dir = self.cfg.local_dir().join(app);
        fs::create_dir_all(&dir).map_err(|e| {
            Error::internal(format!("creating local storage {}: {e}", dir.display()))
        })?;
        let created_at = self.store.ensure_local_storage(app, &now_rfc3339())?;
        Ok(self.local_view(app, created_at))
    }
}

impl DiskService {
    /// Removes an app's local storage if its directory is empty (used for the build
    /// sandboxes' scratch storage); true when it is gone.
    pub fn remove_local_storage_if_empty(&self, app: &str) -> Result<bool, Error> {
        let dir = self.cfg.local_dir().join(app);
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => return Ok(false),
        }
        self.store.remove_local_storage(app)?;
        Ok(true)
    }
}

/// 400 for a name in the agent's own name space (see `miren_addons::is_reserved_name`).
pub fn refuse_reserved(what: &str, name: &str) -> Result<(), Error> {
    if miren_addons::is_reserved_name(name) {
        return Err(Error::invalid(format!(
            "{what} `{name}` is reserved: names that are `addon` or start with `addon-` belong to the agent's addons; pick another name"
        )));
    }
    Ok(())
}

fn not_yours(disk: &str, owner: Option<&Owner>, wanted_by: &Owner) -> Error {
    let owner = owner.map_or("someone else".to_string(), Owner::describe);
    Error::conflict(format!(
        "disk `{disk}` belongs to {owner}, so {} cannot use it; an app uses its own disks and ones nobody owns yet (made with `miren debug disk create`): pick another disk name",
        wanted_by.describe()
    ))
}

/// `name` with 8 hex digits of a hash of `salt`, within the 63-character name limit.
pub fn hashed_name(name: &str, salt: &str) -> Result<Name, Error> {
    let hash = miren_sys::fnv::fnv1a32(format!("{name}\0{salt}").as_bytes());
    Name::with_hash_suffix(name, hash)
        .map_err(|e| Error::invalid(format!("name `{name}` with a hash {e}")))
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs_f64().round() as u64)
}

fn parse_fs(s: &str) -> Result<Filesystem, Error> {
    s.parse::<Filesystem>().map_err(Error::internal)
}

fn remove_dir_if_present(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::internal(format!("removing {}: {e}", dir.display()))),
    }
}

fn dir_allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            total += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}
