//! Growing a disk online (offline where the kernel refuses), and rolling a failed growth back.

use super::*;

impl DiskService {
    pub fn resize(&self, id_or_name: &str, size_gb: u64) -> Result<Disk, Error> {
        if size_gb == 0 || size_gb > MAX_SIZE_GB {
            return Err(Error::invalid(format!(
                "size_gb must be between 1 and {MAX_SIZE_GB}, got {size_gb}"
            )));
        }
        let row = self.find(id_or_name)?;
        // A rollback cuts the image back, which must never race another resize growing it.
        let _only = DiskOperation::begin(&row, "resize")?;
        if size_gb > row.size_gb {
            // Refused here, before anything is recorded: a size the filesystem or the host
            // cannot hold would otherwise fail halfway and leave the disk `resizing`.
            self.check_size_fits(parse_fs(&row.filesystem)?, size_gb, Some(&row))?;
        }
        let old_size_gb = row.size_gb;
        let row = self.store.begin_resize(&row.id, size_gb)?;
        if let Err(failed) = self.grow(&row) {
            warn!(disk = %row.name, size_gb, error = %failed.error, "resize failed; rolling it back");
            self.roll_back_resize(&row, Some(old_size_gb), &failed)?;
            return Err(failed.error);
        }
        self.store.set_status(&row.id, DiskStatus::Ready, None)?;
        info!(disk = %row.name, size_gb, "disk grown");
        self.view_one(&self.find(&row.id)?)
    }

    /// Refuses a size beyond what the filesystem (its kind, and for an existing disk its
    /// superblock's features) or the host filesystem holding the images can hold.
    pub(crate) fn check_size_fits(
        &self,
        fs: Filesystem,
        size_gb: u64,
        existing: Option<&DiskRow>,
    ) -> Result<(), Error> {
        let size_bytes = size_gb * GIB;
        let mut fs_max = fs.max_size_bytes();
        if let Some(row) = existing {
            fs_max =
                fs_max.min(kernel::read_geometry(fs, &self.cfg.image_path(&row.id))?.max_bytes);
        }
        if size_bytes > fs_max {
            return Err(Error::invalid(format!(
                "size_gb {size_gb} is larger than a {fs} filesystem can be here ({} GiB); choose a smaller size",
                fs_max / GIB
            )));
        }
        kernel::check_host_file_size(&self.cfg.images_dir(), size_bytes).map_err(|e| {
            Error::invalid(format!(
                "size_gb {size_gb}: {e}; choose a smaller size or keep the data dir on a filesystem that allows larger files (xfs, btrfs)"
            ))
        })
    }

    /// Settles a failed growth (`row` carries the size that was asked for) as `ready`, so a
    /// failed resize never wedges the disk (leases, backups and other resizes work again):
    /// - the image was never extended: the disk is what its image is (the old size);
    /// - it was, but the filesystem was not touched and the old size is known: the image is cut
    ///   back to it;
    /// - the filesystem tool ran (it may have grown part way): nothing is cut, the disk is
    ///   recorded at its image's size and the error says to run the resize again to finish.
    pub(super) fn roll_back_resize(
        &self,
        row: &DiskRow,
        old_size_gb: Option<u64>,
        failed: &GrowFailure,
    ) -> Result<(), Error> {
        let image = self.cfg.image_path(&row.id);
        let image_gb = || {
            fs::metadata(&image)
                .map(|m| m.len().div_ceil(GIB).max(1))
                .map_err(|e| Error::internal(format!("reading {}: {e}", image.display())))
        };
        let size_gb = match (failed.stage, old_size_gb) {
            (GrowStage::FilesystemUntouched, Some(old)) => {
                kernel::roll_back_image_size(&image, old * GIB)?;
                for lo in kernel::loops_backed_by(&image)? {
                    kernel::refresh_capacity(&lo.device)?;
                }
                old
            }
            _ => image_gb()?,
        };
        let settled = DiskRow {
            size_gb,
            ..row.clone()
        };
        let attached = self.ensure_attached(&settled);
        let note = if size_gb < row.size_gb {
            format!(
                "the last resize (to {} GiB) failed and was rolled back: {}",
                row.size_gb, failed.error.message
            )
        } else {
            format!(
                "the last resize (to {} GiB) failed while growing the filesystem, which may be smaller than the disk: {}. Run `miren debug disk resize -n {} --size-gb {}` again to finish",
                row.size_gb, failed.error.message, row.name, row.size_gb
            )
        };
        self.store.end_resize(&row.id, size_gb, Some(&note))?;
        info!(disk = %row.name, size_gb, "failed resize settled; the disk is ready");
        attached.map(drop)
    }

    /// Grows image, loop device and filesystem, online. Each step is a no-op when already done.
    /// A failure says how far it got, for `roll_back_resize`.
    pub(super) fn grow(&self, row: &DiskRow) -> Result<(), GrowFailure> {
        let before = |error: Error| GrowFailure::at(GrowStage::FilesystemUntouched, error);
        let fs = parse_fs(&row.filesystem).map_err(before)?;
        let image = self.cfg.image_path(&row.id);
        let mount_path = self.cfg.mount_path(&row.id);
        kernel::extend_image(&image, row.size_gb * GIB)
            .map_err(|e| GrowFailure::at(GrowStage::ImageUnchanged, e.into()))?;
        let device = self.ensure_attached(row).map_err(before)?;
        kernel::refresh_capacity(&device).map_err(|e| before(e.into()))?;
        // Online growth needs a writable mount; a read-only disk is writable only meanwhile.
        if row.read_only {
            kernel::remount(&mount_path, fs, false).map_err(|e| before(e.into()))?;
        }
        let grown = kernel::grow_filesystem(fs, &device, &mount_path);
        if row.read_only {
            kernel::remount(&mount_path, fs, true)
                .map_err(|e| GrowFailure::at(GrowStage::Filesystem, e.into()))?;
        }
        match grown {
            // The kernel refuses before changing anything.
            Err(kernel::DiskError::OnlineGrowthDenied(_)) => self.grow_offline(row),
            Err(e) => Err(GrowFailure::at(GrowStage::Filesystem, e.into())),
            Ok(()) => Ok(()),
        }
    }

    /// ext4 without CAP_SYS_RESOURCE can only grow unmounted. That is safe only while no
    /// sandbox holds the disk, and leases are refused while a disk is `resizing`.
    fn grow_offline(&self, row: &DiskRow) -> Result<(), GrowFailure> {
        let before = |error: Error| GrowFailure::at(GrowStage::FilesystemUntouched, error);
        if let Some(lease) = self.store.lease(&row.id).map_err(|e| before(e.into()))? {
            return Err(before(Error::conflict(format!(
                "disk `{}` is in use by `{}`, and this host does not let the agent grow a mounted ext4 filesystem (it lacks CAP_SYS_RESOURCE). Stop the holder (release the lease) and run the resize again: the disk then grows offline in seconds",
                row.name, lease.holder
            ))));
        }
        let image = self.cfg.image_path(&row.id);
        kernel::unmount(&self.cfg.mount_path(&row.id)).map_err(|e| before(e.into()))?;
        // Autoclear detaches the loop device once the mount is gone; if it stays attached,
        // something else still uses the filesystem and it must not be touched offline.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !kernel::loops_backed_by(&image)
            .map_err(|e| before(e.into()))?
            .is_empty()
        {
            if Instant::now() >= deadline {
                self.ensure_attached(row).map_err(before)?;
                return Err(before(Error::busy(format!(
                    "disk `{}` is still in use outside its mount; stop whatever uses it and retry the resize",
                    row.name
                ))));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let grown = kernel::grow_ext4_offline(&image);
        let touched = |error: Error| GrowFailure::at(GrowStage::Filesystem, error);
        self.ensure_attached(row).map_err(touched)?;
        grown.map_err(|e| touched(e.into()))?;
        info!(disk = %row.name, "grew ext4 offline (online growth is not permitted on this host)");
        Ok(())
    }
}

/// How far a failed growth got: what `roll_back_resize` may safely undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GrowStage {
    /// The image keeps its size (the host refused it, or we never got that far).
    ImageUnchanged,
    /// The image (and loop device) grew, the filesystem was not touched.
    FilesystemUntouched,
    /// A filesystem tool ran or the step after it failed: the filesystem may have grown.
    Filesystem,
}

pub(super) struct GrowFailure {
    stage: GrowStage,
    pub(super) error: Error,
}

impl GrowFailure {
    fn at(stage: GrowStage, error: Error) -> GrowFailure {
        GrowFailure { stage, error }
    }
}
