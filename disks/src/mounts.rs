use std::fs;
use std::path::{Path, PathBuf};

use sys_mount::{Mount, MountFlags, UnmountFlags};

use crate::{DiskError, Filesystem};

/// One line of /proc/self/mountinfo, reduced to what reconciliation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub target: PathBuf,
    pub source: String,
    pub fstype: String,
    pub read_only: bool,
}

/// Mounts `device` at `target` (created if missing). `discard` lets deleted files give their
/// space back to the host, which is what keeps a thin-provisioned image thin over time.
pub fn mount(
    device: &Path,
    target: &Path,
    fs: Filesystem,
    read_only: bool,
) -> Result<(), DiskError> {
    fs::create_dir_all(target).map_err(|e| DiskError::io("creating mount point", target, e))?;
    let mut flags = MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let attempt = || {
        Mount::builder()
            .fstype(fs.as_str())
            .flags(flags)
            .data(fs.mount_options())
            .mount(device, target)
            .map(|_| ())
    };
    let mut result = attempt();
    // A btrfs copy (a restore) has its source's fsid. If udev's `btrfs device scan` registered
    // the new loop device before the mount, the kernel refuses it as a second device of the
    // mounted source (EEXIST); forgetting the unmounted registration lets the mount give the
    // copy a temporary fsid, as it does when nothing raced it.
    for _ in 0..3 {
        match &result {
            Err(e) if fs == Filesystem::Btrfs && e.raw_os_error() == Some(libc::EEXIST) => {
                let _ = std::process::Command::new("btrfs")
                    .args(["device", "scan", "--forget"])
                    .arg(device)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                std::thread::sleep(std::time::Duration::from_millis(50));
                result = attempt();
            }
            _ => break,
        }
    }
    result.map_err(|e| DiskError::io("mounting", target, e))
}

/// Switches an existing mount between read-only and read-write.
pub fn remount(target: &Path, fs: Filesystem, read_only: bool) -> Result<(), DiskError> {
    let mut flags = MountFlags::REMOUNT | MountFlags::NOSUID | MountFlags::NODEV;
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    Mount::builder()
        .flags(flags)
        .data(fs.mount_options())
        .mount("", target)
        .map(|_| ())
        .map_err(|e| DiskError::io("remounting", target, e))
}

/// Unmounts `target`; a path that is not mounted (or gone) is fine.
pub fn unmount(target: &Path) -> Result<(), DiskError> {
    match sys_mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(DiskError::io(
            "unmounting (a process still uses files under it; stop it first)",
            target,
            e,
        )),
        Err(e) => Err(DiskError::io("unmounting", target, e)),
    }
}

/// The mount at exactly `target`, if any (the topmost one when stacked).
pub fn mount_point_of(target: &Path) -> Result<Option<MountEntry>, DiskError> {
    Ok(read_mountinfo()?
        .into_iter()
        .rev()
        .find(|m| m.target == target))
}

/// Every mount at or below `dir`.
pub fn mounts_under(dir: &Path) -> Result<Vec<MountEntry>, DiskError> {
    Ok(read_mountinfo()?
        .into_iter()
        .filter(|m| m.target.starts_with(dir))
        .collect())
}

fn read_mountinfo() -> Result<Vec<MountEntry>, DiskError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|e| DiskError::io("reading", path, e))?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

/// Format: `id parent maj:min root target options [optional...] - fstype source superoptions`.
fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let mut right = right.split(' ');
    let target = unescape(left.get(4)?);
    let options = left.get(5)?;
    let fstype = right.next()?.to_string();
    let source = unescape(right.next()?);
    Some(MountEntry {
        target: PathBuf::from(target),
        source,
        fstype,
        read_only: options.split(',').any(|o| o == "ro"),
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && bytes.len() - i >= 4 {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let line = "36 35 7:3 / /var/lib/mi\\040ren/m ro,relatime shared:1 - ext4 /dev/loop3 ro";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.target, PathBuf::from("/var/lib/mi ren/m"));
        assert_eq!(m.source, "/dev/loop3");
        assert_eq!(m.fstype, "ext4");
        assert!(m.read_only);
        assert!(parse_mountinfo_line("garbage").is_none());
    }
}
