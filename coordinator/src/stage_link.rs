//! The coordinator's end of the pipeline over gRPC (the [`Transport`] a
//! cluster runs): one long-lived `Forward` stream to stage 0 carrying every
//! micro-batch of a plan epoch, and a reader task that hands each reply
//! (sampled tokens, or the failure of some stage) to the scheduler. Hidden
//! states never pass through here.

use std::sync::Arc;
use std::time::Duration;

use potluck_proto::trace_context::TraceHeaders;
use potluck_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

use crate::error::CoordinatorError;
use crate::planner::StagePlan;
use crate::stage_rpc::StageRpc;
use crate::traffic::Traffic;
use crate::transport::{deliver, Link, LinkEvents, LinkKey, Transport};

/// How long opening the stream to stage 0 may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a `Release` may take before it is given up.
pub const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle connection to stage 0 is pinged, so a frozen or vanished host is noticed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Micro-batches buffered toward stage 0.
const SEND_BUFFER: usize = 64;

/// Opens [`StageLink`]s, counting their traffic.
#[derive(Debug, Clone)]
pub(crate) struct GrpcTransport {
    /// Forward messages and bytes exchanged with stage 0.
    pub traffic: Arc<Traffic>,
    /// Unary calls (releases after a break).
    pub rpc: Arc<StageRpc>,
}

impl Transport for GrpcTransport {
    type Link = StageLink;

    async fn open(&self, key: LinkKey, first: &StagePlan, events: LinkEvents) -> Result<StageLink, CoordinatorError> {
        StageLink::open(key.id, key.epoch, first, Arc::clone(&self.traffic), events).await
    }

    fn release_at(&self, first: &StagePlan, sessions: Vec<u64>) {
        release_at(&self.rpc, first, sessions);
    }
}

/// An open stream to the first stage of one plan epoch.
#[derive(Debug)]
pub(crate) struct StageLink {
    /// Distinguishes this link's events from those of links it replaced.
    pub id: u64,
    /// The plan epoch stamped on every micro-batch.
    pub epoch: u64,
    /// Stage 0, for errors and releases.
    pub first: StagePlan,
    requests: mpsc::Sender<pb::ForwardRequest>,
    client: pb::stage_client::StageClient<tonic::transport::Channel>,
    reader: JoinHandle<()>,
}

impl Drop for StageLink {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl StageLink {
    /// Opens the stream; replies go to `events`.
    pub async fn open(
        id: u64,
        epoch: u64,
        first: &StagePlan,
        traffic: Arc<Traffic>,
        events: LinkEvents,
    ) -> Result<Self, CoordinatorError> {
        let worker_err = |m: String| CoordinatorError::Worker {
            worker: first.worker.clone(),
            address: first.address.clone(),
            message: m,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(first.address.clone())
            .map_err(|e| worker_err(format!("bad address: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        let endpoint = endpoint
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|e| worker_err(format!("unreachable: {}", causes(&e))))?;
        let client = pb::stage_client::StageClient::new(channel).max_decoding_message_size(64 << 20);
        let (requests, rx) = mpsc::channel(SEND_BUFFER);
        let counted = Arc::clone(&traffic);
        // Counted as they leave, so every request on the wire is in the figure.
        let outgoing = ReceiverStream::new(rx).map(move |r: pb::ForwardRequest| {
            counted.request(r.encoded_len());
            r
        });
        let mut forward_client = client.clone();
        let mut replies = tokio::time::timeout(CONNECT_TIMEOUT, forward_client.forward(outgoing))
            .await
            .map_err(|_| worker_err("did not answer the Forward stream in time".into()))?
            .map_err(|s| worker_err(s.message().to_string()))?
            .into_inner();
        let via = format!("via stage 0, worker {} at {}", first.worker, first.address);
        let reader = tokio::spawn(async move {
            loop {
                let reply = match replies.message().await {
                    Ok(Some(r)) => {
                        traffic.reply(r.encoded_len());
                        Ok(r)
                    }
                    Ok(None) => Err(format!("the pipeline stream ended ({via})")),
                    Err(s) => Err(format!("{} ({via})", status_text(&s))),
                };
                if !deliver(&events, id, reply).await {
                    return;
                }
            }
        });
        Ok(Self { id, epoch, first: first.clone(), requests, client, reader })
    }
}

impl Link for StageLink {
    fn key(&self) -> LinkKey {
        LinkKey { id: self.id, epoch: self.epoch }
    }

    /// Stamps the micro-batch with this link's epoch and the current trace.
    async fn send(&self, batch_id: u64, rows: Vec<pb::Row>, tokens: Vec<u32>) -> Result<(), CoordinatorError> {
        let trace = TraceHeaders::current();
        let request = pb::ForwardRequest {
            epoch: self.epoch,
            batch_id,
            rows,
            tokens,
            hidden: None,
            traceparent: trace.traceparent,
            tracestate: trace.tracestate,
        };
        self.requests.send(request).await.map_err(|_| CoordinatorError::Worker {
            worker: self.first.worker.clone(),
            address: self.first.address.clone(),
            message: "the pipeline stream closed".into(),
        })
    }

    /// A failed release is logged.
    fn release(&self, sessions: Vec<u64>) {
        release_with(self.client.clone(), sessions);
    }
}

/// Frees `sessions` on every stage through stage 0 at `first`, over the
/// client stack's channel: for when the stream that carried them has broken,
/// so the stages that survive do not keep their caches.
fn release_at(rpc: &Arc<StageRpc>, first: &StagePlan, sessions: Vec<u64>) {
    if sessions.is_empty() {
        return;
    }
    let (rpc, address) = (Arc::clone(rpc), first.address.clone());
    tokio::spawn(async move {
        let release = |mut c: crate::stage_rpc::StageClient| {
            let mut request = tonic::Request::new(pb::ReleaseRequest { sessions: sessions.clone() });
            TraceHeaders::current().inject(&mut request);
            async move { c.release(request).await }
        };
        if let Err(e) = rpc.call(&address, "Release", RELEASE_TIMEOUT, release).await {
            tracing::warn!(?sessions, error = %e, "release failed");
        }
    });
}

fn release_with(mut client: pb::stage_client::StageClient<tonic::transport::Channel>, sessions: Vec<u64>) {
    if sessions.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut request = tonic::Request::new(pb::ReleaseRequest { sessions: sessions.clone() });
        request.set_timeout(RELEASE_TIMEOUT);
        TraceHeaders::current().inject(&mut request);
        if let Err(e) = client.release(request).await {
            tracing::warn!(?sessions, error = %e.message(), "release failed");
        }
    });
}

/// An error with every cause it wraps (tonic's "transport error" alone says nothing).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A status's message, or its code and causes when the message is empty.
fn status_text(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}: {}", s.code(), causes(s))
    } else {
        s.message().to_string()
    }
}
