//! The node as the addon driver uses it: disks, sandboxes and their network. [`NodeHost`] is
//! the real one; unit tests drive the addon lifecycle with a fake, without root.

use std::net::Ipv4Addr;
use std::sync::Arc;

use tracing::{info, warn};

use super::provider::BoxFuture;
use crate::core::disks::DiskService;
use crate::core::error::Error;
use crate::core::net::NetService;
use crate::core::sandboxes::{DiskMount, SandboxRequest, SandboxService};
use crate::model::{CreateDisk, FilesystemKind, Sandbox};
use crate::store::{Owner, Store};
use miren_runtime::sandbox::RestartPolicy;

/// What the driver needs to know of a server's sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSandbox {
    pub id: String,
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    /// Gave up (or its supervisor is gone): replaced, not waited for.
    pub failed: bool,
    pub restarts: u32,
    pub exit_code: Option<i32>,
}

impl ServerSandbox {
    pub fn from_sandbox(sandbox: &Sandbox) -> ServerSandbox {
        ServerSandbox {
            id: sandbox.id.clone(),
            name: sandbox.name.clone(),
            ip: sandbox.ip.as_deref().and_then(|ip| ip.parse().ok()),
            failed: sandbox.state.is_failed(),
            restarts: sandbox.restarts,
            exit_code: sandbox.exit_code,
        }
    }

    pub fn ip(&self) -> Result<Ipv4Addr, Error> {
        self.ip.ok_or_else(|| {
            Error::internal(format!(
                "addon server `{}` has no network address",
                self.name
            ))
        })
    }
}

/// A server sandbox to run: `image` with `env`, `disk` mounted at `mount_path`, restart
/// `always`, reachable by the apps in `allow_from` only.
#[derive(Debug, Clone)]
pub struct ServerLaunch {
    /// The display name it gets when free.
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// (disk name, mount path in the sandbox).
    pub disk: Option<(String, String)>,
    pub allow_from: Vec<String>,
    /// (memory bytes, CPUs) of a tier; `None`: the sandbox defaults.
    pub limits: Option<(u64, f64)>,
}

/// A mounted data disk's size and use (statvfs of its mount).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub size_gb: u64,
    pub total_bytes: u64,
    pub used_bytes: u64,
}

/// Disks, sandboxes and network as the addon driver uses them. Lookups are by owner, never by
/// name; every call is safe to repeat.
pub trait AddonHost: Send + Sync {
    /// The disk `owner` has, made (ext4, `size_gb`) or adopted under `name` if it has none;
    /// returns its name.
    fn ensure_disk<'a>(
        &'a self,
        owner: &'a Owner,
        name: &'a str,
        size_gb: u64,
    ) -> BoxFuture<'a, Result<String, Error>>;

    /// [`AddonHost::ensure_disk`], making a new disk with `filesystem`; an existing disk
    /// smaller than `size_gb` is grown (online where its filesystem allows).
    fn ensure_disk_as<'a>(
        &'a self,
        owner: &'a Owner,
        name: &'a str,
        size_gb: u64,
        _filesystem: FilesystemKind,
    ) -> BoxFuture<'a, Result<String, Error>> {
        self.ensure_disk(owner, name, size_gb)
    }

    /// `owner`'s disk's size and use, if it has a mounted one.
    fn disk_usage(&self, _owner: &Owner) -> Result<Option<DiskUsage>, Error> {
        Ok(None)
    }

    /// Grows `owner`'s disk to `size_gb` (never shrinks it).
    fn grow_disk<'a>(
        &'a self,
        _owner: &'a Owner,
        _size_gb: u64,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    /// Deletes `owner`'s disk and its data, if it has one.
    fn remove_disk<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>>;

    /// Removes `dir` (relative to the disk's root) from a mounted disk, if it is there.
    fn discard_dir<'a>(&'a self, disk: &'a str, dir: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Flushes a mounted disk to stable storage (`syncfs`).
    fn sync_disk<'a>(&'a self, disk: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// The sandbox `owner` runs, if any.
    fn server_sandbox(&self, owner: &Owner) -> Result<Option<ServerSandbox>, Error>;

    /// A sandbox by id, as it is now.
    fn sandbox(&self, id: &str) -> Result<ServerSandbox, Error>;

    /// Removes the unowned sandbox an agent from before migration 8 ran under `name`, if any.
    fn remove_unowned_server<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Runs a server sandbox for `owner`.
    fn run_server<'a>(
        &'a self,
        owner: &'a Owner,
        launch: ServerLaunch,
    ) -> BoxFuture<'a, Result<ServerSandbox, Error>>;

    fn delete_sandbox<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>>;

    /// Stops a sandbox without restarting it (SIGTERM to its process, SIGKILL after `grace`)
    /// and waits for its exit: a server shuts down cleanly before its sandbox is deleted.
    /// A host without processes has nothing to stop.
    fn stop_sandbox<'a>(
        &'a self,
        _sandbox_id: &'a str,
        _grace: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async { Ok(()) })
    }

    /// Deletes the sandbox `owner` runs; none is fine.
    fn delete_owned<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>>;

    /// Lets exactly `apps` reach the sandbox.
    fn set_allow_from<'a>(
        &'a self,
        sandbox_id: &'a str,
        apps: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// The last `lines` lines of the sandbox's output, joined by ` | `, for error reasons.
    fn log_tail(&self, sandbox_id: &str, lines: usize) -> String;

    /// Runs `command` inside the running sandbox; a non-zero exit is an error with its
    /// output.
    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        command: SandboxCommand,
    ) -> BoxFuture<'a, Result<(), Error>>;

    /// Runs `args` in a running sandbox; returns its exit code and the end of its stderr.
    fn exec_status<'a>(
        &'a self,
        _sandbox_id: &'a str,
        _args: Vec<String>,
    ) -> BoxFuture<'a, Result<(i32, String), Error>> {
        Box::pin(async {
            Err(Error::internal(
                "this host cannot run commands in sandboxes",
            ))
        })
    }
}

/// A command an addon runs inside one of its sandboxes (e.g. a pooler's reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCommand {
    pub argv: Vec<String>,
    /// `KEY=VALUE`, beside the sandbox's own environment.
    pub env: Vec<String>,
}

/// The real node: the agent's disk, sandbox and network services.
pub struct NodeHost {
    pub store: Arc<Store>,
    pub disks: Arc<DiskService>,
    pub net: Arc<NetService>,
    pub sandboxes: Arc<SandboxService>,
}

impl NodeHost {
    fn mount_of(&self, disk: &str) -> Result<String, Error> {
        let view = self.disks.view_one(&self.disks.find(disk)?)?;
        view.mount_path
            .ok_or_else(|| Error::busy(format!("disk `{disk}` is not mounted")))
    }
}

impl AddonHost for NodeHost {
    fn ensure_disk<'a>(
        &'a self,
        owner: &'a Owner,
        name: &'a str,
        size_gb: u64,
    ) -> BoxFuture<'a, Result<String, Error>> {
        self.ensure_disk_as(owner, name, size_gb, FilesystemKind::Ext4)
    }

    fn ensure_disk_as<'a>(
        &'a self,
        owner: &'a Owner,
        name: &'a str,
        size_gb: u64,
        filesystem: FilesystemKind,
    ) -> BoxFuture<'a, Result<String, Error>> {
        Box::pin(async move {
            let disks = self.disks.clone();
            let req = CreateDisk {
                name: name.to_string(),
                size_gb,
                filesystem: Some(filesystem),
                read_only: false,
            };
            let owner = owner.clone();
            tokio::task::spawn_blocking(move || {
                let name = disks.ensure_for_addon(&req, &owner)?;
                let row = disks.find(&name)?;
                if row.size_gb < size_gb {
                    info!(disk = %name, from = row.size_gb, to = size_gb, "growing an addon's disk to its tier's size");
                    disks.resize(&row.id, size_gb)?;
                }
                Ok(name)
            })
            .await
            .map_err(|e| Error::internal(format!("creating a disk: {e}")))?
        })
    }

    fn disk_usage(&self, owner: &Owner) -> Result<Option<DiskUsage>, Error> {
        let Some(row) = self.store.disk_of(owner)? else {
            return Ok(None);
        };
        let Some(mount) = self.disks.view_one(&row)?.mount_path else {
            return Ok(None);
        };
        let stat = nix::sys::statvfs::statvfs(mount.as_str())
            .map_err(|e| Error::internal(format!("statvfs {mount}: {e}")))?;
        let fragment = stat.fragment_size();
        let total = stat.blocks() * fragment;
        let used = total.saturating_sub(stat.blocks_free() * fragment);
        Ok(Some(DiskUsage {
            size_gb: row.size_gb,
            total_bytes: total,
            used_bytes: used,
        }))
    }

    fn grow_disk<'a>(&'a self, owner: &'a Owner, size_gb: u64) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let Some(row) = self.store.disk_of(owner)? else {
                return Ok(());
            };
            if row.size_gb >= size_gb {
                return Ok(());
            }
            let disks = self.disks.clone();
            tokio::task::spawn_blocking(move || disks.resize(&row.id, size_gb).map(drop))
                .await
                .map_err(|e| Error::internal(format!("growing a disk: {e}")))?
        })
    }

    fn remove_disk<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let Some(row) = self.store.disk_of(owner)? else {
                return Ok(());
            };
            // The server is gone, but a reader may still hold files on its disk for a moment
            // (a base backup streaming the data directory fails once the server stops):
            // a busy disk is tried again for a while before the removal reports it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            loop {
                let disks = self.disks.clone();
                let id = row.id.clone();
                let result = tokio::task::spawn_blocking(move || match disks.delete(&id) {
                    Err(e) if e.is_not_found() => Ok(()),
                    other => other,
                })
                .await
                .map_err(|e| Error::internal(format!("deleting a disk: {e}")))?;
                match result {
                    Err(e)
                        if e.kind == crate::core::error::ErrorKind::Busy
                            && std::time::Instant::now() < deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    }
                    other => return other,
                }
            }
        })
    }

    fn discard_dir<'a>(&'a self, disk: &'a str, dir: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let data = std::path::Path::new(&self.mount_of(disk)?).join(dir);
            tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&data) {
                Ok(()) => {
                    info!(dir = %data.display(), "discarded the data directory of a server that never answered");
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::internal(format!(
                    "removing {}: {e}",
                    data.display()
                ))),
            })
            .await
            .map_err(|e| Error::internal(format!("discarding a data directory: {e}")))?
        })
    }

    fn sync_disk<'a>(&'a self, disk: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let mount = self.mount_of(disk)?;
            tokio::task::spawn_blocking(move || -> Result<(), Error> {
                let dir = std::fs::File::open(&mount)
                    .map_err(|e| Error::internal(format!("opening {mount}: {e}")))?;
                nix::unistd::syncfs(&dir)
                    .map_err(|e| Error::internal(format!("syncing {mount}: {e}")))
            })
            .await
            .map_err(|e| Error::internal(format!("syncing a disk: {e}")))?
        })
    }

    fn server_sandbox(&self, owner: &Owner) -> Result<Option<ServerSandbox>, Error> {
        Ok(self
            .sandboxes
            .get_owned(owner)?
            .as_ref()
            .map(ServerSandbox::from_sandbox))
    }

    fn sandbox(&self, id: &str) -> Result<ServerSandbox, Error> {
        Ok(ServerSandbox::from_sandbox(&self.sandboxes.get(id)?))
    }

    fn remove_unowned_server<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            // Users cannot name sandboxes in the addon space, so an unowned one there is ours.
            if let Some(old) = self.store.sandbox(name)? {
                if old.owner.is_none() && old.app == old.name {
                    warn!(sandbox = %name, "replacing an addon server recorded without an owner");
                    self.sandboxes.delete(&old.id).await?;
                }
            }
            Ok(())
        })
    }

    fn run_server<'a>(
        &'a self,
        owner: &'a Owner,
        launch: ServerLaunch,
    ) -> BoxFuture<'a, Result<ServerSandbox, Error>> {
        Box::pin(async move {
            let name = self.sandboxes.free_name(&launch.name, owner)?;
            // The network app is the server's own name, in the addon name space no app can
            // take, so no app's sandboxes count as the server's for isolation.
            let mut req = SandboxRequest::new(launch.image);
            req.name = Some(name.clone());
            req.app = Some(name);
            req.env = launch.env;
            req.cmd = launch.command;
            req.disks = launch
                .disk
                .map(|(disk, path)| DiskMount {
                    disk,
                    path,
                    read_only: false,
                })
                .into_iter()
                .collect();
            req.lease_timeout = std::time::Duration::from_secs(30);
            req.restart = RestartPolicy::Always {
                backoff: Default::default(),
            };
            req.allow_from = launch.allow_from;
            if let Some((memory_bytes, cpus)) = launch.limits {
                req.resources.memory_bytes = Some(memory_bytes);
                req.resources.cpus = Some(cpus);
            }
            let sandbox = self.sandboxes.run_request(req, Some(owner.clone())).await?;
            Ok(ServerSandbox::from_sandbox(&sandbox))
        })
    }

    fn delete_sandbox<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.sandboxes.delete(id))
    }

    fn stop_sandbox<'a>(
        &'a self,
        sandbox_id: &'a str,
        grace: std::time::Duration,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            self.sandboxes
                .stop(sandbox_id, Some(grace))
                .await
                .map(|_| ())
        })
    }

    fn delete_owned<'a>(&'a self, owner: &'a Owner) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.sandboxes.delete_owned(owner))
    }

    fn set_allow_from<'a>(
        &'a self,
        sandbox_id: &'a str,
        apps: &'a [String],
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(self.net.set_allow_from(sandbox_id, apps))
    }

    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        command: SandboxCommand,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            let done = self
                .sandboxes
                .exec(sandbox_id, command.argv.clone(), command.env)
                .await?;
            if done.exit_code == 0 {
                return Ok(());
            }
            Err(Error::internal(format!(
                "`{}` in sandbox {sandbox_id} exited with {}: {}",
                command.argv.join(" "),
                done.exit_code,
                done.stderr.trim()
            )))
        })
    }

    fn exec_status<'a>(
        &'a self,
        sandbox_id: &'a str,
        args: Vec<String>,
    ) -> BoxFuture<'a, Result<(i32, String), Error>> {
        Box::pin(async move {
            let out = self.sandboxes.exec(sandbox_id, args, Vec::new()).await?;
            Ok((out.exit_code, out.stderr))
        })
    }

    fn log_tail(&self, sandbox_id: &str, lines: usize) -> String {
        let Ok((stdout, stderr)) = self.sandboxes.log_files(sandbox_id) else {
            return "(no logs)".into();
        };
        let mut text = String::new();
        for file in stdout.iter().chain(stderr.iter()) {
            if let Ok(content) = std::fs::read_to_string(file) {
                text.push_str(&content);
            }
        }
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        if tail.is_empty() {
            return "(nothing)".into();
        }
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}
