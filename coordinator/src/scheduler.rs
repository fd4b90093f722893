//! The scheduler: continuous batching through the pipeline.
//!
//! One task owns every session and the stream to stage 0. Whenever fewer
//! than `max_inflight` micro-batches are in the pipeline, it forms another
//! from the sessions that are not already in one: a decode row for each
//! session that has a new token, and chunks of waiting prompts within a row
//! budget (chunked prefill, interleaved with decode). Sessions are spread
//! over the in-flight micro-batches so that with P stages all P compute at
//! once, and picked oldest-turn first, so no session starves. A new request
//! joins at the next micro-batch, that is, at a token boundary.
//!
//! Batch invariance makes all this invisible in the output: a row's result
//! does not depend on which rows share its micro-batch.
//!
//! The scheduler keeps every session's tokens. On a planned change the
//! cluster pauses it (no micro-batch in flight), loads the new plan, and
//! hands it over; every running session is then re-prefilled from its tokens
//! on the new pipeline and goes on where it was, with no error.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use potluck_engine::SamplingParams;
use potluck_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument as _;

use crate::admission::{Admission, Refusal};
use crate::cluster::PlanState;
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::pipeline::{Finish, Generation, Token};
use crate::stage_link::{LinkEvent, StageLink};
use crate::traffic::Traffic;

/// Default most prompt tokens one session sends in one micro-batch.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;
/// Default most rows in one micro-batch.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 512;
/// How long a pause waits for micro-batches in flight before giving up on them.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a micro-batch may stay in the pipeline before the pipeline counts as stuck.
pub const BATCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How often waiting and idle sessions are checked for a client that went away.
const REAP_INTERVAL: Duration = Duration::from_millis(100);

/// How the scheduler batches.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sessions served at once.
    pub max_sessions: usize,
    /// Most requests waiting for capacity; beyond it requests are refused (429).
    pub queue_capacity: usize,
    /// Most prompt tokens one session sends per micro-batch.
    pub prefill_chunk: usize,
    /// Most rows per micro-batch.
    pub max_batch_rows: usize,
    /// Micro-batches in flight at once (`None`: one per stage, at least two).
    pub max_inflight: Option<usize>,
    /// KV budget of each worker, in bytes.
    pub worker_kv_budget: u64,
    /// KV bytes one token costs in one layer.
    pub kv_bytes_per_token_layer: usize,
    /// The model's context length.
    pub context: usize,
    /// Token ids that end a generation.
    pub stop_ids: Vec<u32>,
}

/// What a session's consumer receives.
#[derive(Debug)]
pub enum SessionEvent {
    /// A generated token (never an end-of-sequence token).
    Token(Token),
    /// Generation ended; no more events follow.
    Finished(Finish),
    /// The pipeline failed this session; no more events follow.
    Failed(String),
}

/// A running generation. Dropping it cancels the session and frees its KV
/// cache on every stage.
#[derive(Debug)]
pub struct SessionStream {
    /// The session's id on the workers.
    pub session: u64,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    events: mpsc::UnboundedReceiver<SessionEvent>,
}

impl SessionStream {
    /// The next event; `None` only if the scheduler is gone.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }
}

enum Command {
    Submit(Generation, tracing::Span, oneshot::Sender<Result<SessionStream, CoordinatorError>>),
    Pause(oneshot::Sender<()>),
    Resume,
    Plan(PlanState),
}

/// A handle to the scheduler task.
#[derive(Debug, Clone)]
pub struct Scheduler {
    commands: mpsc::UnboundedSender<Command>,
}

/// Holds the scheduler paused (nothing in flight, nothing sent) until dropped.
#[derive(Debug)]
pub struct Pause {
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Pause {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Resume);
    }
}

impl Scheduler {
    /// Starts the scheduler task.
    pub fn start(config: SchedulerConfig, metrics: Arc<Metrics>, traffic: Arc<Traffic>) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let core = Core::new(config, metrics, traffic);
        tokio::spawn(core.run(rx));
        Self { commands }
    }

    /// Admits a generation, or queues it, or refuses it (429 when the queue is full).
    pub async fn submit(&self, generation: Generation) -> Result<SessionStream, CoordinatorError> {
        let (tx, rx) = oneshot::channel();
        let span = tracing::info_span!(
            "generate",
            session = tracing::field::Empty,
            prompt_tokens = generation.prompt.len(),
            max_tokens = generation.max_tokens
        );
        self.commands.send(Command::Submit(generation, span, tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Stops sending micro-batches and waits (at most [`PAUSE_TIMEOUT`]) until none is in flight.
    pub async fn pause(&self) -> Pause {
        let (tx, rx) = oneshot::channel();
        let pause = Pause { commands: self.commands.clone() };
        if self.commands.send(Command::Pause(tx)).is_ok() && tokio::time::timeout(PAUSE_TIMEOUT, rx).await.is_err() {
            tracing::warn!("micro-batches still in flight after {PAUSE_TIMEOUT:?}; switching plans anyway");
        }
        pause
    }

    /// Hands over a newly loaded plan; running sessions move to it.
    pub fn set_plan(&self, plan: PlanState) {
        let _ = self.commands.send(Command::Plan(plan));
    }
}

fn stopped() -> CoordinatorError {
    CoordinatorError::NotReady("the scheduler has stopped".into())
}

struct Session {
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    sampling: pb::Sampling,
    reserved: usize,
    /// Tokens handed to the pipeline (their rows sent).
    sent: usize,
    in_flight: bool,
    /// Dispatch order: the smallest goes first.
    turn: u64,
    events: mpsc::UnboundedSender<SessionEvent>,
    arrived: Instant,
    last_token: Option<Instant>,
    span: tracing::Span,
}

impl Session {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    fn ready(&self) -> bool {
        !self.in_flight && self.sent < self.tokens.len()
    }
}

struct Core {
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    traffic: Arc<Traffic>,
    plan: Option<PlanState>,
    link: Option<StageLink>,
    link_events: (mpsc::UnboundedSender<LinkEvent>, mpsc::UnboundedReceiver<LinkEvent>),
    next_link: u64,
    next_batch: u64,
    next_session: u64,
    next_turn: u64,
    sessions: BTreeMap<u64, Session>,
    waiting: VecDeque<(u64, Session)>,
    /// Micro-batches in the pipeline: the sessions in each, their span, and when they left.
    inflight: HashMap<u64, (Vec<u64>, tracing::Span, Instant)>,
    admission: Admission,
    paused: bool,
    pause_waiters: Vec<oneshot::Sender<()>>,
    to_release: Vec<u64>,
    /// Session events held back until the next micro-batch has left (see `deliver`).
    outbox: Vec<(mpsc::UnboundedSender<SessionEvent>, SessionEvent)>,
}

impl Core {
    fn new(config: SchedulerConfig, metrics: Arc<Metrics>, traffic: Arc<Traffic>) -> Self {
        let admission = Admission::new(0, config.max_sessions, config.queue_capacity);
        // Session ids are unique across coordinator restarts: workers may still hold an old leader's sessions.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1));
        Self {
            config,
            metrics,
            traffic,
            plan: None,
            link: None,
            link_events: mpsc::unbounded_channel(),
            next_link: 1,
            next_batch: 1,
            next_session: start,
            next_turn: 0,
            sessions: BTreeMap::new(),
            waiting: VecDeque::new(),
            inflight: HashMap::new(),
            admission,
            paused: false,
            pause_waiters: Vec::new(),
            to_release: Vec::new(),
            outbox: Vec::new(),
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut reap = tokio::time::interval(REAP_INTERVAL);
        reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let sent = self.dispatch().await;
            self.deliver(sent).await;
            self.flush_releases();
            self.publish();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(c) => self.command(c),
                    None => return,
                },
                Some(event) = self.link_events.1.recv() => self.link_event(event),
                _ = reap.tick() => self.reap(),
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Submit(generation, span, reply) => {
                let _ = reply.send(self.submit(generation, span));
            }
            Command::Pause(done) => {
                self.paused = true;
                self.pause_waiters.push(done);
                self.wake_pausers();
            }
            Command::Resume => self.paused = false,
            Command::Plan(plan) => self.set_plan(plan),
        }
    }

    fn submit(&mut self, g: Generation, span: tracing::Span) -> Result<SessionStream, CoordinatorError> {
        if g.prompt.is_empty() {
            return Err(CoordinatorError::BadRequest("the prompt is empty".into()));
        }
        let needed = g.prompt.len().saturating_add(g.max_tokens);
        if needed > self.config.context {
            return Err(CoordinatorError::BadRequest(format!(
                "prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {} tokens",
                g.prompt.len(),
                g.max_tokens,
                self.config.context
            )));
        }
        g.sampling.validate()?;
        if self.plan.is_none() {
            return Err(CoordinatorError::NotReady("no plan is loaded yet".into()));
        }
        self.admission.may_wait(needed, self.waiting.len()).map_err(|r| match r {
            Refusal::QueueFull { .. } => CoordinatorError::Overloaded(r.to_string()),
            Refusal::TooLarge { .. } => CoordinatorError::BadRequest(r.to_string()),
        })?;
        let id = self.next_session;
        self.next_session += 1;
        span.record("session", id);
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_len = g.prompt.len();
        let session = Session {
            tokens: g.prompt,
            prompt_len,
            max_tokens: g.max_tokens,
            sampling: to_pb(&g.sampling),
            reserved: needed,
            sent: 0,
            in_flight: false,
            turn: 0,
            events: tx,
            arrived: Instant::now(),
            last_token: None,
            span,
        };
        self.metrics.prompt_tokens.fetch_add(prompt_len as u64, Ordering::Relaxed);
        self.waiting.push_back((id, session));
        self.admit();
        Ok(SessionStream { session: id, prompt_tokens: prompt_len, events: rx })
    }

    /// Moves waiting requests into the running set while they fit, first come first served.
    fn admit(&mut self) {
        while let Some((_, s)) = self.waiting.front() {
            if !self.admission.fits(s.reserved) {
                break;
            }
            let Some((id, mut s)) = self.waiting.pop_front() else { break };
            self.admission.reserve(s.reserved);
            s.turn = self.take_turn();
            self.sessions.insert(id, s);
        }
    }

    fn take_turn(&mut self) -> u64 {
        self.next_turn += 1;
        self.next_turn
    }

    fn set_plan(&mut self, plan: PlanState) {
        if !plan.ready {
            // No plan to serve on: this coordinator stood down, or a new plan failed half-loaded.
            self.link = None;
            self.inflight.clear();
            let why = plan.error.clone().unwrap_or_else(|| "the plan in force was withdrawn".into());
            self.fail_all(&format!("not ready: {why}"));
            for (_, s) in self.waiting.drain(..) {
                let _ = s.events.send(SessionEvent::Failed(format!("not ready: {why}")));
            }
            self.plan = None;
            self.wake_pausers();
            return;
        }
        if self.plan.as_ref().is_some_and(|p| p.epoch == plan.epoch) {
            return; // Same epoch: the workers still hold every session's cache.
        }
        let capacity =
            Admission::capacity_of(&plan.stages, self.config.worker_kv_budget, self.config.kv_bytes_per_token_layer);
        self.admission.set_capacity(capacity);
        if self.link.as_ref().is_some_and(|l| l.epoch != plan.epoch) {
            self.link = None;
        }
        // Whatever is still in flight ran on the old plan; those sessions cannot be trusted to continue.
        let stale: Vec<u64> = self.inflight.drain().flat_map(|(_, (s, _, _))| s).collect();
        for id in stale {
            self.fail(id, "the plan changed while this request was in flight".into());
        }
        // Every other session re-prefills its tokens on the new pipeline and goes on from there.
        let mut moved = 0;
        for s in self.sessions.values_mut().filter(|s| s.sent > 0) {
            s.sent = 0;
            moved += 1;
        }
        self.metrics.replayed_sessions.fetch_add(moved, Ordering::Relaxed);
        tracing::info!(
            epoch = plan.epoch,
            capacity_tokens = capacity,
            sessions = self.sessions.len(),
            "scheduler on new plan"
        );
        self.plan = Some(plan);
        self.admit();
    }

    /// One micro-batch per stage keeps every stage computing; more only cut
    /// the same sessions into smaller batches, which the kernels run less
    /// efficiently (measured on two workers at 16 streams: 2 in flight gave
    /// 1,583 tok/s, 3 gave 1,510). A lone stage still gets two, so it
    /// computes the next batch while the coordinator turns the last around.
    fn max_inflight(&self) -> usize {
        let stages = self.plan.as_ref().map_or(1, |p| p.stages.len());
        self.config.max_inflight.unwrap_or(stages.max(2)).max(1)
    }

    /// Sends micro-batches while there is room in flight; returns whether
    /// any left.
    async fn dispatch(&mut self) -> bool {
        if self.paused || !self.sessions.values().any(Session::ready) {
            return false;
        }
        let Some(plan) = self.plan.clone() else { return false };
        if self.link.is_none() {
            let Some(first) = plan.stages.first() else { return false };
            // Opening the stream can take seconds: no held event waits on it.
            self.deliver(false).await;
            let id = self.next_link;
            self.next_link += 1;
            let events = self.link_events.0.clone();
            match StageLink::open(id, plan.epoch, first, Arc::clone(&self.traffic), events).await {
                Ok(link) => self.link = Some(link),
                Err(e) => {
                    self.fail_all(&e.to_string());
                    return false;
                }
            }
        }
        let mut sent_any = false;
        while self.inflight.len() < self.max_inflight() {
            let Some((batch_id, rows, tokens, span)) = self.form_batch() else { break };
            let Some(link) = self.link.as_ref() else { break };
            let sent = link.send(batch_id, rows, tokens).instrument(span).await;
            if let Err(e) = sent {
                self.link_broken(&e.to_string());
                break;
            }
            sent_any = true;
        }
        sent_any
    }

    /// The next micro-batch: ready sessions, oldest turn first, spread over the in-flight slots.
    fn form_batch(&mut self) -> Option<(u64, Vec<pb::Row>, Vec<u32>, tracing::Span)> {
        let cancelled: Vec<u64> =
            self.sessions.iter().filter(|(_, s)| !s.in_flight && s.events.is_closed()).map(|(&id, _)| id).collect();
        for id in cancelled {
            self.finish(id, Finish::Cancelled);
        }
        let mut ready: Vec<(u64, u64)> =
            self.sessions.iter().filter(|(_, s)| s.ready()).map(|(&id, s)| (s.turn, id)).collect();
        if ready.is_empty() {
            return None;
        }
        ready.sort_unstable();
        let slots = self.max_inflight();
        let share = self.sessions.len().div_ceil(slots).max(1);
        let (mut rows, mut tokens, mut members) = (Vec::new(), Vec::new(), Vec::new());
        let mut budget = self.config.max_batch_rows.max(1);
        let mut decode = false;
        for (_, id) in ready {
            let turn = self.take_turn();
            let Some(s) = self.sessions.get_mut(&id) else { continue };
            let n = (s.tokens.len() - s.sent).min(self.config.prefill_chunk.max(1)).min(budget);
            if n == 0 {
                break;
            }
            decode |= s.sent >= s.prompt_len;
            for pos in s.sent..s.sent + n {
                rows.push(pb::Row {
                    session: id,
                    position: u32::try_from(pos).unwrap_or(u32::MAX),
                    sample: pos + 1 == s.tokens.len(),
                    sampling: (pos == 0).then_some(s.sampling),
                });
                tokens.push(s.tokens[pos]);
            }
            s.sent += n;
            s.in_flight = true;
            s.turn = turn;
            budget -= n;
            members.push(id);
            if members.len() >= share || budget == 0 {
                break;
            }
        }
        let batch_id = self.next_batch;
        self.next_batch += 1;
        // The micro-batch's span joins the trace of its first request; the others are linked.
        let parent = members.first().and_then(|id| self.sessions.get(id)).map(|s| s.span.clone());
        let span = match (decode, parent) {
            (true, Some(p)) => tracing::info_span!(parent: &p, "decode.step", batch_id, rows = rows.len()),
            (false, Some(p)) => tracing::info_span!(parent: &p, "prefill.step", batch_id, rows = rows.len()),
            (_, None) => tracing::Span::none(),
        };
        for id in members.iter().skip(1) {
            if let Some(s) = self.sessions.get(id) {
                span.follows_from(&s.span);
            }
        }
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics.batch_rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
        self.inflight.insert(batch_id, (members, span.clone(), Instant::now()));
        Some((batch_id, rows, tokens, span))
    }

    fn link_event(&mut self, event: LinkEvent) {
        if self.link.as_ref().is_none_or(|l| l.id != event.link) {
            return; // A replaced link's late news.
        }
        let reply = match event.reply {
            Ok(r) if r.error.is_empty() => r,
            Ok(r) => return self.link_broken(&r.error),
            Err(e) => return self.link_broken(&e),
        };
        let Some((members, _span, _)) = self.inflight.remove(&reply.batch_id) else {
            return self.link_broken(&format!("a reply for unknown micro-batch {}", reply.batch_id));
        };
        for id in &members {
            if let Some(s) = self.sessions.get_mut(id) {
                s.in_flight = false;
            }
        }
        for t in reply.tokens {
            let token = Token {
                id: t.token,
                logprob: t.logprob,
                top: t.top.into_iter().map(|p| (p.token, p.logprob)).collect(),
            };
            self.on_token(t.session, token);
        }
        self.wake_pausers();
    }

    fn on_token(&mut self, id: u64, token: Token) {
        let Some(s) = self.sessions.get_mut(&id) else { return };
        let now = Instant::now();
        match s.last_token {
            None => self.metrics.time_to_first_token.observe(now - s.arrived),
            Some(t) => self.metrics.inter_token_latency.observe(now - t),
        }
        s.last_token = Some(now);
        s.tokens.push(token.id);
        self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if self.config.stop_ids.contains(&token.id) {
            return self.finish(id, Finish::Stop);
        }
        let done = s.generated() >= s.max_tokens;
        if s.events.is_closed() {
            return self.finish(id, Finish::Cancelled);
        }
        self.outbox.push((s.events.clone(), SessionEvent::Token(token)));
        if done {
            self.finish(id, Finish::Length);
        }
    }

    fn finish(&mut self, id: u64, finish: Finish) {
        if let Some(s) = self.sessions.remove(&id) {
            self.outbox.push((s.events, SessionEvent::Finished(finish)));
            self.admission.release(s.reserved);
            self.to_release.push(id);
            self.admit();
        }
    }

    fn fail(&mut self, id: u64, message: String) {
        if let Some(s) = self.sessions.remove(&id) {
            tracing::warn!(session = id, error = %message, "session failed");
            self.outbox.push((s.events, SessionEvent::Failed(message)));
            self.admission.release(s.reserved);
            self.to_release.push(id);
            self.admit();
        }
    }

    fn fail_all(&mut self, message: &str) {
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        for id in ids {
            self.fail(id, message.to_string());
        }
    }

    /// The stream to stage 0 broke: every running session depended on it.
    fn link_broken(&mut self, message: &str) {
        if self.sessions.is_empty() {
            tracing::info!(error = %message, "pipeline stream closed while idle");
        } else {
            tracing::warn!(error = %message, sessions = self.sessions.len(), "pipeline stream failed");
        }
        self.inflight.clear();
        self.fail_all(&format!("pipeline failed: {message}"));
        self.link = None;
        self.wake_pausers();
    }

    /// Drops waiting requests whose client went away, and idle sessions likewise.
    fn reap(&mut self) {
        if self.inflight.values().any(|(_, _, sent)| sent.elapsed() > BATCH_TIMEOUT) {
            return self.link_broken(&format!("a micro-batch got no answer in {BATCH_TIMEOUT:?}; a stage is stuck"));
        }
        self.waiting.retain(|(_, s)| !s.events.is_closed());
        let idle: Vec<u64> =
            self.sessions.iter().filter(|(_, s)| !s.in_flight && s.events.is_closed()).map(|(&id, _)| id).collect();
        for id in idle {
            self.finish(id, Finish::Cancelled);
        }
    }

    fn wake_pausers(&mut self) {
        if self.inflight.is_empty() {
            for w in self.pause_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Hands the held-back events to their sessions, in order. After a
    /// micro-batch was sent (`after_send`) it yields first, so the batch is
    /// on its way to stage 0 before the HTTP tasks wake to stream the last
    /// tokens, instead of queueing behind them. (A client that has gone is
    /// noticed at its next token, or by `form_batch`.)
    async fn deliver(&mut self, after_send: bool) {
        if self.outbox.is_empty() {
            return;
        }
        if after_send {
            tokio::task::yield_now().await;
        }
        for (to, event) in self.outbox.drain(..) {
            let _ = to.send(event);
        }
    }

    fn flush_releases(&mut self) {
        if self.to_release.is_empty() {
            return;
        }
        let sessions = std::mem::take(&mut self.to_release);
        match (&self.link, self.plan.as_ref().and_then(|p| p.stages.first())) {
            (Some(link), _) => link.release(sessions),
            (None, Some(first)) => crate::stage_link::release_at(first, sessions),
            (None, None) => tracing::debug!(?sessions, "no plan to release sessions on"),
        }
    }

    fn publish(&self) {
        Metrics::set(&self.metrics.queue_depth, self.waiting.len());
        Metrics::set(&self.metrics.active_sessions, self.sessions.len());
    }
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
        logprobs: s.logprobs,
    }
}
