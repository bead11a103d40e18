//! The bounded writable layer: a sandbox's overlay `upper/` and `work/` live on a sparse
//! ext4 image of its own (`layer.img` in the state dir, loop-mounted at `layer/`), so a
//! container writing to its root filesystem gets ENOSPC at the layer's size instead of
//! filling the host. The image stays with the state dir, so the layer survives restarts,
//! an agent crash and a host restart (the next supervisor mounts it again).

use std::fs;
use std::path::{Path, PathBuf};

use miren_disks::Filesystem;
use miren_sys::timeline::Timeline;

use super::control::{is_mounted, unmount};
use super::SandboxError;

pub const LAYER_IMAGE: &str = "layer.img";
pub const LAYER_DIR: &str = "layer";

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

/// Makes (once) and mounts the layer image of `size_bytes`. An image left by an earlier
/// run is kept with its contents; a layer still mounted by a crashed predecessor is reused.
pub(crate) fn mount(state_dir: &Path, size_bytes: u64) -> Result<(), SandboxError> {
    mount_timed(state_dir, size_bytes, None, &mut Timeline::start())
}

/// [`mount`], each step timed in `steps`; a new image is a copy of the one in `templates`
/// (made there first if missing, see [`copy_template`]) when it is given, else made here.
fn mount_timed(
    state_dir: &Path,
    size_bytes: u64,
    templates: Option<&Path>,
    steps: &mut Timeline,
) -> Result<(), SandboxError> {
    let dir = state_dir.join(LAYER_DIR);
    let image = state_dir.join(LAYER_IMAGE);
    if is_mounted(&dir) {
        return Ok(());
    }
    if !image.exists() {
        // Made beside and renamed into place: a run killed half-way leaves no image that
        // looks complete but is not formatted.
        let partial = state_dir.join(format!("{LAYER_IMAGE}.partial"));
        let _ = fs::remove_file(&partial);
        match templates {
            Some(templates) => copy_template(templates, &partial, size_bytes, steps)?,
            None => format_new(&partial, size_bytes, steps)?,
        }
        fs::rename(&partial, &image)
            .map_err(|e| SandboxError::io(format!("rename {}", image.display()), e))?;
    }
    // Autoclear: the loop device goes away with the mount, whoever unmounts it.
    let attached = miren_disks::attach(&image).map_err(disk_error)?;
    steps.mark("layer.attach");
    miren_disks::mount(&attached.path, &dir, Filesystem::Ext4, false).map_err(disk_error)?;
    drop(attached);
    steps.mark("layer.mount");
    Ok(())
}

/// Unmounts the layer (its loop device detaches itself); fine if it is not mounted.
pub(crate) fn unmount_layer(state_dir: &Path) -> Result<(), SandboxError> {
    let dir = state_dir.join(LAYER_DIR);
    if is_mounted(&dir) {
        unmount(&dir)?;
    }
    Ok(())
}

fn disk_error(e: miren_disks::DiskError) -> SandboxError {
    SandboxError::StartFailed(format!("writable layer: {e}"))
}

/// A new, empty layer image of `size_bytes` at `image` (which must not exist), formatted
/// with mkfs. mkfs flushes it before it returns.
fn format_new(image: &Path, size_bytes: u64, steps: &mut Timeline) -> Result<(), SandboxError> {
    miren_disks::create_sparse_image(image, size_bytes).map_err(disk_error)?;
    steps.mark("layer.image");
    // Never grown: no blocks reserved (and written) for growth.
    miren_disks::make_fixed_size_filesystem(Filesystem::Ext4, image).map_err(disk_error)?;
    steps.mark("layer.mkfs");
    Ok(())
}

/// Where spare supervisors keep the template of their layers, under [`SPARE_LAYERS_DIR`].
const TEMPLATES_DIR: &str = "template";

/// The template's name: what it is made of changes the name (an older one is removed at
/// the agent's start, [`remove_stale_spare_layers`]).
fn template_name(size_bytes: u64) -> String {
    format!("ext4-fixed-{size_bytes}.img")
}

/// A new, empty layer image of `size_bytes` at `image` (which must not exist): a copy of
/// the allocated blocks of a template formatted once (`<templates>/ext4-fixed-SIZE.img`,
/// made here if missing). mkfs.ext4 ran for every spare's layer: 7-9 ms of CPU (an exec,
/// its probing, its writes) right after each start, beside the next one on this two-core
/// host, and more the more sandboxes ran; the copy is a few syscalls over 152 KB. The
/// copies share the template's filesystem UUID, which ext4 does not mind (nor do we: a
/// layer is found by its path, never by UUID). Flushed before it returns, as mkfs's is: the
/// sandbox that takes the layer over relies on it after a host crash.
fn copy_template(
    templates: &Path,
    image: &Path,
    size_bytes: u64,
    steps: &mut Timeline,
) -> Result<(), SandboxError> {
    let template = templates.join(template_name(size_bytes));
    if !template.exists() {
        fs::create_dir_all(templates)
            .map_err(|e| SandboxError::io(format!("mkdir {}", templates.display()), e))?;
        // Made beside and renamed into place by whichever spare finishes first.
        let making = templates.join(format!(
            ".{}.{}",
            template_name(size_bytes),
            std::process::id()
        ));
        let _ = fs::remove_file(&making);
        if let Err(e) = format_new(&making, size_bytes, steps) {
            let _ = fs::remove_file(&making);
            return Err(e);
        }
        fs::rename(&making, &template)
            .map_err(|e| SandboxError::io(format!("rename {}", template.display()), e))?;
    }
    let copied = miren_snapshot::capture_extents(&template, image)
        .map_err(|e| SandboxError::StartFailed(format!("writable layer: {e}")))
        .and_then(|_| {
            fs::File::open(image)
                .and_then(|f| f.sync_all())
                .map_err(|e| SandboxError::io(format!("flush {}", image.display()), e))
        });
    steps.mark("layer.copy");
    copied
}

/// Removes the template a layer was copied from, so the next spare formats a new one
/// (a copy that did not mount).
fn remove_template(templates: &Path, size_bytes: u64) {
    let _ = fs::remove_file(templates.join(template_name(size_bytes)));
}

/// Where spare supervisors keep their ready layers: beside the sandboxes dir (same
/// filesystem, so an image is renamed, not copied, into the state dir it goes to).
pub const SPARE_LAYERS_DIR: &str = "spare-layers";

/// A layer made ahead of need by a spare supervisor (`<spare-layers>/<pid>/layer.img`,
/// mounted at `<spare-layers>/<pid>/layer`): a start of the default size takes it over with
/// a rename and a mount move instead of paying mkfs, loop setup and the ext4 mount on its
/// critical path (together 55-100 ms on this VM).
pub(crate) struct SpareLayer {
    dir: PathBuf,
    size_bytes: u64,
    /// How long its making took, step by step (for the start's timeline).
    pub(crate) steps: Timeline,
}

impl SpareLayer {
    /// Makes one for the sandboxes dir `sandboxes_dir`; None (and nothing left) if it fails:
    /// the start then makes its layer itself.
    pub(crate) fn make(sandboxes_dir: &Path, size_bytes: u64) -> Option<SpareLayer> {
        let spare_layers = sandboxes_dir.parent()?.join(SPARE_LAYERS_DIR);
        let dir = spare_layers.join(std::process::id().to_string());
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).ok()?;
        let templates = spare_layers.join(TEMPLATES_DIR);
        let mut spare = SpareLayer {
            dir,
            size_bytes,
            steps: Timeline::start(),
        };
        match mount_timed(&spare.dir, size_bytes, Some(&templates), &mut spare.steps) {
            Ok(()) => Some(spare),
            Err(e) => {
                eprintln!("spare layer: {e}");
                // A bad template would fail every spare after this one; whatever failed, the
                // next spare formats a new one (one mkfs).
                remove_template(&templates, size_bytes);
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
        let image = state_dir.join(LAYER_IMAGE);
        let target = state_dir.join(LAYER_DIR);
        // No image yet means nothing of a layer is mounted there either.
        if size_bytes != self.size_bytes || image.exists() {
            self.discard();
            return false;
        }
        // The loop device keeps the image open, so the rename does not disturb the mount.
        if fs::rename(self.dir.join(LAYER_IMAGE), &image).is_err() {
            self.discard();
            return false;
        }
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
            // The image (formatted) is in place already; the normal path mounts it.
            self.discard();
        }
        moved
    }

    /// Unmounts (the loop device detaches itself) and removes it.
    pub(crate) fn discard(self) {
        let _ = unmount_layer(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Removes what is left of a spare's layer once taken over (its empty directories).
/// Never removes a mounted layer's contents: `remove_dir` only takes empty directories.
pub(crate) fn remove_spare_dirs(spare_dir: &Path) {
    let _ = fs::remove_dir(spare_dir.join(LAYER_DIR));
    let _ = fs::remove_dir(spare_dir);
}

/// Whether `name` ends in the pid of a running process (`<pid>` or `.<anything>.<pid>`).
fn names_a_live_process(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .and_then(|n| n.parse::<i32>().ok())
        .is_some_and(|pid| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok())
}

/// Removes the ready layers of spare supervisors that are gone (killed, or a host restart):
/// `<data dir>/spare-layers/<pid>` whose pid no longer runs; and of the templates, those
/// half made by a spare that is gone and those an older version made (another name).
pub fn remove_stale_spare_layers(spare_layers: &Path) {
    let Ok(entries) = fs::read_dir(spare_layers) else {
        return;
    };
    if let Ok(templates) = fs::read_dir(spare_layers.join(TEMPLATES_DIR)) {
        let current = template_name(super::DEFAULT_WRITABLE_BYTES);
        for entry in templates.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let making = name.starts_with('.') && names_a_live_process(&name);
            if name != current && !making {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == TEMPLATES_DIR {
            continue;
        }
        if !names_a_live_process(&name) {
            (SpareLayer {
                dir: entry.path(),
                size_bytes: 0,
                steps: Timeline::start(),
            })
            .discard();
        }
    }
}
