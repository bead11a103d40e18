//! The bounded writable layer: a sandbox's overlay `upper/` and `work/` live on a sparse
//! ext4 image of its own (`layer.img` in the state dir, loop-mounted at `layer/`), so a
//! container writing to its root filesystem gets ENOSPC at the layer's size instead of
//! filling the host. The image stays with the state dir, so the layer survives restarts,
//! an agent crash and a host restart (the next supervisor mounts it again).

use std::fs;
use std::path::{Path, PathBuf};

use miren_disks::Filesystem;

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
        miren_disks::create_sparse_image(&partial, size_bytes).map_err(disk_error)?;
        miren_disks::make_filesystem(Filesystem::Ext4, &partial).map_err(disk_error)?;
        fs::rename(&partial, &image)
            .map_err(|e| SandboxError::io(format!("rename {}", image.display()), e))?;
    }
    // Autoclear: the loop device goes away with the mount, whoever unmounts it.
    let attached = miren_disks::attach(&image).map_err(disk_error)?;
    miren_disks::mount(&attached.path, &dir, Filesystem::Ext4, false).map_err(disk_error)?;
    drop(attached);
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
