//! The CLI's side of the socket: one typed method per API route. This is the only CLI file that
//! speaks HTTP (methods, paths, statuses, bodies); the command files call methods with model
//! types. Path segments and query values are percent-encoded here, in one place.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

pub use hyper::body::Bytes;

mod route;
pub use route::Route;

use crate::api::{DATA_BYTES_HEADER, DISK_SIZE_HEADER, FREEZE_SECONDS_HEADER};
use crate::model::{
    AcquireLease, Addon, AddonCatalogEntry, AddonDestroyed, AddonRotated, AddonUpdated, AgentInfo,
    App, AppDeleted, BackupEvent, BackupToTarget, BuildQuery, BuildResult, CreateAddon, CreateDisk,
    CreateEndpoint, DeployApp, Disk, Endpoint, EndpointDeleted, EnvVarView, ErrorBody, ExecRequest,
    ExecResult, ImageGcReport, ImageRemoved, ImageSummary, ImportImage, Lease, NetGcReport,
    PullEvent, PullImage, ReleaseResult, ResizeDisk, RestoreResult, RotateAddon, RunSandbox,
    Sandbox, UpdateAddon,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the miren agent at {socket}: {source}. Is `miren agent` running? Point to it with --socket or MIREN_SOCKET")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error; its message is meant for the user as is.
    #[error("{message}")]
    Api {
        /// The HTTP status, e.g. 404.
        status: u16,
        code: String,
        message: String,
    },
    #[error("talking to the agent: {0}")]
    Protocol(String),
    /// A streamed response broke off; the caller says which stream.
    #[error("{0}")]
    Stream(String),
    /// A line of a streamed response (or a restore's answer) was not what the API sends.
    #[error("{0}")]
    Event(serde_json::Error),
}

/// A streamed response body (logs, a backup).
pub struct ByteStream {
    body: Incoming,
}

impl ByteStream {
    /// The next chunk, or `None` at the end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(ClientError::Stream(e.to_string()))),
            }
        }
    }
}

/// A backup's snapshot stream and what the agent said about it up front.
pub struct BackupStream {
    /// How long the filesystem was frozen; `None` when it was not mounted writable.
    pub freeze_seconds: Option<f64>,
    /// Non-zero bytes of the image, for a progress bar.
    pub data_bytes: Option<u64>,
    /// The disk image's size.
    pub size_bytes: Option<u64>,
    pub snapshot: ByteStream,
}

/// An NDJSON response's events (a pull's, a target backup's).
pub struct EventStream<T> {
    body: ByteStream,
    pending: Vec<u8>,
    event: std::marker::PhantomData<T>,
}

pub type PullStream = EventStream<PullEvent>;

impl<T: DeserializeOwned> EventStream<T> {
    fn new(response: hyper::Response<Incoming>) -> Self {
        EventStream {
            body: ByteStream {
                body: response.into_body(),
            },
            pending: Vec::new(),
            event: std::marker::PhantomData,
        }
    }

    /// The next event, or `None` when the agent ended the stream.
    pub async fn next_event(&mut self) -> Option<Result<T, ClientError>> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).map_err(ClientError::Event));
            }
            match self.body.chunk().await? {
                Ok(data) => self.pending.extend_from_slice(&data),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// A request body streamed from `reader`, read on a thread of its own.
fn upload_body(
    mut reader: impl Read + Send + 'static,
) -> StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, io::Error>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, io::Error>>(8);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let frame = Frame::data(Bytes::copy_from_slice(&buf[..n]));
                    if tx.blocking_send(Ok(frame)).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    break;
                }
            }
        }
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

pub struct Client {
    socket: PathBuf,
}

type Result<T, E = ClientError> = std::result::Result<T, E>;

const NO_BODY: Option<&()> = None;

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_path_buf(),
        }
    }

    // --- system

    pub async fn info(&self) -> Result<AgentInfo> {
        self.call(Route::Info, &[], &[], NO_BODY).await
    }

    // --- disks and leases

    pub async fn disks(&self) -> Result<Vec<Disk>> {
        self.call(Route::ListDisks, &[], &[], NO_BODY).await
    }

    pub async fn create_disk(&self, req: &CreateDisk) -> Result<Disk> {
        self.call(Route::CreateDisk, &[], &[], Some(req)).await
    }

    /// `disk` is an id or a name.
    pub async fn disk(&self, disk: &str) -> Result<Disk> {
        self.call(Route::Disk, &[disk], &[], NO_BODY).await
    }

    pub async fn delete_disk(&self, disk: &str) -> Result<()> {
        self.call(Route::DeleteDisk, &[disk], &[], NO_BODY).await
    }

    pub async fn resize_disk(&self, disk: &str, req: &ResizeDisk) -> Result<Disk> {
        self.call(Route::ResizeDisk, &[disk], &[], Some(req)).await
    }

    pub async fn acquire_lease(&self, disk: &str, req: &AcquireLease) -> Result<Lease> {
        self.call(Route::AcquireLease, &[disk], &[], Some(req))
            .await
    }

    pub async fn release_lease(&self, disk: &str) -> Result<ReleaseResult> {
        self.call(Route::ReleaseLease, &[disk], &[], NO_BODY).await
    }

    pub async fn leases(&self) -> Result<Vec<Lease>> {
        self.call(Route::ListLeases, &[], &[], NO_BODY).await
    }

    pub async fn local_storage(&self, app: &str) -> Result<Disk> {
        self.call(Route::LocalStorage, &[app], &[], NO_BODY).await
    }

    pub async fn backup_disk(&self, disk: &str) -> Result<BackupStream> {
        let path = Route::BackupDisk.path(&[disk], &[]);
        let response = self
            .send(
                Route::BackupDisk,
                &path,
                "application/octet-stream",
                Empty::<Bytes>::new(),
            )
            .await?;
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(BackupStream {
            freeze_seconds: header(FREEZE_SECONDS_HEADER).and_then(|v| v.parse().ok()),
            data_bytes: header(DATA_BYTES_HEADER).and_then(|v| v.parse().ok()),
            size_bytes: header(DISK_SIZE_HEADER).and_then(|v| v.parse().ok()),
            snapshot: ByteStream {
                body: response.into_body(),
            },
        })
    }

    /// Has the agent back the disk up into one of its backup targets.
    pub async fn backup_disk_to_target(
        &self,
        disk: &str,
        req: &BackupToTarget,
    ) -> Result<EventStream<BackupEvent>> {
        let payload = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let path = Route::BackupDiskToTarget.path(&[disk], &[]);
        let response = self
            .send(
                Route::BackupDiskToTarget,
                &path,
                "application/json",
                Full::new(Bytes::from(payload)),
            )
            .await?;
        Ok(EventStream::new(response))
    }

    /// Has the agent restore a backup it reads from one of its backup targets.
    pub async fn restore_disk_from_target(
        &self,
        name: Option<&str>,
        force: bool,
        target: &str,
        key: &str,
    ) -> Result<RestoreResult> {
        let mut query = vec![
            ("force", force.to_string()),
            ("target", target.to_string()),
            ("key", key.to_string()),
        ];
        if let Some(name) = name {
            query.push(("name", name.to_string()));
        }
        self.call(Route::RestoreDisk, &[], &query, NO_BODY).await
    }

    /// Uploads a snapshot read from `snapshot` (on a thread of its own: stdin or a file).
    pub async fn restore_disk(
        &self,
        name: Option<&str>,
        force: bool,
        snapshot: impl Read + Send + 'static,
    ) -> Result<RestoreResult> {
        let body = upload_body(snapshot);
        let mut query = vec![("force", force.to_string())];
        if let Some(name) = name {
            query.push(("name", name.to_string()));
        }
        let path = Route::RestoreDisk.path(&[], &query);
        let response = self
            .send(Route::RestoreDisk, &path, "application/octet-stream", body)
            .await?;
        // The answer comes once the whole upload is checked: errors reading it are shown bare.
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Stream(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(ClientError::Event)
    }

    // --- network endpoints

    pub async fn endpoints(&self) -> Result<Vec<Endpoint>> {
        self.call(Route::ListEndpoints, &[], &[], NO_BODY).await
    }

    pub async fn create_endpoint(&self, req: &CreateEndpoint) -> Result<Endpoint> {
        self.call(Route::CreateEndpoint, &[], &[], Some(req)).await
    }

    pub async fn endpoint(&self, owner: &str) -> Result<Endpoint> {
        self.call(Route::Endpoint, &[owner], &[], NO_BODY).await
    }

    pub async fn delete_endpoint(&self, owner: &str) -> Result<EndpointDeleted> {
        self.call(Route::DeleteEndpoint, &[owner], &[], NO_BODY)
            .await
    }

    pub async fn net_gc(&self) -> Result<NetGcReport> {
        self.call(Route::NetGc, &[], &[], NO_BODY).await
    }

    // --- images

    pub async fn images(&self) -> Result<Vec<ImageSummary>> {
        self.call(Route::ListImages, &[], &[], NO_BODY).await
    }

    pub async fn pull_image(&self, req: &PullImage) -> Result<PullStream> {
        let payload = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let path = Route::PullImage.path(&[], &[]);
        let response = self
            .send(
                Route::PullImage,
                &path,
                "application/json",
                Full::new(Bytes::from(payload)),
            )
            .await?;
        Ok(EventStream::new(response))
    }

    pub async fn import_image(&self, req: &ImportImage) -> Result<ImageSummary> {
        self.call(Route::ImportImage, &[], &[], Some(req)).await
    }

    pub async fn remove_image(&self, reference: &str) -> Result<ImageRemoved> {
        let query = [("reference", reference.to_string())];
        self.call(Route::RemoveImage, &[], &query, NO_BODY).await
    }

    pub async fn image_gc(&self) -> Result<ImageGcReport> {
        self.call(Route::ImageGc, &[], &[], NO_BODY).await
    }

    // --- sandboxes

    pub async fn sandboxes(&self) -> Result<Vec<Sandbox>> {
        self.call(Route::ListSandboxes, &[], &[], NO_BODY).await
    }

    pub async fn run_sandbox(&self, req: &RunSandbox) -> Result<Sandbox> {
        self.call(Route::RunSandbox, &[], &[], Some(req)).await
    }

    /// `sandbox` is an id or a name.
    pub async fn sandbox(&self, sandbox: &str) -> Result<Sandbox> {
        self.call(Route::Sandbox, &[sandbox], &[], NO_BODY).await
    }

    pub async fn delete_sandbox(&self, sandbox: &str) -> Result<()> {
        self.call(Route::DeleteSandbox, &[sandbox], &[], NO_BODY)
            .await
    }

    /// The sandbox's output so far, and with `follow` what it writes next.
    pub async fn sandbox_logs(&self, sandbox: &str, follow: bool) -> Result<ByteStream> {
        let path = Route::SandboxLogs.path(&[sandbox], &[("follow", follow.to_string())]);
        let response = self
            .send(
                Route::SandboxLogs,
                &path,
                "application/json",
                Empty::<Bytes>::new(),
            )
            .await?;
        Ok(ByteStream {
            body: response.into_body(),
        })
    }

    pub async fn exec_sandbox(&self, sandbox: &str, req: &ExecRequest) -> Result<ExecResult> {
        self.call(Route::ExecSandbox, &[sandbox], &[], Some(req))
            .await
    }

    /// `grace`: seconds between SIGTERM and SIGKILL (default: the sandbox's).
    pub async fn stop_sandbox(&self, sandbox: &str, grace_secs: Option<f64>) -> Result<Sandbox> {
        let query: Vec<_> = grace_secs
            .map(|s| ("grace_secs", s.to_string()))
            .into_iter()
            .collect();
        self.call(Route::StopSandbox, &[sandbox], &query, NO_BODY)
            .await
    }

    /// Waits until the sandbox is over; the agent answers 408 after `timeout_secs`.
    pub async fn wait_sandbox(&self, sandbox: &str, timeout_secs: Option<f64>) -> Result<Sandbox> {
        let query: Vec<_> = timeout_secs
            .map(|s| ("timeout_secs", s.to_string()))
            .into_iter()
            .collect();
        self.call(Route::WaitSandbox, &[sandbox], &query, NO_BODY)
            .await
    }

    // --- apps, env and addons

    /// Uploads an app's source (a tar read from `source` on a thread of its own) to be built
    /// into an image for one service.
    pub async fn build_source(
        &self,
        query: &BuildQuery,
        source: impl Read + Send + 'static,
    ) -> Result<BuildResult> {
        let mut pairs = vec![
            ("app", query.app.clone()),
            ("service", query.service.clone()),
        ];
        for (key, value) in [
            ("stack", &query.stack),
            ("base", &query.base),
            ("command", &query.command),
        ] {
            if let Some(value) = value {
                pairs.push((key, value.clone()));
            }
        }
        let path = Route::Build.path(&[], &pairs);
        let response = self
            .send(
                Route::Build,
                &path,
                "application/octet-stream",
                upload_body(source),
            )
            .await?;
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Stream(e.to_string()))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(ClientError::Event)
    }

    pub async fn deploy(&self, req: &DeployApp) -> Result<App> {
        self.call(Route::Deploy, &[], &[], Some(req)).await
    }

    pub async fn apps(&self) -> Result<Vec<App>> {
        self.call(Route::ListApps, &[], &[], NO_BODY).await
    }

    pub async fn app(&self, app: &str) -> Result<App> {
        self.call(Route::App, &[app], &[], NO_BODY).await
    }

    pub async fn delete_app(&self, app: &str) -> Result<AppDeleted> {
        self.call(Route::DeleteApp, &[app], &[], NO_BODY).await
    }

    pub async fn restart_app(&self, app: &str) -> Result<App> {
        self.call(Route::RestartApp, &[app], &[], NO_BODY).await
    }

    pub async fn app_env(&self, app: &str, reveal: bool) -> Result<Vec<EnvVarView>> {
        let query = [("reveal", reveal.to_string())];
        self.call(Route::AppEnv, &[app], &query, NO_BODY).await
    }

    pub async fn app_addons(&self, app: &str) -> Result<Vec<Addon>> {
        self.call(Route::AppAddons, &[app], &[], NO_BODY).await
    }

    pub async fn app_addon(&self, app: &str, addon: &str) -> Result<Addon> {
        self.call(Route::AppAddon, &[app, addon], &[], NO_BODY)
            .await
    }

    pub async fn destroy_addon(&self, app: &str, addon: &str) -> Result<AddonDestroyed> {
        self.call(Route::DestroyAddon, &[app, addon], &[], NO_BODY)
            .await
    }

    pub async fn rotate_addon(
        &self,
        app: &str,
        addon: &str,
        req: &RotateAddon,
    ) -> Result<AddonRotated> {
        self.call(Route::RotateAddon, &[app, addon], &[], Some(req))
            .await
    }

    pub async fn update_addon(
        &self,
        app: &str,
        addon: &str,
        req: &UpdateAddon,
    ) -> Result<AddonUpdated> {
        self.call(Route::UpdateAddon, &[app, addon], &[], Some(req))
            .await
    }

    pub async fn addon_backups(
        &self,
        app: &str,
        addon: &str,
    ) -> Result<crate::model::AddonBackups> {
        self.call(Route::AddonBackups, &[app, addon], &[], NO_BODY)
            .await
    }

    pub async fn restore_addon(
        &self,
        app: &str,
        addon: &str,
        req: &crate::model::RestoreAddon,
    ) -> Result<crate::model::AddonRestored> {
        self.call(Route::RestoreAddon, &[app, addon], &[], Some(req))
            .await
    }

    pub async fn create_addon(&self, req: &CreateAddon) -> Result<Addon> {
        self.call(Route::CreateAddon, &[], &[], Some(req)).await
    }

    pub async fn addon_catalog(&self) -> Result<Vec<AddonCatalogEntry>> {
        self.call(Route::AddonCatalog, &[], &[], NO_BODY).await
    }

    // --- transport

    /// A JSON request and a JSON answer (an empty answer reads as `null`, i.e. `()`).
    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        route: Route,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&B>,
    ) -> Result<R> {
        let payload = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let path = route.path(segments, query);
        let response = self
            .send(
                route,
                &path,
                "application/json",
                Full::new(Bytes::from(payload)),
            )
            .await?;
        decode(read_all(response).await?)
    }

    /// Sends a request; returns the response of a success, or the agent's error.
    async fn send<B>(
        &self,
        route: Route,
        path: &str,
        content_type: &str,
        body: B,
    ) -> Result<hyper::Response<Incoming>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(conn);
        let request = Request::builder()
            .method(route.http_method())
            .uri(path)
            .header("host", "miren-agent")
            .header("content-type", content_type)
            .body(body)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Protocol(format!("the agent closed the connection: {e}")))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = Status {
            code: response.status().as_u16(),
            shown: response.status().to_string(),
        };
        let bytes = read_all(response).await?;
        Err(error_from(status, &bytes))
    }
}

async fn read_all(response: hyper::Response<Incoming>) -> Result<Bytes> {
    Ok(response
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Protocol(e.to_string()))?
        .to_bytes())
}

fn decode<R: DeserializeOwned>(bytes: Bytes) -> Result<R> {
    let bytes = if bytes.is_empty() {
        Bytes::from_static(b"null")
    } else {
        bytes
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| ClientError::Protocol(format!("unexpected response: {e}")))
}

/// A response's status as the client reports it: the number, and `404 Not Found` for people.
struct Status {
    code: u16,
    shown: String,
}

fn error_from(status: Status, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(err) => ClientError::Api {
            status: status.code,
            code: err.code,
            message: err.message,
        },
        Err(_) => ClientError::Protocol(format!(
            "agent answered {}: {}",
            status.shown,
            String::from_utf8_lossy(bytes)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_encode_segments_and_query_values() {
        assert_eq!(Route::Disk.path(&["pg-data"], &[]), "/v1/disks/pg-data");
        assert_eq!(
            Route::DestroyAddon.path(&["shop", "miren-postgresql"], &[]),
            "/v1/apps/shop/addons/miren-postgresql"
        );
        assert_eq!(
            Route::Endpoint.path(&["pid:12"], &[]),
            "/v1/endpoints/pid%3A12"
        );
        assert_eq!(
            Route::RemoveImage.path(&[], &[("reference", "ghcr.io/org/app:1".into())]),
            "/v1/images?reference=ghcr.io%2Forg%2Fapp%3A1"
        );
        assert_eq!(
            Route::RestoreDisk.path(&[], &[("force", "false".into()), ("name", "d1".into())]),
            "/v1/disks/restore?force=false&name=d1"
        );
        assert_eq!(
            Route::WaitSandbox.path(&["sb"], &[("timeout_secs", 1.5f64.to_string())]),
            "/v1/sandboxes/sb/wait?timeout_secs=1.5"
        );
    }

    #[test]
    fn every_route_is_listed_once() {
        for (i, route) in Route::ALL.iter().enumerate() {
            assert!(!Route::ALL[..i].contains(route), "{route:?} twice");
            assert!(route.template().starts_with("/v1/"));
        }
    }
}
