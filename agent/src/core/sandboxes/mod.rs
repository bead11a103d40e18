//! Sandboxes as the agent manages them. The sandbox's own supervisor (`miren supervise`, see
//! `miren_runtime::sandbox`) runs it and records how it runs in its state dir, so the agent can
//! die and come back without the sandbox noticing. The agent's row says the sandbox exists; its
//! disk leases and network endpoint are held under the sandbox id, and are freed when the row
//! goes (or by reconciliation if a run or delete was cut short).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use miren_runtime::sandbox::{self, Mount, SandboxSpec, State, User};
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::core::disks::DiskService;
use crate::core::error::Error;
use crate::core::images::ImageService;
use crate::core::net::{EndpointRequest, NetService};
use crate::core::owner::Holder;
use crate::core::status::SandboxState;
use crate::core::validate;
use crate::model::{ExecResult, RunSandbox, Sandbox};
use crate::store::{Owner, SandboxRow, SandboxStatus, Store};
use crate::util::{new_id, now_rfc3339};
use miren_sys::name::Name;

/// First bytes on stderr of `miren exec-in` when the exec itself failed (not the command).
pub const EXEC_ERROR_MARK: &str = "miren-exec-error: ";

mod heap;
mod request;
mod start;
pub use request::{
    parse_memory, DiskMount, SandboxRequest, TmpfsMount, DEFAULT_CPUS, DEFAULT_MEMORY_BYTES,
    DEFAULT_PIDS, DEFAULT_TMPFS_BYTES, DEFAULT_WRITABLE_BYTES,
};

pub struct SandboxService {
    cfg: AgentConfig,
    store: Arc<Store>,
    disks: Arc<DiskService>,
    net: Arc<NetService>,
    images: Arc<ImageService>,
    spares: Spares,
    /// Mount roots a supervisor detaches in its own mount namespace (see
    /// [`prepare_private_roots`]); empty if they could not be made.
    private_mounts: Vec<PathBuf>,
    /// One stop, delete or relaunch at a time per sandbox id.
    locks: crate::util::KeyedLocks,
}

/// The dirs under which the host holds per-sandbox mounts: the data dir (writable layers,
/// overlays, disks) and the netns dir.
fn private_root_dirs(cfg: &AgentConfig) -> [PathBuf; 2] {
    [
        cfg.data_dir.clone(),
        crate::core::net::netns_dir(&cfg.run_dir),
    ]
}

/// Makes the data dir and the netns dir mount roots of their own (private bind mounts of
/// themselves), so that each supervisor can drop its copies of every other sandbox's mounts
/// in one call (`miren_runtime::sandbox::prepare_private_roots`, docs/sandbox.md "Cost of one
/// more sandbox"). Call at start, before disks and endpoints are restored. On failure
/// sandboxes run in the host's mount namespace, as before.
pub fn prepare_private_roots(cfg: &AgentConfig) {
    if let Err(e) = sandbox::prepare_private_roots(&private_root_dirs(cfg)) {
        warn!(error = %e, "sandboxes use the host's mount namespace");
    }
}

/// Supervisors are this binary, forked by the spare factory (or re-executed). A few are kept
/// ahead of need (spares, waiting for a sandbox id on their stdin, each with a writable layer
/// of the default size made and mounted), so a start waits neither for a new process nor for
/// mkfs. One taken is replaced at once, while its start goes on: with a replacement made only
/// after a start, starts one after another each waited for most of the next spare's making
/// (20-45 ms: bench/density, docs/sandbox.md "Cost").
#[derive(Clone)]
struct Spares {
    sandboxes_dir: PathBuf,
    /// The agent's mount roots: a spare makes its mount namespace from them while it waits.
    private_mounts: Vec<PathBuf>,
    /// The small namespace a spare copies its own from (instead of the host's table, which
    /// has a netns file per sandbox); `None`: the host's.
    mount_template: Option<Arc<sandbox::MountTemplate>>,
    ready: Arc<std::sync::Mutex<std::collections::VecDeque<sandbox::Spare>>>,
    factory: Arc<std::sync::Mutex<Factory>>,
}

/// The spare factory (`sandbox::SpareFactory`): spares are forks of it, sharing its pages
/// (the binary's relocated data above all: an exec'd supervisor had 1.1 MB of its own).
/// Started with the first spare and again when it fails; `broken` when a new one failed
/// too, and spares are exec'd from then on.
#[derive(Default)]
struct Factory {
    running: Option<sandbox::SpareFactory>,
    broken: bool,
}

/// How many spares are kept: the second one has had a whole start's time to get ready when a
/// burst of starts (a deploy, a node filling up) reaches it.
const SPARES: usize = 2;

impl Spares {
    fn ready(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<sandbox::Spare>> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The supervisor for `state_dir` (spec written): the oldest spare (it has had the most
    /// time to get ready), or a new one. Blocking.
    fn launch(&self, state_dir: &Path) -> Result<sandbox::Launch, Error> {
        loop {
            let spare = self.ready().pop_front();
            let Some(spare) = spare else { break };
            match spare.assign(state_dir) {
                Ok(launch) => return Ok(launch),
                Err(gone) => gone.retire(),
            }
        }
        Ok(sandbox::spawn(self.command(state_dir)?, state_dir)?)
    }

    /// A fresh supervisor's command for `state_dir`.
    fn command(&self, state_dir: &Path) -> Result<std::process::Command, Error> {
        let mut cmd = crate::util::own_binary();
        cmd.arg("supervise").arg("--state-dir").arg(state_dir);
        Ok(cmd)
    }

    /// `miren supervise` for a spare, or (`factory`) for the spare factory.
    fn spare_command(&self, factory: bool) -> std::process::Command {
        let mut cmd = crate::util::own_binary();
        cmd.arg("supervise")
            .arg("--sandboxes-dir")
            .arg(&self.sandboxes_dir);
        for root in &self.private_mounts {
            cmd.arg("--private-mount").arg(root);
        }
        if let Some(template) = &self.mount_template {
            cmd.arg("--mount-template").arg(template.path());
        }
        if factory {
            cmd.arg("--factory");
        }
        cmd
    }

    /// A spare forked by the factory (started first if there is none); `None` when there is
    /// no factory to ask. Blocking.
    fn forked_spare(&self) -> Option<sandbox::Spare> {
        let mut factory = self.factory.lock().unwrap_or_else(|e| e.into_inner());
        if factory.broken {
            return None;
        }
        let fresh = factory.running.is_none();
        if fresh {
            match sandbox::SpareFactory::start(self.spare_command(true)) {
                Ok(started) => factory.running = Some(started),
                Err(e) => {
                    warn!(error = %e, "no spare factory: spares are exec'd one by one");
                    factory.broken = true;
                    return None;
                }
            }
        }
        match factory.running.as_ref().map(|f| f.spare()) {
            Some(Ok(spare)) => Some(spare),
            Some(Err(e)) => {
                // Closed and reaped here; a new one is started next time, unless this one
                // was new already.
                factory.running = None;
                factory.broken = fresh;
                warn!(error = %e, broken = fresh, "the spare factory failed; this spare is exec'd");
                None
            }
            None => None,
        }
    }

    /// Starts spares until [`SPARES`] are waiting. Blocking.
    fn replenish(&self) {
        while self.ready().len() < SPARES {
            let spawned = match self.forked_spare() {
                Some(spare) => Ok(spare),
                None => sandbox::spawn_spare(self.spare_command(false)),
            };
            match spawned {
                Ok(new) => {
                    let mut ready = self.ready();
                    if ready.len() < SPARES {
                        ready.push_back(new);
                    } else {
                        drop(ready);
                        new.retire(); // a racing replenish filled the last place
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "starting a spare supervisor failed; starts exec one each");
                    return;
                }
            }
        }
    }

    fn retire(&self) {
        let spares: Vec<_> = self.ready().drain(..).collect();
        for spare in spares {
            spare.retire();
        }
        self.factory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running = None;
    }
}

impl From<sandbox::SandboxError> for Error {
    fn from(err: sandbox::SandboxError) -> Self {
        match err {
            sandbox::SandboxError::InvalidSpec(_) => Error::invalid(err.to_string()),
            sandbox::SandboxError::NotRunning => Error::conflict(format!(
                "{err}; start a new sandbox with `miren sandbox run`"
            )),
            _ => Error::internal(err.to_string()),
        }
    }
}

/// Reads a stream to its end keeping at most [`sandbox::EXEC_OUTPUT_LIMIT`] bytes; true when
/// there was more (the rest is read and dropped, so the writer never blocks on us).
async fn read_bounded(stream: Option<impl tokio::io::AsyncRead + Unpin>) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut kept = Vec::new();
    let mut truncated = false;
    let Some(mut stream) = stream else {
        return (kept, truncated);
    };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = sandbox::EXEC_OUTPUT_LIMIT.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (kept, truncated)
}

fn ms_to_rfc3339(ms: Option<u64>) -> Option<String> {
    ms.map(|ms| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
            .to_string()
    })
}

impl SandboxService {
    pub fn new(
        cfg: AgentConfig,
        store: Arc<Store>,
        disks: Arc<DiskService>,
        net: Arc<NetService>,
        images: Arc<ImageService>,
    ) -> SandboxService {
        let private_mounts: Vec<PathBuf> = private_root_dirs(&cfg)
            .into_iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .filter(|d| miren_sys::mountinfo::is_mount_point(d).unwrap_or(false))
            .collect();
        let mount_template = match sandbox::MountTemplate::new(&private_mounts) {
            Ok(t) => t.map(Arc::new),
            Err(e) => {
                warn!(error = %e, "no mount template: spares copy the host's mount table");
                None
            }
        };
        let spares = Spares {
            sandboxes_dir: cfg.data_dir.join("sandboxes"),
            private_mounts: private_mounts.clone(),
            mount_template,
            ready: Default::default(),
            factory: Default::default(),
        };
        SandboxService {
            cfg,
            store,
            disks,
            net,
            images,
            spares,
            private_mounts,
            locks: Default::default(),
        }
    }

    /// Keeps [`SPARES`] spare supervisors waiting (made in the background).
    pub fn replenish_spare(&self) {
        let spares = self.spares.clone();
        tokio::task::spawn_blocking(move || spares.replenish());
    }

    /// Lets the spare supervisors go (at shutdown). Blocking, briefly.
    pub fn retire_spare(&self) {
        self.spares.retire();
    }

    fn state_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("sandboxes").join(id)
    }

    fn find(&self, id_or_name: &str) -> Result<SandboxRow, Error> {
        self.store.sandbox(id_or_name)?.ok_or_else(|| {
            Error::not_found(format!(
                "no sandbox `{id_or_name}`; `miren sandbox list` shows them"
            ))
        })
    }

    /// A sandbox a user asks for (`sandbox run`): it belongs to no app service or addon, and
    /// may not take the names the agent keeps for its own.
    pub async fn run(&self, req: RunSandbox) -> Result<Sandbox, Error> {
        self.run_as(req, None).await
    }

    /// Runs a sandbox for `owner` (an app's service, an addon's server), recorded on its row:
    /// that, not its name, is how the owner finds it again.
    pub async fn run_as(&self, req: RunSandbox, owner: Option<Owner>) -> Result<Sandbox, Error> {
        self.run_request(SandboxRequest::from_api(req)?, owner)
            .await
    }

    /// Runs a typed request for `owner`. Every request, however it was built, is checked first.
    pub async fn run_request(
        &self,
        req: SandboxRequest,
        owner: Option<Owner>,
    ) -> Result<Sandbox, Error> {
        req.check()?;
        let id = new_id("sbx");
        let name = match &req.name {
            Some(name) => name.clone(),
            // Ids are `sbx_` and hex: with a hyphen, a name by the rule.
            None => Name::new(id.replace('_', "-"))
                .map_err(|e| Error::internal(format!("sandbox id `{id}` as a name: {e}")))?,
        };
        let app = req.app.clone().unwrap_or_else(|| name.clone());
        if owner.is_none() {
            crate::core::disks::refuse_reserved("sandbox name", &name)?;
            crate::core::disks::refuse_reserved("app", &app)?;
        }
        miren_runtime::normalize_reference(&req.image)?;

        // A disk is used only by its owner (or by anyone while nobody owns it).
        let uses_disks_as = owner.clone().unwrap_or_else(|| Owner::app(&app));
        for mount in &req.disks {
            self.disks.check_attach(&mount.disk, &uses_disks_as)?;
        }

        let row = SandboxRow {
            id: id.clone(),
            name: name.to_string(),
            app: app.to_string(),
            image: req.image.clone(),
            status: SandboxStatus::Creating,
            disks: req.disks.iter().map(|d| d.disk.clone()).collect(),
            created_at: now_rfc3339(),
            owner,
        };
        // The container's cgroup migration comes a few ms from now: start the grace period
        // it would wait for (see `prime_cgroup_migrations`) already.
        tokio::task::spawn_blocking(sandbox::prime_cgroup_migrations);
        let mut timeline = miren_sys::timeline::Timeline::start();
        self.store.insert_sandbox(&row)?;
        timeline.mark("row");
        match self.start(&row, &req, &mut timeline).await {
            Ok(supervisor_steps) => {
                self.store.set_sandbox_status(&id, SandboxStatus::Created)?;
                timeline.mark("status");
                // Each step's milliseconds, the agent's and the supervisor's own.
                info!(sandbox = %name, id = %id, image = %req.image, ms = ?timeline.to_string(),
                      supervisor_ms = ?supervisor_steps.unwrap_or_default(), "sandbox started");
                heap::trim_when_quiet();
                self.get(&id)
            }
            Err(err) => {
                warn!(sandbox = %name, error = %err, "sandbox run failed; removing what it made");
                if let Err(e) = self.teardown(&row).await {
                    warn!(sandbox = %name, error = %e, "cleanup after a failed run failed; reconciliation retries");
                    return Err(err);
                }
                self.store.remove_sandbox(&id)?;
                Err(err)
            }
        }
    }

    /// Everything a sandbox has: its supervisor and container, state dir, disk leases and
    /// network endpoint. Safe to repeat.
    async fn teardown(&self, row: &SandboxRow) -> Result<(), Error> {
        let state_dir = self.state_dir(&row.id);
        tokio::task::spawn_blocking(move || sandbox::delete(&state_dir))
            .await
            .map_err(|e| Error::internal(format!("deleting the sandbox: {e}")))??;
        for disk_id in self.store.leases_of(&row.id)? {
            self.store.release_lease(&disk_id, Some(&row.id))?;
        }
        self.disks.notify_lease_released();
        self.net.delete(&row.id).await?;
        Ok(())
    }

    fn view(&self, row: &SandboxRow, ips: &std::collections::HashMap<String, String>) -> Sandbox {
        let status = sandbox::status(&self.state_dir(&row.id));
        let (state, pid, exit_code, oom, restarts, started, finished, mut error) = match &status {
            Ok(s) => {
                let state = match (s.state, s.supervisor_alive) {
                    (_, _) if row.status == SandboxStatus::Creating => SandboxState::Creating,
                    (_, _) if row.status == SandboxStatus::Deleting => SandboxState::Deleting,
                    (State::Creating, true) => SandboxState::Creating,
                    (State::Running, true) => SandboxState::Running,
                    (State::Restarting, true) | (State::Exited, _) => SandboxState::Exited,
                    (State::Failed, _) => SandboxState::Failed,
                    (_, false) => SandboxState::Failed,
                };
                (
                    state,
                    s.pid.filter(|_| state.is_running()),
                    s.exit_code,
                    s.oom_killed,
                    s.restarts,
                    ms_to_rfc3339(s.started_at),
                    ms_to_rfc3339(s.finished_at),
                    s.error.clone(),
                )
            }
            Err(_) if row.status == SandboxStatus::Creating => (
                SandboxState::Creating,
                None,
                None,
                false,
                0,
                None,
                None,
                None,
            ),
            Err(e) => (
                SandboxState::Failed,
                None,
                None,
                false,
                0,
                None,
                None,
                Some(e.to_string()),
            ),
        };
        if state.is_failed() && error.is_none() {
            error = Some("its supervisor is gone (the host restarted, or it was killed)".into());
        }
        Sandbox {
            id: row.id.clone(),
            name: row.name.clone(),
            app: row.app.clone(),
            image: row.image.clone(),
            state,
            pid,
            ip: ips.get(&row.id).cloned(),
            exit_code,
            oom_killed: oom,
            restarts,
            started_at: started,
            finished_at: finished,
            disks: row.disks.clone(),
            error,
            created_at: row.created_at.clone(),
        }
    }

    fn ips(&self) -> std::collections::HashMap<String, String> {
        self.net
            .list()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.owner, e.ip))
            .collect()
    }

    pub fn get(&self, id_or_name: &str) -> Result<Sandbox, Error> {
        let row = self.find(id_or_name)?;
        Ok(self.view(&row, &self.ip_of(&row.id)))
    }

    /// One sandbox's address, as [`Self::view`] takes it: reading every endpoint for one
    /// sandbox (each start ends with a `get`) made a start's cost grow with the sandboxes.
    fn ip_of(&self, id: &str) -> std::collections::HashMap<String, String> {
        self.net
            .get(id)
            .ok()
            .map(|e| (e.owner, e.ip))
            .into_iter()
            .collect()
    }

    /// The sandbox `owner` runs, if any.
    pub fn get_owned(&self, owner: &Owner) -> Result<Option<Sandbox>, Error> {
        Ok(self
            .store
            .sandbox_of(owner)?
            .map(|row| self.view(&row, &self.ip_of(&row.id))))
    }

    /// Deletes the sandbox `owner` runs; none is fine (owners repeat themselves).
    pub async fn delete_owned(&self, owner: &Owner) -> Result<(), Error> {
        match self.store.sandbox_of(owner)? {
            Some(row) => self.delete_if_exists(&row.id).await,
            None => Ok(()),
        }
    }

    /// A display name for `owner`'s sandbox: `preferred` when no sandbox has it, otherwise
    /// `preferred` with a hash of the owner, so names stay unique and readable while nothing
    /// depends on them.
    pub fn free_name(&self, preferred: &str, owner: &Owner) -> Result<Name, Error> {
        if !self.store.sandbox_name_taken(preferred)? {
            return validate::to_name("sandbox name", preferred);
        }
        crate::core::disks::hashed_name(preferred, &owner.describe())
    }

    pub fn list(&self) -> Result<Vec<Sandbox>, Error> {
        let ips = self.ips();
        Ok(self
            .store
            .sandboxes()?
            .iter()
            .map(|r| self.view(r, &ips))
            .collect())
    }

    /// Returns once the sandbox is over (its process exited and no restart is to come, or
    /// it failed), with its final status.
    pub async fn wait(
        &self,
        id_or_name: &str,
        timeout: Option<Duration>,
    ) -> Result<Sandbox, Error> {
        let row = self.find(id_or_name)?;
        let state_dir = self.state_dir(&row.id);
        tokio::task::spawn_blocking(move || sandbox::wait(&state_dir, timeout))
            .await
            .map_err(|e| Error::internal(format!("waiting for the sandbox: {e}")))?
            .map_err(|e| match e {
                sandbox::SandboxError::Timeout(why) => Error::new(
                    crate::core::error::ErrorKind::Timeout,
                    "timeout",
                    format!("{why}; wait longer or stop it with `miren sandbox stop`"),
                ),
                sandbox::SandboxError::NoStatus(_) => Error::not_found(format!(
                    "sandbox `{id_or_name}` was deleted while waiting for it"
                )),
                e => e.into(),
            })?;
        self.get(&row.id)
    }

    pub async fn stop(&self, id_or_name: &str, grace: Option<Duration>) -> Result<Sandbox, Error> {
        let row = self.find(id_or_name)?;
        let lock = self.locks.of(&row.id);
        let _guard = lock.lock().await;
        let state_dir = self.state_dir(&row.id);
        let grace = grace.unwrap_or(Duration::from_secs(10));
        tokio::task::spawn_blocking(move || sandbox::stop(&state_dir, grace))
            .await
            .map_err(|e| Error::internal(format!("stopping the sandbox: {e}")))??;
        info!(sandbox = %row.name, "sandbox stopped");
        self.get(&row.id)
    }

    pub async fn delete(&self, id_or_name: &str) -> Result<(), Error> {
        let row = self.find(id_or_name)?;
        let lock = self.locks.of(&row.id);
        let _guard = lock.lock().await;
        self.store
            .set_sandbox_status(&row.id, SandboxStatus::Deleting)?;
        self.teardown(&row).await?;
        self.store.remove_sandbox(&row.id)?;
        self.locks.forget(&row.id);
        info!(sandbox = %row.name, id = %row.id, "sandbox deleted");
        heap::trim_when_quiet();
        Ok(())
    }

    /// [`Self::delete`], where a sandbox already gone is fine (for owners that remove theirs
    /// by name and may be repeating themselves).
    pub async fn delete_if_exists(&self, id_or_name: &str) -> Result<(), Error> {
        match self.delete(id_or_name).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        }
    }

    /// Runs a command inside a running sandbox through `miren exec-in`: the command becomes
    /// its caller's child, and libcontainer must not fork from this multi-threaded process.
    pub async fn exec(
        &self,
        id_or_name: &str,
        args: Vec<String>,
        env: Vec<String>,
    ) -> Result<ExecResult, Error> {
        if args.is_empty() {
            return Err(Error::invalid("give the command to run after `--`"));
        }
        let row = self.find(id_or_name)?;
        let mut cmd = tokio::process::Command::from(crate::util::own_binary());
        cmd.arg("exec-in")
            .arg("--state-dir")
            .arg(self.state_dir(&row.id));
        for kv in &env {
            cmd.arg("--env").arg(kv);
        }
        cmd.arg("--")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::internal(format!("starting exec: {e}")))?;
        let (stdout, stderr) = tokio::join!(
            read_bounded(child.stdout.take()),
            read_bounded(child.stderr.take())
        );
        let status = child
            .wait()
            .await
            .map_err(|e| Error::internal(format!("waiting for exec: {e}")))?;
        let (stdout, stdout_truncated) = stdout;
        let (stderr, stderr_truncated) = stderr;
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        if let Some(message) = stderr.strip_prefix(EXEC_ERROR_MARK) {
            return Err(Error::conflict(format!(
                "cannot exec in sandbox `{}`: {}",
                row.name,
                message.trim()
            )));
        }
        Ok(ExecResult {
            exit_code: status.code().unwrap_or(128),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr,
            stdout_truncated,
            stderr_truncated,
        })
    }

    /// Kills the sandbox's container process (checked against its recorded start time), so
    /// its supervisor restarts it per its restart policy: an unhealthy service's restart.
    pub fn kill_process(&self, id: &str) -> Result<(), Error> {
        let row = self.find(id)?;
        let st = sandbox::status(&self.state_dir(&row.id))?;
        match (st.pid, st.pid_start_time) {
            (Some(pid), Some(start)) if miren_sys::proc::is_same_process(pid, start) => {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .map_err(|e| Error::internal(format!("killing sandbox `{}`: {e}", row.name)))
            }
            // Not running: its supervisor restarts it anyway (or it has ended).
            _ => Ok(()),
        }
    }

    /// A redeploy's switch of published ports from sandbox `from` to `to` (their endpoints).
    pub async fn switch_published(
        &self,
        from: &str,
        to: &str,
        publish: &[miren_netns::PublishedPort],
    ) -> Result<(), Error> {
        self.net.switch_published(from, to, publish).await
    }

    /// A redeploy's ownership step (see `Store::promote_next_sandbox`).
    pub fn promote_next(&self, app: &str, service: &str) -> Result<(), Error> {
        Ok(self.store.promote_next_sandbox(app, service)?)
    }

    /// Removes the images' blobs and layers that nothing uses, keeping the sandboxes' layers.
    pub fn gc_images(&self) -> Result<crate::model::ImageGcReport, Error> {
        self.images.gc(&self.layers_in_use())
    }

    /// Layer directories the sandboxes' overlays are built on: image GC must keep them.
    pub fn layers_in_use(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for row in self.store.sandboxes().unwrap_or_default() {
            let spec = self.state_dir(&row.id).join(sandbox::SPEC_FILE);
            let Ok(text) = std::fs::read(&spec) else {
                continue;
            };
            if let Ok(spec) = serde_json::from_slice::<SandboxSpec>(&text) {
                dirs.extend(spec.lower_dirs);
            }
        }
        dirs
    }

    /// The sandbox's log files, oldest rotation first: (stdout files, stderr files).
    pub fn log_files(&self, id_or_name: &str) -> Result<(Vec<PathBuf>, Vec<PathBuf>), Error> {
        let row = self.find(id_or_name)?;
        let dir = self.state_dir(&row.id);
        let rotated = |base: &str| -> Vec<PathBuf> {
            let mut files: Vec<PathBuf> = (1..=16)
                .rev()
                .map(|n| dir.join(format!("{base}.{n}")))
                .filter(|p| p.exists())
                .collect();
            files.push(dir.join(base));
            files
        };
        Ok((rotated(sandbox::STDOUT_LOG), rotated(sandbox::STDERR_LOG)))
    }

    /// Finishes or undoes runs and deletes a crash cut short. Running sandboxes are left alone:
    /// their supervisors never depended on the agent.
    pub async fn reconcile(&self) -> Result<(), Error> {
        for row in self.store.sandboxes()? {
            if row.status.in_flight() {
                info!(sandbox = %row.name, status = %row.status, "finishing a sandbox operation cut short");
                // One sandbox that cannot be torn down yet (a process that does not die at
                // once keeps its cgroup busy) must not keep the agent from starting: its row
                // stays as it is, and the next delete of it (its owner's, or by hand) retries.
                match self.teardown(&row).await {
                    Ok(()) => self.store.remove_sandbox(&row.id)?,
                    Err(e) => {
                        warn!(sandbox = %row.name, error = %e, "tearing down a sandbox cut short failed; a delete of it retries")
                    }
                }
            }
        }
        // State dirs no row owns (a crash between creating the dir and the row, or after
        // removing the row): their supervisors and containers go too.
        let known: HashSet<String> = self.store.sandboxes()?.into_iter().map(|r| r.id).collect();
        // Before any start: new sandbox cgroups then take their cpuset from the parent.
        let prefix = self.cfg.name_prefix.clone();
        let prepared = tokio::task::spawn_blocking(move || sandbox::prepare_cgroup_parent(&prefix));
        if let Ok(Err(e)) = prepared.await {
            warn!(error = %e, "the cgroup parent was not prepared; each start sets its cpuset itself");
        }
        let root = self.cfg.data_dir.join("sandboxes");
        let sandboxes_dir = root.clone();
        let _ =
            tokio::task::spawn_blocking(move || sandbox::remove_stale_layers(&sandboxes_dir)).await;
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if !known.contains(&id) {
                    warn!(state_dir = %entry.path().display(), "removing a sandbox no row owns");
                    let dir = entry.path();
                    let _ = tokio::task::spawn_blocking(move || sandbox::delete(&dir)).await;
                }
            }
        }
        self.relaunch_dead().await
    }

    /// A supervisor gone without having recorded an end means the host restarted (or it
    /// was killed): sandboxes whose restart policy asks for it run again, as after any
    /// failure. At start, after endpoints and disks are restored, and periodically.
    pub async fn relaunch_dead(&self) -> Result<(), Error> {
        for row in self.store.sandboxes()? {
            if row.status != SandboxStatus::Created {
                continue;
            }
            let lock = self.locks.of(&row.id);
            let _guard = lock.lock().await;
            // Looked at again under the lock: a delete may have come first.
            if !matches!(self.store.sandbox(&row.id)?, Some(r) if r.status == SandboxStatus::Created)
            {
                continue;
            }
            let dir = self.state_dir(&row.id);
            let cmd = match self.spares.command(&dir) {
                Ok(cmd) => cmd,
                Err(e) => {
                    warn!(error = %e, "cannot restart sandboxes whose supervisor is gone");
                    break;
                }
            };
            let relaunched = tokio::task::spawn_blocking(move || {
                if !sandbox::needs_relaunch(&dir) {
                    return Ok(false);
                }
                sandbox::relaunch(cmd, &dir).map(|_| true)
            })
            .await
            .map_err(|e| Error::internal(format!("restarting a sandbox: {e}")))?;
            match relaunched {
                Ok(false) => {}
                Ok(true) => {
                    info!(sandbox = %row.name, "started again: its supervisor was gone without an exit on record, and its restart policy asks for another run")
                }
                Err(e) => {
                    warn!(sandbox = %row.name, error = %e, "restarting a sandbox whose supervisor was gone failed; it shows as failed")
                }
            }
        }
        Ok(())
    }
}
