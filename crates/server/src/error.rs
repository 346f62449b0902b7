//! Errors as the API answers them: a status and a JSON body with the message and a hint.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use dozen_api::ErrorBody;
use dozen_control::ControlError;
use dozen_store::blob::BlobError;
use dozen_store::StoreError;

pub(crate) fn error(status: StatusCode, message: String, hint: Option<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message,
            hint,
        }),
    )
        .into_response()
}
/// A JSON answer written once into a buffer of about its size (`Json` starts at 128 bytes
/// and grows, copying as it goes): for hot routes whose answers run to kilobytes.
pub(crate) struct SizedJson<T>(pub T, pub usize);

impl<T: serde::Serialize> IntoResponse for SizedJson<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(self.1);
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => (
                [(
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response(),
            Err(e) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the answer: {e}"),
                None,
            ),
        }
    }
}

/// A failed request, already turned into its answer.
pub struct ApiFailure(Box<Response>);
impl ApiFailure {
    pub(crate) fn from_response(response: Response) -> Self {
        ApiFailure(Box::new(response))
    }
}
impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        *self.0
    }
}
impl From<ControlError> for ApiFailure {
    fn from(e: ControlError) -> Self {
        let status = match &e {
            ControlError::NotFound { .. }
            | ControlError::LeaseLost(_)
            | ControlError::Absent(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::Gone(_) => StatusCode::GONE,
            ControlError::LostLeadership => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Store(StoreError::Compacted { .. }) => StatusCode::GONE,
            ControlError::Store(StoreError::NoSpace { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            ControlError::Store(StoreError::TooLarge { .. } | StoreError::TooManyOps { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ControlError::Registry(e) => {
                StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ControlError::Store(_) | ControlError::Model(_) | ControlError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "request failed");
        }
        ApiFailure::from_response(error(status, e.to_string(), None))
    }
}
impl From<StoreError> for ApiFailure {
    fn from(e: StoreError) -> Self {
        ControlError::Store(e).into()
    }
}
impl From<dozen_model::ModelError> for ApiFailure {
    fn from(e: dozen_model::ModelError) -> Self {
        ControlError::Model(e).into()
    }
}
pub(crate) type ApiResult<T> = Result<T, ApiFailure>;
pub(crate) fn bad_request(message: String) -> ApiFailure {
    ApiFailure::from_response(error(StatusCode::BAD_REQUEST, message, None))
}
impl From<BlobError> for ApiFailure {
    fn from(e: BlobError) -> Self {
        let status = match e {
            BlobError::BadDigest(_) | BlobError::Mismatch { .. } => StatusCode::BAD_REQUEST,
            BlobError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BlobError::Io { .. } => {
                tracing::error!(error = %e, "blob store failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiFailure::from_response(error(status, e.to_string(), None))
    }
}
pub(crate) fn unauthorized(message: String) -> ApiFailure {
    ApiFailure::from_response(error(StatusCode::UNAUTHORIZED, message, None))
}
