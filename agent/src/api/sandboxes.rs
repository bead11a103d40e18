//! Sandboxes: OCI containers under their supervisors, with their logs and exec.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;

use super::{blocking, detached, stream, AppState, Body, PathParam, QueryParam};
use crate::core::error::Error;
use crate::model::{
    ErrorBody, ExecRequest, ExecResult, LogsQuery, RunSandbox, Sandbox, StopQuery, WaitQuery,
};

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, body = [crate::model::Sandbox])))]
pub(super) async fn list_sandboxes(
    State(state): State<AppState>,
) -> Result<Json<Vec<Sandbox>>, Error> {
    blocking(move || state.sandboxes.list()).await.map(Json)
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = crate::model::RunSandbox,
    responses(
        (status = 201, description = "Running (its supervisor started the container)", body = crate::model::Sandbox),
        (status = 400, body = ErrorBody),
        (status = 409, description = "Name taken, a disk belongs to another app or an addon, or a disk's lease timed out", body = ErrorBody),
        (status = 422, description = "The container did not start", body = ErrorBody)))]
pub(super) async fn run_sandbox(
    State(state): State<AppState>,
    Body(req): Body<RunSandbox>,
) -> Result<(StatusCode, Json<Sandbox>), Error> {
    crate::core::validate::run_sandbox(&req)?;
    let sandbox = detached(async move { state.sandboxes.run(req).await }).await?;
    Ok((StatusCode::CREATED, Json(sandbox)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{sandbox}", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 200, body = crate::model::Sandbox), (status = 404, body = ErrorBody)))]
pub(super) async fn get_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
) -> Result<Json<Sandbox>, Error> {
    blocking(move || state.sandboxes.get(&sandbox))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/v1/sandboxes/{sandbox}", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name")),
    responses((status = 204, description = "Stopped and removed with its leases, endpoint, cgroup and overlay"), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
) -> Result<StatusCode, Error> {
    detached(async move { state.sandboxes.delete(&sandbox).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/stop", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), crate::model::StopQuery),
    responses((status = 200, description = "SIGTERM, the grace period, then SIGKILL", body = crate::model::Sandbox), (status = 404, body = ErrorBody)))]
pub(super) async fn stop_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    QueryParam(query): QueryParam<StopQuery>,
) -> Result<Json<Sandbox>, Error> {
    crate::core::validate::query_seconds("grace_secs", query.grace_secs, 3600.0)?;
    let grace = query.grace_secs.map(Duration::from_secs_f64);
    detached(async move { state.sandboxes.stop(&sandbox, grace).await })
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/v1/sandboxes/{sandbox}/wait", tag = "sandboxes",
    params(("sandbox" = String, Path, description = "Sandbox id or name"), crate::model::WaitQuery),
    responses((status = 200, description = "The sandbox is over (exited or failed, no restart to come): its final status", body = crate::model::Sandbox),
        (status = 404, body = ErrorBody), (status = 408, description = "Still running after timeout_secs", body = ErrorBody)))]
pub(super) async fn wait_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    QueryParam(query): QueryParam<WaitQuery>,
) -> Result<Json<Sandbox>, Error> {
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
pub(super) async fn exec_sandbox(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    Body(req): Body<ExecRequest>,
) -> Result<Json<ExecResult>, Error> {
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
pub(super) async fn sandbox_logs(
    State(state): State<AppState>,
    PathParam(sandbox): PathParam<String>,
    QueryParam(query): QueryParam<LogsQuery>,
) -> Result<Response, Error> {
    let logs = {
        let sandboxes = state.sandboxes.clone();
        blocking(move || sandboxes.logs(&sandbox)).await?
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move { state.sandboxes.send_logs(logs, query.follow, tx).await });
    Ok(stream::response(
        stream::chunks(rx),
        "text/plain; charset=utf-8",
    ))
}
