use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::DiskError;

/// Creates a sparse image of `size_bytes` apparent size. Fails if the file exists, so a second
/// create can never clobber a disk's data.
pub fn create_sparse_image(path: &Path, size_bytes: u64) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| DiskError::io("creating image", path, e))?;
    // No fsync here: mkfs flushes the loop device when it finishes, and a loop flush fsyncs
    // the image, which on the host's journaling filesystem also commits its directory entry.
    file.set_len(size_bytes)
        .map_err(|e| DiskError::io("sizing image", path, e))
}

/// The image opened for writing, and its apparent size.
fn open_for_resize(path: &Path) -> Result<(File, u64), DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| DiskError::io("opening image", path, e))?;
    let current = file
        .metadata()
        .map_err(|e| DiskError::io("reading image size", path, e))?
        .len();
    Ok((file, current))
}

/// Grows the image's apparent size. Growing to the current size is a no-op; shrinking is refused.
pub fn extend_image(path: &Path, size_bytes: u64) -> Result<(), DiskError> {
    let (file, current) = open_for_resize(path)?;
    if size_bytes < current {
        return Err(DiskError::Shrink {
            path: path.to_path_buf(),
            current,
            requested: size_bytes,
        });
    }
    if size_bytes > current {
        file.set_len(size_bytes)
            .map_err(|e| DiskError::io("growing image", path, e))?;
        file.sync_all()
            .map_err(|e| DiskError::io("syncing image", path, e))?;
    }
    Ok(())
}

/// Cuts the image's apparent size back to `size_bytes` after a growth that did not reach the
/// filesystem: the caller has checked that the filesystem ends at or before `size_bytes`.
/// An image already that small is left as it is.
pub fn roll_back_image_size(path: &Path, size_bytes: u64) -> Result<(), DiskError> {
    let (file, current) = open_for_resize(path)?;
    if current > size_bytes {
        file.set_len(size_bytes)
            .map_err(|e| DiskError::io("rolling back the size of image", path, e))?;
        file.sync_all()
            .map_err(|e| DiskError::io("syncing image", path, e))?;
    }
    Ok(())
}

/// Real space the image occupies on the host, as opposed to its apparent size.
pub fn allocated_bytes(path: &Path) -> Result<u64, DiskError> {
    let meta = fs::metadata(path).map_err(|e| DiskError::io("inspecting image", path, e))?;
    Ok(meta.blocks() * 512)
}

/// Removes the image; an image that is already gone is fine (retries and crash recovery).
pub fn remove_image(path: &Path) -> Result<(), DiskError> {
    match fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DiskError::io("removing image", path, e)),
    }
}

fn sync_parent(path: &Path) -> Result<(), DiskError> {
    if let Some(parent) = path.parent() {
        File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| DiskError::io("syncing directory", parent, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_image_allocates_almost_nothing_and_only_grows() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-img")
            .tempdir()
            .unwrap();
        let path = dir.path().join("d.img");
        create_sparse_image(&path, 10 << 30).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 10 << 30);
        assert!(allocated_bytes(&path).unwrap() < 1 << 20);
        assert!(
            create_sparse_image(&path, 1 << 30).is_err(),
            "create must never clobber"
        );
        extend_image(&path, 11 << 30).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 11 << 30);
        assert!(matches!(
            extend_image(&path, 1 << 30),
            Err(DiskError::Shrink { .. })
        ));
        remove_image(&path).unwrap();
        remove_image(&path).unwrap();
    }
}
