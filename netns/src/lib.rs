//! Per-sandbox network namespaces for the miren agent.
//!
//! One gateway link per agent (`<prefix>0`, a bridge without ports holding the gateway
//! address), one routed veth pair and one bind-mounted network namespace per endpoint, and
//! one nftables table named after the prefix (`inet <prefix>`: isolation between endpoints,
//! their addresses' checks, NAT). See `docs/netns.md` for the design.
//!
//! Every create/delete call is idempotent and safe to repeat after the caller
//! was killed between any two steps.

mod endpoint;
mod files;
mod host;
mod libnft;
mod link;
mod nsfs;
mod pool;
mod rules;
mod subnet;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub use endpoint::{
    create_endpoint, delete_endpoint, delete_endpoint_by_key, ensure_bridge_and_table,
    list_kernel_objects, uninstall, Endpoint, KernelEndpoint, KernelObjects,
};
pub use files::{hosts_file, resolv_conf, resolv_conf_from_host, ResolvConf};
pub use host::{check_publish, overlaps, PublishRefused};
pub use nsfs::{ensure_netns, NetnsSysfs, UnboundNetns};
pub use pool::NetnsPool;
pub use rules::{
    add_endpoint_rules, admission_change_json, apply_rules, change_admission,
    endpoint_removal_json, endpoint_rules_json, publish_switch_json, remove_endpoint_rules,
    ruleset_json, switch_published,
};
pub use subnet::Subnet;

/// Linux's IFNAMSIZ minus the terminating NUL.
pub const MAX_IFNAME_LEN: usize = 15;
/// Longest app name (in `app` and `allow_from`).
pub const MAX_APP_LEN: usize = 120;
/// Longest accepted prefix: leaves room for `-` and a six-character key.
pub const MAX_PREFIX_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid subnet {0}")]
    InvalidSubnet(String),
    #[error("subnet {0} has no free address left")]
    SubnetExhausted(Subnet),
    #[error("invalid prefix {0:?}: 1-{MAX_PREFIX_LEN} characters, a lowercase letter then lowercase letters or digits")]
    InvalidPrefix(String),
    #[error("invalid endpoint: {0}")]
    InvalidEndpoint(String),
    #[error("bridge {0} does not exist; call ensure_bridge_and_table first")]
    BridgeMissing(String),
    #[error("interface {name} belongs to owner {found:?}, not {wanted:?} (name hash collision)")]
    OwnerCollision {
        name: String,
        found: String,
        wanted: String,
    },
    #[error("netlink: {context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nftables: {0}")]
    Nftables(#[from] nftables::helper::NftablesError),
    #[error("nftables: {0}")]
    Libnftables(String),
    #[error(transparent)]
    PublishRefused(#[from] PublishRefused),
    #[error("worker thread for {0} panicked")]
    ThreadPanicked(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What one agent owns: every kernel object it makes is named from `prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    prefix: String,
    subnet: Subnet,
    runtime_dir: PathBuf,
}

impl NetConfig {
    /// `prefix`: 1-8 chars `[a-z][a-z0-9]*`; `runtime_dir`: where netns files
    /// are bind-mounted (e.g. `/run/miren/netns`), created if missing.
    pub fn new(prefix: &str, subnet: Subnet, runtime_dir: impl Into<PathBuf>) -> Result<Self> {
        let mut chars = prefix.chars();
        let valid = prefix.len() <= MAX_PREFIX_LEN
            && chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !valid {
            return Err(Error::InvalidPrefix(prefix.to_string()));
        }
        Ok(NetConfig {
            prefix: prefix.to_string(),
            subnet,
            runtime_dir: runtime_dir.into(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// `<prefix>0`: the gateway's link (a bridge without ports).
    pub fn bridge_name(&self) -> String {
        format!("{}0", self.prefix)
    }

    /// Name of the nftables table (`inet` family; an older agent also had a `bridge` one).
    pub fn table_name(&self) -> String {
        self.prefix.clone()
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }

    /// Stable per-owner key `<prefix>-<hash>`, exactly 15 characters: the
    /// host veth's name and the netns file's name.
    pub fn endpoint_key(&self, owner: &str) -> String {
        let hash_len = MAX_IFNAME_LEN - self.prefix.len() - 1;
        format!("{}-{}", self.prefix, base32_hash(owner, hash_len))
    }

    /// True when `name` has the shape of one of this config's endpoint keys.
    pub fn is_endpoint_key(&self, name: &str) -> bool {
        name.len() == MAX_IFNAME_LEN
            && name
                .strip_prefix(self.prefix.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|hash| hash.bytes().all(|b| BASE32.contains(&b)))
    }

    pub fn netns_path(&self, key: &str) -> PathBuf {
        self.runtime_dir.join(key)
    }
}

/// A TCP port of an endpoint published on a host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublishedPort {
    /// `127.0.0.1` for host-only access; `0.0.0.0` means every local address.
    pub host_ip: Ipv4Addr,
    pub host_port: u16,
    pub endpoint_port: u16,
}

impl PublishedPort {
    /// Publish on `127.0.0.1:host_port`.
    pub fn loopback(host_port: u16, endpoint_port: u16) -> Self {
        PublishedPort {
            host_ip: Ipv4Addr::LOCALHOST,
            host_port,
            endpoint_port,
        }
    }
}

/// Everything the crate needs to know about one endpoint: used both to create
/// it and, for the whole set, to generate the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    /// Stable id of the sandbox that owns the endpoint.
    pub owner: String,
    pub app: String,
    pub ip: Ipv4Addr,
    /// Other apps whose endpoints may open connections to this one.
    pub allow_from: Vec<String>,
    pub publish: Vec<PublishedPort>,
}

impl EndpointSpec {
    pub fn new(owner: impl Into<String>, app: impl Into<String>, ip: Ipv4Addr) -> Self {
        EndpointSpec {
            owner: owner.into(),
            app: app.into(),
            ip,
            allow_from: Vec::new(),
            publish: Vec::new(),
        }
    }

    fn validate(&self, cfg: &NetConfig) -> Result<()> {
        if self.owner.is_empty() || self.owner.len() > 255 {
            return Err(Error::InvalidEndpoint("owner must be 1-255 bytes".into()));
        }
        // App names become nftables set and chain names (hex, 255 bytes at most).
        let app_ok = |app: &String| !app.is_empty() && app.len() <= MAX_APP_LEN;
        if !app_ok(&self.app) || !self.allow_from.iter().all(app_ok) {
            return Err(Error::InvalidEndpoint(format!(
                "app names must be 1-{MAX_APP_LEN} bytes"
            )));
        }
        if !cfg.subnet.is_assignable(self.ip) {
            return Err(Error::InvalidEndpoint(format!(
                "{} is not an assignable address of {}",
                self.ip, cfg.subnet
            )));
        }
        Ok(())
    }
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// FNV-1a 64, rendered as `len` base32 characters: stable across versions.
fn base32_hash(text: &str, len: usize) -> String {
    let hash = miren_sys::fnv::fnv1a64(text.as_bytes());
    (0..len)
        .map(|i| char::from(BASE32[((hash >> (5 * i)) & 31) as usize]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endpoint keys name veths and netns files that outlive the agent: they never change.
    #[test]
    fn endpoint_keys_and_bridge_macs_are_pinned() {
        assert_eq!(cfg("miren").endpoint_key("sandbox-42"), "miren-ndrvo44j7");
        assert_eq!(cfg("mrtst1a2").endpoint_key("pid:1234"), "mrtst1a2-unx5l5");
        assert_eq!(cfg("m").endpoint_key(""), "m-fzieccs44u4xm");
        assert_eq!(
            format!("{:02x?}", crate::endpoint::bridge_mac("miren")),
            "[02, a5, 28, 5f, 62, cc]"
        );
    }

    fn cfg(prefix: &str) -> NetConfig {
        NetConfig::new(prefix, "10.88.0.0/16".parse().expect("subnet"), "/run/x")
            .expect("valid config")
    }

    #[test]
    fn names_fit_ifnamsiz() {
        for prefix in ["m", "miren", "mrtst1a2"] {
            let c = cfg(prefix);
            let key = c.endpoint_key("sandbox-42");
            assert_eq!(key.len(), MAX_IFNAME_LEN);
            assert!(c.is_endpoint_key(&key));
            assert!(c.bridge_name().len() <= MAX_IFNAME_LEN);
            assert_eq!(key, c.endpoint_key("sandbox-42"), "stable");
            assert_ne!(key, c.endpoint_key("sandbox-43"));
        }
        assert_eq!(cfg("miren").bridge_name(), "miren0");
    }

    #[test]
    fn keys_of_other_prefixes_are_not_ours() {
        let short = cfg("mrtst");
        let long = cfg("mrtsta");
        assert!(!short.is_endpoint_key(&long.endpoint_key("x")));
        assert!(!long.is_endpoint_key(&short.endpoint_key("x")));
        assert!(!short.is_endpoint_key("mrtst0"));
    }

    #[test]
    fn rejects_bad_prefixes() {
        let subnet: Subnet = "10.88.0.0/16".parse().expect("subnet");
        for bad in ["", "Miren", "1miren", "mi-ren", "miren1234", "mi ren"] {
            assert!(NetConfig::new(bad, subnet, "/run/x").is_err(), "{bad:?}");
        }
    }
}
