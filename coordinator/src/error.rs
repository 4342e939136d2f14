//! The engine's one error type, mapped to a gRPC status in one place.

use tonic::Status;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    /// Bad input: the message names the field or value at fault.
    #[error("{0}")]
    Invalid(String),
    /// The call cannot be done in the job's present state.
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// More than the coordinator has (slots, GPUs).
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Something outside the coordinator failed (object storage).
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::NotFound(m) => Status::not_found(m),
            EngineError::Invalid(m) => Status::invalid_argument(m),
            EngineError::Precondition(m) => Status::failed_precondition(m),
            EngineError::Unauthenticated(m) => Status::unauthenticated(m),
            EngineError::Exhausted(m) => Status::resource_exhausted(m),
            EngineError::AlreadyExists(m) => Status::already_exists(m),
            EngineError::Unavailable(m) => Status::unavailable(m),
            EngineError::Store(e) => {
                tracing::error!(error = %e, "job store failure");
                Status::internal(e.to_string())
            }
        }
    }
}
