//! What a sandbox is asked to be, typed: the API's `RunSandbox` (strings such as `NAME:/path:ro`,
//! `256M`, `always`) is parsed into it once at the edge, and apps and addons build it directly.

use std::time::Duration;

use miren_runtime::sandbox::{self, Resources, RestartPolicy};

use crate::core::disks::DEFAULT_LEASE_TIMEOUT;
use crate::core::error::Error;
use crate::core::validate;
use miren_netns::PublishedPort;
use miren_sys::name::Name;

use crate::core::net::published_port;
use crate::model::RunSandbox;

/// Limits of every sandbox whose request (or app.toml service) does not set its own; see
/// docs/sandbox.md. Memory and swap: 512 MiB; tasks: 1024; CPU: one core.
pub const DEFAULT_MEMORY_BYTES: u64 = 512 << 20;
pub const DEFAULT_PIDS: i64 = 1024;
pub const DEFAULT_CPUS: f64 = 1.0;
/// The writable layer (container writes to its own root filesystem).
pub use sandbox::DEFAULT_WRITABLE_BYTES;
/// A `--tmpfs` mount without a size.
pub const DEFAULT_TMPFS_BYTES: u64 = 64 << 20;

/// A disk mounted into the sandbox, leased for its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskMount {
    pub disk: String,
    /// Absolute, without `..`.
    pub path: String,
    pub read_only: bool,
}

/// A private tmpfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpfsMount {
    pub path: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct SandboxRequest {
    /// An image reference; pulled if it is not on the node.
    pub image: String,
    pub name: Option<Name>,
    /// The app it belongs to (network isolation, local storage); default: its name.
    pub app: Option<Name>,
    /// `K=V` (the OCI form), applied over the image's environment.
    pub env: Vec<String>,
    pub resources: Resources,
    pub disks: Vec<DiskMount>,
    /// How long to wait for each disk's lease.
    pub lease_timeout: Duration,
    /// Where the app's local storage directory appears inside.
    pub local_dir: Option<String>,
    pub tmpfs: Vec<TmpfsMount>,
    pub restart: RestartPolicy,
    pub publish: Vec<PublishedPort>,
    /// Other apps whose sandboxes may reach this one.
    pub allow_from: Vec<String>,
    /// Command and arguments; empty: the image's entrypoint and cmd.
    pub cmd: Vec<String>,
}

impl SandboxRequest {
    /// A request for `image` with every default: no disks, no restarts, default limits.
    pub fn new(image: impl Into<String>) -> SandboxRequest {
        SandboxRequest {
            image: image.into(),
            name: None,
            app: None,
            env: Vec::new(),
            resources: Resources {
                memory_bytes: Some(DEFAULT_MEMORY_BYTES),
                cpus: Some(DEFAULT_CPUS),
                pids: Some(DEFAULT_PIDS),
                writable_bytes: Some(DEFAULT_WRITABLE_BYTES),
            },
            disks: Vec::new(),
            lease_timeout: DEFAULT_LEASE_TIMEOUT,
            local_dir: None,
            tmpfs: Vec::new(),
            restart: RestartPolicy::No,
            publish: Vec::new(),
            allow_from: Vec::new(),
            cmd: Vec::new(),
        }
    }

    /// Parses the API's request: each field checked (a 400 naming it), each string form
    /// (`NAME:/path:ro`, `/path:64M`, `256M`, `always`) read into its type.
    pub fn from_api(req: RunSandbox) -> Result<SandboxRequest, Error> {
        validate::run_sandbox(&req)?;
        let disks = req
            .disks
            .iter()
            .map(|d| parse_disk(d))
            .collect::<Result<_, _>>()?;
        let memory_bytes = req
            .memory
            .as_deref()
            .map(parse_memory)
            .transpose()?
            .unwrap_or(DEFAULT_MEMORY_BYTES);
        let writable_bytes = match req.writable_size.as_deref() {
            Some(s) => {
                let bytes = parse_size("writable_size", s)?;
                if !(sandbox::MIN_WRITABLE_BYTES..=sandbox::MAX_WRITABLE_BYTES).contains(&bytes) {
                    return Err(Error::invalid(format!(
                        "writable_size `{s}`: give between 16M and 16T"
                    )));
                }
                bytes
            }
            None => DEFAULT_WRITABLE_BYTES,
        };
        let tmpfs = req
            .tmpfs
            .iter()
            .map(|t| parse_tmpfs(t))
            .collect::<Result<_, _>>()?;
        let local_dir = req
            .local_dir
            .as_deref()
            .map(|p| container_path("local dir", p))
            .transpose()?;
        let lease_timeout = req
            .lease_timeout_secs
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(DEFAULT_LEASE_TIMEOUT, Duration::from_secs_f64);
        let request = SandboxRequest {
            resources: Resources {
                memory_bytes: Some(memory_bytes),
                cpus: Some(req.cpus.unwrap_or(DEFAULT_CPUS)),
                pids: Some(req.pids.unwrap_or(DEFAULT_PIDS)),
                writable_bytes: Some(writable_bytes),
            },
            restart: restart_policy(req.restart.as_deref())?,
            disks,
            lease_timeout,
            local_dir,
            tmpfs,
            image: req.image,
            name: req.name.map(|n| validate::to_name("name", n)).transpose()?,
            app: req.app.map(|a| validate::to_name("app", a)).transpose()?,
            env: req.env,
            publish: req
                .publish
                .iter()
                .map(published_port)
                .collect::<Result<_, _>>()?,
            allow_from: req.allow_from,
            cmd: req.cmd,
        };
        // Every field was checked above (`validate::run_sandbox`); `run_request` checks the
        // typed request once more, as it does for every caller.
        Ok(request)
    }

    /// What a type cannot say: every request, however it was built (the API's, a deploy's from
    /// app.toml, an addon's), passes here before anything is recorded.
    pub fn check(&self) -> Result<(), Error> {
        validate::image_reference("image", &self.image)?;
        validate::env("env", &self.env)?;
        validate::command("cmd", &self.cmd)?;
        for (i, app) in self.allow_from.iter().enumerate() {
            validate::name(&format!("allow_from[{i}]"), app)?;
        }
        for mount in &self.disks {
            miren_disks::validate_name(&mount.disk).map_err(|e| Error::invalid(e.to_string()))?;
            container_path("disk mount", &mount.path)?;
        }
        for tmpfs in &self.tmpfs {
            container_path("tmpfs", &tmpfs.path)?;
            if tmpfs.size_bytes < 4096 {
                return Err(Error::invalid(format!(
                    "tmpfs `{}`: give at least 4K (or no size for {}M)",
                    tmpfs.path,
                    DEFAULT_TMPFS_BYTES >> 20
                )));
            }
        }
        if let Some(dir) = &self.local_dir {
            container_path("local dir", dir)?;
        }
        let r = &self.resources;
        if let Some(bytes) = r.memory_bytes {
            if bytes < 4 << 20 {
                return Err(Error::invalid(format!(
                    "memory {bytes} bytes is below the 4M a sandbox needs"
                )));
            }
            if bytes > validate::MAX_MEMORY {
                return Err(Error::invalid(format!(
                    "memory {bytes} bytes is more than the 1024G a sandbox may ask for"
                )));
            }
        }
        if let Some(writable) = r.writable_bytes {
            if !(sandbox::MIN_WRITABLE_BYTES..=sandbox::MAX_WRITABLE_BYTES).contains(&writable) {
                return Err(Error::invalid(format!(
                    "writable_size `{writable}`: give between 16M and 16T"
                )));
            }
        }
        if let Some(cpus) = r.cpus {
            if !(cpus > 0.0 && cpus <= 1024.0) {
                return Err(Error::invalid(format!("cpus must be above 0, got {cpus}")));
            }
        }
        if r.pids.is_some_and(|p| p < 1) {
            return Err(Error::invalid("pids must be at least 1"));
        }
        if let Some(pids) = r.pids.filter(|p| *p > validate::MAX_PIDS) {
            return Err(Error::invalid(format!(
                "pids: a number from 1 to {}, got {pids}",
                validate::MAX_PIDS
            )));
        }
        Ok(())
    }
}

/// `256M`, `1G`, `512k`, `1048576` -> bytes.
pub fn parse_memory(s: &str) -> Result<u64, Error> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| Error::invalid(format!("memory `{s}`: write a size like 256M or 1G")))?;
    let factor = match unit.to_ascii_lowercase().trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => {
            return Err(Error::invalid(format!(
                "memory `{s}`: use a K, M or G suffix"
            )))
        }
    };
    let bytes = n.saturating_mul(factor);
    if bytes < 4 << 20 {
        return Err(Error::invalid(format!(
            "memory `{s}` is below the 4M a sandbox needs"
        )));
    }
    Ok(bytes)
}

fn restart_policy(s: Option<&str>) -> Result<RestartPolicy, Error> {
    Ok(match s.unwrap_or("no") {
        "no" => RestartPolicy::No,
        "on-failure" => RestartPolicy::OnFailure {
            max_retries: None,
            backoff: Default::default(),
        },
        "always" => RestartPolicy::Always {
            backoff: Default::default(),
        },
        other => {
            return Err(Error::invalid(format!(
                "restart policy `{other}`: choose no, on-failure or always"
            )))
        }
    })
}

fn container_path(what: &str, path: &str) -> Result<String, Error> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(Error::invalid(format!(
            "{what} `{path}` must be an absolute path inside the sandbox, without `..`"
        )));
    }
    Ok(path.to_string())
}

/// A size with an optional K, M, G or T suffix (powers of 1024); `field` names it in the error.
fn parse_size(field: &str, s: &str) -> Result<u64, Error> {
    miren_addons::app_toml::parse_size(s)
        .ok_or_else(|| Error::invalid(format!("{field} `{s}`: write a size like 64M or 2G")))
}

/// `/path[:size]`: a private tmpfs, [`DEFAULT_TMPFS_BYTES`] unless sized.
fn parse_tmpfs(spec: &str) -> Result<TmpfsMount, Error> {
    let (path, size) = match spec.rsplit_once(':') {
        Some((path, size)) => (path, parse_size("tmpfs size", size)?),
        None => (spec, DEFAULT_TMPFS_BYTES),
    };
    if size < 4096 {
        return Err(Error::invalid(format!(
            "tmpfs `{spec}`: give at least 4K (or no size for {}M)",
            DEFAULT_TMPFS_BYTES >> 20
        )));
    }
    Ok(TmpfsMount {
        path: container_path("tmpfs", path)?,
        size_bytes: size,
    })
}

/// `NAME:/path[:ro]`.
fn parse_disk(spec: &str) -> Result<DiskMount, Error> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (name, path, read_only) = match parts.as_slice() {
        [name, path] => (*name, *path, false),
        [name, path, "ro"] => (*name, *path, true),
        [name, path, "rw"] => (*name, *path, false),
        _ => {
            return Err(Error::invalid(format!(
                "disk `{spec}`: write NAME:/path or NAME:/path:ro"
            )))
        }
    };
    miren_disks::validate_name(name).map_err(|e| Error::invalid(e.to_string()))?;
    Ok(DiskMount {
        disk: name.to_string(),
        path: container_path("disk mount", path)?,
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(image: &str) -> RunSandbox {
        RunSandbox {
            image: image.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_api_strings_become_types() {
        let req = SandboxRequest::from_api(RunSandbox {
            disks: vec!["data:/var/lib/data:ro".into(), "logs:/logs".into()],
            tmpfs: vec!["/scratch:256M".into(), "/tmp".into()],
            memory: Some("256M".into()),
            writable_size: Some("2G".into()),
            restart: Some("always".into()),
            lease_timeout_secs: Some(1.5),
            ..api("busybox")
        })
        .unwrap();
        assert_eq!(
            req.disks,
            vec![
                DiskMount {
                    disk: "data".into(),
                    path: "/var/lib/data".into(),
                    read_only: true
                },
                DiskMount {
                    disk: "logs".into(),
                    path: "/logs".into(),
                    read_only: false
                },
            ]
        );
        assert_eq!(
            req.tmpfs,
            vec![
                TmpfsMount {
                    path: "/scratch".into(),
                    size_bytes: 256 << 20
                },
                TmpfsMount {
                    path: "/tmp".into(),
                    size_bytes: DEFAULT_TMPFS_BYTES
                },
            ]
        );
        assert_eq!(req.resources.memory_bytes, Some(256 << 20));
        assert_eq!(req.resources.writable_bytes, Some(2 << 30));
        assert!(matches!(req.restart, RestartPolicy::Always { .. }));
        assert_eq!(req.lease_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn defaults_are_the_documented_limits() {
        let parsed = SandboxRequest::from_api(api("busybox")).unwrap();
        let built = SandboxRequest::new("busybox");
        assert_eq!(parsed.resources, built.resources);
        assert_eq!(parsed.resources.memory_bytes, Some(DEFAULT_MEMORY_BYTES));
        assert!(matches!(parsed.restart, RestartPolicy::No));
        assert_eq!(parsed.lease_timeout, DEFAULT_LEASE_TIMEOUT);
    }

    #[test]
    fn bad_strings_and_bad_typed_values_are_refused() {
        for bad in [
            RunSandbox {
                disks: vec!["data".into()],
                ..api("busybox")
            },
            RunSandbox {
                disks: vec!["data:relative".into()],
                ..api("busybox")
            },
            RunSandbox {
                restart: Some("sometimes".into()),
                ..api("busybox")
            },
            RunSandbox {
                tmpfs: vec!["/t:1".into()],
                ..api("busybox")
            },
            RunSandbox {
                writable_size: Some("1M".into()),
                ..api("busybox")
            },
        ] {
            assert!(SandboxRequest::from_api(bad).is_err());
        }
        // A request built in code is checked too: a type does not make a path safe.
        let mut built = SandboxRequest::new("busybox");
        built.disks.push(DiskMount {
            disk: "data".into(),
            path: "/../etc".into(),
            read_only: false,
        });
        assert!(built.check().is_err());
        let mut built = SandboxRequest::new("busybox");
        built.env.push("NOEQUALS".into());
        assert!(built.check().is_err());
    }
}
