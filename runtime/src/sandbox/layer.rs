//! The bounded writable layer: a sandbox's overlay `upper/` and `work/` live in a btrfs
//! subvolume of its own (`<data dir>/layers/<sandbox id>`), bounded to the layer's size by a
//! quota group, bind-mounted at the state dir's `layer/`. A container writing to its root
//! filesystem gets EDQUOT ("Disk quota exceeded") at the layer's size instead of filling the
//! host. The subvolume stays until the sandbox is deleted, so the layer survives restarts, an
//! agent crash and a host restart (the next supervisor binds it again).
//!
//! Every sandbox of a data dir shares one btrfs filesystem, the store: a sparse image
//! (`<data dir>/layers.img`) loop-mounted once at `<data dir>/layers` by whichever supervisor
//! needs it first. A filesystem per sandbox (an ext4 image and a loop device each, as before)
//! made every start pay for all the others: attaching walks every loop device, mounting walks
//! every ext4 superblock, and each layer added two kernel threads that `pivot_root` walks.
//! Sandboxes made then keep their image (`layer.img` in the state dir), mounted as before.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use miren_disks::Filesystem;
use miren_sys::timeline::Timeline;
use nix::fcntl::{Flock, FlockArg};

use super::control::{is_mounted, unmount};
use super::SandboxError;

/// An ext4 image of the sandbox's own (sandboxes made before the store).
pub const LAYER_IMAGE: &str = "layer.img";
pub const LAYER_DIR: &str = "layer";
/// Where the store is mounted, in the data dir.
pub const LAYERS_DIR: &str = "layers";
/// The store's image, in the data dir.
pub const LAYERS_IMAGE: &str = "layers.img";
/// Held while the store is made or mounted, in the data dir.
const LAYERS_LOCK: &str = ".layers.lock";
/// Names of spares' subvolumes start with this; sandbox ids cannot.
const SPARE_PREFIX: &str = ".spare-";
/// The inode number of every btrfs subvolume's root directory.
const SUBVOLUME_ROOT_INO: u64 = 256;

/// Where the overlay's upper and work dirs are: inside the mounted layer when the sandbox
/// has a bounded one, else directly in the state dir (specs written before the bound).
pub(crate) fn upper_and_work(state_dir: &Path, bounded: bool) -> (PathBuf, PathBuf) {
    let base = if bounded {
        state_dir.join(LAYER_DIR)
    } else {
        state_dir.to_path_buf()
    };
    (base.join(super::UPPER_DIR), base.join(super::WORK_DIR))
}

/// The sandboxes dir and the sandbox id of a state dir (`<sandboxes dir>/<id>`).
fn split_state_dir(state_dir: &Path) -> Result<(&Path, &str), SandboxError> {
    state_dir
        .parent()
        .zip(state_dir.file_name().and_then(|n| n.to_str()))
        .ok_or_else(|| {
            SandboxError::InvalidSpec(format!(
                "state dir {} is not <sandboxes dir>/<id>",
                state_dir.display()
            ))
        })
}

/// The filesystem every writable layer of one data dir is a subvolume of (see the module doc).
pub(crate) struct Store {
    dir: PathBuf,
    /// Its root directory, opened in the host's mount namespace: subvolumes are made, renamed
    /// and deleted through it from any namespace.
    root: File,
}

impl Store {
    /// The store of `sandboxes_dir`'s data dir (its parent), made and mounted first if it is
    /// not. Call in the host's mount namespace.
    pub(crate) fn open(sandboxes_dir: &Path) -> Result<Store, SandboxError> {
        let data_dir = sandboxes_dir.parent().ok_or_else(|| {
            SandboxError::InvalidSpec(format!(
                "sandboxes dir {} has no parent for its layers",
                sandboxes_dir.display()
            ))
        })?;
        let dir = data_dir.join(LAYERS_DIR);
        if !is_mounted(&dir) {
            let _lock = lock(data_dir)?;
            if !is_mounted(&dir) {
                mount_store(data_dir, &dir)?;
            }
        }
        let root =
            File::open(&dir).map_err(|e| SandboxError::io(format!("open {}", dir.display()), e))?;
        Ok(Store { dir, root })
    }

    /// [`Store::open`] if the store was ever made (its image is there); `None` otherwise.
    fn existing(sandboxes_dir: &Path) -> Result<Option<Store>, SandboxError> {
        let made = sandboxes_dir
            .parent()
            .is_some_and(|d| d.join(LAYERS_IMAGE).exists());
        if made {
            Store::open(sandboxes_dir).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Subvolume `name`, made if it is not there, bounded to `bytes` (set again if it was).
    fn subvolume(&self, name: &str, bytes: u64) -> Result<PathBuf, SandboxError> {
        let path = self.dir.join(name);
        miren_disks::create_subvolume(&self.root, name, &path).map_err(SandboxError::Layer)?;
        let sub = File::open(&path)
            .map_err(|e| SandboxError::io(format!("open {}", path.display()), e))?;
        // A plain directory of that name would put the bound on the whole store.
        let ino = sub
            .metadata()
            .map_err(|e| SandboxError::io(format!("stat {}", path.display()), e))?
            .ino();
        if ino != SUBVOLUME_ROOT_INO {
            return Err(SandboxError::StartFailed(format!(
                "writable layer: {} is not a subvolume; remove it and start the sandbox again",
                path.display()
            )));
        }
        match miren_disks::limit_subvolume(&sub, bytes, &path) {
            // Quotas off: a run killed between mounting a new store and turning them on.
            Err(miren_disks::DiskError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ENOTCONN) =>
            {
                miren_disks::enable_quota(&self.root, &self.dir).map_err(SandboxError::Layer)?;
                miren_disks::limit_subvolume(&sub, bytes, &path).map_err(SandboxError::Layer)?;
            }
            other => other.map_err(SandboxError::Layer)?,
        }
        Ok(path)
    }

    /// Renames subvolume `from` to `to` unless `to` exists; whether it did.
    fn rename(&self, from: &str, to: &str) -> bool {
        nix::fcntl::renameat2(
            &self.root,
            from,
            &self.root,
            to,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .is_ok()
    }

    /// Deletes subvolume `name` with its contents; fine if it is not there.
    fn remove(&self, name: &str) -> Result<(), SandboxError> {
        miren_disks::delete_subvolume(&self.root, name, &self.dir.join(name))
            .map_err(SandboxError::Layer)
    }

    /// Names of the subvolumes (and anything else) in the store.
    fn names(&self) -> Vec<String> {
        fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn lock(data_dir: &Path) -> Result<Flock<File>, SandboxError> {
    let path = data_dir.join(LAYERS_LOCK);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| SandboxError::io(format!("open {}", path.display()), e))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| SandboxError::sys(format!("lock {}", path.display()), e))
}

/// Makes the store's image if it is missing (beside, then renamed into place: a run killed
/// half-way leaves nothing that looks made), mounts it at `dir` and turns its quota on.
/// As large as the filesystem that holds the data dir: the image is sparse, and the layers'
/// bounds are what limit each sandbox.
fn mount_store(data_dir: &Path, dir: &Path) -> Result<(), SandboxError> {
    let image = data_dir.join(LAYERS_IMAGE);
    if !image.exists() {
        let partial = data_dir.join(format!("{LAYERS_IMAGE}.partial"));
        let _ = fs::remove_file(&partial);
        let host = nix::sys::statvfs::statvfs(data_dir)
            .map_err(|e| SandboxError::sys(format!("statvfs {}", data_dir.display()), e))?;
        let bytes = (host.blocks() as u64 * host.fragment_size() as u64).max(miren_disks::GIB);
        miren_disks::create_sparse_image(&partial, bytes).map_err(SandboxError::Layer)?;
        miren_disks::make_filesystem(Filesystem::Btrfs, &partial).map_err(SandboxError::Layer)?;
        fs::rename(&partial, &image)
            .map_err(|e| SandboxError::io(format!("rename {}", image.display()), e))?;
    }
    // Autoclear: the loop device goes away with the mount.
    let attached = miren_disks::attach(&image).map_err(SandboxError::Layer)?;
    miren_disks::mount(&attached.path, dir, Filesystem::Btrfs, false)
        .map_err(SandboxError::Layer)?;
    drop(attached);
    let root =
        File::open(dir).map_err(|e| SandboxError::io(format!("open {}", dir.display()), e))?;
    miren_disks::enable_quota(&root, dir).map_err(SandboxError::Layer)
}

/// Mounts the sandbox's layer at `layer/` if it is not: its own image if it has one (made
/// before the store), else its subvolume, made (bounded to `size_bytes`) if missing. The
/// subvolume is bound from the store, which only the host's namespace shows: a supervisor
/// in a namespace of its own brings it there instead ([`own_subvolume`]).
pub(crate) fn mount(state_dir: &Path, size_bytes: u64) -> Result<(), SandboxError> {
    let dir = state_dir.join(LAYER_DIR);
    if is_mounted(&dir) {
        return Ok(());
    }
    let image = state_dir.join(LAYER_IMAGE);
    if image.exists() {
        let attached = miren_disks::attach(&image).map_err(SandboxError::Layer)?;
        miren_disks::mount(&attached.path, &dir, Filesystem::Ext4, false)
            .map_err(SandboxError::Layer)?;
        return Ok(());
    }
    bind(&own_subvolume(state_dir, size_bytes)?, &dir)
}

/// Whether the sandbox's layer is an image of its own (made before the store).
pub(crate) fn has_own_image(state_dir: &Path) -> bool {
    state_dir.join(LAYER_IMAGE).exists()
}

/// The sandbox's subvolume (made if missing, bounded to `size_bytes`): what its `layer/`
/// binds. Call in the host's mount namespace.
pub(crate) fn own_subvolume(state_dir: &Path, size_bytes: u64) -> Result<PathBuf, SandboxError> {
    let (sandboxes_dir, id) = split_state_dir(state_dir)?;
    Store::open(sandboxes_dir)?.subvolume(id, size_bytes)
}

/// Deletes the sandbox's subvolume (its layer's contents), at its deletion; fine if there is
/// none. Its `layer/` must be unmounted.
pub(crate) fn remove_own_subvolume(state_dir: &Path) -> Result<(), SandboxError> {
    let (sandboxes_dir, id) = split_state_dir(state_dir)?;
    match Store::existing(sandboxes_dir)? {
        Some(store) => store.remove(id),
        None => Ok(()),
    }
}

fn bind(source: &Path, target: &Path) -> Result<(), SandboxError> {
    fs::create_dir_all(target)
        .map_err(|e| SandboxError::io(format!("mkdir {}", target.display()), e))?;
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        SandboxError::sys(
            format!("bind {} at {}", source.display(), target.display()),
            e,
        )
    })
}

/// Unmounts the layer (an image's loop device detaches itself); fine if it is not mounted.
pub(crate) fn unmount_layer(state_dir: &Path) -> Result<(), SandboxError> {
    let dir = state_dir.join(LAYER_DIR);
    if is_mounted(&dir) {
        unmount(&dir)?;
    }
    Ok(())
}

/// Where spare supervisors mount their ready layers: beside the sandboxes dir.
pub const SPARE_LAYERS_DIR: &str = "spare-layers";

/// A layer made ahead of need by a spare supervisor: subvolume `.spare-<pid>` of the store,
/// bounded to the default size and bound at `<spare-layers>/<pid>/layer`. A start of the
/// default size takes it over with a rename and a mount move.
pub(crate) struct SpareLayer {
    dir: PathBuf,
    store: Store,
    name: String,
    size_bytes: u64,
    /// How long its making took, step by step (for the start's timeline).
    pub(crate) steps: Timeline,
}

impl SpareLayer {
    /// Makes one for the sandboxes dir `sandboxes_dir`; None (and nothing left) if it fails:
    /// the start then makes its layer itself.
    pub(crate) fn make(sandboxes_dir: &Path, size_bytes: u64) -> Option<SpareLayer> {
        let dir = sandboxes_dir
            .parent()?
            .join(SPARE_LAYERS_DIR)
            .join(std::process::id().to_string());
        let mut steps = Timeline::start();
        let store = match Store::open(sandboxes_dir) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("spare layer: {e}");
                return None;
            }
        };
        steps.mark("layer.store");
        // What a killed spare of the same pid left, its layer unmounted first.
        let _ = unmount_layer(&dir);
        let _ = fs::remove_dir_all(&dir);
        let spare = SpareLayer {
            dir,
            store,
            name: format!("{SPARE_PREFIX}{}", std::process::id()),
            size_bytes,
            steps,
        };
        // One a killed spare of the same pid left is taken as it is: nothing writes to a
        // spare's subvolume before it is renamed to its sandbox's id.
        let made = spare
            .store
            .subvolume(&spare.name, size_bytes)
            .and_then(|sub| bind(&sub, &spare.dir.join(LAYER_DIR)));
        match made {
            Ok(()) => {
                let mut spare = spare;
                spare.steps.mark("layer.subvolume");
                Some(spare)
            }
            Err(e) => {
                eprintln!("spare layer: {e}");
                spare.discard();
                None
            }
        }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves this layer to `state_dir` if it is what the sandbox asks for and the sandbox
    /// has none yet; true if it did. Otherwise it is discarded.
    pub(crate) fn adopt(self, state_dir: &Path, size_bytes: u64) -> bool {
        let Ok((_, id)) = split_state_dir(state_dir) else {
            self.discard();
            return false;
        };
        if size_bytes != self.size_bytes
            || has_own_image(state_dir)
            || !self.store.rename(&self.name, id)
        {
            self.discard();
            return false;
        }
        let target = state_dir.join(LAYER_DIR);
        let moved = fs::create_dir_all(&target).is_ok()
            && nix::mount::mount(
                Some(&self.dir.join(LAYER_DIR)),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_MOVE,
                None::<&str>,
            )
            .is_ok();
        // Moved: only empty directories are left of it, removed at the supervisor's end
        // ([`remove_spare_dirs`]): an rmdir here waited for the host's journal (2-38 ms).
        if !moved {
            // The subvolume is the sandbox's now; the normal path binds it.
            let _ = unmount_layer(&self.dir);
            let _ = fs::remove_dir_all(&self.dir);
        }
        moved
    }

    /// Unmounts and deletes it.
    pub(crate) fn discard(self) {
        let _ = unmount_layer(&self.dir);
        if let Err(e) = self.store.remove(&self.name) {
            eprintln!("spare layer: {e}");
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes what is left of a spare's layer once taken over (its empty directories).
/// Never removes a mounted layer's contents: `remove_dir` only takes empty directories.
pub(crate) fn remove_spare_dirs(spare_dir: &Path) {
    let _ = fs::remove_dir(spare_dir.join(LAYER_DIR));
    let _ = fs::remove_dir(spare_dir);
}

/// Whether `name` ends in the pid of a running process (`<pid>`, `.spare-<pid>`).
fn names_a_live_process(name: &str) -> bool {
    name.rsplit(['.', '-'])
        .next()
        .and_then(|n| n.parse::<i32>().ok())
        .is_some_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

/// At the agent's start, before any sandbox starts: removes the ready layers of spare
/// supervisors that are gone (killed, or a host restart), the subvolumes of sandboxes whose
/// state dir is gone (a crash between the two), and what older versions left beside them
/// (`spare-layers/template`, the ext4 image spares copied theirs from).
pub fn remove_stale_layers(sandboxes_dir: &Path) {
    let Some(data_dir) = sandboxes_dir.parent() else {
        return;
    };
    if let Ok(entries) = fs::read_dir(data_dir.join(SPARE_LAYERS_DIR)) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !names_a_live_process(&name) {
                let _ = unmount_layer(&entry.path());
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let store = match Store::existing(sandboxes_dir) {
        Ok(Some(store)) => store,
        Ok(None) => return,
        Err(e) => {
            eprintln!("{e}");
            return;
        }
    };
    for name in store.names() {
        let stale = if name.starts_with(SPARE_PREFIX) {
            !names_a_live_process(&name)
        } else {
            !sandboxes_dir.join(&name).exists()
        };
        if stale {
            if let Err(e) = store.remove(&name) {
                eprintln!("{e}");
            }
        }
    }
}
