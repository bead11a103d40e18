//! The agent's HTTP/1.1 + JSON API over its Unix socket. Routes are declared once, with their
//! OpenAPI description next to them, one file per resource; `openapi()` builds the document
//! from the same router. A handler parses the request (path, query, body) into a typed core
//! call, runs it ([`blocking`] for blocking work, [`detached`] for async work that must run
//! to its end) and maps the result; errors become statuses only in `error.rs`.

mod addons;
mod apps;
mod builds;
mod disks;
mod endpoints;
pub mod error;
mod images;
mod pitr;
mod sandboxes;
pub mod stream;
mod system;

pub use disks::{DATA_BYTES_HEADER, DISK_SIZE_HEADER, FREEZE_SECONDS_HEADER};

use std::sync::Arc;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tracing::{info, warn};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::core::addons::AddonService;
use crate::core::app_addons::AddonsOfApps;
use crate::core::apps::AppService;
use crate::core::disks::DiskService;
use crate::core::error::{Error, ErrorKind};
use crate::core::images::ImageService;
use crate::core::net::NetService;
use crate::core::sandboxes::SandboxService;
use crate::model::ErrorBody;

#[derive(Clone)]
pub struct AppState {
    pub builds: Arc<crate::core::build::BuildService>,
    pub disks: Arc<DiskService>,
    pub net: Arc<NetService>,
    pub images: Arc<ImageService>,
    pub sandboxes: Arc<SandboxService>,
    pub addons: Arc<AddonService>,
    pub apps: Arc<AppService>,
    pub addons_of_apps: Arc<AddonsOfApps>,
    /// Where backups can go besides the client's own file (`core::targets`).
    pub targets: Arc<crate::core::targets::Targets>,
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
        .routes(routes!(system::agent_info))
        .routes(routes!(disks::list_disks, disks::create_disk))
        .routes(routes!(disks::get_disk, disks::delete_disk))
        .routes(routes!(disks::resize_disk))
        .routes(routes!(disks::acquire_lease, disks::release_lease))
        .routes(routes!(disks::list_leases))
        .routes(routes!(disks::ensure_local_storage))
        .routes(routes!(
            endpoints::list_endpoints,
            endpoints::create_endpoint
        ))
        .routes(routes!(endpoints::get_endpoint, endpoints::delete_endpoint))
        .routes(routes!(endpoints::gc_endpoints))
        .routes(routes!(disks::backup_disk))
        .routes(routes!(disks::backup_disk_to_target))
        .routes(routes!(disks::restore_disk))
        .routes(routes!(images::list_images, images::remove_image))
        .routes(routes!(images::pull_image))
        .routes(routes!(images::import_image))
        .routes(routes!(images::gc_images))
        .routes(routes!(sandboxes::list_sandboxes, sandboxes::run_sandbox))
        .routes(routes!(sandboxes::get_sandbox, sandboxes::delete_sandbox))
        .routes(routes!(sandboxes::stop_sandbox))
        .routes(routes!(sandboxes::wait_sandbox))
        .routes(routes!(sandboxes::exec_sandbox))
        .routes(routes!(sandboxes::sandbox_logs))
        .routes(routes!(addons::addon_catalog))
        .routes(routes!(addons::create_addon))
        .routes(routes!(addons::list_addons))
        .routes(routes!(addons::get_addon, addons::destroy_addon))
        .routes(routes!(addons::rotate_addon))
        .routes(routes!(addons::update_addon, addons::update_addon_post))
        .routes(routes!(pitr::addon_backups))
        .routes(routes!(pitr::restore_addon))
        .routes(routes!(apps::app_env))
        .routes(routes!(apps::deploy_app))
        .routes(routes!(builds::build_source))
        .routes(routes!(apps::list_apps))
        .routes(routes!(apps::get_app, apps::delete_app))
        .routes(routes!(apps::restart_app))
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
        .method_not_allowed_fallback(|| async { error::method_not_allowed() })
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

/// Runs blocking core work (ioctls, mkfs, SQLite, file reads) off the async threads. If the
/// client hangs up, the operation still runs to its end, so the state store never sees half an
/// operation.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))?
}

/// Runs `f` on its own task, so a client that hangs up does not cut an operation short.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    tokio::spawn(f)
        .await
        .map_err(|e| Error::internal(format!("operation failed to run: {e}")))?
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
