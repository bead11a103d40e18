//! `/proc/thread-self/mountinfo`, parsed once for every crate.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One mount, reduced to what the agent's crates need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub target: PathBuf,
    pub source: String,
    pub fstype: String,
    pub read_only: bool,
}

/// Every mount of the calling thread's mount namespace, in mountinfo order (a mount stacked over
/// another comes after it).
pub fn read_self() -> io::Result<Vec<MountEntry>> {
    // The calling thread's namespace (a thread may have one of its own; in a process
    // whose threads share it this is the same as /proc/self).
    Ok(parse(&fs::read_to_string("/proc/thread-self/mountinfo")?))
}

/// True if something is mounted at exactly `path` (compared after resolving symlinks, as
/// mountinfo shows resolved paths). A path that does not exist is not mounted.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let path = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(read_self()?.iter().any(|m| m.target == path))
}

/// Parses a whole mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

/// Format: `id parent maj:min root target options [optional...] - fstype source superoptions`.
pub fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let mut right = right.split(' ');
    let target = left.nth(4)?;
    let options = left.next()?;
    let fstype = right.next()?.to_string();
    let source = String::from_utf8_lossy(&unescape(right.next()?)).into_owned();
    Some(MountEntry {
        target: PathBuf::from(OsString::from_vec(unescape(target))),
        source,
        fstype,
        read_only: options.split(',').any(|o| o == "ro"),
    })
}

/// mountinfo escapes space, tab, newline and backslash as three octal digits (`\040`).
/// Anything else, including a backslash not followed by a valid byte value, is kept as is.
pub fn unescape(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(value) = bytes.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Three octal digits that fit a byte (`000` to `377`).
fn octal_byte(digits: &[u8]) -> Option<u8> {
    let mut value: u16 = 0;
    for d in digits {
        if !(b'0'..=b'7').contains(d) {
            return None;
        }
        value = value * 8 + u16::from(d - b'0');
    }
    u8::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_line_with_optional_fields_and_escapes() {
        let line = "36 35 98:0 / /mnt/my\\040disk rw,noatime master:1 shared:2 - ext4 /dev/loop\\0401 rw,errors=continue";
        let m = parse_line(line).expect("valid line");
        assert_eq!(m.target, PathBuf::from("/mnt/my disk"));
        assert_eq!(m.source, "/dev/loop 1");
        assert_eq!(m.fstype, "ext4");
        assert!(!m.read_only);
        let ro = parse_line("36 35 98:0 / /mnt/x ro,relatime - xfs /dev/loop2 ro").expect("valid");
        assert!(ro.read_only);
        assert!(parse_line("garbage").is_none());
        assert!(parse_line("1 2 3:4 / - ext4").is_none());
    }

    #[test]
    fn unescape_keeps_what_is_not_a_valid_octal_escape() {
        assert_eq!(unescape("a\\134b"), b"a\\b");
        assert_eq!(unescape("\\011\\012"), b"\t\n");
        // Not three octal digits, or more than a byte: kept literally (never a panic).
        assert_eq!(unescape("\\08x"), b"\\08x");
        assert_eq!(unescape("\\777"), b"\\777");
        assert_eq!(unescape("\\+12"), b"\\+12");
        assert_eq!(unescape("end\\04"), b"end\\04");
        assert_eq!(unescape("\\é12"), "\\é12".as_bytes());
    }

    #[test]
    fn the_root_is_a_mount_point_and_a_missing_path_is_not() {
        assert!(is_mount_point(Path::new("/")).expect("reading mountinfo"));
        assert!(!is_mount_point(Path::new("/nonexistent/mrtst-sys")).expect("missing path"));
        let mounts = read_self().expect("reading mountinfo");
        assert!(mounts.iter().any(|m| m.target == Path::new("/proc")));
    }
}
