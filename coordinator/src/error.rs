//! The engine's one error type. It knows nothing of gRPC or HTTP: the
//! adapters map it (`rpc::convert`, the dashboard's JSON errors).

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
