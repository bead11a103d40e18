//! Service health: one light task per checked sandbox runs its check (TCP and HTTP from the
//! host to the sandbox's address, exec through `miren exec-in`), and keeps what it found in a
//! `watch` (state, consecutive failures, the last failure's text, bounded). A redeploy waits
//! on it; `miren app status` reads it. A serving sandbox that turns unhealthy has its process
//! killed, so the supervisor restarts it per its restart policy (`always` for services).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{HealthSpec, ProbeSpec, ServiceSandboxes};
use crate::core::sandboxes::SandboxService;
use crate::model::{HealthState, ServiceHealth};

/// The last failure's text is cut to this: it is the only per-sandbox buffer kept.
const MAX_FAILURE_TEXT: usize = 512;
/// How much of an HTTP answer's body a failure shows.
const MAX_HTTP_BODY: usize = 200;
/// While a sandbox is starting, checks run at least this often: a redeploy waits on the
/// first one that passes.
const STARTING_INTERVAL: Duration = Duration::from_millis(200);

struct Tracked {
    tx: watch::Sender<ServiceHealth>,
    /// Set once the sandbox serves (a redeploy's next sandbox is not restarted: the
    /// redeploy gives up on it instead).
    serving: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

/// The health of every checked sandbox, by sandbox id.
#[derive(Default)]
pub struct HealthBoard {
    tracked: Mutex<HashMap<String, Tracked>>,
}

impl HealthBoard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.tracked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts checking `id` (again, if it was: its state starts over).
    pub fn track(
        &self,
        sandboxes: Arc<dyn ServiceSandboxes>,
        id: &str,
        ip: Option<Ipv4Addr>,
        spec: &HealthSpec,
        serving: bool,
    ) -> watch::Receiver<ServiceHealth> {
        let (tx, rx) = watch::channel(ServiceHealth {
            state: HealthState::Starting,
            check: spec.probe.describe(),
            last_failure: None,
            failures: 0,
        });
        let serving = Arc::new(AtomicBool::new(serving));
        let task = tokio::spawn(monitor(
            sandboxes,
            id.to_string(),
            ip,
            spec.clone(),
            tx.clone(),
            serving.clone(),
        ))
        .abort_handle();
        if let Some(old) = self
            .lock()
            .insert(id.to_string(), Tracked { tx, serving, task })
        {
            old.task.abort();
        }
        rx
    }

    pub fn set_serving(&self, id: &str) {
        if let Some(t) = self.lock().get(id) {
            t.serving.store(true, Ordering::Relaxed);
        }
    }

    /// Stops checking `id` (it is being removed).
    pub fn forget(&self, id: &str) {
        if let Some(t) = self.lock().remove(id) {
            t.task.abort();
        }
    }

    pub fn view(&self, id: &str) -> Option<ServiceHealth> {
        self.lock().get(id).map(|t| t.tx.borrow().clone())
    }

    pub fn is_tracked(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }
}

async fn monitor(
    sandboxes: Arc<dyn ServiceSandboxes>,
    id: String,
    ip: Option<Ipv4Addr>,
    spec: HealthSpec,
    tx: watch::Sender<ServiceHealth>,
    serving: Arc<AtomicBool>,
) {
    let interval = Duration::from_millis(spec.interval_ms);
    let timeout = Duration::from_millis(spec.timeout_ms);
    let start_period = Duration::from_millis(spec.start_period_ms);
    let mut since = Instant::now();
    let mut ever_healthy = false;
    loop {
        let starting = tx.borrow().state == HealthState::Starting;
        let pause = if starting {
            interval.min(STARTING_INTERVAL)
        } else {
            interval
        };
        tokio::time::sleep(pause).await;
        let result =
            match tokio::time::timeout(timeout, sandboxes.probe(&id, ip, &spec.probe)).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "{}: no answer within {}",
                    spec.probe.describe(),
                    humantime::format_duration(timeout)
                )),
            };
        match result {
            Ok(()) => {
                ever_healthy = true;
                tx.send_if_modified(|h| {
                    let changed = h.state != HealthState::Healthy || h.failures > 0;
                    h.state = HealthState::Healthy;
                    h.failures = 0;
                    h.last_failure = None;
                    changed
                });
            }
            Err(output) => {
                let output = bounded(output);
                let counted = ever_healthy || since.elapsed() >= start_period;
                let mut turned = false;
                tx.send_modify(|h| {
                    h.failures = h.failures.saturating_add(1);
                    h.last_failure = Some(output.clone());
                    if counted
                        && h.failures >= spec.failure_threshold
                        && h.state != HealthState::Unhealthy
                    {
                        h.state = HealthState::Unhealthy;
                        turned = true;
                    }
                });
                if turned && serving.load(Ordering::Relaxed) {
                    warn!(sandbox = %id, failure = %output, "service unhealthy: restarting its process");
                    if let Err(e) = sandboxes.restart_process(&id) {
                        warn!(sandbox = %id, error = %e, "restarting an unhealthy service failed");
                    }
                    // Counted afresh after the restart, with its start period again.
                    since = Instant::now();
                    ever_healthy = false;
                    tx.send_modify(|h| {
                        h.state = HealthState::Starting;
                        h.failures = 0;
                    });
                }
            }
        }
    }
}

/// The text kept of a failure: at most [`MAX_FAILURE_TEXT`] bytes, cut on a char boundary.
fn bounded(mut text: String) -> String {
    let text_len = text.trim_end().len();
    text.truncate(text_len);
    if text.len() > MAX_FAILURE_TEXT {
        let mut end = MAX_FAILURE_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [...]");
    }
    text
}

/// Runs one check of the real sandbox `id` at `ip`; Err carries what the user reads.
pub async fn probe(
    sandboxes: &SandboxService,
    id: &str,
    ip: Option<Ipv4Addr>,
    probe: &ProbeSpec,
) -> Result<(), String> {
    let addr = |port: u16| {
        ip.map(|ip| std::net::SocketAddr::from((ip, port)))
            .ok_or_else(|| format!("{}: the sandbox has no address", probe.describe()))
    };
    match probe {
        ProbeSpec::Tcp { port } => {
            let addr = addr(*port)?;
            tokio::net::TcpStream::connect(addr)
                .await
                .map(drop)
                .map_err(|e| format!("tcp connect to {addr}: {e}"))
        }
        ProbeSpec::Http { path, port } => http_get(addr(*port)?, path).await,
        ProbeSpec::Exec { argv } => match sandboxes.exec(id, argv.clone(), Vec::new()).await {
            Ok(r) if r.exit_code == 0 => Ok(()),
            Ok(r) => Err(format!(
                "exec `{}` exited with {}: {}{}",
                argv.join(" "),
                r.exit_code,
                r.stdout.trim(),
                if r.stderr.trim().is_empty() {
                    String::new()
                } else {
                    format!(" {}", r.stderr.trim())
                }
            )),
            Err(e) => Err(format!("exec `{}`: {}", argv.join(" "), e.message)),
        },
    }
}

/// `GET path` over HTTP/1.1 (hyper's client connection); 2xx and 3xx pass.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(), String> {
    let what = format!("http GET {path} on {addr}");
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("{what}: {e}"))?;
    // Driven beside the request; aborted with it (the probe's timeout drops both).
    struct Abort(tokio::task::JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _conn = Abort(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "miren-health")
        .header(hyper::header::CONNECTION, "close")
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| format!("{what}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{what}: {e}"))?;
    let status = resp.status();
    if status.is_success() || status.is_redirection() {
        return Ok(());
    }
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while text.len() < MAX_HTTP_BODY {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    text.extend_from_slice(data);
                }
            }
            _ => break,
        }
    }
    text.truncate(MAX_HTTP_BODY);
    Err(format!(
        "{what}: HTTP {status}: {}",
        String::from_utf8_lossy(&text).trim()
    ))
}

/// Waits until the check passes (Ok) or calls the sandbox unhealthy (Err with its last
/// failure).
pub async fn until_healthy(mut rx: watch::Receiver<ServiceHealth>) -> Result<(), String> {
    let seen = rx
        .wait_for(|h| h.state != HealthState::Starting)
        .await
        .map(|h| h.clone());
    match seen {
        Ok(h) if h.state == HealthState::Healthy => Ok(()),
        Ok(h) => Err(h
            .last_failure
            .unwrap_or_else(|| format!("{} failed", h.check))),
        Err(_) => Err("its health check stopped".into()),
    }
}

pub(super) fn log_healthy(app: &str, service: &str, id: &str) {
    info!(app = %app, service = %service, sandbox = %id, "service healthy");
}
