//! The one place where an error becomes an HTTP response: its kind picks the status, its code
//! and message form the body `{"code", "message"}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::core::error::{Error, ErrorKind};
use crate::model::ErrorBody;

pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict | ErrorKind::NameTaken | ErrorKind::Busy => StatusCode::CONFLICT,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Upstream => StatusCode::BAD_GATEWAY,
        ErrorKind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A response of the API's error shape for what only the HTTP layer knows (a method a route
/// does not take).
fn respond(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        code: code.to_string(),
        message: message.into(),
    };
    (status, axum::Json(body)).into_response()
}

/// The answer to a method a route does not take: only the HTTP layer knows this error.
pub fn method_not_allowed() -> Response {
    respond(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method; GET /openapi.json lists every route",
    )
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        respond(status_of(self.kind), self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_the_statuses_clients_know() {
        assert_eq!(status_of(Error::invalid("x").kind), StatusCode::BAD_REQUEST);
        assert_eq!(status_of(Error::name_taken("x").kind), StatusCode::CONFLICT);
        assert_eq!(status_of(Error::busy("x").kind), StatusCode::CONFLICT);
        assert_eq!(
            status_of(Error::internal("x").kind),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
