//! Disks, their leases, apps' local storage, and backups and restores of disks.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;

use super::stream::FrameResult;
use super::{blocking, stream, AppState, Body, PathParam, QueryParam, MAX_RESTORES};
use crate::core::disks::DEFAULT_LEASE_TIMEOUT;
use crate::core::error::{Error, ErrorKind};
use crate::model::{
    AcquireLease, BackupEvent, BackupToTarget, CreateDisk, Disk, ErrorBody, Lease, ReleaseResult,
    ResizeDisk, RestoreQuery, RestoreResult,
};

#[utoipa::path(get, path = "/v1/disks", tag = "disks",
    responses((status = 200, description = "Every disk and local storage directory", body = [Disk])))]
pub(super) async fn list_disks(State(state): State<AppState>) -> Result<Json<Vec<Disk>>, Error> {
    blocking(move || state.disks.list()).await.map(Json)
}

#[utoipa::path(post, path = "/v1/disks", tag = "disks", request_body = CreateDisk,
    responses(
        (status = 201, description = "Created, attached, formatted and mounted", body = Disk),
        (status = 400, description = "Invalid name or size", body = ErrorBody),
        (status = 409, description = "A disk with that name exists", body = ErrorBody)))]
pub(super) async fn create_disk(
    State(state): State<AppState>,
    Body(req): Body<CreateDisk>,
) -> Result<(StatusCode, Json<Disk>), Error> {
    let disk = blocking(move || state.disks.create(&req)).await?;
    Ok((StatusCode::CREATED, Json(disk)))
}

#[utoipa::path(get, path = "/v1/disks/{disk}", tag = "disks",
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses((status = 200, body = Disk), (status = 404, body = ErrorBody)))]
pub(super) async fn get_disk(
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
pub(super) async fn delete_disk(
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
pub(super) async fn resize_disk(
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
pub(super) async fn acquire_lease(
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
pub(super) async fn release_lease(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
) -> Result<Json<ReleaseResult>, Error> {
    blocking(move || state.disks.release_lease(&disk))
        .await
        .map(Json)
}

#[utoipa::path(get, path = "/v1/leases", tag = "leases",
    responses((status = 200, description = "Every lease held", body = [Lease])))]
pub(super) async fn list_leases(State(state): State<AppState>) -> Result<Json<Vec<Lease>>, Error> {
    blocking(move || state.disks.leases()).await.map(Json)
}

#[utoipa::path(put, path = "/v1/local-storage/{app}", tag = "disks",
    params(("app" = String, Path, description = "App name")),
    responses((status = 200, description = "The app's local storage directory (made on first use)", body = Disk),
        (status = 400, body = ErrorBody)))]
pub(super) async fn ensure_local_storage(
    State(state): State<AppState>,
    PathParam(app): PathParam<String>,
) -> Result<Json<Disk>, Error> {
    blocking(move || state.disks.ensure_local_storage(&app))
        .await
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
pub(super) async fn backup_disk(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
) -> Result<Response, Error> {
    let capture = blocking(move || state.disks.capture_for_backup(&disk)).await?;
    let mut headers = HeaderMap::new();
    let header = |v: String| HeaderValue::from_str(&v).ok();
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
    // The capture's copy goes when the snapshot is written (or the client went away).
    let frames = stream::written_by(move |out| {
        capture
            .write_snapshot(out, &mut miren_snapshot::NoProgress)
            .map(|_| ())
    });
    let mut response = stream::response(frames, "application/octet-stream");
    response.headers_mut().extend(headers);
    Ok(response)
}

#[utoipa::path(post, path = "/v1/disks/{disk}/backups", tag = "backups", request_body = BackupToTarget,
    params(("disk" = String, Path, description = "Disk id (disk_...) or name")),
    responses(
        (status = 200, description = "NDJSON, one BackupEvent per line: progress while the snapshot is written into the target, then the stored backup, or an error (nothing is then stored under the key). The upload runs to its end even if the client hangs up.",
            content_type = "application/x-ndjson", body = [BackupEvent]),
        (status = 400, description = "Invalid key", body = ErrorBody),
        (status = 404, description = "No such disk or backup target", body = ErrorBody),
        (status = 409, description = "The key holds a backup already, or the disk is busy", body = ErrorBody),
        (status = 503, description = "The target did not answer", body = ErrorBody)))]
pub(super) async fn backup_disk_to_target(
    State(state): State<AppState>,
    PathParam(disk): PathParam<String>,
    Body(req): Body<BackupToTarget>,
) -> Result<Response, Error> {
    let target = state.targets.resolve(req.target.as_deref())?;
    let key = target.path(&req.key)?;
    crate::core::backup::ensure_key_free(&target, &key).await?;
    let capture = blocking(move || state.disks.capture_for_backup(&disk)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<FrameResult>(64);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut progress = BackupProgress {
            tx: tx.clone(),
            total: capture.copied_bytes,
            done: 0,
            sent_at: Instant::now(),
        };
        let event = match crate::core::backup::capture_to_target(
            &capture,
            &target,
            &key,
            handle,
            &mut progress,
        ) {
            Ok(stored) => BackupEvent::Stored(stored),
            Err(err) => BackupEvent::Error(ErrorBody {
                code: err.code.to_string(),
                message: err.message,
            }),
        };
        let _ = tx.blocking_send(stream::ndjson_line(&event));
    });
    Ok(stream::response(
        tokio_stream::wrappers::ReceiverStream::new(rx),
        "application/x-ndjson",
    ))
}

/// Progress lines of a target backup, at most five a second; a slow reader misses some.
struct BackupProgress {
    tx: tokio::sync::mpsc::Sender<FrameResult>,
    total: u64,
    done: u64,
    sent_at: Instant,
}

impl miren_snapshot::Progress for BackupProgress {
    fn start(&mut self, total_bytes: u64) {
        self.total = total_bytes;
    }
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.sent_at.elapsed() >= Duration::from_millis(200) {
            self.sent_at = Instant::now();
            let _ = self
                .tx
                .try_send(stream::ndjson_line(&BackupEvent::Progress {
                    done: self.done,
                    total: self.total,
                }));
        }
    }
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
pub(super) async fn restore_disk(
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
    if let Some(key) = &query.key {
        let target = state.targets.resolve(query.target.as_deref())?;
        let key = target.path(key)?;
        let handle = tokio::runtime::Handle::current();
        let restored = blocking(move || {
            let input = crate::core::targets::ObjectReader::open(handle, &target, &key)?;
            let result = state.disks.restore(
                std::io::BufReader::with_capacity(1 << 20, input),
                query.name,
                query.force,
            );
            drop(slot);
            result
        })
        .await?;
        return Ok(Json(restored.into()));
    }
    if query.target.is_some() {
        return Err(Error::invalid(
            "`target` names where `key` is: pass the key of the backup to restore",
        ));
    }
    let mut input = stream::forward_body(body);
    // No blocking thread for a client that has not sent anything yet.
    input.wait_for_data().await;
    let restored = blocking(move || {
        let result = state.disks.restore(&mut input, query.name, query.force);
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
                    stream::BODY_IDLE_TIMEOUT.as_secs()
                ),
            )),
            other => other,
        }
    })
    .await?;
    Ok(Json(restored.into()))
}
