//! Network namespaces pinned by bind mounts, and running netlink work inside them.
//!
//! Anything that changes a thread's namespace runs on a fresh OS thread that
//! exits afterwards, so no pooled (tokio) thread is ever left in a sandbox's
//! namespace.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use miren_sys::unmount::WhenBusy;
use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::{Error, Result};

/// `f_type` of the nsfs pseudo file system (linux/magic.h).
const NSFS_MAGIC: i64 = 0x6e73_6673;

fn io_error(context: impl Into<String>, source: impl Into<io::Error>) -> Error {
    Error::Io {
        context: context.into(),
        source: source.into(),
    }
}

/// True when `path` is a mounted namespace file.
// `f_type`'s integer type differs between architectures, hence the cast.
#[allow(clippy::unnecessary_cast)]
pub fn is_netns_mount(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 as i64 == NSFS_MAGIC)
        .unwrap_or(false)
}

/// Runs `work` on a new OS thread and waits for it without blocking the runtime.
async fn on_fresh_thread<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("miren-netns".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(|e| io_error(format!("spawning thread for {what}"), e))?;
    rx.await
        .map_err(|_| Error::ThreadPanicked(what.to_string()))?
}

/// Creates the empty file a namespace is bound on (and its directory); one left by an
/// interrupted call is reused.
fn create_mount_point(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io_error(format!("creating {}", dir.display()), e))?;
    }
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o444)
        .open(path)
        .map_err(|e| io_error(format!("creating {}", path.display()), e))?;
    Ok(())
}

/// Writes 1 to `net.ipv6.conf.<conf>.disable_ipv6` of the calling thread's network namespace
/// (`conf`: an interface, or `default` for every interface made from then on), through a proc
/// of its own (detached, gone when this returns) rather than the host's `/proc`: there, each
/// path step under `/proc/sys/net` compared the cached entry of every namespace looked up
/// under the same name (see [`host_conf_write`]), so making a namespace cost more the more
/// sandboxes ran (`docs/netns.md` "Scaling"). A fresh proc has only the entries this lookup
/// makes. Nothing to do on a kernel without IPv6.
pub(crate) fn ipv6_off(conf: &str) -> Result<()> {
    use miren_sys::fsmount::{detached, MountAttrs};
    let sysctl = format!("sys/net/ipv6/conf/{conf}/disable_ipv6");
    let failed = |e| io_error(format!("turning IPv6 off (/proc/{sysctl})"), e);
    let proc = detached(
        c"proc",
        MountAttrs::NOSUID | MountAttrs::NODEV | MountAttrs::NOEXEC,
    )
    .map_err(|e| io_error("making a proc to turn IPv6 off", e))?;
    let fd = match nix::fcntl::openat(
        &proc,
        sysctl.as_str(),
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(failed(e)),
    };
    nix::unistd::write(&fd, b"1").map_err(failed)?;
    Ok(())
}

/// A `conf` directory of the host's net sysctls: `/proc/sys/net/ipv4/conf` or
/// `/proc/sys/net/ipv6/conf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostConf {
    Ipv4,
    Ipv6,
}

static HOST_IPV4_CONF: std::sync::OnceLock<File> = std::sync::OnceLock::new();
static HOST_IPV6_CONF: std::sync::OnceLock<File> = std::sync::OnceLock::new();

/// Writes `value` to `net.<ipv4|ipv6>.conf.<link>.<name>` of this process's own network
/// namespace (the host's; never call it from a thread that entered another), through a
/// descriptor of the `conf` directory opened once. Why not by path: the kernel keeps one
/// cached entry per network namespace for each of `net`, `ipv4`/`ipv6` and `conf` under
/// `/proc/sys`, side by side under one name and told apart only by namespace, so a path
/// lookup compared every namespace's entry at each of those steps: with 1000 sandboxes,
/// `proc_sys_compare` was a tenth of an endpoint's create (`docs/netns.md` "Scaling"). From the
/// directory only `<link>` is looked up, a name no other namespace has. On a kernel without
/// IPv6, an IPv6 write has nothing to do.
pub(crate) fn host_conf_write(conf: HostConf, link: &str, name: &str, value: &str) -> Result<()> {
    let (cell, dir) = match conf {
        HostConf::Ipv4 => (&HOST_IPV4_CONF, "/proc/sys/net/ipv4/conf"),
        HostConf::Ipv6 => (&HOST_IPV6_CONF, "/proc/sys/net/ipv6/conf"),
    };
    let directory = match cell.get() {
        Some(directory) => directory,
        None => match File::open(dir) {
            Ok(opened) => cell.get_or_init(|| opened),
            Err(e) if e.kind() == io::ErrorKind::NotFound && conf == HostConf::Ipv6 => {
                return Ok(())
            }
            Err(e) => return Err(io_error(format!("opening {dir}"), e)),
        },
    };
    let relative = format!("{link}/{name}");
    let fd = nix::fcntl::openat(
        directory,
        relative.as_str(),
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| io_error(format!("opening {dir}/{relative}"), e))?;
    nix::unistd::write(&fd, value.as_bytes())
        .map_err(|e| io_error(format!("writing {dir}/{relative}"), e))?;
    Ok(())
}

/// A detached sysfs of one network namespace, made with it (see [`UnboundNetns`]): a sandbox
/// in that namespace gets it as its `/sys` without making one on its start's path. Valid
/// while held; another (root) process clones it from [`NetnsSysfs::proc_path`].
#[derive(Debug)]
pub struct NetnsSysfs(OwnedFd);

impl NetnsSysfs {
    /// `/proc/PID/fd/N` of this process's descriptor.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.0.as_raw_fd()
        ))
    }
}

/// A network namespace held only by an open file: nothing on the host names it, and it
/// ends when the file is closed (with the process that holds it, killed or not). With it,
/// when the kernel allows, a sysfs made in it.
#[derive(Debug)]
pub struct UnboundNetns {
    ns: File,
    sysfs: Option<NetnsSysfs>,
}

impl UnboundNetns {
    /// Makes a new network namespace, and a sysfs in it (on a fresh thread, which exits
    /// afterwards).
    pub async fn new() -> Result<UnboundNetns> {
        Self::make(true).await
    }

    async fn make(with_sysfs: bool) -> Result<UnboundNetns> {
        on_fresh_thread("making a network namespace", move || {
            unshare(CloneFlags::CLONE_NEWNET).map_err(|e| io_error("unshare(CLONE_NEWNET)", e))?;
            // Sandboxes are IPv4 only (the host forwards nothing else from them). Without this
            // every interface later made in the namespace, `eth0` included, took an IPv6
            // link-local address and sent router solicitations, a duplicate address probe and
            // MLD reports: seven multicast frames in its first seconds, each flooded over the
            // bridge's ports, so a start cost the host more the more sandboxes ran. `lo`, made
            // with the namespace, keeps `::1`. Here, on the thread in the new namespace: net
            // sysctls are the writer's namespace's.
            ipv6_off("default")?;
            let ns = File::open("/proc/thread-self/ns/net")
                .map_err(|e| io_error("opening /proc/thread-self/ns/net", e))?;
            // Without it the sandbox's container makes its own.
            let sysfs = if with_sysfs {
                miren_sys::sysfs::detached_sysfs().ok().map(NetnsSysfs)
            } else {
                None
            };
            Ok(UnboundNetns { ns, sysfs })
        })
        .await
    }

    /// Binds the namespace at `path`, which pins it from then on, and gives its sysfs; a
    /// path that already is a namespace is left as it is (and this one is dropped).
    pub fn bind_at(self, path: &Path) -> Result<Option<NetnsSysfs>> {
        if is_netns_mount(path) {
            return Ok(None);
        }
        create_mount_point(path)?;
        let source = format!("/proc/self/fd/{}", self.ns.as_raw_fd());
        mount(
            Some(source.as_str()),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| io_error(format!("bind-mounting netns on {}", path.display()), e))?;
        Ok(self.sysfs)
    }
}

/// Makes sure `path` is a bind mount of a network namespace, creating a new
/// namespace if it is missing. An empty file left by an interrupted call is reused.
pub async fn ensure_netns(path: &Path) -> Result<()> {
    if is_netns_mount(path) {
        return Ok(());
    }
    UnboundNetns::make(false).await?.bind_at(path).map(drop)
}

/// Unmounts and removes a namespace file; missing or unmounted is fine.
pub fn remove_netns(path: &Path) -> Result<()> {
    // Loop: two racing creates could have stacked two mounts.
    for _ in 0..8 {
        if !is_netns_mount(path) {
            break;
        }
        // An nsfs bind mount has no filesystem to flush: detach it outright.
        if let Err(e) = miren_sys::unmount::unmount(path, WhenBusy::DetachAlways) {
            return Err(io_error(format!("unmounting {}", path.display()), e));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(format!("removing {}", path.display()), e)),
    }
}

pub type NetlinkWork<T> =
    Box<dyn FnOnce(rtnetlink::Handle) -> Pin<Box<dyn Future<Output = Result<T>> + Send>> + Send>;

/// Runs netlink work with a connection opened inside the namespace at `path`.
pub async fn in_netns<T: Send + 'static>(path: &Path, work: NetlinkWork<T>) -> Result<T> {
    let ns_file =
        File::open(path).map_err(|e| io_error(format!("opening {}", path.display()), e))?;
    let what = format!("netlink work in {}", path.display());
    on_fresh_thread(&what.clone(), move || {
        setns(&ns_file, CloneFlags::CLONE_NEWNET).map_err(|e| io_error(what.clone(), e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| io_error("building a runtime", e))?;
        runtime.block_on(async move {
            let handle = crate::link::connect()?;
            work(handle).await
        })
    })
    .await
}
