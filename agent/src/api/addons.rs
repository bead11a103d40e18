//! Addons of apps: the catalogue, and creating, listing and destroying an app's addons.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::{blocking, detached, AppState, Body, PathParam};
use crate::core::error::Error;
use crate::model::{
    Addon, AddonCatalogEntry, AddonDestroyed, AddonRotated, AddonUpdated, CreateAddon, ErrorBody,
    RotateAddon, UpdateAddon,
};

#[utoipa::path(get, path = "/v1/addons/catalog", tag = "addons",
    responses((status = 200, description = "Every addon this agent offers, with variants and versions", body = [crate::model::AddonCatalogEntry])))]
pub(super) async fn addon_catalog() -> Json<Vec<AddonCatalogEntry>> {
    Json(crate::core::addons::catalogue())
}

#[utoipa::path(post, path = "/v1/addons", tag = "addons", request_body = crate::model::CreateAddon,
    responses(
        (status = 201, description = "Recorded and provisioning; with `wait`, `active` or `error`", body = crate::model::Addon),
        (status = 400, description = "Unknown addon, variant or version (the message lists the valid ones)", body = ErrorBody),
        (status = 409, description = "The app has this addon with another variant or pinned version, or the shared server runs another version", body = ErrorBody)))]
pub(super) async fn create_addon(
    State(state): State<AppState>,
    Body(req): Body<CreateAddon>,
) -> Result<(StatusCode, Json<Addon>), Error> {
    crate::core::validate::addon(&req)?;
    let addon = detached(async move { state.addons_of_apps.create(&req, "cli").await }).await?;
    Ok((StatusCode::CREATED, Json(addon)))
}

#[utoipa::path(get, path = "/v1/apps/{app}/addons", tag = "addons",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, body = [crate::model::Addon])))]
pub(super) async fn list_addons(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<Vec<Addon>>, Error> {
    blocking(move || state.addons.list(&app)).await.map(Json)
}

#[utoipa::path(get, path = "/v1/apps/{app}/addons/{addon}", tag = "addons",
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name, e.g. miren-postgresql")),
    responses((status = 200, body = crate::model::Addon), (status = 404, body = ErrorBody)))]
pub(super) async fn get_addon(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
) -> Result<Json<Addon>, Error> {
    blocking(move || state.addons.get(&app, &addon))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/v1/apps/{app}/addons/{addon}", tag = "addons",
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name, e.g. miren-postgresql")),
    responses(
        (status = 200, description = "Its server or database, role, disk and data are gone", body = crate::model::AddonDestroyed),
        (status = 409, description = "Removal failed; the reason says why, and destroying again retries", body = ErrorBody)))]
pub(super) async fn destroy_addon(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
) -> Result<Json<AddonDestroyed>, Error> {
    detached(async move { state.addons_of_apps.destroy(&app, &addon).await })
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/apps/{app}/addons/{addon}/rotate", tag = "addons", request_body = crate::model::RotateAddon,
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name, e.g. miren-postgresql")),
    responses(
        (status = 200, description = "The app's services run with the new login and the previous one can no longer log in", body = crate::model::AddonRotated),
        (status = 404, description = "The app has no such addon", body = ErrorBody),
        (status = 409, description = "The addon is not active, a rotation of it is running, or its server could not be reached (running the rotation again finishes it)", body = ErrorBody),
        (status = 422, description = "This addon (or credential) cannot be rotated", body = ErrorBody)))]
pub(super) async fn rotate_addon(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
    Body(req): Body<RotateAddon>,
) -> Result<Json<AddonRotated>, Error> {
    detached(async move {
        state
            .addons_of_apps
            .rotate(&app, &addon, req.credential)
            .await
    })
    .await
    .map(Json)
}

#[utoipa::path(patch, path = "/v1/apps/{app}/addons/{addon}", tag = "addons", request_body = crate::model::UpdateAddon,
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name, e.g. miren-postgresql")),
    responses(
        (status = 200, description = "Applied: the new tier's limits hold; `restarted` says whether the server restarted for them", body = crate::model::AddonUpdated),
        (status = 400, description = "Unknown tier, a kind without tiers, or nothing to change", body = ErrorBody),
        (status = 404, description = "The app has no such addon", body = ErrorBody),
        (status = 409, description = "A smaller tier than the data on the disk, or applying it failed (updating again retries)", body = ErrorBody)))]
pub(super) async fn update_addon(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
    Body(req): Body<UpdateAddon>,
) -> Result<Json<AddonUpdated>, Error> {
    detached(async move { state.addons_of_apps.update(&app, &addon, &req).await })
        .await
        .map(Json)
}

/// The same as `PATCH`, for clients that only send `POST`.
#[utoipa::path(post, path = "/v1/apps/{app}/addons/{addon}", tag = "addons", request_body = crate::model::UpdateAddon,
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name, e.g. miren-postgresql")),
    responses(
        (status = 200, description = "Applied, as with `PATCH`", body = crate::model::AddonUpdated),
        (status = 400, description = "Unknown tier, a kind without tiers, or nothing to change", body = ErrorBody),
        (status = 404, description = "The app has no such addon", body = ErrorBody),
        (status = 409, description = "A smaller tier than the data on the disk, or applying it failed (updating again retries)", body = ErrorBody)))]
pub(super) async fn update_addon_post(
    state: State<AppState>,
    path: PathParam<(String, String)>,
    body: Body<UpdateAddon>,
) -> Result<Json<AddonUpdated>, Error> {
    update_addon(state, path, body).await
}
