//! What can go wrong talking to etcd.

use std::time::Duration;

/// An etcd failure, naming the RPC.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The configuration cannot be used (bad endpoint URL, unreadable TLS file…).
    #[error("etcd configuration: {0}")]
    Config(String),
    /// etcd answered with an error status.
    #[error("etcd {rpc}: {code:?}: {message}")]
    Rpc {
        /// The RPC, e.g. `KV.Range`.
        rpc: &'static str,
        /// gRPC status code.
        code: tonic::Code,
        /// etcd's message.
        message: String,
    },
    /// No answer within the deadline.
    #[error("etcd {rpc}: no reply in {after:?}")]
    Timeout {
        /// The RPC.
        rpc: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// A stream (watch or keep-alive) ended or was cancelled by etcd.
    #[error("etcd {rpc} stream ended: {reason}")]
    StreamEnded {
        /// The RPC.
        rpc: &'static str,
        /// Why, as far as we know.
        reason: String,
    },
    /// The lease is gone (expired, revoked, or etcd lost it).
    #[error("etcd lease {0:x} is gone")]
    LeaseLost(i64),
}

impl EtcdError {
    pub(crate) fn rpc(rpc: &'static str, s: &tonic::Status) -> Self {
        Self::Rpc { rpc, code: s.code(), message: s.message().to_string() }
    }

    /// Whether etcd refused our auth token (expired or revoked), so re-authenticating may help.
    pub(crate) fn is_token_error(s: &tonic::Status) -> bool {
        s.code() == tonic::Code::Unauthenticated || s.message().contains("invalid auth token")
    }
}
