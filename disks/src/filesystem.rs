use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::DiskError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    #[default]
    Ext4,
    Xfs,
    Btrfs,
}

impl Filesystem {
    pub const ALL: [Filesystem; 3] = [Filesystem::Ext4, Filesystem::Xfs, Filesystem::Btrfs];

    pub fn as_str(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
            Filesystem::Btrfs => "btrfs",
        }
    }

    /// The Debian package that ships this filesystem's tools.
    pub fn package(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "e2fsprogs",
            Filesystem::Xfs => "xfsprogs",
            Filesystem::Btrfs => "btrfs-progs",
        }
    }

    /// Mount options: `discard` returns freed blocks to the sparse image; ext4's
    /// `noinit_itable` stops the background zeroing of inode tables, which would otherwise
    /// allocate gigabytes of a large, empty image; `no_prefetch_block_bitmaps` keeps each
    /// mount off the kernel's one `ext4lazyinit` thread, which otherwise reads every group's
    /// bitmap in the background (a node with hundreds of sandboxes mounts a writable layer
    /// per start; the bitmaps are read when first needed anyway).
    pub(crate) fn mount_options(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "discard,noinit_itable,no_prefetch_block_bitmaps",
            // A restored copy has its source's UUID; XFS refuses a second mount of a UUID
            // unless told that is fine (it is: our filesystems are single-device).
            Filesystem::Xfs => "discard,nouuid",
            Filesystem::Btrfs => "discard=async",
        }
    }

    fn mkfs(self) -> (&'static str, &'static [&'static str]) {
        match self {
            // Lazy inode tables and journal: on a fresh sparse file both read as zeros already,
            // so a 100 GiB disk allocates a few MB instead of hundreds. No discard pass either:
            // there is nothing to discard in a new file.
            Filesystem::Ext4 => (
                "mkfs.ext4",
                &[
                    "-F",
                    "-q",
                    "-b",
                    "4096",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                ],
            ),
            Filesystem::Xfs => ("mkfs.xfs", &["-f", "-q", "-K"]),
            Filesystem::Btrfs => ("mkfs.btrfs", &["-f", "-q", "-K"]),
        }
    }
}

impl fmt::Display for Filesystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Filesystem {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Filesystem::ALL
            .into_iter()
            .find(|fs| fs.as_str() == s)
            .ok_or_else(|| format!("unknown filesystem `{s}`: choose ext4, xfs or btrfs"))
    }
}

/// Formats `device`. Called exactly once per disk, before its first mount.
pub fn make_filesystem(fs: Filesystem, device: &Path) -> Result<(), DiskError> {
    format(fs, device, &[])
}

/// [`make_filesystem`] for a filesystem that is never grown (a sandbox's writable layer):
/// ext4 then reserves no group descriptor blocks for online growth (`resize_inode`), which
/// mkfs would otherwise write out as zeros: 508 KB of the 664 KB it writes for a 1 GiB
/// image, the largest part of a start's disk writes on a node making one layer a start.
pub fn make_fixed_size_filesystem(fs: Filesystem, device: &Path) -> Result<(), DiskError> {
    let no_growth: &[&str] = match fs {
        Filesystem::Ext4 => &["-O", "^resize_inode"],
        Filesystem::Xfs | Filesystem::Btrfs => &[],
    };
    format(fs, device, no_growth)
}

/// Runs `fs`'s mkfs with its options and `extra` on `device`.
fn format(fs: Filesystem, device: &Path, extra: &[&str]) -> Result<(), DiskError> {
    let (tool, args) = fs.mkfs();
    run(
        tool,
        fs.package(),
        Command::new(tool).args(args).args(extra).arg(device),
        device,
    )
}

/// Grows a mounted filesystem to fill its (already grown) device.
pub fn grow_filesystem(fs: Filesystem, device: &Path, mount_path: &Path) -> Result<(), DiskError> {
    match fs {
        Filesystem::Ext4 => {
            match run(
                "resize2fs",
                fs.package(),
                Command::new("resize2fs").arg(device),
                device,
            ) {
                Err(DiskError::ToolFailed { stderr, .. })
                    if stderr.contains("Permission denied to resize") =>
                {
                    Err(DiskError::OnlineGrowthDenied(device.to_path_buf()))
                }
                other => other,
            }
        }
        Filesystem::Xfs => run(
            "xfs_growfs",
            fs.package(),
            Command::new("xfs_growfs").arg(mount_path),
            mount_path,
        ),
        Filesystem::Btrfs => run(
            "btrfs",
            fs.package(),
            Command::new("btrfs")
                .args(["filesystem", "resize", "max"])
                .arg(mount_path),
            mount_path,
        ),
    }
}

/// Grows an unmounted ext4 image file in place: the fallback when online growth is refused.
/// resize2fs insists on a freshly checked filesystem, so e2fsck runs first (it fixes nothing
/// on a cleanly unmounted filesystem, and exit code 1 means it only tidied up).
pub fn grow_ext4_offline(image: &Path) -> Result<(), DiskError> {
    let package = Filesystem::Ext4.package();
    match run(
        "e2fsck",
        package,
        Command::new("e2fsck").args(["-f", "-p"]).arg(image),
        image,
    ) {
        Err(DiskError::ToolFailed { status, .. }) if status == "1" => {}
        other => other?,
    }
    run(
        "resize2fs",
        package,
        Command::new("resize2fs").arg(image),
        image,
    )
}

fn run(
    tool: &'static str,
    package: &'static str,
    command: &mut Command,
    target: &Path,
) -> Result<(), DiskError> {
    // The tool must not outlive an agent killed with -9: an orphaned mkfs would keep writing
    // to a device that the restarted agent is busy rolling back.
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(DiskError::MissingTool { tool, package })
        }
        Err(e) => return Err(DiskError::io("running", tool, e)),
    };
    if output.status.success() {
        return Ok(());
    }
    Err(DiskError::ToolFailed {
        tool: tool.to_string(),
        target: target.to_path_buf(),
        status: output
            .status
            .code()
            .map_or_else(|| "signal".to_string(), |c| c.to_string()),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a fixed-size ext4 leaves out, and what it writes, against a growable one.
    #[test]
    fn fixed_size_ext4_reserves_no_growth_blocks_and_writes_less() {
        use std::os::unix::fs::MetadataExt;
        // Removed on drop, also when an assertion fails.
        let dir = tempfile::Builder::new()
            .prefix("mrtst-fixed-fs")
            .tempdir()
            .unwrap();
        let formatted = |name: &str, fixed: bool| {
            let image = dir.path().join(name);
            crate::create_sparse_image(&image, 1 << 30).unwrap();
            if fixed {
                make_fixed_size_filesystem(Filesystem::Ext4, &image).unwrap();
            } else {
                make_filesystem(Filesystem::Ext4, &image).unwrap();
            }
            let out = Command::new("dumpe2fs")
                .arg("-h")
                .arg(&image)
                .output()
                .unwrap();
            let header = String::from_utf8_lossy(&out.stdout).to_string();
            let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
            (header, allocated)
        };
        let (growable, growable_bytes) = formatted("growable.img", false);
        let (fixed, fixed_bytes) = formatted("fixed.img", true);
        let features = |h: &str| {
            h.lines()
                .find(|l| l.starts_with("Filesystem features:"))
                .unwrap_or_default()
                .to_string()
        };
        assert!(features(&growable).contains("resize_inode"), "{growable}");
        assert!(!features(&fixed).contains("resize_inode"), "{fixed}");
        assert!(features(&fixed).contains("has_journal"), "{fixed}");
        assert!(
            fixed_bytes + 256 * 1024 < growable_bytes,
            "fixed {fixed_bytes} B, growable {growable_bytes} B"
        );
    }

    #[test]
    fn parses_filesystems() {
        assert_eq!("xfs".parse::<Filesystem>(), Ok(Filesystem::Xfs));
        let err = "zfs".parse::<Filesystem>().unwrap_err();
        assert!(err.contains("ext4, xfs or btrfs"), "{err}");
    }
}
