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
    /// etcd could not be reached, or the connection broke.
    #[error("etcd {rpc}: unreachable: {reason}")]
    Unreachable {
        /// The RPC.
        rpc: &'static str,
        /// The transport's account of it.
        reason: String,
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
    /// `e`, a failure of `rpc` as etcd-client reports it, in our terms.
    pub(crate) fn from_client(rpc: &'static str, e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match e {
            E::GRpcStatus(s) => Self::Rpc { rpc, code: s.code(), message: s.message().to_string() },
            E::InvalidArgs(m) | E::EndpointError(m) => Self::Config(format!("{rpc}: {m}")),
            E::InvalidUri(u) => Self::Config(format!("{rpc}: endpoint URL: {u}")),
            E::InvalidMetadataValue(v) => Self::Config(format!("{rpc}: etcd returned an unusable token: {v}")),
            E::WatchError(m) | E::LeaseKeepAliveError(m) => Self::StreamEnded { rpc, reason: m },
            other => Self::Unreachable { rpc, reason: other.to_string() },
        }
    }

    /// Whether etcd refused our auth token (expired, or lost when etcd restarted),
    /// so authenticating again may help.
    pub fn is_token_error(&self) -> bool {
        match self {
            Self::Rpc { code, message, .. } => {
                *code == tonic::Code::Unauthenticated || message.contains("invalid auth token")
            }
            Self::StreamEnded { reason, .. } => {
                reason.contains("invalid auth token") || reason.contains("permission denied")
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::Error as E;

    #[test]
    fn client_errors_become_named_variants() {
        let expired =
            EtcdError::from_client("KV.Put", E::GRpcStatus(tonic::Status::unauthenticated("invalid auth token")));
        assert!(matches!(expired, EtcdError::Rpc { rpc: "KV.Put", code: tonic::Code::Unauthenticated, .. }));
        assert!(expired.is_token_error());
        let refused_watch = EtcdError::from_client("Watch", E::WatchError("etcdserver: permission denied".into()));
        assert!(matches!(refused_watch, EtcdError::StreamEnded { rpc: "Watch", .. }));
        assert!(refused_watch.is_token_error());
        let down = EtcdError::from_client("KV.Range", E::GRpcStatus(tonic::Status::unavailable("connection refused")));
        assert!(!down.is_token_error());
        assert!(
            matches!(EtcdError::from_client("connect", E::InvalidArgs("empty endpoints".into())), EtcdError::Config(m) if m.contains("empty endpoints"))
        );
        let io = EtcdError::from_client("KV.Range", E::IoError(std::io::Error::other("reset")));
        assert!(matches!(io, EtcdError::Unreachable { rpc: "KV.Range", .. }));
        assert!(io.to_string().contains("KV.Range"), "{io}");
    }
}
