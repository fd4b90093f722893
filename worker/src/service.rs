//! The gRPC `Stage` service: each handler decodes the request into domain
//! types, calls the worker, and encodes the reply. Nothing else lives here.

use std::sync::Arc;

use potluck_engine::SessionId;
use potluck_proto::trace_context::TraceHeaders;
use potluck_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::error::WorkerError;
use crate::forward::{self, Replies};
use crate::load_spec::{LoadSpec, WarmSpec};
use crate::worker::Worker;

/// Serves `potluck.v1.Stage` for one worker.
#[derive(Debug, Clone)]
pub(crate) struct StageService {
    worker: Arc<Worker>,
}

impl StageService {
    /// A service backed by `worker`.
    pub fn new(worker: Arc<Worker>) -> Self {
        Self { worker }
    }
}

/// Makes a unary call's `span` a child of the caller's span named in the `traceparent` metadata.
fn traced<T>(span: tracing::Span, request: &Request<T>) -> tracing::Span {
    TraceHeaders::from_metadata(request.metadata()).parent(&span);
    span
}

fn to_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[tonic::async_trait]
impl pb::stage_server::Stage for StageService {
    async fn load(&self, request: Request<pb::LoadRequest>) -> Result<Response<pb::LoadReply>, Status> {
        let span = traced(tracing::info_span!("stage.load"), &request);
        let spec = LoadSpec::try_from(request.into_inner()).map_err(WorkerError::from)?;
        let out = self.worker.load(spec).instrument(span).await?;
        Ok(Response::new(pb::LoadReply {
            epoch: out.epoch,
            transferred_bytes: out.transferred,
            weight_bytes: out.weight_bytes,
        }))
    }

    async fn warm(&self, request: Request<pb::WarmRequest>) -> Result<Response<pb::WarmReply>, Status> {
        let span = traced(tracing::info_span!("stage.warm"), &request);
        let spec = WarmSpec::try_from(request.into_inner()).map_err(WorkerError::from)?;
        let (held, transferred) = self.worker.warm(spec).instrument(span).await?;
        Ok(Response::new(pb::WarmReply { held: to_u32(held), transferred_bytes: transferred }))
    }

    type ForwardStream = Replies;

    async fn forward(
        &self,
        request: Request<Streaming<pb::ForwardRequest>>,
    ) -> Result<Response<Self::ForwardStream>, Status> {
        Ok(Response::new(forward::serve(self.worker.clone(), request.into_inner())))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseReply>, Status> {
        let span = traced(tracing::info_span!("stage.release"), &request);
        let sessions = request.into_inner().sessions.into_iter().map(SessionId).collect();
        let released = self.worker.release(sessions).instrument(span).await?;
        Ok(Response::new(pb::ReleaseReply { released: to_u32(released) }))
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::InfoReply>, Status> {
        let i = self.worker.info().await?;
        Ok(Response::new(pb::InfoReply {
            worker_id: i.id,
            device: i.device.to_string(),
            threads: to_u32(i.threads),
            free_memory_bytes: i.free_memory,
            version: crate::VERSION.to_string(),
            epoch: i.epoch,
            layer_start: to_u32(i.layers.start),
            layer_end: to_u32(i.layers.end),
            kv_bytes_in_use: i.kv_bytes as u64,
            weight_bytes_transferred: i.transferred_total,
            hidden_bytes_sent: i.hidden_sent,
            hidden_bytes_received: i.hidden_received,
            busy_micros: u64::try_from(i.busy.as_micros()).unwrap_or(u64::MAX),
        }))
    }
}
