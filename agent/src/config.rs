use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/miren";
pub const DEFAULT_SOCKET: &str = "/run/miren/agent.sock";
pub const DEFAULT_NAME_PREFIX: &str = "miren";
pub const DEFAULT_RUN_DIR: &str = "/run/miren";

/// Everything one agent instance owns. Two agents with different values never touch each
/// other's resources: every path lives under `data_dir` and every kernel-visible name starts
/// with `name_prefix`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub name_prefix: String,
    /// Group (besides root) allowed to use the socket.
    pub socket_gid: Option<u32>,
    pub reclaim_interval: Duration,
    /// Sandbox subnet (CIDR); the gateway is its first address, on the agent's gateway link.
    pub subnet: String,
    /// Runtime state that must not survive a reboot (netns bind mounts).
    pub run_dir: PathBuf,
    /// `REGISTRY=MIRROR` rewrites of where images are fetched from.
    pub image_mirrors: Vec<String>,
    pub allow_insecure_mirrors: bool,
    /// Named places backups and archives go (`core::targets`), besides `local`.
    pub backup_targets: Vec<crate::core::targets::TargetSpec>,
    pub default_backup_target: Option<String>,
    /// PostgreSQL archive retention and base backup schedule.
    pub pitr: crate::core::addons::postgres::archive::PitrSettings,
}

impl AgentConfig {
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("state.db")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("disks")
    }
    pub fn mounts_dir(&self) -> PathBuf {
        self.data_dir.join("mounts")
    }
    pub fn local_dir(&self) -> PathBuf {
        self.data_dir.join("local")
    }
    pub fn image_path(&self, disk_id: &str) -> PathBuf {
        self.images_dir().join(format!("{disk_id}.img"))
    }
    /// Host path where a disk is mounted: prefixed, so `findmnt` tells whose mount it is.
    pub fn mount_path(&self, disk_id: &str) -> PathBuf {
        self.mounts_dir()
            .join(format!("{}-{}", self.name_prefix, disk_id))
    }
}

/// The prefix ends up in interface names (15 bytes at most, with room for a suffix), so it is
/// short, lowercase and starts with a letter.
pub fn validate_name_prefix(prefix: &str) -> Result<(), String> {
    let ok_chars = prefix
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let starts_with_letter = prefix
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase());
    if prefix.is_empty() || prefix.len() > 8 || !ok_chars || !starts_with_letter {
        return Err(format!(
            "name prefix `{prefix}` is invalid: use 1-8 lowercase letters and digits, starting with a letter (e.g. `miren`)"
        ));
    }
    Ok(())
}

pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!(
            "socket group `{name}` does not exist: create it with `groupadd {name}` or pass a numeric gid"
        )),
        Err(e) => Err(format!("looking up group `{name}`: {e}")),
    }
}

pub fn is_within(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(validate_name_prefix("miren").is_ok());
        assert!(validate_name_prefix("mrtst1a2").is_ok());
        for bad in ["", "Miren", "1abc", "toolongprefix", "a-b"] {
            assert!(validate_name_prefix(bad).is_err(), "{bad}");
        }
    }
}
