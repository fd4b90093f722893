//! The worker's client of the coordinator: joining at start, and fetching
//! shard manifests and chunks. Every call goes through one helper that sets
//! the deadline and names the coordinator in errors.

use std::future::Future;
use std::ops::Range;
use std::time::{Duration, Instant};

use potluck_proto::v1 as pb;
use potluck_proto::v1::coordinator_client::CoordinatorClient;
use tonic::transport::{Channel, Endpoint};

use crate::config::DEFAULT_MAX_MESSAGE_BYTES;
use crate::error::WorkerError;
use crate::shard_cache::{ChunkSource, ShardManifest};

/// Deadline of one coordinator call; a chunk of a few MiB fits well inside it.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of one connection attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to the coordinator.
#[derive(Debug, Clone)]
pub(crate) struct CoordinatorLink {
    address: String,
    client: CoordinatorClient<Channel>,
}

/// Joins again as a new member after each freeze `freezes` counts (the
/// coordinator gives every join a new instance, so the fence on the old one
/// no longer applies); ends when the worker stops.
pub(crate) async fn rejoin_after_freezes(
    address: String,
    request: pb::JoinRequest,
    budget: Duration,
    mut freezes: tokio::sync::watch::Receiver<u64>,
) {
    while freezes.changed().await.is_ok() {
        match CoordinatorLink::join(&address, request.clone(), budget).await {
            Ok(_) => tracing::info!(coordinator = %address, "joined again as a new member"),
            Err(e) => tracing::warn!(coordinator = %address, error = %e, "could not join again after a freeze"),
        }
    }
}

impl CoordinatorLink {
    /// Connects and joins, retrying an unreachable coordinator with backoff until `budget` has passed.
    pub async fn join(
        address: &str,
        request: pb::JoinRequest,
        budget: Duration,
    ) -> Result<(Self, String), WorkerError> {
        let unreachable = |reason: String| WorkerError::CoordinatorUnreachable { address: address.to_string(), reason };
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| unreachable(format!("bad URL: {e}")))?
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let deadline = Instant::now() + budget;
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = match endpoint.connect().await {
                Ok(channel) => {
                    let link = Self {
                        address: address.to_string(),
                        client: CoordinatorClient::new(channel).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES),
                    };
                    let mut client = link.client.clone();
                    match link.call("Join", client.join(request.clone())).await {
                        Ok(reply) => return Ok((link, reply.cluster)),
                        Err(WorkerError::Coordinator { status, .. }) if status.code() == tonic::Code::Unavailable => {
                            status.message().to_string()
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => error_chain(&e),
            };
            if Instant::now() + backoff > deadline {
                return Err(unreachable(attempt));
            }
            tracing::warn!(coordinator = address, error = %attempt, "coordinator not reachable yet; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Connects without joining (the coordinator that sent a plan, when membership is in etcd).
    pub async fn connect(address: &str) -> Result<Self, WorkerError> {
        let unreachable = |reason: String| WorkerError::CoordinatorUnreachable { address: address.to_string(), reason };
        let channel = Endpoint::from_shared(address.to_string())
            .map_err(|e| unreachable(format!("bad URL: {e}")))?
            .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| unreachable(error_chain(&e)))?;
        Ok(Self {
            address: address.to_string(),
            client: CoordinatorClient::new(channel).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES),
        })
    }

    /// The coordinator's URL.
    pub fn address(&self) -> &str {
        &self.address
    }

    async fn call<T>(
        &self,
        call: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, WorkerError> {
        let err = |status| WorkerError::Coordinator { address: self.address.clone(), call, status };
        match tokio::time::timeout(DEFAULT_CALL_TIMEOUT, fut).await {
            Ok(Ok(reply)) => Ok(reply.into_inner()),
            Ok(Err(status)) => Err(err(status)),
            Err(_) => Err(err(tonic::Status::deadline_exceeded(format!("no reply in {DEFAULT_CALL_TIMEOUT:?}")))),
        }
    }

    /// The manifest of the shard holding `layers`.
    pub async fn manifest(&self, layers: &Range<usize>) -> Result<ShardManifest, WorkerError> {
        let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let req = pb::ShardRequest { layer_start: to_u32(layers.start), layer_end: to_u32(layers.end) };
        let mut client = self.client.clone();
        let manifest = self.call("ShardManifest", client.shard_manifest(req)).await?;
        Ok(ShardManifest::try_from(manifest)?)
    }
}

impl ChunkSource for CoordinatorLink {
    async fn chunk(&self, digest: &str, index: u32) -> Result<Vec<u8>, WorkerError> {
        let mut client = self.client.clone();
        let req = pb::ChunkRequest { digest: digest.to_string(), index };
        Ok(self.call("ShardChunk", client.shard_chunk(req)).await?.data)
    }
}

/// A transport error with its causes ("transport error: connection refused").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
