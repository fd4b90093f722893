//! The coordinator's error type, and its one mapping to gRPC statuses.

use std::path::PathBuf;

/// What can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The engine refused (model file, tokenizer, sampling parameters…).
    #[error(transparent)]
    Engine(#[from] potluck_engine::EngineError),
    /// A file operation failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A worker asked for a shard or chunk that does not exist.
    #[error("unknown shard {0}")]
    UnknownShard(String),
    /// No plan could be made.
    #[error(transparent)]
    Plan(#[from] crate::planner::PlanError),
    /// A worker could not be reached or refused a call.
    #[error("worker {worker} ({address}): {message}")]
    Worker {
        /// Its id.
        worker: String,
        /// Its address.
        address: String,
        /// What failed.
        message: String,
    },
    /// The pipeline is not ready to serve.
    #[error("not ready: {0}")]
    NotReady(String),
    /// A request is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// The server is at capacity and its queue is full; the client should retry.
    #[error("{0}")]
    Overloaded(String),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] potluck_etcd::EtcdError),
    /// This coordinator no longer leads: it must not write the plan.
    #[error("this coordinator is not the leader")]
    NotLeader,
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        match &e {
            CoordinatorError::UnknownShard(_) => Self::not_found(e.to_string()),
            CoordinatorError::BadRequest(_) | CoordinatorError::Engine(_) => Self::invalid_argument(e.to_string()),
            CoordinatorError::NotReady(_)
            | CoordinatorError::Plan(_)
            | CoordinatorError::Etcd(_)
            | CoordinatorError::NotLeader => Self::unavailable(e.to_string()),
            CoordinatorError::Overloaded(_) => Self::resource_exhausted(e.to_string()),
            CoordinatorError::Io(..) | CoordinatorError::Worker { .. } => Self::internal(e.to_string()),
        }
    }
}
