//! The one place worker errors become gRPC statuses, so every handler answers
//! the same failure with the same code.

use potluck_engine::EngineError;
use tonic::{Code, Status};

use crate::error::WorkerError;

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        let code = match &e {
            WorkerError::InvalidRequest(_) => Code::InvalidArgument,
            WorkerError::StaleEpoch { .. }
            | WorkerError::NotLoaded
            | WorkerError::DigestMismatch { .. }
            | WorkerError::NoCoordinator
            | WorkerError::Device(_)
            | WorkerError::DeviceMemory(_) => Code::FailedPrecondition,
            WorkerError::CoordinatorUnreachable { .. } | WorkerError::Coordinator { .. } => Code::Unavailable,
            WorkerError::InvalidManifest(_) | WorkerError::ChunkCorrupt { .. } => Code::DataLoss,
            WorkerError::NextStage { code, .. } => *code,
            WorkerError::Engine(engine) => engine_code(engine),
            WorkerError::Io { .. } | WorkerError::Serve(_) | WorkerError::Probe(_) => Code::Internal,
            WorkerError::ComputeStopped | WorkerError::Etcd(_) => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

/// Bad input is the caller's fault; a broken model file or a full cache is not.
fn engine_code(e: &EngineError) -> Code {
    match e {
        EngineError::InvalidBatch(_)
        | EngineError::ContextExceeded { .. }
        | EngineError::Hidden(_)
        | EngineError::Sampling(_)
        | EngineError::LayerRange { .. } => Code::InvalidArgument,
        EngineError::KvBudgetExceeded { .. } | EngineError::DeviceOutOfMemory { .. } => Code::ResourceExhausted,
        _ => Code::FailedPrecondition,
    }
}

/// A status from (or about) the next stage, as this stage reports it upstream:
/// same code, message naming the next stage (`stage`, from `Peers::describe`)
/// and the causes, each once (transport errors repeat their sources' text).
pub(crate) fn next_stage(stage: &str, status: &Status) -> WorkerError {
    let mut message = status.message().to_string();
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        let text = c.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = c.source();
    }
    WorkerError::NextStage { stage: stage.to_string(), code: status.code(), message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_kind_of_failure() {
        let stale: Status = WorkerError::StaleEpoch { got: 1, current: 2 }.into();
        assert_eq!(stale.code(), Code::FailedPrecondition);
        assert_eq!(stale.message(), "stale epoch 1, current 2");
        let full: Status = WorkerError::Engine(EngineError::KvBudgetExceeded { needed: 1, used: 1, budget: 1 }).into();
        assert_eq!(full.code(), Code::ResourceExhausted);
        let next: Status = next_stage("http://10.0.0.2:7001", &Status::unavailable("connection refused")).into();
        assert_eq!(next.code(), Code::Unavailable);
        assert!(next.message().contains("http://10.0.0.2:7001"));
        // A cause whose text is already in the message is not repeated.
        let nested = Status::from_error(Box::new(std::io::Error::other("connection refused")));
        let next: Status = next_stage("w1 (http://10.0.0.2:7001)", &nested).into();
        assert_eq!(next.message().matches("connection refused").count(), 1, "{}", next.message());
        assert!(next.message().starts_with("next stage w1 (http://10.0.0.2:7001): "), "{}", next.message());
    }
}
