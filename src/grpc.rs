//! The gRPC API (tonic): orders, generic sagas, analytics, the cluster's administration, plus
//! health and reflection.
//!
//! Every service is a thin edge over [`SagaApi`] (in [`crate::api`]): it validates the request
//! (`INVALID_ARGUMENT` naming the field), calls the core, and translates the core's
//! [`ApiError`] into a `tonic::Status` here, the only place that builds one.

use std::pin::Pin;

use futures::Stream;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

pub use crate::api::{valid_id, ApiError, SagaApi, MAX_INPUT};

pub mod admin;
pub mod analytics;
pub mod definitions;
pub mod orders;
pub mod render;
pub mod sagas;

/// A boxed server stream.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// `INVALID_ARGUMENT` naming `field`.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Overloaded(e) => Status::with_error_details(
                tonic::Code::ResourceExhausted,
                e.to_string(),
                ErrorDetails::with_retry_info(Some(crate::admission::RETRY_AFTER)),
            ),
            e @ ApiError::DifferentInput { .. } => Status::already_exists(e.to_string()),
            e @ ApiError::Raced => Status::aborted(e.to_string()),
            e @ ApiError::NotFound(_) => Status::not_found(e.to_string()),
            ApiError::Corrupt(message) => Status::data_loss(message),
            e @ ApiError::Unavailable(_) => {
                let chain = crate::telemetry::error_chain(&e);
                tracing::warn!(error = %chain, "storage unavailable");
                Status::unavailable(chain)
            }
            e @ ApiError::Encode(_) => Status::internal(e.to_string()),
            e @ ApiError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            ApiError::Precondition(message) => Status::failed_precondition(message),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::admission::Overloaded;
    use tonic::Code;

    #[test]
    fn api_errors_become_the_status_codes_they_name_with_their_messages() {
        let overloaded = Status::from(ApiError::Overloaded(Overloaded {
            pressure: 0.9,
            limit: 0.5,
        }));
        assert_eq!(overloaded.code(), Code::ResourceExhausted);
        assert!(overloaded.message().contains("90 %"), "{overloaded:?}");
        let retry = overloaded.get_details_retry_info().expect("a retry delay");
        assert_eq!(retry.retry_delay, Some(crate::admission::RETRY_AFTER));

        let cases = [
            (
                ApiError::DifferentInput {
                    id: "s-1".into(),
                    fields: vec!["a".into(), "b".into()],
                },
                Code::AlreadyExists,
                "`s-1` already exists with a different input (a, b differ)",
            ),
            (ApiError::Raced, Code::Aborted, "retry"),
            (
                ApiError::NotFound("s-2".into()),
                Code::NotFound,
                "no saga with id `s-2`",
            ),
            (
                ApiError::Corrupt("bad bytes".into()),
                Code::DataLoss,
                "bad bytes",
            ),
            (
                ApiError::Unavailable(Box::new(std::io::Error::other("nats is gone"))),
                Code::Unavailable,
                "nats is gone",
            ),
        ];
        for (error, code, text) in cases {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(text), "{status:?}");
        }
    }
}
