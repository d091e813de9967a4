//! `Form<T>`: axum's URL-encoded form extractor with its refusals in the contract's
//! problem+json shape (a wrong `Content-Type` is 415 `unsupported_media_type`, an
//! unreadable form 400 `invalid_request`, an oversize one 413).

use super::error::ApiError;
use axum::extract::rejection::FormRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// A deserialized `application/x-www-form-urlencoded` body.
pub struct Form<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Form<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(value)) => Ok(Form(value)),
            Err(FormRejection::InvalidFormContentType(_)) => Err(ApiError::UnsupportedMediaType),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge)
            }
            Err(_) => Err(ApiError::InvalidRequest(
                "the form could not be read".to_owned(),
            )),
        }
    }
}
