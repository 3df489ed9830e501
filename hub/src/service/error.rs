//! The one error type of the service layer and how each API edge shows it.

use crate::store::StoreError;

/// Why a service operation failed. REST maps it to a status + code string, gRPC to a `tonic::Status`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed; `field` names what is wrong.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Request field (JSON name) at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The addressed object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with the current state (name taken, network in use, concurrent change).
    #[error("{0}")]
    Conflict(String),
    /// etcd is unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt state.
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// A validation error on `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ServiceError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// HTTP status code for REST.
    pub fn http_status(&self) -> u16 {
        match self {
            ServiceError::InvalidArgument { .. } => 400,
            ServiceError::NotFound(_) => 404,
            ServiceError::Conflict(_) => 409,
            ServiceError::Unavailable(_) => 503,
            ServiceError::Internal(_) => 500,
        }
    }

    /// Machine-readable code for REST error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::InvalidArgument { .. } => "invalid_argument",
            ServiceError::NotFound(_) => "not_found",
            ServiceError::Conflict(_) => "conflict",
            ServiceError::Unavailable(_) => "unavailable",
            ServiceError::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => ServiceError::Unavailable(e.to_string()),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        let message = e.to_string();
        match e {
            ServiceError::InvalidArgument { .. } => tonic::Status::invalid_argument(message),
            ServiceError::NotFound(_) => tonic::Status::not_found(message),
            ServiceError::Conflict(_) => tonic::Status::failed_precondition(message),
            ServiceError::Unavailable(_) => tonic::Status::unavailable(message),
            ServiceError::Internal(_) => tonic::Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let e = ServiceError::invalid("cpu", "not a cpu quantity");
        assert_eq!(e.to_string(), "cpu: not a cpu quantity");
        assert_eq!(e.http_status(), 400);
        assert_eq!(e.code(), "invalid_argument");
        let s: tonic::Status = e.into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn statuses_map() {
        assert_eq!(ServiceError::NotFound("x".into()).http_status(), 404);
        assert_eq!(ServiceError::Conflict("x".into()).http_status(), 409);
        assert_eq!(ServiceError::Unavailable("x".into()).http_status(), 503);
        let s: tonic::Status = ServiceError::Conflict("in use".into()).into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let s: tonic::Status = ServiceError::from(StoreError::Unavailable("down".into())).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}
