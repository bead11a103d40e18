//! PostgreSQL continuous protection: an addon's restorable window, and restores.

use axum::extract::State;
use axum::Json;

use super::{detached, AppState, Body, PathParam};
use crate::core::error::Error;
use crate::model::{AddonBackups, AddonRestored, ErrorBody, RestoreAddon};

#[utoipa::path(get, path = "/v1/apps/{app}/addons/{addon}/backups", tag = "addons",
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name: miren-postgresql")),
    responses(
        (status = 200, description = "The restorable window, base backups, archive lag and target", body = crate::model::AddonBackups),
        (status = 404, description = "The app has no such addon", body = ErrorBody),
        (status = 503, description = "The target cannot be read or the server is not running", body = ErrorBody)))]
pub(super) async fn addon_backups(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
) -> Result<Json<AddonBackups>, Error> {
    detached(async move { state.addons.pg_backups(&app, &addon).await })
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/apps/{app}/addons/{addon}/restore", tag = "addons", request_body = crate::model::RestoreAddon,
    params(("app" = String, Path, description = "App name"), ("addon" = String, Path, description = "Addon name: miren-postgresql")),
    responses(
        (status = 200, description = "The restored server is the app's; the previous disk is kept (or was discarded)", body = crate::model::AddonRestored),
        (status = 400, description = "Neither or both of to_time and latest, or a bad time", body = ErrorBody),
        (status = 404, description = "No such addon, or no base backup before the point", body = ErrorBody),
        (status = 409, description = "The addon is not active, or a previous disk is still kept", body = ErrorBody),
        (status = 422, description = "Recovery could not reach the point; nothing was changed", body = ErrorBody)))]
pub(super) async fn restore_addon(
    State(state): State<AppState>,
    PathParam((app, addon)): PathParam<(String, String)>,
    Body(req): Body<RestoreAddon>,
) -> Result<Json<AddonRestored>, Error> {
    detached(async move { state.addons_of_apps.restore(&app, &addon, &req).await })
        .await
        .map(Json)
}
