//! Thin-provisioned disks built from Linux primitives: a sparse image file, a loop device with
//! 4 KiB logical blocks, a filesystem made once with mkfs, and a mount under the agent's data dir.
//!
//! Every function here is a single idempotent step on the kernel side. Deciding *which* steps to
//! take (and recording that durably) is the agent's job; this crate never keeps state of its own,
//! so the kernel can always be re-read to find out where a half-finished operation stopped.

mod error;
mod filesystem;
mod image;
mod limits;
mod loops;
mod mounts;
mod name;
mod subvolumes;

pub use error::DiskError;
pub use filesystem::{
    grow_ext4_offline, grow_filesystem, make_filesystem, make_fixed_size_filesystem, Filesystem,
};
pub use image::{
    allocated_bytes, create_sparse_image, extend_image, remove_image, roll_back_image_size,
};
pub use limits::{check_host_file_size, read_geometry, FsGeometry};
pub use loops::{
    all_loops, attach, detach, loops_backed_by, loops_under, refresh_capacity, AttachedLoop,
    LoopInfo,
};
pub use mounts::{mount, mount_point_of, mounts_under, remount, unmount, MountEntry};
pub use name::{validate_name, NameError, MAX_NAME_LEN};
pub use subvolumes::{create_subvolume, delete_subvolume, enable_quota, limit_subvolume};

/// Bytes in one `size_gb` unit. Sizes are GiB, as `truncate -s 10G` and the seeds mean them.
pub const GIB: u64 = 1 << 30;

/// Logical block size of every loop device we attach: matches the filesystems' block size and
/// lets direct I/O line up with the backing filesystem's pages.
pub const BLOCK_SIZE: u32 = 4096;
