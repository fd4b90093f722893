//! One client stack for the coordinator's unary Stage RPCs (`Load`, `Warm`,
//! `Info`, `Release`), built from `tower` layers over tonic channels:
//!
//! - one channel per worker address, kept and shared, so a `/metrics` scrape
//!   or a probe reuses the connection instead of opening one per call;
//! - a concurrency limit per worker, so a burst of scrapes or loads cannot
//!   pile calls onto one slow worker;
//! - a deadline on every call, so a stopped or cut-off worker costs a known
//!   wait (a `Load` included, which runs while serving is paused).
//!
//! Calls go through [`StageRpc::call`], which also turns a failure into a
//! [`StageRpcError`] naming the worker. The forward stream to stage 0 is not
//! here: it is long-lived and has its own per-micro-batch deadlines.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use potluck_proto::v1 as pb;
use tonic::transport::{Channel, Endpoint};
use tower::limit::ConcurrencyLimit;
use tower::timeout::Timeout;
use tower::ServiceBuilder;

/// Calls in flight to one worker at once; more wait their turn (within their deadline).
pub const DEFAULT_CALLS_PER_WORKER: usize = 8;
/// Deadline of a connection attempt.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest reply accepted.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// The channel to one worker under its concurrency limit: what is cached.
pub type WorkerService = ConcurrencyLimit<Channel>;
/// A Stage client whose calls carry one deadline.
pub type StageClient = pb::stage_client::StageClient<Timeout<WorkerService>>;

/// Why a Stage RPC failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageRpcError {
    /// The worker's address is not a URL.
    #[error("worker at {address}: bad address: {reason}")]
    BadAddress {
        /// The address given.
        address: String,
        /// What was wrong with it.
        reason: String,
    },
    /// No answer within the call's deadline (a stopped, hung or cut-off worker).
    #[error("worker at {address}: {rpc} got no answer within {deadline:?}")]
    Deadline {
        /// The worker.
        address: String,
        /// The RPC.
        rpc: &'static str,
        /// The deadline it had.
        deadline: Duration,
    },
    /// The worker answered with an error, or could not be reached.
    #[error("worker at {address}: {rpc} failed: {message}")]
    Failed {
        /// The worker.
        address: String,
        /// The RPC.
        rpc: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message.
        message: String,
    },
}

/// The cached channels, one per worker address.
#[derive(Debug)]
pub struct StageRpc {
    channels: Mutex<HashMap<String, WorkerService>>,
    calls_per_worker: usize,
}

impl Default for StageRpc {
    fn default() -> Self {
        Self::new(DEFAULT_CALLS_PER_WORKER)
    }
}

impl StageRpc {
    /// A stack that lets `calls_per_worker` calls run at once on each worker.
    pub fn new(calls_per_worker: usize) -> Self {
        Self { channels: Mutex::default(), calls_per_worker: calls_per_worker.max(1) }
    }

    /// The cached service for `address`, made (without connecting yet) on first use.
    fn service(&self, address: &str) -> Result<WorkerService, StageRpcError> {
        let mut channels = self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = channels.get(address) {
            return Ok(s.clone());
        }
        let bad = |reason: String| StageRpcError::BadAddress { address: address.to_string(), reason };
        let channel = Endpoint::from_shared(address.to_string())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        let service = ServiceBuilder::new().concurrency_limit(self.calls_per_worker).service(channel);
        channels.insert(address.to_string(), service.clone());
        Ok(service)
    }

    /// How many worker addresses have a cached channel.
    pub fn cached(&self) -> usize {
        self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Runs `rpc` (named `name` in errors) on the worker at `address`
    /// within `deadline`, and returns the reply's message.
    pub async fn call<R, F, Fut>(
        &self,
        address: &str,
        name: &'static str,
        deadline: Duration,
        rpc: F,
    ) -> Result<R, StageRpcError>
    where
        F: FnOnce(StageClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let service = ServiceBuilder::new().timeout(deadline).service(self.service(address)?);
        let client = pb::stage_client::StageClient::new(service).max_decoding_message_size(MAX_REPLY_BYTES);
        rpc(client).await.map(tonic::Response::into_inner).map_err(|status| {
            let elapsed = std::error::Error::source(&status)
                .is_some_and(|e| e.downcast_ref::<tower::timeout::error::Elapsed>().is_some());
            if elapsed {
                StageRpcError::Deadline { address: address.to_string(), rpc: name, deadline }
            } else {
                StageRpcError::Failed {
                    address: address.to_string(),
                    rpc: name,
                    code: status.code(),
                    message: status.message().to_string(),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage whose `Info` takes `delay` and counts the calls it is in at once.
    #[derive(Clone)]
    struct SlowStage {
        delay: Duration,
        now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        most: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl pb::stage_server::Stage for SlowStage {
        async fn load(
            &self,
            _: tonic::Request<pb::LoadRequest>,
        ) -> Result<tonic::Response<pb::LoadReply>, tonic::Status> {
            Err(tonic::Status::failed_precondition("stale epoch 1, current 2"))
        }
        type ForwardStream = tokio_stream::Empty<Result<pb::ForwardReply, tonic::Status>>;
        async fn forward(
            &self,
            _: tonic::Request<tonic::Streaming<pb::ForwardRequest>>,
        ) -> Result<tonic::Response<Self::ForwardStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not here"))
        }
        async fn release(
            &self,
            _: tonic::Request<pb::ReleaseRequest>,
        ) -> Result<tonic::Response<pb::ReleaseReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not here"))
        }
        async fn warm(
            &self,
            _: tonic::Request<pb::WarmRequest>,
        ) -> Result<tonic::Response<pb::WarmReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("not here"))
        }
        async fn info(
            &self,
            _: tonic::Request<pb::InfoRequest>,
        ) -> Result<tonic::Response<pb::InfoReply>, tonic::Status> {
            use std::sync::atomic::Ordering;
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            Ok(tonic::Response::new(pb::InfoReply { worker_id: "slow".into(), ..Default::default() }))
        }
    }

    async fn serve(stage: SlowStage) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::stage_server::StageServer::new(stage))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    fn slow(delay: Duration) -> SlowStage {
        SlowStage { delay, now: Default::default(), most: Default::default() }
    }

    #[tokio::test]
    async fn calls_share_one_channel_per_worker_and_answers_come_back() {
        let address = serve(slow(Duration::ZERO)).await;
        let rpc = StageRpc::default();
        for _ in 0..3 {
            let info = rpc
                .call(&address, "Info", Duration::from_secs(5), |mut c| async move { c.info(pb::InfoRequest {}).await })
                .await
                .expect("answers");
            assert_eq!(info.worker_id, "slow");
        }
        assert_eq!(rpc.cached(), 1);
    }

    #[tokio::test]
    async fn a_slow_worker_runs_into_the_deadline() {
        let address = serve(slow(Duration::from_secs(5))).await;
        let rpc = StageRpc::default();
        let deadline = Duration::from_millis(200);
        let err = rpc
            .call(&address, "Info", deadline, |mut c| async move { c.info(pb::InfoRequest {}).await })
            .await
            .expect_err("too slow");
        assert_eq!(err, StageRpcError::Deadline { address, rpc: "Info", deadline });
    }

    #[tokio::test]
    async fn calls_beyond_the_limit_wait_their_turn() {
        let stage = slow(Duration::from_millis(100));
        let most = std::sync::Arc::clone(&stage.most);
        let address = serve(stage).await;
        let rpc = std::sync::Arc::new(StageRpc::new(2));
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let (rpc, address) = (std::sync::Arc::clone(&rpc), address.clone());
                tokio::spawn(async move {
                    rpc.call(&address, "Info", Duration::from_secs(10), |mut c| async move {
                        c.info(pb::InfoRequest {}).await
                    })
                    .await
                })
            })
            .collect();
        for c in calls {
            c.await.expect("task").expect("answers");
        }
        let most = most.load(std::sync::atomic::Ordering::SeqCst);
        assert!((1..=2).contains(&most), "at most two at once on one worker, saw {most}");
    }

    #[tokio::test]
    async fn errors_name_the_worker_and_the_rpc() {
        let address = serve(slow(Duration::ZERO)).await;
        let rpc = StageRpc::default();
        let err =
            rpc.call(&address, "Load", Duration::from_secs(5), |mut c| async move {
                c.load(pb::LoadRequest::default()).await
            })
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, StageRpcError::Failed { code: tonic::Code::FailedPrecondition, rpc: "Load", .. }),
            "{err}"
        );
        assert!(err.to_string().contains(&address), "{err}");
        let gone = rpc
            .call("http://127.0.0.1:1", "Info", Duration::from_secs(5), |mut c| async move {
                c.info(pb::InfoRequest {}).await
            })
            .await
            .expect_err("nobody there");
        assert!(matches!(gone, StageRpcError::Failed { code: tonic::Code::Unavailable, .. }), "{gone}");
        assert!(matches!(rpc.service("not a url"), Err(StageRpcError::BadAddress { .. })));
    }
}
