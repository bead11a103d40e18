//! `miren agent`: start-up, the socket, readiness, shutdown.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::api::{self, AppState, PeerCred};
use crate::config::AgentConfig;
use crate::core::disks::DiskService;
use crate::core::error::{Error, ErrorKind};
use crate::core::net::NetService;
use crate::store::Store;

/// How long in-flight requests (a lease wait, say) get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A client gets this long to send a request's headers (and an idle keep-alive connection
/// this long to start its next request); then the agent closes the connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are answered 503 and closed, so a client opening
/// connections without end cannot exhaust the agent's file descriptors or memory.
pub const MAX_CONNECTIONS: usize = 1024;

/// Connections one peer process may hold at once: one client stalling many connections
/// uses up its own share, and the others' requests still get in.
pub const MAX_CONNECTIONS_PER_PEER: usize = 128;

fn require_root() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("miren agent must run as root: it attaches loop devices, mounts filesystems and configures the network");
    }
    Ok(())
}

/// `miren agent --uninstall-network`: removes every endpoint, the gateway link and the nftables
/// table, with the agent stopped (it takes the data dir's lock).
pub async fn uninstall_network(cfg: AgentConfig) -> Result<()> {
    require_root()?;
    fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let _lock = lock_data_dir(&cfg)?;
    let store = Arc::new(Store::open(&cfg.db_path())?);
    let net_cfg = crate::core::net::net_config(&cfg.name_prefix, &cfg.subnet, &cfg.run_dir)
        .map_err(anyhow::Error::msg)?;
    let removed = NetService::uninstall(net_cfg, store).await?;
    println!(
        "removed {removed} endpoint(s), the gateway link {}0 and the nftables table {}",
        cfg.name_prefix, cfg.name_prefix
    );
    Ok(())
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    require_root()?;
    fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    fs::set_permissions(&cfg.data_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("securing data dir {}", cfg.data_dir.display()))?;
    let _lock = lock_data_dir(&cfg)?;

    let store = Arc::new(Store::open(&cfg.db_path())?);
    let targets = Arc::new(
        crate::core::targets::Targets::open(
            &cfg.backup_targets,
            cfg.default_backup_target.as_deref(),
            &cfg.data_dir,
        )
        .map_err(anyhow::Error::msg)?,
    );
    crate::core::sandboxes::prepare_private_roots(&cfg);
    let disks = Arc::new(DiskService::new(cfg.clone(), store.clone())?);
    // Reconciliation is timed: with many sandboxes it is what a restart waits for.
    let reconcile_started = std::time::Instant::now();
    {
        let disks = disks.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            disks.reconcile().context("reconciling disks")?;
            let reclaimed = disks.reclaim_dead_holders().context("reclaiming leases")?;
            if reclaimed > 0 {
                info!(reclaimed, "reclaimed leases of holders that are gone");
            }
            Ok(())
        })
        .await??;
    }

    let net_cfg = crate::core::net::net_config(&cfg.name_prefix, &cfg.subnet, &cfg.run_dir)
        .map_err(anyhow::Error::msg)?;
    let net = NetService::start(net_cfg, store.clone())
        .await
        .context("setting up the network (gateway link, nftables)")?;
    let report = net.gc().await.context("reconciling network endpoints")?;
    if !(report.released.is_empty() && report.removed.is_empty() && report.repaired.is_empty()) {
        info!(?report, "network reconciled");
    }

    let mirrors = miren_runtime::Mirrors::parse(&cfg.image_mirrors, cfg.allow_insecure_mirrors)
        .map_err(|e| anyhow::anyhow!("--image-mirror: {e}"))?;
    let images = Arc::new(crate::core::images::ImageService::open(
        &cfg.data_dir,
        mirrors,
    )?);

    let sandboxes = Arc::new(crate::core::sandboxes::SandboxService::new(
        cfg.clone(),
        store.clone(),
        disks.clone(),
        net.clone(),
        images.clone(),
    ));
    sandboxes
        .reconcile()
        .await
        .context("reconciling sandboxes")?;
    info!(
        seconds = reconcile_started.elapsed().as_secs_f64(),
        sandboxes = store.sandboxes().map(|s| s.len()).unwrap_or_default(),
        "reconciled endpoints and sandboxes"
    );
    sandboxes.replenish_spare();
    let addons = crate::core::addons::AddonService::new(
        store.clone(),
        disks.clone(),
        net.clone(),
        sandboxes.clone(),
    );
    let apps = crate::core::apps::AppService::new(
        store.clone(),
        disks.clone(),
        sandboxes.clone(),
        addons.clone(),
    );

    let addons_of_apps = crate::core::app_addons::AddonsOfApps::new(addons.clone(), apps.clone());
    let builds = crate::core::build::BuildService::new(
        images.clone(),
        disks.clone(),
        sandboxes.clone(),
        cfg.data_dir.clone(),
        cfg.local_dir(),
    );
    builds
        .reconcile()
        .await
        .context("removing what interrupted builds left")?;

    let listener = bind_socket(&cfg)?;
    let state = AppState {
        builds,
        disks: disks.clone(),
        net: net.clone(),
        images,
        sandboxes: sandboxes.clone(),
        addons: addons.clone(),
        apps: apps.clone(),
        addons_of_apps: addons_of_apps.clone(),
        targets: targets.clone(),
        socket_gid: cfg.socket_gid,
        restores: Arc::new(tokio::sync::Semaphore::new(api::MAX_RESTORES)),
    };
    addons_of_apps.restart_apps_when_addons_settle();
    // Restores a previous agent left mid-way are finished or discarded before the addons
    // resume (so no server starts on a disk about to be swapped).
    addons.enable_pitr(crate::core::addons::postgres::archive::Pitr::new(
        disks.clone(),
        targets.clone(),
        cfg.pitr,
    ));
    addons
        .resume_pg_restores()
        .await
        .context("resuming PostgreSQL restores")?;
    // Addons and deploys a previous agent left mid-way continue in the background.
    addons.resume().context("resuming addons")?;
    apps.resume().context("resuming deploys")?;
    addons_of_apps
        .resume_rotations()
        .context("resuming credential rotations")?;
    let app = api::router(state);

    let reclaimer = tokio::spawn(reclaim_periodically(
        disks.clone(),
        net.clone(),
        sandboxes.clone(),
        cfg.reclaim_interval,
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = serve(listener, app, stop_rx.clone());
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    for target in targets.list() {
        info!(target = target.name(), at = %target.describe(), off_node = target.off_node(),
              default = target.name() == targets.default_target().name(), "backup target");
    }
    info!(socket = %cfg.socket.display(), data_dir = %cfg.data_dir.display(), prefix = %cfg.name_prefix, "agent ready");

    let mut server = std::pin::pin!(server);
    tokio::select! {
        result = &mut server => result.context("serving the API")?,
        signal = shutdown_signal() => {
            info!(signal, "shutting down");
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            let _ = stop_tx.send(true);
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                warn!("requests still running after {SHUTDOWN_GRACE:?}; stopping anyway");
            }
        }
    }
    reclaimer.abort();
    let _ = tokio::task::spawn_blocking(move || sandboxes.retire_spare()).await;
    let _ = fs::remove_file(&cfg.socket);
    info!("agent stopped");
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent can only be killed; never return early here.
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn reclaim_periodically(
    disks: Arc<DiskService>,
    net: Arc<NetService>,
    sandboxes: Arc<crate::core::sandboxes::SandboxService>,
    every: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match net.gc().await {
            Ok(report) if !report.released.is_empty() || !report.removed.is_empty() => {
                info!(?report, "periodic network reconciliation");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "periodic network reconciliation failed"),
        }
        let disks = disks.clone();
        match tokio::task::spawn_blocking(move || disks.reclaim_dead_holders()).await {
            Ok(Err(e)) => warn!(error = %e, "periodic lease reclaim failed"),
            Err(e) => warn!(error = %e, "periodic lease reclaim failed"),
            Ok(Ok(_)) => {}
        }
        // A supervisor killed while the agent runs: its sandbox's restart policy still holds.
        if let Err(e) = sandboxes.relaunch_dead().await {
            warn!(error = %e, "periodic sandbox relaunch failed");
        }
    }
}

/// One agent per data dir: a second one would fight the first over every disk.
fn lock_data_dir(cfg: &AgentConfig) -> Result<Flock<File>> {
    let path = cfg.data_dir.join("agent.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        anyhow::anyhow!(
            "another miren agent is already using {} ({errno}); stop it, or give this one its own --data-dir",
            cfg.data_dir.display()
        )
    })
}

fn bind_socket(cfg: &AgentConfig) -> Result<UnixListener> {
    if let Some(parent) = cfg.socket.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("creating socket directory {}", parent.display()))?;
    }
    if cfg.socket.exists() {
        if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
            bail!(
                "another agent is already listening on {}; stop it or pass a different --socket",
                cfg.socket.display()
            );
        }
        // A socket file left by an agent that was killed: nobody listens on it.
        fs::remove_file(&cfg.socket)
            .with_context(|| format!("removing stale socket {}", cfg.socket.display()))?;
    }
    let listener = UnixListener::bind(&cfg.socket)
        .with_context(|| format!("binding {}", cfg.socket.display()))?;
    fs::set_permissions(&cfg.socket, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting permissions of {}", cfg.socket.display()))?;
    if let Some(gid) = cfg.socket_gid {
        nix::unistd::chown(
            &cfg.socket,
            Some(nix::unistd::Uid::from_raw(0)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .with_context(|| format!("giving {} to group {gid}", cfg.socket.display()))?;
    }
    Ok(listener)
}

/// Serves HTTP/1.1 on the socket until `stop` turns true, then lets the open connections
/// finish their requests. Unlike `axum::serve`, it bounds how long a client may take to
/// send its headers and how many connections are open at once.
async fn serve(
    listener: UnixListener,
    app: axum::Router,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    raise_open_file_limit();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_peer = PeerConnections::default();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => Some(stream),
                Err(e) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.wait_for(|stop| *stop) => None,
        };
        let Some(stream) = stream else { break };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(
                stream,
                format!("the agent already serves {MAX_CONNECTIONS} connections"),
            ));
            continue;
        };
        let peer = peer_cred(&stream);
        let Some(peer_slot) = per_peer.acquire(peer.pid) else {
            tokio::spawn(refuse_busy(
                stream,
                format!(
                    "process {} already has {MAX_CONNECTIONS_PER_PEER} connections open to the agent",
                    peer.pid.map_or("unknown".into(), |p| p.to_string())
                ),
            ));
            continue;
        };
        let app = app.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let mut request = request.map(axum::body::Body::new);
                    request
                        .extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    let mut app = app.clone();
                    async move {
                        use tower_service::Service;
                        app.call(request).await
                    }
                },
            );
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            let stopping = tokio::select! {
                _ = connection.as_mut() => false,
                _ = stop.wait_for(|stop| *stop) => true,
            };
            if stopping {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
            drop(peer_slot);
            drop(slot);
        });
    }
    // Every connection holds a slot: having them all back means every connection is done.
    let _ = slots.acquire_many(MAX_CONNECTIONS as u32).await;
    Ok(())
}

/// Credentials of the process on the other end of the socket (SO_PEERCRED).
fn peer_cred(stream: &tokio::net::UnixStream) -> PeerCred {
    match stream.peer_cred() {
        Ok(cred) => PeerCred {
            uid: Some(cred.uid()),
            gid: Some(cred.gid()),
            pid: cred.pid(),
        },
        Err(_) => PeerCred {
            uid: None,
            gid: None,
            pid: None,
        },
    }
}

/// Open connections per peer process (by pid; peers without one share a count).
#[derive(Clone, Default)]
struct PeerConnections(Arc<std::sync::Mutex<std::collections::HashMap<Option<i32>, usize>>>);

/// One connection counted against its peer; uncounted when dropped.
struct PeerSlot {
    counts: PeerConnections,
    pid: Option<i32>,
}

impl PeerConnections {
    fn acquire(&self, pid: Option<i32>) -> Option<PeerSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(pid).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: self.clone(),
            pid,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.pid) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.pid);
            }
        }
    }
}

/// Room for every connection the agent serves beside its disks and sandboxes: the soft
/// open-file limit (often 1024) goes up to the hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let wanted = hard.min(65_536);
        if soft < wanted {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, wanted, hard) {
                warn!(error = %e, "raising the open-file limit failed");
            }
        }
    }
}

/// The bytes of an error response for a connection that HTTP never serves: the status comes
/// from the one mapping in `api::error`.
fn raw_error_response(error: &Error) -> String {
    let status = api::error::status_of(error.kind);
    let body = serde_json::to_string(&crate::model::ErrorBody {
        code: error.code.to_string(),
        message: error.message.clone(),
    })
    .unwrap_or_default();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
}

/// Answers a connection over a connection cap with a 503 and closes it.
async fn refuse_busy(mut stream: tokio::net::UnixStream, why: String) {
    use tokio::io::AsyncWriteExt;
    let error = Error::new(
        ErrorKind::Unavailable,
        "too_many_connections",
        format!("{why}; close idle ones (or wait for them to finish) and retry"),
    );
    let response = raw_error_response(&error);
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_gets_a_503_with_the_error_body() {
        let error = Error::new(
            ErrorKind::Unavailable,
            "too_many_connections",
            "full; retry",
        );
        assert_eq!(
            raw_error_response(&error),
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 55\r\nconnection: close\r\n\r\n{\"code\":\"too_many_connections\",\"message\":\"full; retry\"}"
        );
    }
}
