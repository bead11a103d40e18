//! Size limits, checked before a size is recorded: a size the filesystem or the host cannot
//! hold must be refused up front, never discovered halfway through a create or a resize.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::{DiskError, Filesystem};

/// ext4 without the `64bit` feature counts blocks in 32 bits.
const EXT4_BLOCKS_32BIT: u64 = 1 << 32;
/// ext4 with `64bit`: e2fsprogs and the kernel support 2^48 blocks.
const EXT4_BLOCKS_64BIT: u64 = 1 << 48;
const EXT4_INCOMPAT_64BIT: u32 = 0x80;

impl Filesystem {
    /// The largest filesystem of this kind with our block size (4 KiB), as documented by the
    /// filesystem: ext4 with `64bit` (mkfs.ext4's default) 1 EiB, XFS 8 EiB, btrfs 16 EiB.
    pub fn max_size_bytes(self) -> u64 {
        match self {
            Filesystem::Ext4 => EXT4_BLOCKS_64BIT * 4096,
            Filesystem::Xfs => i64::MAX as u64,
            Filesystem::Btrfs => u64::MAX,
        }
    }
}

/// What a formatted image's superblock says: its current size and the most it can grow to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsGeometry {
    pub size_bytes: u64,
    pub max_bytes: u64,
}

/// Reads the superblock of the filesystem in `image` (an image file or a block device).
pub fn read_geometry(fs: Filesystem, image: &Path) -> Result<FsGeometry, DiskError> {
    let file = File::open(image).map_err(|e| DiskError::io("opening", image, e))?;
    let bad = |what: &str| {
        DiskError::io(
            "reading the superblock of",
            image,
            io::Error::new(io::ErrorKind::InvalidData, format!("not {fs}: {what}")),
        )
    };
    let read = |offset: u64, len: usize| -> Result<Vec<u8>, DiskError> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| DiskError::io("reading the superblock of", image, e))?;
        Ok(buf)
    };
    let le32 = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    match fs {
        Filesystem::Ext4 => {
            let sb = read(1024, 1024)?;
            if sb[0x38..0x3a] != [0x53, 0xEF] {
                return Err(bad("no ext4 magic"));
            }
            let log_block = le32(&sb, 0x18);
            if log_block > 6 {
                return Err(bad("block size out of range"));
            }
            let block_size = 1024u64 << log_block;
            let incompat = le32(&sb, 0x60);
            let mut blocks = u64::from(le32(&sb, 0x04));
            let max_blocks = if incompat & EXT4_INCOMPAT_64BIT != 0 {
                blocks |= u64::from(le32(&sb, 0x150)) << 32;
                EXT4_BLOCKS_64BIT
            } else {
                EXT4_BLOCKS_32BIT
            };
            Ok(FsGeometry {
                size_bytes: blocks.saturating_mul(block_size),
                max_bytes: max_blocks.saturating_mul(block_size),
            })
        }
        Filesystem::Xfs => {
            let sb = read(0, 16)?;
            if &sb[0..4] != b"XFSB" {
                return Err(bad("no XFS magic"));
            }
            let block_size = u64::from(u32::from_be_bytes([sb[4], sb[5], sb[6], sb[7]]));
            let mut dblocks = [0u8; 8];
            dblocks.copy_from_slice(&sb[8..16]);
            Ok(FsGeometry {
                size_bytes: u64::from_be_bytes(dblocks).saturating_mul(block_size),
                max_bytes: Filesystem::Xfs.max_size_bytes(),
            })
        }
        Filesystem::Btrfs => {
            let sb = read(0x10000, 0x78)?;
            if &sb[0x40..0x48] != b"_BHRfS_M" {
                return Err(bad("no btrfs magic"));
            }
            let mut total = [0u8; 8];
            total.copy_from_slice(&sb[0x70..0x78]);
            Ok(FsGeometry {
                size_bytes: u64::from_le_bytes(total),
                max_bytes: Filesystem::Btrfs.max_size_bytes(),
            })
        }
    }
}

/// Checks that the filesystem holding `dir` lets a file there have `size_bytes` of apparent
/// size, by sizing an unnamed temporary file (O_TMPFILE: nothing is left behind, even if we
/// are killed). A sparse file costs no space, so this answers only "is it too large".
pub fn check_host_file_size(dir: &Path, size_bytes: u64) -> Result<(), DiskError> {
    let too_large = || DiskError::TooLarge {
        requested: size_bytes,
        reason: format!(
            "the filesystem holding {} cannot have a file that large",
            dir.display()
        ),
    };
    if i64::try_from(size_bytes).is_err() {
        return Err(too_large());
    }
    let probe = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)
        .map_err(|e| DiskError::io("creating a size probe in", dir, e))?;
    match probe.set_len(size_bytes) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EFBIG) | Some(libc::EINVAL)) => {
            Err(too_large())
        }
        Err(e) => Err(DiskError::io("sizing a size probe in", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_refuses_what_it_cannot_hold_and_leaves_nothing() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-limits")
            .tempdir()
            .unwrap();
        check_host_file_size(dir.path(), 1 << 30).unwrap();
        let err = check_host_file_size(dir.path(), u64::MAX).unwrap_err();
        assert!(matches!(err, DiskError::TooLarge { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn garbage_is_not_a_superblock() {
        let dir = tempfile::Builder::new()
            .prefix("mrtst-limits")
            .tempdir()
            .unwrap();
        let path = dir.path().join("junk.img");
        std::fs::write(&path, vec![0x5a; 1 << 17]).unwrap();
        for fs in Filesystem::ALL {
            assert!(read_geometry(fs, &path).is_err(), "{fs}");
        }
    }
}
