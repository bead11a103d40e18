//! Images: pulled from registries (progress streamed as NDJSON), imported, listed, collected.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use tracing::info;

use super::stream::{self, FrameResult};
use super::{blocking, AppState, Body, QueryParam};
use crate::core::error::Error;
use crate::model::{
    ErrorBody, ImageGcReport, ImageQuery, ImageRemoved, ImageSummary, ImportImage, PullEvent,
    PullImage,
};

#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "Images on this node", body = [crate::model::ImageSummary])))]
pub(super) async fn list_images(
    State(state): State<AppState>,
) -> Result<Json<Vec<ImageSummary>>, Error> {
    blocking(move || state.images.list()).await.map(Json)
}

#[utoipa::path(delete, path = "/v1/images", tag = "images", params(crate::model::ImageQuery),
    responses((status = 200, description = "Removed, or it was not here", body = crate::model::ImageRemoved)))]
pub(super) async fn remove_image(
    State(state): State<AppState>,
    QueryParam(query): QueryParam<ImageQuery>,
) -> Result<Json<ImageRemoved>, Error> {
    crate::core::validate::text("reference", &query.reference, 1024)?;
    let reference = query.reference.clone();
    let removed = blocking(move || state.images.remove(&query.reference)).await?;
    Ok(Json(ImageRemoved { reference, removed }))
}

#[utoipa::path(post, path = "/v1/images/pull", tag = "images", request_body = crate::model::PullImage,
    responses(
        (status = 200, description = "NDJSON, one PullEvent per line: progress while blobs download, then the image or an error", content_type = "application/x-ndjson", body = [crate::model::PullEvent]),
        (status = 400, description = "Not a valid reference", body = ErrorBody)))]
pub(super) async fn pull_image(
    State(state): State<AppState>,
    Body(req): Body<PullImage>,
) -> Result<Response, Error> {
    crate::core::validate::pull(&req)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<FrameResult>(64);
    let progress_tx = tx.clone();
    let progress: miren_runtime::ProgressFn = Arc::new(move |p: &miren_runtime::Progress| {
        // Progress is best effort: a slow reader misses a few updates, never blocks the pull.
        let _ = progress_tx.try_send(stream::ndjson_line(&PullEvent::Progress {
            digest: p.digest.clone(),
            done: p.done,
            total: p.total,
        }));
    });
    let credentials = req.username.clone().zip(req.password.clone());
    // The pull runs to its end even if the client hangs up: its blobs are kept.
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
        let _ = tx.send(stream::ndjson_line(&event)).await;
    });
    Ok(stream::response(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        "application/x-ndjson",
    ))
}

#[utoipa::path(post, path = "/v1/images/import", tag = "images", request_body = crate::model::ImportImage,
    responses((status = 200, body = crate::model::ImageSummary), (status = 400, body = ErrorBody)))]
pub(super) async fn import_image(
    State(state): State<AppState>,
    Body(req): Body<ImportImage>,
) -> Result<Json<ImageSummary>, Error> {
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
pub(super) async fn gc_images(State(state): State<AppState>) -> Result<Json<ImageGcReport>, Error> {
    blocking(move || state.sandboxes.gc_images())
        .await
        .map(Json)
}
