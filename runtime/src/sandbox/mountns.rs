//! The supervisor's own mount namespace, so that neither the host's mount table nor any
//! supervisor's grows with the number of sandboxes.
//!
//! Every start used to read the whole mount table many times (libcgroups' v1 manager parses
//! `/proc/self/mountinfo` once per controller, about 40 times a start) and copy it (each
//! container's mount namespace), and the host's table had three lines per running sandbox:
//! its writable layer, its overlay root and its netns file. Now the agent makes its data dir
//! and its netns dir mount roots of their own ([`prepare_private_roots`]), and a supervisor,
//! in a namespace of its own, detaches its copies of both (one `umount2` each drops every
//! other sandbox's mounts, so nothing of a deleted sandbox stays pinned by a later one),
//! attaches again only their top mounts (clones taken in the host's namespace, without
//! submounts), its own disks and spare layer (clones too), and mounts its layer and overlay
//! there: the host never has them, and they go with the namespace once the supervisor and
//! its container are gone.
//!
//! A spare supervisor makes this namespace while it waits ([`prepare`]), with its layer in
//! it; the start only brings in its disks ([`Prepared::bring`]), so the unshare is off the
//! start's path. It copies the agent's small [`MountTemplate`] rather than the host's whole
//! table (a netns file per sandbox), whose copy held the mount lock a start waits for, and
//! clones the roots there too ([`clone_roots`]).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::fcntl::{open, openat, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;

use super::control::is_mounted;
use super::SandboxError;

/// The host's root, opened before leaving its mount namespace: paths looked up from it cross
/// the host's mounts, including those made after we left.
static HOST_ROOT: OnceLock<OwnedFd> = OnceLock::new();

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// A mount the sandbox keeps in its namespace: `source` in the host's, `target` in ours.
pub(crate) struct Keep {
    pub source: PathBuf,
    pub target: PathBuf,
    /// Unmount it from the host once cloned (the spare layer: the host must not hold it).
    pub take: bool,
}

/// Makes each of `dirs` a mount root (a private bind mount of itself) if it is not one and
/// nothing is mounted under it yet, and returns those that are mount roots: the ones a
/// supervisor may detach in its own namespace (`SandboxSpec::private_mounts`). A dir with
/// mounts under it but none of its own (an agent of an older version left sandboxes running)
/// is left as it is and not returned: a bind over it would hide those mounts from the host
/// while keeping them; sandboxes then use the host's namespace until a restart with nothing
/// mounted. Call at agent start, before disks and endpoints are restored.
pub fn prepare_private_roots(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, SandboxError> {
    let mut roots = Vec::new();
    for dir in dirs {
        std::fs::create_dir_all(dir)
            .map_err(|e| SandboxError::io(format!("mkdir {}", dir.display()), e))?;
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| SandboxError::io(format!("resolve {}", dir.display()), e))?;
        if !is_mounted(&dir) {
            let table = miren_sys::mountinfo::read_self()
                .map_err(|e| SandboxError::io("read /proc/self/mountinfo", e))?;
            if table.iter().any(|m| m.target.starts_with(&dir)) {
                eprintln!(
                    "{} has mounts but is not a mount root: sandboxes use the host's mount namespace until the agent starts with nothing mounted there",
                    dir.display()
                );
                continue;
            }
            let fail = |e| SandboxError::sys(format!("bind {} onto itself", dir.display()), e);
            mount(
                Some(&dir),
                &dir,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(fail)?;
            // Private: what the agent mounts there is not copied to any other namespace.
            mount(
                None::<&str>,
                &dir,
                None::<&str>,
                MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(fail)?;
        }
        roots.push(dir);
    }
    Ok(roots)
}

fn c_path(path: &Path) -> Result<CString, SandboxError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| SandboxError::InvalidSpec(format!("path {} has a NUL", path.display())))
}

/// A detached copy of the mount at `path` (with its submounts if `recursive`).
fn clone_mount(path: &Path, recursive: bool) -> Result<OwnedFd, SandboxError> {
    let c = c_path(path)?;
    let flags = OPEN_TREE_CLONE
        | libc::O_CLOEXEC as libc::c_uint
        | if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `c` is NUL-terminated and outlives the call; open_tree reads only it and
    // returns a new descriptor (or -1), which we own from here on.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(SandboxError::sys(
            format!("clone the mount at {}", path.display()),
            nix::errno::Errno::last(),
        ));
    }
    // SAFETY: a descriptor open_tree just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches the detached mount `tree` at `target` in our namespace.
fn attach(tree: &OwnedFd, target: &Path) -> Result<(), SandboxError> {
    let c = c_path(target)?;
    move_tree(tree, libc::AT_FDCWD, &c, 0)
        .map_err(|e| SandboxError::sys(format!("attach a mount at {}", target.display()), e))
}

/// `move_mount` of the detached `tree` onto `to` (relative to `to_dir`; `extra_flags` adds
/// `MOVE_MOUNT_T_EMPTY_PATH` to mount on `to_dir` itself).
fn move_tree(
    tree: &OwnedFd,
    to_dir: libc::c_int,
    to: &std::ffi::CStr,
    extra_flags: libc::c_uint,
) -> Result<(), nix::errno::Errno> {
    let empty = c"";
    // SAFETY: both strings are NUL-terminated and outlive the call; move_mount only reads
    // them and the descriptors, which stay their owners'.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            to_dir,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | extra_flags,
        )
    };
    if rc < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(())
}

/// Moves this (single-threaded) supervisor into a mount namespace of its own (see the module
/// doc): `roots` (mount roots on the host) show only their top mount there, plus `keep`.
/// `Ok(false)`, and nothing changed, when it cannot (no roots, a root that is not a mount
/// root, a kernel without `open_tree`): the sandbox then uses the host's namespace. Call
/// once, before the overlay and the layer are mounted.
pub(crate) fn enter(
    roots: &[PathBuf],
    keep: &[Keep],
    needed: &[PathBuf],
) -> Result<bool, SandboxError> {
    enter_from(None, roots, keep, needed)
}

/// [`enter`], copying the namespace at `base` (a [`MountTemplate`]'s path) instead of the
/// host's when it can be joined.
fn enter_from(
    base: Option<&Path>,
    roots: &[PathBuf],
    keep: &[Keep],
    needed: &[PathBuf],
) -> Result<bool, SandboxError> {
    match make_own(base, roots, keep, needed)? {
        Some(host_root) => {
            let _ = HOST_ROOT.set(host_root);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The work of [`enter_from`] on the calling thread; the host's root (opened before
/// leaving its namespace) when done, `None` when nothing was changed.
fn make_own(
    base: Option<&Path>,
    roots: &[PathBuf],
    keep: &[Keep],
    needed: &[PathBuf],
) -> Result<Option<OwnedFd>, SandboxError> {
    if roots.is_empty() || !roots.iter().all(|r| is_mounted(r)) {
        return Ok(None);
    }
    // Parents first: a root under another is no mount of its own once that one is detached.
    let mut roots: Vec<&PathBuf> = roots.iter().collect();
    roots.sort_by_key(|r| r.components().count());
    let Some(root_trees) = clone_roots(base, &roots)? else {
        return Ok(None);
    };
    let mut kept = Vec::new();
    for k in keep {
        kept.push(clone_mount(&k.source, true)?);
    }
    for k in keep.iter().filter(|k| k.take) {
        super::control::unmount(&k.source)?;
    }
    let host_root = open(
        "/",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SandboxError::sys("open /", e))?;
    if let Some(base) = base {
        // What the unshare copies: the template's few mounts, not the host's table.
        if let Err(e) = join_template(base) {
            eprintln!("{e}: copying the host's mount table instead");
        }
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::sys("unshare a mount namespace", e))?;
    // Slave: on a host whose mounts are shared, ours still never go back.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys("make mounts slave", e))?;
    for (root, tree) in roots.iter().zip(&root_trees) {
        if is_mounted(root) {
            // Our copies of every mount under it go in one call.
            umount2(root.as_path(), MntFlags::MNT_DETACH)
                .map_err(|e| SandboxError::sys(format!("detach {}", root.display()), e))?;
        }
        attach(tree, root)?;
    }
    for (k, tree) in keep.iter().zip(&kept) {
        std::fs::create_dir_all(&k.target)
            .map_err(|e| SandboxError::io(format!("mkdir {}", k.target.display()), e))?;
        attach(tree, &k.target)?;
    }
    for root in &roots {
        // The clones may share the host's propagation: what we mount stays here.
        mount(
            None::<&str>,
            root.as_path(),
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| SandboxError::sys(format!("make {} private", root.display()), e))?;
    }
    drop_foreign_mounts(&roots, needed)?;
    Ok(Some(host_root))
}

/// Clones of the top mounts of `roots`; `None`, with a word why, if one cannot be made.
/// Taken in the namespace at `base` (the template) when it can be joined, and we are back in
/// ours when this returns: a clone checks every mount under the one it clones
/// (`has_locked_children`), and the host's netns root has one per sandbox where the
/// template's has none (0.4 ms of each spare at 1000 sandboxes).
fn clone_roots(
    base: Option<&Path>,
    roots: &[&PathBuf],
) -> Result<Option<Vec<OwnedFd>>, SandboxError> {
    let ours = match base {
        Some(base) => {
            let ours = open_mount_ns()?;
            join_template(base).is_ok().then_some(ours)
        }
        None => None,
    };
    let trees: Result<Vec<OwnedFd>, SandboxError> =
        roots.iter().map(|root| clone_mount(root, false)).collect();
    if let Some(ours) = &ours {
        join_mount_ns(ours, "host's")?;
    }
    match trees {
        Ok(trees) => Ok(Some(trees)),
        Err(e) => {
            eprintln!("{e}: the sandbox uses the host's mount namespace");
            Ok(None)
        }
    }
}

fn join_template(base: &Path) -> Result<(), SandboxError> {
    let fail = |e| SandboxError::sys(format!("join the mount template {}", base.display()), e);
    let ns = open(base, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(fail)?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS).map_err(fail)
}

/// A small mount namespace for spares to copy, held by a parked thread of the agent.
///
/// A spare's `unshare(CLONE_NEWNS)` copies the mount table of the namespace it is in, under
/// the kernel's global mount lock, and then detaches the copies of the agent's roots again.
/// In the host's namespace that table has a netns file per sandbox: at 500 sandboxes the copy
/// and the detach took about 2 ms, in which every mount of a start running beside it (its
/// container's `/proc`, `/sys`, `/dev`, `pivot_root`) waited for that lock (bench/density).
/// The template is [`enter`]'s namespace made once, at agent start, with no sandbox mounts:
/// the host's base mounts and the roots' top mounts. A spare joins it and copies that
/// instead; what it then does is what it did from the host's (its roots detached and attached
/// again from fresh clones, its layer brought in, foreign mounts dropped). The namespace
/// goes with its thread when this is dropped or the agent exits: nothing is left on the host.
pub struct MountTemplate {
    path: PathBuf,
    /// Dropping it ends the parked thread, and with it the namespace.
    _release: std::sync::mpsc::Sender<()>,
}

impl MountTemplate {
    /// Makes the template for `roots` (the agent's mount roots, from
    /// [`prepare_private_roots`]); `Ok(None)` when spares could not use one (no roots, or
    /// they are not mount roots), in which case they copy the host's table as before.
    pub fn new(roots: &[PathBuf]) -> Result<Option<MountTemplate>, SandboxError> {
        if roots.is_empty() {
            return Ok(None);
        }
        let roots = roots.to_vec();
        let (made_tx, made_rx) = std::sync::mpsc::channel();
        let (release, parked) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("miren-mnt-template".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                // This thread only: unshare gives it its own mount namespace and root.
                let made = make_own(None, &roots, &[], &[]).map(|own| own.is_some());
                let keep = matches!(made, Ok(true));
                let _ = made_tx.send(made.map(|m| m.then(nix::unistd::gettid)));
                if keep {
                    // Until the template is dropped (the sender goes) or the agent exits.
                    let _ = parked.recv();
                }
            })
            .map_err(|e| SandboxError::io("start the mount template's thread", e))?;
        let made = made_rx
            .recv()
            .map_err(|_| SandboxError::StartFailed("the mount template's thread died".into()))?;
        Ok(made?.map(|tid| MountTemplate {
            path: PathBuf::from(format!(
                "/proc/{}/task/{}/ns/mnt",
                std::process::id(),
                tid.as_raw()
            )),
            _release: release,
        }))
    }

    /// Where a spare joins it (`/proc/PID/task/TID/ns/mnt`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A mount namespace a spare supervisor made with [`prepare`] while it waited for a
/// sandbox: `roots` attached, foreign mounts dropped, the spare's layer in it. What a start
/// still needs from the host (its disks) it brings with [`Prepared::bring`]: unsharing
/// copies the host's whole mount table (a netns file per sandbox), so doing it at the start
/// made every start slower by the number already running (bench/density: `sup.mountns`
/// 2-4 ms at 0, 5-6 ms at 500).
pub(crate) struct Prepared {
    /// The host's mount namespace, to take clones of mounts made there since.
    host_ns: OwnedFd,
    /// Ours.
    own_ns: OwnedFd,
    roots: Vec<PathBuf>,
}

fn open_mount_ns() -> Result<OwnedFd, SandboxError> {
    open(
        "/proc/self/ns/mnt",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SandboxError::sys("open /proc/self/ns/mnt", e))
}

fn join_mount_ns(ns: &OwnedFd, which: &str) -> Result<(), SandboxError> {
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| SandboxError::sys(format!("join the {which} mount namespace"), e))
}

/// [`enter`] ahead of any sandbox, from a spare: `roots` (the agent's mount roots) and
/// `keep` (the spare's layer). `Ok(None)` when the namespace cannot be made (see [`enter`]):
/// the start then makes it. An error leaves this process in a state no sandbox may use.
pub(crate) fn prepare(
    roots: &[PathBuf],
    keep: &[Keep],
    template: Option<&Path>,
) -> Result<Option<Prepared>, SandboxError> {
    let host_ns = open_mount_ns()?;
    if !enter_from(template, roots, keep, &[])? {
        return Ok(None);
    }
    Ok(Some(Prepared {
        host_ns,
        own_ns: open_mount_ns()?,
        roots: roots.to_vec(),
    }))
}

impl Prepared {
    /// Whether a sandbox with these roots and `needed` paths can use this namespace: what
    /// it reads lies under the roots, whose top mounts are here (mounts under them come with
    /// [`Prepared::bring`]); a path elsewhere may be on a host mount made or dropped since.
    pub(crate) fn fits(&self, roots: &[PathBuf], needed: &[PathBuf]) -> bool {
        self.roots == roots
            && needed
                .iter()
                .all(|n| self.roots.iter().any(|r| n.starts_with(r)))
    }

    /// Back to the host's namespace (for a sandbox this one does not fit); ours goes once
    /// nothing holds it. Unmount what of ours must not outlive it first (the layer).
    pub(crate) fn leave(self) -> Result<(), SandboxError> {
        join_mount_ns(&self.host_ns, "host's")
    }

    /// Attaches here clones of the host's mounts that `keep` names (a sandbox's disks,
    /// mounted on the host, not here; its layer's subvolume). `keep` runs in the host's
    /// namespace, where those are to be seen. `take` is not honoured: nothing of a spare's
    /// is on the host.
    pub(crate) fn bring(
        self,
        keep: impl FnOnce() -> Result<Vec<Keep>, SandboxError>,
    ) -> Result<(), SandboxError> {
        join_mount_ns(&self.host_ns, "host's")?;
        let cloned = keep().and_then(|keep| {
            let trees: Result<Vec<OwnedFd>, SandboxError> =
                keep.iter().map(|k| clone_mount(&k.source, true)).collect();
            trees.map(|t| (keep, t))
        });
        // Back in ours whatever happened: the caller fails the start from here.
        join_mount_ns(&self.own_ns, "sandbox's")?;
        let (keep, trees) = cloned?;
        for (k, tree) in keep.iter().zip(&trees) {
            std::fs::create_dir_all(&k.target)
                .map_err(|e| SandboxError::io(format!("mkdir {}", k.target.display()), e))?;
            attach(tree, &k.target)?;
        }
        Ok(())
    }
}

/// Detaches our copy of every host mount this sandbox does not need. A copy that does not
/// follow the host (all of them on a host whose root is private, as here; another agent's
/// private roots anywhere) would keep what it holds alive after the host unmounts it: another
/// agent's disks (their loop devices stay backed, and a fresh mount of the same image would
/// sit beside a live superblock) and its netns files, for as long as this supervisor lives.
/// Kept: `/`, the kernel's `/proc`, `/sys` and `/dev`, our roots (fresh clones), their
/// parents, and the mounts that hold a `needed` path (bind sources, image layers, the
/// sandbox's own dir, its netns file).
fn drop_foreign_mounts(roots: &[&PathBuf], needed: &[PathBuf]) -> Result<(), SandboxError> {
    let table = miren_sys::mountinfo::read_self()
        .map_err(|e| SandboxError::io("read /proc/self/mountinfo", e))?;
    let kernel = [Path::new("/proc"), Path::new("/sys"), Path::new("/dev")];
    let is_needed = |target: &Path| {
        target == Path::new("/")
            || kernel.iter().any(|k| target.starts_with(k))
            || roots
                .iter()
                .any(|r| target.starts_with(r) || r.starts_with(target))
            || needed.iter().any(|n| n.starts_with(target))
    };
    let mut foreign: Vec<PathBuf> = table
        .into_iter()
        .map(|m| m.target)
        .filter(|t| !is_needed(t))
        .collect();
    // Parents first: detaching one takes every mount under it along.
    foreign.sort_by_key(|t| t.components().count());
    let mut detached: Vec<PathBuf> = Vec::new();
    for target in foreign {
        if detached
            .iter()
            .any(|d| target != *d && target.starts_with(d))
        {
            continue;
        }
        match umount2(target.as_path(), MntFlags::MNT_DETACH) {
            // Gone already (the host unmounted it, or a stacked one went first).
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(SandboxError::sys(
                    format!("detach our copy of {}", target.display()),
                    e,
                ))
            }
        }
        detached.push(target);
    }
    Ok(())
}

/// Shows here what the host has mounted at `path` since we left its namespace (the
/// endpoint's netns, which the agent bind-mounts while the supervisor prepares). A no-op in
/// the host's namespace or if it is already a mount here.
pub(crate) fn follow_host_mount(path: Option<&Path>) -> Result<(), SandboxError> {
    let (Some(path), Some(root)) = (path, HOST_ROOT.get()) else {
        return Ok(());
    };
    if is_mounted(path) {
        return Ok(());
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    let fail = |e| SandboxError::sys(format!("bind the host's {}", path.display()), e);
    let fd = openat(
        root,
        relative,
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    // Binding a namespace file is allowed across mount namespaces (nsfs).
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(
        Some(source.as_str()),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(fail)
}

/// Mounts the container's `/sys` at `target` (in its rootfs) before libcontainer creates it,
/// for a sandbox in a network namespace of its own, whose sysfs must be made in that
/// namespace. `source` is where the agent holds one it made with the namespace (off the
/// start's path: making a sysfs walks every sysfs superblock on the host, one per sandbox);
/// it is cloned if it is a sysfs, otherwise one is made here, inside `netns`. Read-only,
/// nosuid, nodev, noexec, like the `/sys` of the OCI default. Nothing to do if one is there
/// (a restart of the sandbox's process). True when the agent's was used.
pub(crate) fn attach_sysfs(
    target: &Path,
    source: Option<&Path>,
    netns: &Path,
) -> Result<bool, SandboxError> {
    // The image's `/sys`: never followed if it is a symlink (mkdir does not follow one, the
    // open below refuses one), so the mount lands in the rootfs whatever the image holds.
    match std::fs::create_dir(target) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(SandboxError::io(format!("mkdir {}", target.display()), e))
        }
        _ => {}
    }
    let dir = open(
        target,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SandboxError::sys(format!("open {}", target.display()), e))?;
    if is_mounted(target) {
        return Ok(false);
    }
    let premade = source
        .and_then(|s| clone_mount(s, false).ok())
        .filter(is_sysfs);
    let cloned = premade.is_some();
    let tree = match premade {
        Some(tree) => tree,
        None => sysfs_in(netns)?,
    };
    move_tree(&tree, dir.as_raw_fd(), c"", MOVE_MOUNT_T_EMPTY_PATH)
        .map_err(|e| SandboxError::sys(format!("mount a sysfs at {}", target.display()), e))?;
    Ok(cloned)
}

// `f_type`'s integer type differs between architectures, hence the cast.
#[allow(clippy::unnecessary_cast)]
fn is_sysfs(tree: &OwnedFd) -> bool {
    nix::sys::statfs::fstatfs(tree)
        .is_ok_and(|fs| fs.filesystem_type().0 as i64 == miren_sys::sysfs::SYSFS_MAGIC)
}

/// A detached sysfs made inside `netns`; this (single-threaded) process goes back to its
/// own network namespace before returning, whatever happened.
fn sysfs_in(netns: &Path) -> Result<OwnedFd, SandboxError> {
    use nix::sched::{setns, CloneFlags};
    let open = |p: &Path| {
        std::fs::File::open(p).map_err(|e| SandboxError::io(format!("open {}", p.display()), e))
    };
    let own = open(Path::new("/proc/self/ns/net"))?;
    let theirs = open(netns)?;
    setns(&theirs, CloneFlags::CLONE_NEWNET)
        .map_err(|e| SandboxError::sys(format!("enter {}", netns.display()), e))?;
    let made = miren_sys::sysfs::detached_sysfs();
    setns(&own, CloneFlags::CLONE_NEWNET)
        .map_err(|e| SandboxError::sys("return to the supervisor's netns", e))?;
    made.map_err(|e| SandboxError::io(format!("make a sysfs in {}", netns.display()), e))
}

/// Unmounts the `/sys` [`attach_sysfs`] put at `target`, if any (sysfs holds no data, so
/// at once even if busy). An image's symlink there is never followed.
pub(crate) fn detach_sysfs(target: &Path) {
    let plain_dir = std::fs::symlink_metadata(target).is_ok_and(|m| m.is_dir());
    if plain_dir && is_mounted(target) {
        let _ = umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
    }
}
