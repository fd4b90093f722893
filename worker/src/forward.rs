//! One upstream `Forward` stream: decode each micro-batch, run it on the
//! compute thread, then either reply with sampled tokens (last stage) or send
//! the hidden states down a long-lived stream to the next stage and relay its
//! replies back unchanged.
//!
//! Batches are not awaited end to end: while the next stage works on batch
//! k, this stage already computes batch k+1. And batch k+1 is decoded and
//! queued on the compute thread while batch k computes, so the thread never
//! waits on the network between the two (that gap was about a tenth of a
//! stage's time with two micro-batches in flight). The first error ends the
//! stream with a status; other streams keep going.

use std::sync::Arc;

use potluck_proto::trace_context::TraceHeaders;
use potluck_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument as _;

use crate::batch::Batch;
use crate::compute::{ForwardOutcome, Outcome};
use crate::error::WorkerError;
use crate::status;
use crate::worker::Worker;

/// Replies buffered toward the upstream before this stage waits for it.
pub const REPLY_BUFFER: usize = 64;
/// Requests buffered toward the next stage before this stage waits for it.
pub const DOWNSTREAM_BUFFER: usize = 16;

/// What the upstream receives.
pub(crate) type Replies = ReceiverStream<Result<pb::ForwardReply, Status>>;
type ReplySender = mpsc::Sender<Result<pb::ForwardReply, Status>>;

/// Micro-batches decoded and queued on the compute thread ahead of the one
/// whose output is being sent on.
pub const QUEUED_AHEAD: usize = 4;

/// Serves `upstream` on tasks of its own and returns the reply stream.
pub(crate) fn serve(worker: Arc<Worker>, upstream: Streaming<pb::ForwardRequest>) -> Replies {
    let (out, replies) = mpsc::channel(REPLY_BUFFER);
    let (queued, to_finish) = mpsc::channel(QUEUED_AHEAD);
    tokio::spawn(admit(Arc::clone(&worker), upstream, queued));
    tokio::spawn(finish(worker, to_finish, out));
    ReceiverStream::new(replies)
}

/// One micro-batch on its way through this stage, in stream order.
struct Queued {
    span: tracing::Span,
    /// The compute thread's answer, or why the request never got there.
    outcome: Result<Outcome, WorkerError>,
}

/// Reads the upstream's requests, decodes each and queues it on the compute
/// thread at once, so the next batch is waiting when the current one ends.
async fn admit(worker: Arc<Worker>, mut upstream: Streaming<pb::ForwardRequest>, queued: mpsc::Sender<Queued>) {
    let mut stopping = worker.stopping.clone();
    loop {
        let message = tokio::select! {
            m = upstream.message() => m,
            _ = stopping.wait_for(|&s| s) => break,
        };
        let request = match message {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(s) => {
                tracing::debug!(status = %s, "upstream forward stream broke");
                break;
            }
        };
        let span = forward_span(&request);
        worker.hidden.received(request.hidden.as_ref().map_or(0, |h| h.data.len()));
        let outcome =
            Batch::try_from(request).map_err(WorkerError::from).and_then(|b| worker.compute.submit(b, span.clone()));
        let failed = outcome.is_err();
        // A closed queue means the stream already failed or its upstream left.
        if queued.send(Queued { span, outcome }).await.is_err() || failed {
            break;
        }
    }
    // Dropping `queued` lets `finish` drain what is queued, then end.
}

/// Sends each queued batch's output on, in order: tokens upstream (last
/// stage), or hidden states down a long-lived stream to the next stage whose
/// replies are relayed back unchanged. The first error ends the stream with
/// a status.
async fn finish(worker: Arc<Worker>, mut queued: mpsc::Receiver<Queued>, out: ReplySender) {
    let mut downstream: Option<Downstream> = None;
    let failure = loop {
        let Some(Queued { span, outcome }) = queued.recv().await else { break None };
        match step(&worker, outcome, &mut downstream, &out).instrument(span).await {
            Ok(true) => {}
            Ok(false) => break None,
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = failure {
        tracing::warn!(error = %e, "forward stream failed");
        if let Some(d) = downstream.take() {
            d.relay.abort();
        }
        let _ = out.send(Err(e.into())).await;
    }
    // On a clean end, dropping `downstream` ends the next stage's request
    // stream; its relay finishes once the next stage has answered everything.
}

/// The `stage.forward` span of one micro-batch, a child of the span that sent it (its `traceparent`).
fn forward_span(request: &pb::ForwardRequest) -> tracing::Span {
    let span = tracing::info_span!("stage.forward", batch_id = request.batch_id, rows = request.rows.len());
    TraceHeaders { traceparent: request.traceparent.clone(), tracestate: request.tracestate.clone() }.parent(&span);
    span
}

/// Sends one batch's output on; `Ok(false)` when the upstream has gone away.
async fn step(
    worker: &Worker,
    outcome: Result<Outcome, WorkerError>,
    downstream: &mut Option<Downstream>,
    out: &ReplySender,
) -> Result<bool, WorkerError> {
    match outcome?.wait().await? {
        ForwardOutcome::Sampled { batch_id, tokens } => {
            let reply = pb::ForwardReply {
                batch_id,
                tokens: tokens
                    .into_iter()
                    .map(|(session, s)| pb::SampledToken {
                        session: session.0,
                        token: s.token,
                        logprob: s.logprob,
                        top: s.top.into_iter().map(|(token, logprob)| pb::TokenLogprob { token, logprob }).collect(),
                    })
                    .collect(),
                error: String::new(),
            };
            Ok(out.send(Ok(reply)).await.is_ok())
        }
        ForwardOutcome::Forwarded { batch, data, wire, shape: (rows, dim), next_stage } => {
            worker.hidden.sent(data.len());
            let mut request = batch.to_request(wire, rows, dim, data);
            // Same trace; the parent becomes this stage's `stage.forward` span.
            let trace = TraceHeaders::current();
            (request.traceparent, request.tracestate) = (trace.traceparent, trace.tracestate);
            let link = match downstream.take() {
                Some(d) if d.address == next_stage => d,
                // A new plan may point elsewhere; the old stream drains on its own.
                _ => Downstream::open(worker, &next_stage, out.clone()).await?,
            };
            let link = downstream.insert(link);
            link.requests.send(request).await.map_err(|_| WorkerError::NextStage {
                stage: worker.peers.describe(&link.address),
                code: tonic::Code::Unavailable,
                message: "the stream to the next stage closed".into(),
            })?;
            Ok(!out.is_closed())
        }
    }
}

/// A long-lived stream to the next stage, and the task relaying its replies upstream.
struct Downstream {
    address: String,
    requests: mpsc::Sender<pb::ForwardRequest>,
    relay: JoinHandle<()>,
}

impl Downstream {
    async fn open(worker: &Worker, address: &str, out: ReplySender) -> Result<Self, WorkerError> {
        let mut client = worker.peers.client(address)?;
        let (requests, rx) = mpsc::channel(DOWNSTREAM_BUFFER);
        let stage = worker.peers.describe(address);
        let response = client.forward(ReceiverStream::new(rx)).await.map_err(|s| status::next_stage(&stage, &s))?;
        let mut replies = response.into_inner();
        let relay = tokio::spawn(async move {
            loop {
                match replies.message().await {
                    Ok(Some(reply)) => {
                        if out.send(Ok(reply)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(s) => {
                        let _ = out.send(Err(status::next_stage(&stage, &s).into())).await;
                        break;
                    }
                }
            }
        });
        Ok(Self { address: address.to_string(), requests, relay })
    }
}
