use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use miren_disks::DiskError;

use crate::model::ErrorBody;

/// What kind of failure an error is, for the services that decide what to do next (a lookup
/// that found nothing, a name someone else took). The HTTP status and `code` say the same to
/// clients; code in the agent asks this instead of comparing strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Invalid,
    NotFound,
    Conflict,
    /// A conflict because the name asked for is in use (a retry under another name may work).
    NameTaken,
    Busy,
    Internal,
    /// Any other failure, told apart only by its `code` (`missing_tool`, `timeout`, ...).
    Other,
}

/// An error as the API returns it: an HTTP status plus `{"code", "message"}`. Messages are
/// written for the person at the CLI: what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Other, status, code, message)
    }
    fn of_kind(
        kind: ErrorKind,
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            kind,
            status,
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::of_kind(
            ErrorKind::Invalid,
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            message,
        )
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::of_kind(
            ErrorKind::NotFound,
            StatusCode::NOT_FOUND,
            "not_found",
            message,
        )
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::of_kind(
            ErrorKind::Conflict,
            StatusCode::CONFLICT,
            "conflict",
            message,
        )
    }
    /// A conflict on a name: the same status and code as [`ApiError::conflict`].
    pub fn name_taken(message: impl Into<String>) -> Self {
        Self::of_kind(
            ErrorKind::NameTaken,
            StatusCode::CONFLICT,
            "conflict",
            message,
        )
    }
    pub fn busy(message: impl Into<String>) -> Self {
        Self::of_kind(ErrorKind::Busy, StatusCode::CONFLICT, "busy", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::of_kind(
            ErrorKind::Internal,
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message,
        )
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
    /// Any conflict, a taken name included.
    pub fn is_conflict(&self) -> bool {
        matches!(self.kind, ErrorKind::Conflict | ErrorKind::NameTaken)
    }
    pub fn is_name_taken(&self) -> bool {
        self.kind == ErrorKind::NameTaken
    }

    /// The same error (kind, status, code) with its message put in context.
    pub fn with_context(self, context: impl std::fmt::Display) -> Self {
        ApiError {
            message: format!("{context}: {}", self.message),
            ..self
        }
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
            DiskError::MountBusy(_) => Self::busy(err.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_answer_the_questions_services_ask() {
        assert!(ApiError::not_found("x").is_not_found());
        assert!(!ApiError::conflict("x").is_not_found());
        assert!(ApiError::conflict("x").is_conflict());
        assert!(!ApiError::conflict("x").is_name_taken());
        let taken = ApiError::name_taken("a sandbox named `x` already exists");
        assert!(taken.is_conflict() && taken.is_name_taken());
        // Clients see a taken name as any other conflict.
        assert_eq!(taken.status, StatusCode::CONFLICT);
        assert_eq!(taken.code, "conflict");
        // A code that merely looks like one is not that kind.
        assert!(!ApiError::new(StatusCode::NOT_FOUND, "registry", "x").is_not_found());
        assert!(!ApiError::busy("x").is_conflict());
    }

    #[test]
    fn context_keeps_kind_status_and_code() {
        let err = ApiError::name_taken("taken").with_context("service `web`");
        assert!(err.is_name_taken());
        assert_eq!(err.status, StatusCode::CONFLICT);
        assert_eq!(err.code, "conflict");
        assert_eq!(err.message, "service `web`: taken");
    }
}
