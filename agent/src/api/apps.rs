//! Apps: deploys from app.toml, the apps' services, and the variables they get.

use axum::extract::State;
use axum::Json;

use super::{blocking, detached, AppState, Body, PathParam, QueryParam};
use crate::core::error::Error;
use crate::model::{App, AppDeleted, DeployApp, EnvQuery, EnvVarView, ErrorBody};

#[utoipa::path(get, path = "/v1/apps/{app}/env", tag = "apps",
    params(("app" = String, Path, description = "App name"), crate::model::EnvQuery),
    responses((status = 200, description = "What the app's services get: addon variables, then app.toml's", body = [crate::model::EnvVarView])))]
pub(super) async fn app_env(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
    QueryParam(query): QueryParam<EnvQuery>,
) -> Result<Json<Vec<EnvVarView>>, Error> {
    blocking(move || state.apps.env(&app, query.reveal))
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/deploy", tag = "apps", request_body = crate::model::DeployApp,
    responses(
        (status = 200, description = "Disks and addons ready, services running", body = crate::model::App),
        (status = 400, description = "app.toml is invalid (each problem with its line and field)", body = ErrorBody),
        (status = 409, description = "An addon did not become active (the services were not started), a declared disk belongs to another app or an addon, or a new version did not become healthy (code `unhealthy`: it was removed and the previous one keeps serving)", body = ErrorBody)))]
pub(super) async fn deploy_app(
    State(state): State<AppState>,
    Body(req): Body<DeployApp>,
) -> Result<Json<App>, Error> {
    crate::core::validate::deploy(&req)?;
    detached(async move { state.apps.deploy(req).await })
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/apps", tag = "apps",
    responses((status = 200, body = [crate::model::App])))]
pub(super) async fn list_apps(State(state): State<AppState>) -> Result<Json<Vec<App>>, Error> {
    blocking(move || state.apps.list()).await.map(Json)
}

#[utoipa::path(get, path = "/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = crate::model::App), (status = 404, body = ErrorBody)))]
pub(super) async fn get_app(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<App>, Error> {
    blocking(move || state.apps.get(&app)).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/apps/{app}", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, description = "Services removed; disks and addons kept", body = crate::model::AppDeleted), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_app(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<AppDeleted>, Error> {
    detached(async move { state.apps.delete(&app).await })
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/apps/{app}/restart", tag = "apps",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, description = "Services replaced (each beside itself unless it holds a leased disk) with the current addon variables", body = crate::model::App), (status = 409, body = ErrorBody)))]
pub(super) async fn restart_app(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<App>, Error> {
    detached(async move { state.apps.restart(&app).await })
        .await
        .map(Json)
}
