//! Errors as RFC 9457 `application/problem+json`: the broker's errors mapped onto the shared
//! [`Problem`] document.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

pub use framecast_shared::problem::Problem;

use crate::service::ServiceError;

/// The request body, or the problem with it (413 past the configured limit, 400 otherwise).
pub fn body_or_problem(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<axum::body::Bytes, Problem> {
    framecast_shared::problem::body_or_problem(body, "the body exceeds http.max_body_bytes")
}

impl From<ServiceError> for Problem {
    fn from(e: ServiceError) -> Self {
        let detail = e.to_string();
        match e {
            ServiceError::BadRequest(_) => Problem::bad_request(detail),
            ServiceError::Forbidden(_) => {
                Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
            }
            ServiceError::NotFound(_) => Problem::not_found(detail),
            ServiceError::Conflict(_) => Problem::conflict(detail),
            ServiceError::Unprocessable { field, .. } => Problem {
                field: Some(field.to_owned()),
                ..Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unprocessable",
                    "Unknown or unusable value",
                    detail,
                )
            },
            ServiceError::TooMany { retry_after_s, .. } => Problem {
                retry_after: Some(retry_after_s),
                ..Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-requests",
                    "Too many requests",
                    detail,
                )
            },
            ServiceError::Unavailable { retry_after_s, .. } => Problem {
                retry_after: retry_after_s,
                ..Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-capacity",
                    "No capacity",
                    detail,
                )
            },
            ServiceError::Internal(_) => {
                tracing::error!(%detail, "request failed inside the broker");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "the broker failed; the error is in its log",
                )
            }
        }
    }
}

impl IntoResponse for ServiceError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}
