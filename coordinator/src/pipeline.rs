//! Driving the pipeline: one long-lived stream to stage 0, token-sized
//! messages out, sampled tokens back. Hidden states never pass through here.

use potluck_engine::SamplingParams;
use potluck_proto::trace_context::TraceHeaders;
use potluck_proto::v1 as pb;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tracing::Instrument as _;

use crate::cluster::Cluster;
use crate::error::CoordinatorError;

/// Prompt tokens per micro-batch during prefill.
pub const PREFILL_CHUNK: usize = 256;

/// An open Forward stream to the first stage of one plan epoch.
#[derive(Debug)]
pub struct PipelineConn {
    epoch: u64,
    tx: mpsc::Sender<pb::ForwardRequest>,
    rx: tonic::Streaming<pb::ForwardReply>,
    next_batch: u64,
    traffic: std::sync::Arc<crate::traffic::Traffic>,
}

/// One sampled token, as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// Top alternatives.
    pub top: Vec<(u32, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence or end-of-turn token.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The consumer stopped listening.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Stop | Self::Cancelled => "stop",
            Self::Length => "length",
        }
    }
}

/// A generation request in engine terms.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
}

fn to_pb(s: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        temperature: s.temperature,
        top_k: u32::try_from(s.top_k).unwrap_or(u32::MAX),
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        top_logprobs: u32::try_from(s.top_logprobs).unwrap_or(u32::MAX),
    }
}

impl Cluster {
    /// Runs one generation through the pipeline, calling `on_token` for each
    /// token (it returns `false` to stop early). Requests take turns.
    pub async fn generate(
        &self,
        req: Generation,
        mut on_token: impl FnMut(&Token) -> bool + Send,
    ) -> Result<(Vec<u32>, Finish), CoordinatorError> {
        req.sampling.validate()?;
        let context = self.model().context;
        if req.prompt.is_empty() {
            return Err(CoordinatorError::BadRequest("the prompt is empty".into()));
        }
        if req.prompt.len() + req.max_tokens > context {
            return Err(CoordinatorError::BadRequest(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the context of {context}",
                req.prompt.len(),
                req.max_tokens
            )));
        }
        let session = self.new_session();
        // The request's trace: every micro-batch carries this span's descendants' context to the workers.
        let span =
            tracing::info_span!("generate", session, prompt_tokens = req.prompt.len(), max_tokens = req.max_tokens);
        async {
            let mut guard = self.pipeline.lock().await;
            let result = self.run_session(&mut guard, session, &req, &mut on_token).await;
            if result.is_err() {
                // The stream may be broken; the next request reconnects.
                *guard = None;
            }
            drop(guard);
            self.release(session).await;
            result
        }
        .instrument(span)
        .await
    }

    async fn run_session(
        &self,
        conn: &mut Option<PipelineConn>,
        session: u64,
        req: &Generation,
        on_token: &mut (impl FnMut(&Token) -> bool + Send),
    ) -> Result<(Vec<u32>, Finish), CoordinatorError> {
        let state = self.plan_state().await;
        if !state.ready {
            return Err(CoordinatorError::NotReady(state.error.unwrap_or_else(|| "no plan loaded yet".into())));
        }
        if conn.as_ref().is_none_or(|c| c.epoch != state.epoch) {
            *conn = Some(self.connect(&state).await?);
        }
        let Some(c) = conn.as_mut() else { return Err(CoordinatorError::NotReady("no pipeline".into())) };
        let mut out = Vec::new();
        let mut first = true;
        let mut pos = 0usize;
        let mut token = None;
        for chunk in req.prompt.chunks(PREFILL_CHUNK) {
            let last_chunk = pos + chunk.len() == req.prompt.len();
            let rows = chunk
                .iter()
                .enumerate()
                .map(|(j, _)| {
                    let r = pb::Row {
                        session,
                        position: u32::try_from(pos + j).unwrap_or(u32::MAX),
                        sample: last_chunk && j + 1 == chunk.len(),
                        sampling: first.then(|| to_pb(&req.sampling)),
                    };
                    first = false;
                    r
                })
                .collect();
            let span = tracing::info_span!("prefill.step", position = pos, tokens = chunk.len());
            token = c.step(rows, chunk.to_vec()).instrument(span).await?.into_iter().next();
            pos += chunk.len();
        }
        loop {
            let Some(t) = token.take() else {
                return Err(CoordinatorError::NotReady("the last stage returned no token".into()));
            };
            out.push(t.id);
            let stop = self.tokenizer().is_stop(t.id);
            if !stop && !on_token(&t) {
                return Ok((out, Finish::Cancelled));
            }
            if stop {
                return Ok((out, Finish::Stop));
            }
            if out.len() >= req.max_tokens {
                return Ok((out, Finish::Length));
            }
            let row =
                pb::Row { session, position: u32::try_from(pos).unwrap_or(u32::MAX), sample: true, sampling: None };
            let span = tracing::info_span!("decode.step", position = pos);
            token = c.step(vec![row], vec![t.id]).instrument(span).await?.into_iter().next();
            pos += 1;
        }
    }

    async fn connect(&self, state: &crate::cluster::PlanState) -> Result<PipelineConn, CoordinatorError> {
        let first = state.stages.first().ok_or_else(|| CoordinatorError::NotReady("empty plan".into()))?;
        let worker_err = |m: String| CoordinatorError::Worker {
            worker: first.worker.clone(),
            address: first.address.clone(),
            message: m,
        };
        let mut client = pb::stage_client::StageClient::connect(first.address.clone())
            .await
            .map_err(|e| worker_err(format!("unreachable: {e}")))?
            .max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(16);
        let traffic = std::sync::Arc::clone(self.traffic());
        let counted = std::sync::Arc::clone(&traffic);
        // Counted as they leave, so every request on the wire is in the figure.
        let outgoing = ReceiverStream::new(rx).map(move |r: pb::ForwardRequest| {
            counted.request(r.encoded_len());
            r
        });
        let replies = client.forward(outgoing).await.map_err(|s| worker_err(s.message().to_string()))?.into_inner();
        Ok(PipelineConn { epoch: state.epoch, tx, rx: replies, next_batch: 1, traffic })
    }

    /// Frees a session on every stage (best effort: the TTL is the backstop).
    pub async fn release(&self, session: u64) {
        let state = self.plan_state().await;
        if let Some(first) = state.stages.first() {
            match pb::stage_client::StageClient::connect(first.address.clone()).await {
                Ok(mut c) => {
                    let mut request = tonic::Request::new(pb::ReleaseRequest { sessions: vec![session] });
                    TraceHeaders::current().inject(&mut request);
                    if let Err(e) = c.release(request).await {
                        tracing::warn!(session, error = %e.message(), "release failed");
                    }
                }
                Err(e) => tracing::warn!(session, error = %e, "release: stage 0 unreachable"),
            }
        }
    }
}

impl PipelineConn {
    /// Sends one micro-batch and waits for its sampled tokens.
    async fn step(&mut self, rows: Vec<pb::Row>, tokens: Vec<u32>) -> Result<Vec<Token>, CoordinatorError> {
        let batch_id = self.next_batch;
        self.next_batch += 1;
        let broken = |m: String| CoordinatorError::NotReady(format!("pipeline stream: {m}"));
        let trace = TraceHeaders::current();
        self.tx
            .send(pb::ForwardRequest {
                epoch: self.epoch,
                batch_id,
                rows,
                tokens,
                hidden: None,
                // Per message: the stream outlives any one request's trace.
                traceparent: trace.traceparent,
                tracestate: trace.tracestate,
            })
            .await
            .map_err(|_| broken("closed".into()))?;
        let reply = self
            .rx
            .message()
            .await
            .map_err(|s| broken(s.message().to_string()))?
            .ok_or_else(|| broken("ended".into()))?;
        self.traffic.reply(reply.encoded_len());
        if !reply.error.is_empty() {
            return Err(broken(reply.error));
        }
        if reply.batch_id != batch_id {
            return Err(broken(format!("reply for batch {} while waiting for {batch_id}", reply.batch_id)));
        }
        Ok(reply
            .tokens
            .into_iter()
            .map(|t| Token {
                id: t.token,
                logprob: t.logprob,
                top: t.top.into_iter().map(|p| (p.token, p.logprob)).collect(),
            })
            .collect())
    }
}
