use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use miren_disks::DiskError;

use crate::model::ErrorBody;

/// An error as the API returns it: an HTTP status plus `{"code", "message"}`. Messages are
/// written for the person at the CLI: what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "busy", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl From<DiskError> for ApiError {
    fn from(err: DiskError) -> Self {
        match err {
            DiskError::MissingTool { .. } => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "missing_tool",
                err.to_string(),
            ),
            DiskError::Shrink { .. } | DiskError::TooLarge { .. } => Self::invalid(err.to_string()),
            DiskError::NoFreeLoop(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_loop_device",
                err.to_string(),
            ),
            _ => Self::internal(err.to_string()),
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(err: rusqlite::Error) -> Self {
        Self::internal(format!("state store: {err}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code.to_string(),
            message: self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}
