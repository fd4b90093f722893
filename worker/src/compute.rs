//! The compute thread: one dedicated OS thread per worker owns the loaded
//! stage, its KV cache, the samplers and the compute pool.
//!
//! Async handlers send it jobs over a channel and await a oneshot reply, so
//! matrix work never blocks the async runtime, and batches from every stream
//! run one at a time in arrival order.

use std::ops::Range;
use std::sync::mpsc;

use potluck_engine::{
    ComputePool, DeviceCache, DeviceStage, Logits, Sampled, SessionCache, SessionId, StageBackend, StageInput,
    StageOutput, WireDtype,
};
use tokio::sync::oneshot;

use crate::batch::Batch;
use crate::error::{InvalidRequest, WorkerError};
use crate::sampler_state::SamplerState;

/// A loaded stage and everything a plan epoch attaches to it.
#[derive(Debug)]
pub(crate) struct Loaded {
    /// The layers, on whichever backend the worker's device runs.
    pub stage: DeviceStage,
    /// Their KV cache (on the same device).
    pub cache: DeviceCache,
    /// The shard's content hash: a later epoch asking for the same one keeps the layers.
    pub digest: String,
    /// The plan epoch requests must carry.
    pub epoch: u64,
    /// Hidden-state dtype in and out.
    pub wire: WireDtype,
    /// Where outputs go (`None` on the last stage).
    pub next_stage: Option<String>,
}

/// What a forward produced.
#[derive(Debug)]
pub(crate) enum ForwardOutcome {
    /// Hidden states, already encoded for the wire, for the next stage.
    Forwarded {
        /// The batch (without its input hidden states), to re-send its rows.
        batch: Batch,
        /// Encoded hidden states.
        data: Vec<u8>,
        /// Their dtype.
        wire: WireDtype,
        /// Rows and width.
        shape: (usize, usize),
        /// The next stage's URL.
        next_stage: String,
    },
    /// Sampled tokens, in row order (last stage).
    Sampled {
        /// The batch's id.
        batch_id: u64,
        /// One entry per row that asked for a sample.
        tokens: Vec<(SessionId, Sampled)>,
    },
}

/// A queued batch's outcome, ready once the compute thread has run it.
#[derive(Debug)]
pub(crate) struct Outcome(oneshot::Receiver<Result<ForwardOutcome, WorkerError>>);

impl Outcome {
    /// Waits for the batch to run.
    pub async fn wait(self) -> Result<ForwardOutcome, WorkerError> {
        self.0.await.map_err(|_| WorkerError::ComputeStopped)?
    }
}

/// What `Info` reports about the loaded stage.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    /// The loaded epoch (0 before any load).
    pub epoch: u64,
    /// The loaded layers (empty before any load).
    pub layers: Range<usize>,
    /// KV bytes held.
    pub kv_bytes: usize,
    /// Time spent running micro-batches since the thread started.
    pub busy: std::time::Duration,
}

/// A new epoch's terms for the stage already held.
#[derive(Debug, Clone)]
pub(crate) struct Renewal {
    /// The shard the epoch asks for; the layers are kept only if it is the one held.
    pub digest: String,
    /// Its layers.
    pub layers: Range<usize>,
    /// The new plan epoch.
    pub epoch: u64,
    /// Hidden-state dtype in and out.
    pub wire: WireDtype,
    /// Where outputs go now (`None` on the last stage).
    pub next_stage: Option<String>,
    /// KV budget of the fresh cache.
    pub kv_budget: usize,
}

enum Job {
    Install(Box<Loaded>, oneshot::Sender<Result<(), WorkerError>>),
    Renew(Renewal, oneshot::Sender<Result<Option<usize>, WorkerError>>),
    /// The span is the caller's, so the compute span joins the micro-batch's trace.
    Forward(Box<Batch>, tracing::Span, oneshot::Sender<Result<ForwardOutcome, WorkerError>>),
    Release(Vec<SessionId>, oneshot::Sender<(usize, Option<String>)>),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// A handle to the compute thread; the thread exits when the handle is dropped.
#[derive(Debug)]
pub(crate) struct Compute {
    jobs: mpsc::Sender<Job>,
}

impl Compute {
    /// Starts the thread with a pool of `threads` (already resolved, > 0).
    pub fn start(threads: usize) -> Result<Self, WorkerError> {
        let (jobs, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("potluck-compute".into())
            .spawn(move || run(&rx, &ComputePool::new(threads)))
            .map_err(|source| WorkerError::Io { path: "potluck-compute thread".into(), source })?;
        Ok(Self { jobs })
    }

    async fn ask<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(job(tx)).map_err(|_| WorkerError::ComputeStopped)?;
        rx.await.map_err(|_| WorkerError::ComputeStopped)
    }

    /// Replaces the loaded stage, unless `loaded` belongs to an older epoch.
    pub async fn install(&self, loaded: Loaded) -> Result<(), WorkerError> {
        self.ask(|tx| Job::Install(Box::new(loaded), tx)).await?
    }

    /// Moves the stage held to a new epoch without reloading its layers, if
    /// it holds the shard `renewal` names; returns the weight bytes it keeps
    /// if it did. The KV
    /// cache and samplers start empty, as after a load: sessions replay
    /// from their tokens on every new epoch.
    pub async fn renew(&self, renewal: Renewal) -> Result<Option<usize>, WorkerError> {
        self.ask(|tx| Job::Renew(renewal, tx)).await?
    }

    /// Queues a batch behind the thread's current work; the receiver yields
    /// its outcome. A stream queues its next batch while one computes, so
    /// the thread goes from one to the next without waiting on the network.
    /// `span` parents the compute span.
    pub fn submit(&self, batch: Batch, span: tracing::Span) -> Result<Outcome, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.jobs.send(Job::Forward(Box::new(batch), span, tx)).map_err(|_| WorkerError::ComputeStopped)?;
        Ok(Outcome(rx))
    }

    /// Frees sessions; returns how many were held here, and the next stage.
    pub async fn release(&self, sessions: Vec<SessionId>) -> Result<(usize, Option<String>), WorkerError> {
        self.ask(|tx| Job::Release(sessions, tx)).await
    }

    /// The loaded stage's state.
    pub async fn snapshot(&self) -> Result<Snapshot, WorkerError> {
        self.ask(Job::Snapshot).await
    }
}

/// The loaded stage plus the last stage's samplers.
struct State {
    loaded: Loaded,
    samplers: SamplerState,
}

fn run(jobs: &mpsc::Receiver<Job>, pool: &ComputePool) {
    let mut state: Option<State> = None;
    let mut busy = std::time::Duration::ZERO;
    // Replies are best effort: a caller that gave up has dropped its receiver.
    for job in jobs {
        match job {
            Job::Install(loaded, reply) => {
                let result = match &state {
                    Some(s) if s.loaded.epoch > loaded.epoch => {
                        Err(WorkerError::StaleEpoch { got: loaded.epoch, current: s.loaded.epoch })
                    }
                    _ => {
                        state = Some(State { loaded: *loaded, samplers: SamplerState::default() });
                        Ok(())
                    }
                };
                let _ = reply.send(result);
            }
            Job::Renew(r, reply) => {
                let result = match &mut state {
                    Some(s) if s.loaded.epoch > r.epoch => {
                        Err(WorkerError::StaleEpoch { got: r.epoch, current: s.loaded.epoch })
                    }
                    Some(s) if s.loaded.digest == r.digest && s.loaded.stage.range() == r.layers => {
                        let l = &mut s.loaded;
                        l.cache = l.stage.new_cache(r.kv_budget);
                        (l.epoch, l.wire, l.next_stage) = (r.epoch, r.wire, r.next_stage);
                        s.samplers = SamplerState::default();
                        Ok(Some(l.stage.weight_bytes()))
                    }
                    _ => Ok(None),
                };
                let _ = reply.send(result);
            }
            Job::Forward(batch, caller, reply) => {
                let started = std::time::Instant::now();
                let result = match state.as_mut() {
                    Some(s) => forward(s, *batch, &caller, pool),
                    None => Err(WorkerError::NotLoaded),
                };
                busy += started.elapsed();
                let _ = reply.send(result);
            }
            Job::Release(sessions, reply) => {
                let result = match state.as_mut() {
                    Some(s) => {
                        let mut n = 0;
                        for id in sessions {
                            // Non-short-circuit `|`: free both the KV cache and the sampler.
                            if s.loaded.cache.release(id) | s.samplers.release(id) {
                                n += 1;
                            }
                        }
                        (n, s.loaded.next_stage.clone())
                    }
                    None => (0, None),
                };
                let _ = reply.send(result);
            }
            Job::Snapshot(reply) => {
                let snap = state.as_ref().map_or_else(
                    || Snapshot { busy, ..Snapshot::default() },
                    |s| Snapshot {
                        epoch: s.loaded.epoch,
                        layers: s.loaded.stage.range(),
                        kv_bytes: s.loaded.cache.used_bytes(),
                        busy,
                    },
                );
                let _ = reply.send(snap);
            }
        }
    }
}

fn forward(
    s: &mut State,
    mut batch: Batch,
    caller: &tracing::Span,
    pool: &ComputePool,
) -> Result<ForwardOutcome, WorkerError> {
    let l = &mut s.loaded;
    if batch.epoch != l.epoch {
        return Err(WorkerError::StaleEpoch { got: batch.epoch, current: l.epoch });
    }
    let range = l.stage.range();
    let _span = tracing::info_span!(
        parent: caller,
        "stage.compute",
        batch_id = batch.batch_id,
        rows = batch.rows.len(),
        layers = ?range
    )
    .entered();
    let hidden = batch.hidden.take();
    let input = match (&hidden, l.stage.is_first()) {
        (None, true) => StageInput::Tokens(&batch.tokens),
        (Some(_), true) => return Err(InvalidRequest::UnexpectedHidden.into()),
        (None, false) => return Err(InvalidRequest::MissingHidden { start: range.start, end: range.end }.into()),
        (Some((dtype, h)), false) => {
            if *dtype != l.wire {
                return Err(InvalidRequest::HiddenDtype { got: dtype.name(), expected: l.wire.name() }.into());
            }
            let expected_dim = l.stage.config().hidden;
            if h.dim != expected_dim || h.rows != batch.rows.len() {
                let (rows, dim, expected_rows) = (h.rows, h.dim, batch.rows.len());
                return Err(InvalidRequest::HiddenShape { rows, dim, expected_rows, expected_dim }.into());
            }
            StageInput::Hidden(h)
        }
    };
    match l.stage.forward(&batch.rows, input, &mut l.cache, pool)? {
        StageOutput::Hidden(h) => {
            let next_stage =
                l.next_stage.clone().ok_or(InvalidRequest::MissingNextStage { start: range.start, end: range.end })?;
            Ok(ForwardOutcome::Forwarded {
                data: h.encode(l.wire),
                wire: l.wire,
                shape: (h.rows, h.dim),
                next_stage,
                batch,
            })
        }
        StageOutput::Logits(logits) => {
            let outcome = sample(&mut s.samplers, &batch, &logits);
            l.stage.recycle(logits);
            outcome
        }
    }
}

/// Records every row's token in its session's history, and samples the rows that ask, in row order.
fn sample(samplers: &mut SamplerState, batch: &Batch, logits: &Logits) -> Result<ForwardOutcome, WorkerError> {
    let mut tokens = Vec::with_capacity(logits.rows.len());
    let mut next_logits = 0;
    for (i, row) in batch.rows.iter().enumerate() {
        samplers.observe(row.session, batch.tokens[i], batch.sampling[i].as_ref())?;
        if logits.rows.get(next_logits) == Some(&i) {
            if let Some(sampled) = samplers.sample(row.session, logits.row(next_logits)) {
                tokens.push((row.session, sampled));
            }
            next_logits += 1;
        }
    }
    Ok(ForwardOutcome::Sampled { batch_id: batch.batch_id, tokens })
}
