//! The agent's HTTP/1.1 + JSON API over its Unix socket. Routes are declared once, with their
//! OpenAPI description next to them; `openapi()` builds the document from the same router.

pub mod error;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tracing::{info, warn};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::core::disks::{DiskService, DEFAULT_LEASE_TIMEOUT};
use crate::core::error::{Error, ErrorKind};
use crate::core::net::NetService;
use crate::model::{
    AcquireLease, AgentInfo, CreateDisk, CreateEndpoint, Disk, Endpoint, EndpointDeleted,
    ErrorBody, Lease, NetGcReport, ReleaseResult, ResizeDisk, RestoreQuery, RestoreResult,
};

#[derive(Clone)]
pub struct AppState {
    pub disks: Arc<DiskService>,
    pub net: Arc<NetService>,
    pub images: Arc<crate::core::images::ImageService>,
    pub sandboxes: Arc<crate::core::sandboxes::SandboxService>,
    pub addons: Arc<crate::core::addons::AddonService>,
    pub apps: Arc<crate::core::apps::AppService>,
    pub socket_gid: Option<u32>,
    /// Restore uploads running at once (see [`MAX_RESTORES`]).
    pub restores: Arc<tokio::sync::Semaphore>,
}

/// Restores that may run at once: each holds a blocking thread and a temporary image while
/// its snapshot arrives. More are refused with 503 rather than queued on open connections.
pub const MAX_RESTORES: usize = 4;

/// Credentials of the process on the other end of the socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug)]
pub struct PeerCred {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub pid: Option<i32>,
}

/// JSON body extractor whose rejections are our JSON errors, not axum's plain text.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(Error))]
pub struct Body<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
pub struct PathParam<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Error))]
pub struct QueryParam<T>(pub T);

impl From<axum::extract::rejection::QueryRejection> for Error {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Error::invalid(format!("invalid query: {}", rejection.body_text()))
    }
}

impl From<JsonRejection> for Error {
    fn from(rejection: JsonRejection) -> Self {
        Error::invalid(format!("invalid request body: {}", rejection.body_text()))
    }
}

impl From<PathRejection> for Error {
    fn from(rejection: PathRejection) -> Self {
        Error::invalid(format!("invalid path: {}", rejection.body_text()))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "miren agent",
        description = "Node agent API, served over the agent's Unix socket (HTTP/1.1, JSON). Errors are `{\"code\", \"message\"}`.",
        license(name = "Apache-2.0")
    ),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(agent_info))
        .routes(routes!(list_disks, create_disk))
        .routes(routes!(get_disk, delete_disk))
        .routes(routes!(resize_disk))
        .routes(routes!(acquire_lease, release_lease))
        .routes(routes!(list_leases))
        .routes(routes!(ensure_local_storage))
        .routes(routes!(list_endpoints, create_endpoint))
        .routes(routes!(get_endpoint, delete_endpoint))
        .routes(routes!(gc_endpoints))
        .routes(routes!(backup_disk))
        .routes(routes!(restore_disk))
        .routes(routes!(list_images, remove_image))
        .routes(routes!(pull_image))
        .routes(routes!(import_image))
        .routes(routes!(gc_images))
        .routes(routes!(list_sandboxes, run_sandbox))
        .routes(routes!(get_sandbox, delete_sandbox))
        .routes(routes!(stop_sandbox))
        .routes(routes!(wait_sandbox))
        .routes(routes!(exec_sandbox))
        .routes(routes!(sandbox_logs))
        .routes(routes!(addon_catalog))
        .routes(routes!(create_addon))
        .routes(routes!(list_addons))
        .routes(routes!(get_addon, destroy_addon))
        .routes(routes!(app_env))
        .routes(routes!(deploy_app))
        .routes(routes!(list_apps))
        .routes(routes!(get_app, delete_app))
        .routes(routes!(restart_app))
}

/// The OpenAPI document of every route, generated from the code.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = api_router().split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    document_error_statuses(&mut doc);
    doc
}

/// Error statuses a route can answer with beyond the ones its own annotation names: the ones
/// every route shares (refused peers, limits, failures), the ones its inputs, lookups and
/// mutations imply, and those of the sandboxes, images and space it may need. An annotation's
/// own description of a status wins.
fn document_error_statuses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    // Routes that may start containers (pulling their images) and allocate space or addresses.
    const STARTS_SANDBOXES: &[&str] = &[
        "/v1/sandboxes",
        "/v1/addons",
        "/v1/deploy",
        "/v1/apps/{app}/restart",
    ];
    const ALLOCATES: &[&str] = &["/v1/disks", "/v1/endpoints", "/v1/disks/restore"];
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            ("get", item.get.as_mut()),
            ("put", item.put.as_mut()),
            ("post", item.post.as_mut()),
            ("delete", item.delete.as_mut()),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            let has_input = operation.request_body.is_some()
                || operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
            let mut statuses: Vec<(&str, &str)> = vec![
                (
                    "403",
                    "The caller is neither root nor in the socket's group",
                ),
                ("500", "The agent failed; its log says why"),
                (
                    "503",
                    "The agent is at a connection, restore or loop-device limit; retry later",
                ),
            ];
            if has_input {
                statuses.push((
                    "400",
                    "Invalid request: the message names the field and what to write",
                ));
            }
            if path.contains('{') {
                statuses.push(("404", "No such object; the message names it"));
            }
            if method != "get" {
                statuses.push(("409", "Conflicts with the current state (in use, busy, exists); the message says what to do"));
            }
            if method == "post" && STARTS_SANDBOXES.contains(&path.as_str()) {
                statuses.push(("422", "A container did not start; the message says why"));
                statuses.push(("502", "The image registry failed or refused the image"));
                statuses.push(("507", "No space left, or no free address in the subnet"));
            }
            if method == "post" && ALLOCATES.contains(&path.as_str()) {
                statuses.push(("507", "No space left, or no free address in the subnet"));
            }
            for (status, description) in statuses {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| error(description).into());
            }
        }
    }
}

pub fn openapi_json() -> String {
    let mut text = serde_json::to_string_pretty(&openapi()).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    text
}

pub fn router(state: AppState) -> Router {
    let (router, _) = api_router().split_for_parts();
    let doc = openapi_json();
    router
        .route(
            "/openapi.json",
            axum::routing::get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    doc,
                )
            }),
        )
        .fallback(|| async {
            Error::not_found("no such route; GET /openapi.json lists every route")
        })
        .method_not_allowed_fallback(|| async {
            error::respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method; GET /openapi.json lists every route",
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                Error::internal("the agent hit a bug handling this request; see its log")
                    .into_response()
            },
        ))
        .with_state(state)
}

/// Only root and members of the socket's group may talk to the agent. File permissions
/// already say so; this is the second lock, and it names who did what in the log.
async fn authorize(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerCred>,
    request: Request,
    next: Next,
) -> Response {
    if !peer_allowed(&peer, state.socket_gid) {
        warn!(uid = ?peer.uid, pid = ?peer.pid, path = %request.uri().path(), "refused a peer");
        let group = state
            .socket_gid
            .map(|g| format!("in group {g}"))
            .unwrap_or_else(|| "root".into());
        return Error::new(
            ErrorKind::Forbidden,
            "forbidden",
            format!(
                "uid {} may not use the miren agent: only root or users {group} may; run as root or ask an operator to add you to the socket group",
                peer.uid.map_or("unknown".into(), |u| u.to_string())
            ),
        )
        .into_response();
    }
    if request.method() != Method::GET {
        info!(uid = ?peer.uid, pid = ?peer.pid, method = %request.method(), path = %request.uri().path(), "request");
    }
    next.run(request).await
}

fn peer_allowed(peer: &PeerCred, socket_gid: Option<u32>) -> bool {
    let Some(uid) = peer.uid else { return false };
    if uid == 0 {
        return true;
    }
    let Some(group) = socket_gid else {
        return false;
    };
    if peer.gid == Some(group) {
        return true;
    }
    // Supplementary groups are not in SO_PEERCRED; read them from the peer's /proc entry.
    peer.pid
        .and_then(miren_sys::proc::supplementary_groups)
        .is_some_and(|groups| groups.contains(&group))
}

/// Disk work blocks (ioctls, mkfs); it runs off the async threads. If the client hangs up, the
/// operation still runs to its end, so the state store never sees half an operation.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))?
}

#[utoipa::path(get, path = "/v1/info", tag = "agent",
    responses((status = 200, description = "Who this agent is", body = AgentInfo)))]
async fn agent_info(State(state): State<AppState>) -> Json<AgentInfo> {
    Json(AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        data_dir: state.disks.cfg.data_dir.display().to_string(),
        name_prefix: state.disks.cfg.name_prefix.clone(),
        pid: std::process::id(),
    })
}

#[utoipa::path(get, path = "/v1/disks", tag = "disks",
    responses((status = 200, description = "Every disk and local storage directory", body = [Disk])))]
async fn list_disks(State(state): State<AppState>) -> Result<Json<Vec<Disk>>, Error> {
    blocking(move || state.disks.list()).await.map(Json)
}

#[utoipa::path(post, path = "/v1/disks", tag = "disks", request_body = CreateDisk,
    responses(
        (status = 201, description = "Created, attached, formatted and mounted", body = Disk),
        (status = 400, description = "Invalid name or size", body = ErrorBody),
        (status = 409, description = "A disk with that name exists", body = ErrorBody)))]
async fn create_disk(
    State(state): State<AppState>,
    Body(req): Body<CreateDisk>,
) -> Result<(StatusCode, Json<Disk>), Error> {
    let disk = blocking(move || state.disks.create(&req)).await?;
    Ok((StatusCode::CREATED, Json(disk)))
}

#[utoipa::path(get, path = "/v1/disks/{disk}", tag = "disks",
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses((status = 200, body = Disk), (status = 404, body = ErrorBody)))]
async fn get_disk(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
) -> Result<Json<Disk>, Error> {
    blocking(move || {
        let row = state.disks.find(&disk)?;
        state.disks.view_one(&row)
    })
    .await
    .map(Json)
}

#[utoipa::path(delete, path = "/v1/disks/{disk}", tag = "disks",
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses(
        (status = 204, description = "Unmounted, detached and removed"),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The disk is leased", body = ErrorBody)))]
async fn delete_disk(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
) -> Result<StatusCode, Error> {
    blocking(move || state.disks.delete(&disk)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/disks/{disk}/resize", tag = "disks", request_body = ResizeDisk,
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses(
        (status = 200, description = "Grown online", body = Disk),
        (status = 400, description = "Smaller than the current size", body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn resize_disk(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
    Body(req): Body<ResizeDisk>,
) -> Result<Json<Disk>, Error> {
    blocking(move || state.disks.resize(&disk, req.size_gb))
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/disks/{disk}/lease", tag = "leases", request_body = AcquireLease,
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses(
        (status = 200, description = "Lease held (also when this holder already had it)", body = Lease),
        (status = 409, description = "Still held by another holder when the timeout ran out", body = ErrorBody),
        (status = 404, body = ErrorBody)))]
async fn acquire_lease(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
    Body(req): Body<AcquireLease>,
) -> Result<Json<Lease>, Error> {
    crate::core::validate::lease(&req)?;
    let timeout = match req.timeout_secs {
        None => DEFAULT_LEASE_TIMEOUT,
        Some(secs) if secs.is_finite() && (0.0..=86_400.0).contains(&secs) => {
            Duration::from_secs_f64(secs)
        }
        Some(secs) => {
            return Err(Error::invalid(format!(
                "timeout_secs must be between 0 and 86400, got {secs}"
            )))
        }
    };
    state
        .disks
        .acquire_lease(
            &disk,
            &crate::core::owner::Holder::parse(&req.holder)?,
            timeout,
        )
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/v1/disks/{disk}/lease", tag = "leases",
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses(
        (status = 200, description = "Released, or was not leased", body = ReleaseResult),
        (status = 404, body = ErrorBody)))]
async fn release_lease(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
) -> Result<Json<ReleaseResult>, Error> {
    blocking(move || state.disks.release_lease(&disk))
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/leases", tag = "leases",
    responses((status = 200, description = "Every lease held", body = [Lease])))]
async fn list_leases(State(state): State<AppState>) -> Result<Json<Vec<Lease>>, Error> {
    blocking(move || state.disks.leases()).await.map(Json)
}

#[utoipa::path(put, path = "/v1/local-storage/{app}", tag = "disks",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, description = "The app's local storage directory (made on first use)", body = Disk),
        (status = 400, body = ErrorBody)))]
async fn ensure_local_storage(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<Disk>, Error> {
    blocking(move || state.disks.ensure_local_storage(&app))
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/endpoints", tag = "network",
    responses((status = 200, description = "Every network endpoint", body = [Endpoint])))]
async fn list_endpoints(State(state): State<AppState>) -> Result<Json<Vec<Endpoint>>, Error> {
    state.net.list().map(Json)
}

#[utoipa::path(post, path = "/v1/endpoints", tag = "network", request_body = CreateEndpoint,
    responses(
        (status = 201, description = "Netns, veth, address, route and rules in place", body = Endpoint),
        (status = 400, body = ErrorBody),
        (status = 409, description = "The owner has a different endpoint, or the host port is taken", body = ErrorBody),
        (status = 507, description = "The subnet has no free address", body = ErrorBody)))]
async fn create_endpoint(
    State(state): State<AppState>,
    Body(req): Body<CreateEndpoint>,
) -> Result<(StatusCode, Json<Endpoint>), Error> {
    // Addon servers' endpoints are in the addon name space; nobody else may join it.
    crate::core::disks::refuse_reserved("app", &req.app)?;
    // Runs to its end even if the client hangs up, like every mutation.
    let endpoint = tokio::spawn(async move { state.net.create(&req).await })
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))??;
    Ok((StatusCode::CREATED, Json(endpoint)))
}

#[utoipa::path(get, path = "/v1/endpoints/{owner}", tag = "network",
    params(("owner" = String, Path, description = "The endpoint's owner")),
    responses((status = 200, body = Endpoint), (status = 404, body = ErrorBody)))]
async fn get_endpoint(
    State(state): State<AppState>,
    PathParam(owner): PathParam<String>,
) -> Result<Json<Endpoint>, Error> {
    state.net.get(&owner).map(Json)
}

#[utoipa::path(delete, path = "/v1/endpoints/{owner}", tag = "network",
    params(("owner" = String, Path, description = "The endpoint's owner")),
    responses((status = 200, description = "Deleted, or there was nothing to delete", body = EndpointDeleted)))]
async fn delete_endpoint(
    State(state): State<AppState>,
    PathParam(owner): PathParam<String>,
) -> Result<Json<EndpointDeleted>, Error> {
    tokio::spawn(async move { state.net.delete(&owner).await })
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))?
        .map(Json)
}

#[utoipa::path(post, path = "/v1/endpoints/gc", tag = "network",
    responses((status = 200, description = "What the reconciliation released, removed and repaired", body = NetGcReport)))]
async fn gc_endpoints(State(state): State<AppState>) -> Result<Json<NetGcReport>, Error> {
    tokio::spawn(async move { state.net.gc().await })
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))?
        .map(Json)
}

/// Headers of a backup response.
pub const FREEZE_SECONDS_HEADER: &str = "x-miren-freeze-seconds";
pub const DATA_BYTES_HEADER: &str = "x-miren-data-bytes";
pub const DISK_SIZE_HEADER: &str = "x-miren-disk-size";

#[utoipa::path(post, path = "/v1/disks/{disk}/backup", tag = "backups",
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses(
        (status = 200, description = "The snapshot, streamed: a sequence of zstd frames (docs/snapshot-format.md). A mounted, writable filesystem is frozen only while its data is copied aside; the header x-miren-freeze-seconds says for how long, x-miren-data-bytes how much data is to come uncompressed.",
            content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The disk is busy (resizing, deleting, another backup)", body = ErrorBody)))]
async fn backup_disk(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
) -> Result<Response, Error> {
    let disks = state.disks.clone();
    let capture = blocking(move || disks.capture_for_backup(&disk)).await?;
    let mut headers = axum::http::HeaderMap::new();
    let header = |v: String| axum::http::HeaderValue::from_str(&v).ok();
    if let Some(secs) = capture
        .freeze_seconds
        .and_then(|s| header(format!("{s:.6}")))
    {
        headers.insert(FREEZE_SECONDS_HEADER, secs);
    }
    if let Some(v) = header(capture.copied_bytes.to_string()) {
        headers.insert(DATA_BYTES_HEADER, v);
    }
    if let Some(v) = header(capture.meta.size_bytes.to_string()) {
        headers.insert(DISK_SIZE_HEADER, v);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        let mut out = crate::api::stream::ChannelWriter::new(tx.clone());
        let started = std::time::Instant::now();
        let written = miren_snapshot::write_snapshot(
            &capture.path,
            &capture.meta,
            &mut out,
            &miren_snapshot::WriteOptions::default(),
            &mut miren_snapshot::NoProgress,
        )
        .map_err(|e| e.to_string())
        .and_then(|summary| {
            std::io::Write::flush(&mut out).map_err(|e| e.to_string())?;
            Ok(summary)
        });
        match written {
            Ok(summary) => {
                info!(disk = %capture.meta.name, bytes = summary.compressed_bytes_written, checksum = %summary.image_checksum,
                      stream_seconds = started.elapsed().as_secs_f64(), "backup streamed")
            }
            Err(e) => {
                warn!(disk = %capture.meta.name, error = %e, "backup stream failed");
                // An error frame aborts the response, so the client never mistakes a
                // truncated stream for a whole snapshot.
                let _ = tx.blocking_send(Err(std::io::Error::other(e)));
            }
        }
        drop(capture);
    });
    let body = axum::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let mut response = Response::new(body);
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

#[utoipa::path(post, path = "/v1/disks/restore", tag = "backups", params(RestoreQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A snapshot written by a backup"),
    responses(
        (status = 200, description = "Restored: verified completely, then swapped in", body = RestoreResult),
        (status = 400, description = "Not a snapshot, corrupt (the first bad chunk is named), or a newer format", body = ErrorBody),
        (status = 408, description = "The upload sent nothing for 20 seconds and was cut off", body = ErrorBody),
        (status = 409, description = "The disk exists (use force) or is leased", body = ErrorBody),
        (status = 503, description = "Too many restores are running; retry when one has finished", body = ErrorBody),
        (status = 507, description = "No space left for the new image", body = ErrorBody)))]
async fn restore_disk(
    State(state): State<AppState>,
    QueryParam(query): QueryParam<RestoreQuery>,
    body: axum::body::Body,
) -> Result<Json<RestoreResult>, Error> {
    let Ok(slot) = state.restores.clone().try_acquire_owned() else {
        return Err(Error::new(
            ErrorKind::Unavailable,
            "too_many_restores",
            format!("{MAX_RESTORES} restores are already running; retry when one has finished"),
        ));
    };
    let mut input = crate::api::stream::forward_body(body);
    // No blocking thread for a client that has not sent anything yet.
    input.wait_for_data().await;
    let disks = state.disks.clone();
    let restored = blocking(move || {
        let result = disks.restore(&mut input, query.name, query.force);
        if result.is_err() {
            input.drain();
        }
        drop(slot);
        match result {
            Err(_) if input.stalled() => Err(Error::new(
                ErrorKind::Timeout,
                "upload_stalled",
                format!(
                    "the upload sent nothing for {}s and was cut off; nothing was restored. Send the snapshot without pauses",
                    crate::api::stream::BODY_IDLE_TIMEOUT.as_secs()
                ),
            )),
            other => other,
        }
    })
    .await?;
    Ok(Json(RestoreResult {
        disk: restored.disk,
        replaced: restored.replaced,
        image_checksum: restored.image_checksum,
        data_bytes: restored.data_bytes,
    }))
}

#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "Images on this node", body = [crate::model::ImageSummary])))]
async fn list_images(
    State(state): State<AppState>,
) -> Result<Json<Vec<crate::model::ImageSummary>>, Error> {
    blocking(move || state.images.list()).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/images", tag = "images", params(crate::model::ImageQuery),
    responses((status = 200, description = "Removed, or it was not here", body = crate::model::ImageRemoved)))]
async fn remove_image(
    State(state): State<AppState>,
    QueryParam(query): QueryParam<crate::model::ImageQuery>,
) -> Result<Json<crate::model::ImageRemoved>, Error> {
    crate::core::validate::text("reference", &query.reference, 1024)?;
    let reference = query.reference.clone();
    let removed = blocking(move || state.images.remove(&query.reference)).await?;
    Ok(Json(crate::model::ImageRemoved { reference, removed }))
}

#[utoipa::path(post, path = "/v1/images/pull", tag = "images", request_body = crate::model::PullImage,
    responses(
        (status = 200, description = "NDJSON, one PullEvent per line: progress while blobs download, then the image or an error", content_type = "application/x-ndjson", body = [crate::model::PullEvent]),
        (status = 400, description = "Not a valid reference", body = ErrorBody)))]
async fn pull_image(
    State(state): State<AppState>,
    Body(req): Body<crate::model::PullImage>,
) -> Result<Response, Error> {
    use crate::model::PullEvent;
    crate::core::validate::pull(&req)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<hyper::body::Bytes>, std::io::Error>,
    >(64);
    let line = ndjson_line;
    let progress_tx = tx.clone();
    let progress: miren_runtime::ProgressFn = Arc::new(move |p: &miren_runtime::Progress| {
        // Progress is best effort: a slow reader misses a few updates, never blocks the pull.
        let _ = progress_tx.try_send(line(&PullEvent::Progress {
            digest: p.digest.clone(),
            done: p.done,
            total: p.total,
        }));
    });
    let credentials = req.username.clone().zip(req.password.clone());
    tokio::spawn(async move {
        let event = match state
            .images
            .pull(&req.reference, credentials, Some(progress))
            .await
        {
            Ok(image) => {
                info!(reference = %image.reference, digest = %image.manifest_digest, "image pulled");
                PullEvent::Image(image)
            }
            Err(err) => PullEvent::Error(ErrorBody {
                code: err.code.to_string(),
                message: err.message,
            }),
        };
        let _ = tx.send(line(&event)).await;
    });
    let mut response = Response::new(axum::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

fn ndjson_line(
    event: &crate::model::PullEvent,
) -> Result<hyper::body::Frame<hyper::body::Bytes>, std::io::Error> {
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Ok(hyper::body::Frame::data(hyper::body::Bytes::from(bytes)))
}

#[utoipa::path(post, path = "/v1/images/import", tag = "images", request_body = crate::model::ImportImage,
    responses((status = 200, body = crate::model::ImageSummary), (status = 400, body = ErrorBody)))]
async fn import_image(
    State(state): State<AppState>,
    Body(req): Body<crate::model::ImportImage>,
) -> Result<Json<crate::model::ImageSummary>, Error> {
    crate::core::validate::import(&req)?;
    blocking(move || {
        state
            .images
            .import(std::path::Path::new(&req.path), &req.reference)
    })
    .await
    .map(Json)
}

#[utoipa::path(post, path = "/v1/images/gc", tag = "images",
    responses((status = 200, body = crate::model::ImageGcReport)))]
async fn gc_images(
    State(state): State<AppState>,
) -> Result<Json<crate::model::ImageGcReport>, Error> {
    blocking(move || {
        let in_use = state.sandboxes.layers_in_use();
        state.images.gc(&in_use)
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, body = [crate::model::Sandbox])))]
async fn list_sandboxes(
    State(state): State<AppState>,
) -> Result<Json<Vec<crate::model::Sandbox>>, Error> {
    blocking(move || state.sandboxes.list()).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = crate::model::RunSandbox,
    responses(
        (status = 201, description = "Running (its supervisor started the container)", body = crate::model::Sandbox),
        (status = 400, body = ErrorBody),
        (status = 409, description = "Name taken, a disk belongs to another app or an addon, or a disk's lease timed out", body = ErrorBody),
        (status = 422, description = "The container did not start", body = ErrorBody)))]
async fn run_sandbox(
    State(state): State<AppState>,
    Body(req): Body<crate::model::RunSandbox>,
) -> Result<(StatusCode, Json<crate::model::Sandbox>), Error> {
    crate::core::validate::run_sandbox(&req)?;
    let sandbox = tokio::spawn(async move { state.sandboxes.run(req).await })
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))??;
    Ok((StatusCode::CREATED, Json(sandbox)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = crate::model::Sandbox), (status = 404, body = ErrorBody)))]
async fn get_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
) -> Result<Json<crate::model::Sandbox>, Error> {
    blocking(move || state.sandboxes.get(&sandbox))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox}", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 204, description = "Stopped and removed with its leases, endpoint, cgroup and overlay"), (status = 404, body = ErrorBody)))]
async fn delete_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
) -> Result<StatusCode, Error> {
    tokio::spawn(async move { state.sandboxes.delete(&sandbox).await })
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/stop", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), crate::model::StopQuery),
    responses((status = 200, description = "SIGTERM, the grace period, then SIGKILL", body = crate::model::Sandbox), (status = 404, body = ErrorBody)))]
async fn stop_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    QueryParam(query): QueryParam<crate::model::StopQuery>,
) -> Result<Json<crate::model::Sandbox>, Error> {
    crate::core::validate::query_seconds("grace_secs", query.grace_secs, 3600.0)?;
    let grace = query.grace_secs.map(Duration::from_secs_f64);
    tokio::spawn(async move { state.sandboxes.stop(&sandbox, grace).await })
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))?
        .map(Json)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/wait", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), crate::model::WaitQuery),
    responses((status = 200, description = "The sandbox is over (exited or failed, no restart to come): its final status", body = crate::model::Sandbox),
        (status = 404, body = ErrorBody), (status = 408, description = "Still running after timeout_secs", body = ErrorBody)))]
async fn wait_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    QueryParam(query): QueryParam<crate::model::WaitQuery>,
) -> Result<Json<crate::model::Sandbox>, Error> {
    let timeout = match query.timeout_secs {
        Some(s) if s.is_finite() && s >= 0.0 => Some(Duration::from_secs_f64(s.min(1e9))),
        Some(s) => {
            return Err(Error::invalid(format!(
                "timeout_secs must be a number of seconds, at least 0; got {s}"
            )))
        }
        None => None,
    };
    state.sandboxes.wait(&sandbox, timeout).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/exec", tag = "sandboxes", request_body = crate::model::ExecRequest,
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, description = "The command ran; its exit code and output", body = crate::model::ExecResult), (status = 409, description = "Not running", body = ErrorBody)))]
async fn exec_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    Body(req): Body<crate::model::ExecRequest>,
) -> Result<Json<crate::model::ExecResult>, Error> {
    crate::core::validate::exec(&req)?;
    state
        .sandboxes
        .exec(&sandbox, req.args, req.env)
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}/logs", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), crate::model::LogsQuery),
    responses((status = 200, description = "stdout, then stderr; with follow, new output as it comes", content_type = "text/plain", body = String)))]
async fn sandbox_logs(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    QueryParam(query): QueryParam<crate::model::LogsQuery>,
) -> Result<Response, Error> {
    let (stdout, stderr) = {
        let sandboxes = state.sandboxes.clone();
        let name = sandbox.clone();
        blocking(move || sandboxes.log_files(&name)).await?
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<hyper::body::Bytes>, std::io::Error>,
    >(16);
    tokio::spawn(async move {
        let send = |bytes: Vec<u8>| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(hyper::body::Frame::data(hyper::body::Bytes::from(
                    bytes,
                ))))
                .await
                .is_ok()
            }
        };
        for file in stdout.iter().chain(stderr.iter()) {
            if let Ok(bytes) = tokio::fs::read(file).await {
                if !bytes.is_empty() && !send(bytes).await {
                    return;
                }
            }
        }
        if !query.follow {
            return;
        }
        // Follow the current files; a rotation shows up as a file shorter than what we sent.
        let current = [stdout.last().cloned(), stderr.last().cloned()];
        let mut offsets = [0u64; 2];
        for (i, f) in current.iter().enumerate() {
            offsets[i] = f
                .as_ref()
                .and_then(|f| std::fs::metadata(f).ok())
                .map_or(0, |m| m.len());
        }
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if state.sandboxes.get(&sandbox).is_err() {
                return; // deleted
            }
            for (i, f) in current.iter().enumerate() {
                let Some(f) = f else { continue };
                let Ok(bytes) = tokio::fs::read(f).await else {
                    continue;
                };
                let len = bytes.len() as u64;
                if len < offsets[i] {
                    offsets[i] = 0;
                }
                if len > offsets[i] {
                    let new = bytes[offsets[i] as usize..].to_vec();
                    offsets[i] = len;
                    if !send(new).await {
                        return;
                    }
                }
            }
        }
    });
    let mut response = Response::new(axum::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    )));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed document must match the code; regenerate with
    /// `UPDATE_OPENAPI=1 cargo test -p miren openapi`.
    #[test]
    fn openapi_document_matches_committed_copy() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
        let generated = openapi_json();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is stale; regenerate it with `UPDATE_OPENAPI=1 cargo test -p miren openapi`"
        );
    }

    #[test]
    fn every_route_is_documented() {
        let doc = openapi();
        for path in [
            "/v1/info",
            "/v1/disks",
            "/v1/disks/{disk}",
            "/v1/disks/{disk}/resize",
            "/v1/disks/{disk}/lease",
            "/v1/leases",
            "/v1/local-storage/{app}",
            "/v1/endpoints",
            "/v1/endpoints/{owner}",
            "/v1/endpoints/gc",
            "/v1/disks/{disk}/backup",
            "/v1/disks/restore",
            "/v1/images",
            "/v1/images/pull",
            "/v1/images/import",
            "/v1/images/gc",
            "/v1/sandboxes",
            "/v1/sandboxes/{sandbox}",
            "/v1/sandboxes/{sandbox}/exec",
            "/v1/sandboxes/{sandbox}/logs",
        ] {
            assert!(doc.paths.paths.contains_key(path), "{path} missing");
        }
    }

    #[test]
    fn peers() {
        let peer = |uid, gid| PeerCred {
            uid: Some(uid),
            gid: Some(gid),
            pid: None,
        };
        assert!(peer_allowed(&peer(0, 0), None));
        assert!(!peer_allowed(&peer(1000, 1000), None));
        assert!(peer_allowed(&peer(1000, 1234), Some(1234)));
        assert!(!peer_allowed(&peer(1000, 1000), Some(1234)));
        assert!(!peer_allowed(
            &PeerCred {
                uid: None,
                gid: None,
                pid: None
            },
            None
        ));
    }
}

/// Runs `f` on its own task, so a client that hangs up does not cut an operation short.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(f)
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))?
}

#[utoipa::path(get, path = "/v1/addons/catalog", tag = "addons",
    responses((status = 200, description = "Every addon this agent offers, with variants and versions", body = [crate::model::AddonCatalogEntry])))]
async fn addon_catalog() -> Json<Vec<crate::model::AddonCatalogEntry>> {
    Json(crate::core::addons::catalogue())
}

#[utoipa::path(post, path = "/v1/addons", tag = "addons", request_body = crate::model::CreateAddon,
    responses(
        (status = 201, description = "Recorded and provisioning; with `wait`, `active` or `error`", body = crate::model::Addon),
        (status = 400, description = "Unknown addon, variant or version (the message lists the valid ones)", body = ErrorBody),
        (status = 409, description = "The app has this addon with another variant or pinned version, or the shared server runs another version", body = ErrorBody)))]
async fn create_addon(
    State(state): State<AppState>,
    Body(req): Body<crate::model::CreateAddon>,
) -> Result<(StatusCode, Json<crate::model::Addon>), Error> {
    crate::core::validate::addon(&req)?;
    let addon = detached(async move {
        let (addon, mut done) = state.addons.create(&req, "cli").await?;
        if !req.wait {
            return Ok(addon);
        }
        let _ = done.wait_for(|d| *d).await;
        let addon = state.addons.get(&addon.app, &addon.name)?;
        if addon.status == crate::store::addons::AddonStatus::Active.as_str() {
            state.apps.addons_changed(&addon.app).await?;
        }
        Ok(addon)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(addon)))
}

#[utoipa::path(get, path = "/v1/apps/{app}/addons", tag = "addons",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = [crate::model::Addon])))]
async fn list_addons(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<Vec<crate::model::Addon>>, Error> {
    blocking(move || state.addons.list(&app)).await.map(Json)
}

#[utoipa::path(get, path = "/v1/apps/{app}/addons/{addon}", tag = "addons",
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name, e.g. miren-postgresql")),
    responses((status = 200, body = crate::model::Addon), (status = 404, body = ErrorBody)))]
async fn get_addon(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
) -> Result<Json<crate::model::Addon>, Error> {
    blocking(move || state.addons.get(&app, &addon))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/v1/apps/{app}/addons/{addon}", tag = "addons",
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name, e.g. miren-postgresql")),
    responses(
        (status = 200, description = "Its server or database, role, disk and data are gone", body = crate::model::AddonDestroyed),
        (status = 409, description = "Removal failed; the reason says why, and destroying again retries", body = ErrorBody)))]
async fn destroy_addon(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
) -> Result<Json<crate::model::AddonDestroyed>, Error> {
    detached(async move {
        let (name, _) = crate::core::addons::split_addon_arg(&addon);
        let kind = miren_addons::AddonKind::parse(name)?.name().to_string();
        let Some(mut done) = state.addons.destroy(&app, &kind)? else {
            return Ok(crate::model::AddonDestroyed {
                name: kind,
                app,
                deleted: false,
            });
        };
        let _ = done.wait_for(|d| *d).await;
        if let Ok(left) = state.addons.get(&app, &kind) {
            return Err(Error::conflict(format!(
                "{kind} of app `{app}` is not fully removed yet: {}",
                left.reason.unwrap_or_else(|| left.status.to_string())
            )));
        }
        state.apps.addons_changed(&app).await?;
        Ok(crate::model::AddonDestroyed {
            name: kind,
            app,
            deleted: true,
        })
    })
    .await
    .map(Json)
}

#[utoipa::path(get, path = "/v1/apps/{app}/env", tag = "apps",
    params(("app" = String, Path, description = "App name"), crate::model::EnvQuery),
    responses((status = 200, description = "What the app's services get: addon variables, then app.toml's", body = [crate::model::EnvVarView])))]
async fn app_env(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
    QueryParam(query): QueryParam<crate::model::EnvQuery>,
) -> Result<Json<Vec<crate::model::EnvVarView>>, Error> {
    blocking(move || state.apps.env(&app, query.reveal))
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/deploy", tag = "apps", request_body = crate::model::DeployApp,
    responses(
        (status = 200, description = "Disks and addons ready, services running", body = crate::model::App),
        (status = 400, description = "app.toml is invalid (each problem with its line and field)", body = ErrorBody),
        (status = 409, description = "An addon did not become active (the services were not started), or a declared disk belongs to another app or an addon", body = ErrorBody)))]
async fn deploy_app(
    State(state): State<AppState>,
    Body(req): Body<crate::model::DeployApp>,
) -> Result<Json<crate::model::App>, Error> {
    crate::core::validate::deploy(&req)?;
    detached(async move { state.apps.deploy(req).await })
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/apps", tag = "apps",
    responses((status = 200, body = [crate::model::App])))]
async fn list_apps(State(state): State<AppState>) -> Result<Json<Vec<crate::model::App>>, Error> {
    blocking(move || state.apps.list()).await.map(Json)
}

#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = crate::model::App), (status = 404, body = ErrorBody)))]
async fn get_app(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<crate::model::App>, Error> {
    blocking(move || state.apps.get(&app)).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, description = "Services removed; disks and addons kept", body = crate::model::AppDeleted), (status = 404, body = ErrorBody)))]
async fn delete_app(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<crate::model::AppDeleted>, Error> {
    detached(async move { state.apps.delete(&app).await })
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/apps/{app}/restart", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, description = "Services recreated with the current addon variables", body = crate::model::App), (status = 409, body = ErrorBody)))]
async fn restart_app(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<crate::model::App>, Error> {
    detached(async move { state.apps.restart(&app).await })
        .await
        .map(Json)
}
