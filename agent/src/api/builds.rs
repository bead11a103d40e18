//! Builds: an app's source (a tar stream) made into an image for one of its services.

use axum::extract::State;
use axum::Json;

use super::{stream, AppState, QueryParam};
use crate::core::build::BuildRequest;
use crate::core::error::{Error, ErrorKind};
use crate::model::{BuildQuery, BuildResult, ErrorBody};

#[utoipa::path(post, path = "/v1/builds", tag = "apps", params(crate::model::BuildQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The app's source as a tar stream (ustar or GNU): files, directories and symlinks with relative names"),
    responses(
        (status = 200, description = "The image, built or found already built", body = crate::model::BuildResult),
        (status = 400, description = "A refused entry (`..`, an absolute name, a hard link, a device) or a bad query", body = ErrorBody),
        (status = 422, description = "The source is over a limit, its stack cannot be told, or its dependency step failed", body = ErrorBody)))]
pub(super) async fn build_source(
    State(state): State<AppState>,
    QueryParam(query): QueryParam<BuildQuery>,
    body: axum::body::Body,
) -> Result<Json<BuildResult>, Error> {
    let req = BuildRequest::from_api(query)?;
    let mut input = stream::forward_body(body);
    input.wait_for_data().await;
    let builds = state.builds.clone();
    let tree = tokio::task::spawn_blocking(move || {
        let result = builds.receive(&mut input);
        // Read the rest, so the client finishes sending and sees our answer.
        input.drain();
        match result {
            Err(_) if input.stalled() => Err(Error::new(
                ErrorKind::Timeout,
                "upload_stalled",
                format!(
                    "the upload sent nothing for {}s and was cut off; nothing was built",
                    stream::BODY_IDLE_TIMEOUT.as_secs()
                ),
            )),
            other => other,
        }
    })
    .await
    .map_err(|e| Error::internal(format!("receiving the source: {e}")))??;
    // The build finishes even if the client hangs up: what it stores is reused next time.
    let builds = state.builds.clone();
    tokio::spawn(async move { builds.build(req, tree).await })
        .await
        .map_err(|e| Error::internal(format!("build task: {e}")))?
        .map(Json)
}
