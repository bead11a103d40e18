//! Network endpoints: a netns and a routed veth per owner.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{blocking, detached, AppState, Body, PathParam};
use crate::core::error::Error;
use crate::model::{CreateEndpoint, Endpoint, EndpointDeleted, ErrorBody, NetGcReport};

#[utoipa::path(get, path = "/v1/endpoints", tag = "network",
    responses((status = 200, description = "Every network endpoint", body = [Endpoint])))]
pub(super) async fn list_endpoints(
    State(state): State<AppState>,
) -> Result<Json<Vec<Endpoint>>, Error> {
    blocking(move || state.net.list()).await.map(Json)
}

#[utoipa::path(post, path = "/v1/endpoints", tag = "network", request_body = CreateEndpoint,
    responses(
        (status = 201, description = "Netns, veth, address, route and rules in place", body = Endpoint),
        (status = 400, body = ErrorBody),
        (status = 409, description = "The owner has a different endpoint, or the host port is taken", body = ErrorBody),
        (status = 507, description = "The subnet has no free address", body = ErrorBody)))]
pub(super) async fn create_endpoint(
    State(state): State<AppState>,
    Body(req): Body<CreateEndpoint>,
) -> Result<(StatusCode, Json<Endpoint>), Error> {
    // Addon servers' endpoints are in the addon name space; nobody else may join it.
    crate::core::disks::refuse_reserved("app", &req.app)?;
    let endpoint = detached(async move { state.net.create(&req).await }).await?;
    Ok((StatusCode::CREATED, Json(endpoint)))
}

#[utoipa::path(get, path = "/v1/endpoints/{owner}", tag = "network",
    params(("owner" = String, Path, description = "The endpoint's owner")),
    responses((status = 200, body = Endpoint), (status = 404, body = ErrorBody)))]
pub(super) async fn get_endpoint(
    State(state): State<AppState>,
    PathParam(owner): PathParam<String>,
) -> Result<Json<Endpoint>, Error> {
    blocking(move || state.net.get(&owner)).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/endpoints/{owner}", tag = "network",
    params(("owner" = String, Path, description = "The endpoint's owner")),
    responses((status = 200, description = "Deleted, or there was nothing to delete", body = EndpointDeleted)))]
pub(super) async fn delete_endpoint(
    State(state): State<AppState>,
    PathParam(owner): PathParam<String>,
) -> Result<Json<EndpointDeleted>, Error> {
    detached(async move { state.net.delete(&owner).await })
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/endpoints/gc", tag = "network",
    responses((status = 200, description = "What the reconciliation released, removed and repaired", body = NetGcReport)))]
pub(super) async fn gc_endpoints(
    State(state): State<AppState>,
) -> Result<Json<NetGcReport>, Error> {
    detached(async move { state.net.gc().await })
        .await
        .map(Json)
}
