//! The scheduler: continuous batching through the pipeline.
//!
//! One task owns every session and the link to stage 0 (a [`Transport`]:
//! gRPC in a cluster, in-process in unit tests). Whenever fewer than
//! `max_inflight` micro-batches are in the pipeline, it forms another from
//! the sessions that are not already in one (`micro_batch.rs`). Sessions are
//! spread over the in-flight micro-batches so that with P stages all P
//! compute at once, and picked oldest-turn first, so no session starves. A
//! new request joins at the next micro-batch, that is, at a token boundary.
//!
//! Batch invariance makes all this invisible in the output: a row's result
//! does not depend on which rows share its micro-batch.
//!
//! The scheduler keeps every session's tokens, so a session can be replayed
//! on any pipeline. On a planned change the cluster pauses it (no
//! micro-batch in flight), loads the new plan, and hands it over. On an
//! unplanned one (the link breaks, or a micro-batch misses its deadline) it
//! drops whatever was in flight, reports the failure to the cluster and
//! waits. Either way, once a plan of a new epoch arrives every running
//! session is re-prefilled from its tokens and goes on where it was: the
//! client sees a pause, not an error. Only if no plan arrives within the
//! failover timeout do waiting sessions fail, as "no capacity".

mod failover;
mod micro_batch;
mod session;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument as _;

pub use failover::{Serving, StageFailure};
pub use micro_batch::{Deadline, DEFAULT_DEADLINE_FACTOR, DEFAULT_DEADLINE_FLOOR, DEFAULT_FIRST_DEADLINE};
pub use session::{SessionEvent, SessionFailure, SessionStream, SESSION_BUFFER};

use crate::admission::{Admission, Refusal};
use crate::cluster::PlanState;
use crate::error::CoordinatorError;
use crate::metrics::Metrics;
use crate::pipeline::{Finish, Generation, Token};
use crate::transport::{Link, LinkEvent, Transport, LINK_EVENT_BUFFER};
use failover::Failover;
use micro_batch::{InFlight, RoundTrips};
use session::Session;

/// Default most prompt tokens one session sends in one micro-batch.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;
/// Default most rows in one micro-batch.
pub const DEFAULT_MAX_BATCH_ROWS: usize = 512;
/// Default time requests wait for a pipeline after a failure before they fail as "no capacity".
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a pause waits for micro-batches in flight before giving up on them.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Failovers in a row (with no token between) after which a session is failed rather than replayed.
pub const MAX_REPLAYS: u32 = 3;
/// How often deadlines, waiting requests and idle sessions are checked.
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
    /// When a micro-batch counts as lost.
    pub deadline: Deadline,
    /// How long sessions wait for a working pipeline before failing as "no capacity".
    pub failover_timeout: Duration,
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
    failures: watch::Receiver<Option<StageFailure>>,
    serving: watch::Receiver<Serving>,
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
    /// Starts the scheduler task over `transport`.
    pub(crate) fn start<T: Transport>(config: SchedulerConfig, metrics: Arc<Metrics>, transport: T) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let (failures_tx, failures) = watch::channel(None);
        let (serving_tx, serving) = watch::channel(Serving::NoPlan);
        let core = Core::new(config, metrics, transport, failures_tx, serving_tx);
        tokio::spawn(core.run(rx));
        Self { commands, failures, serving }
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

    /// The latest unplanned failure of the pipeline, as it changes.
    pub fn failures(&self) -> watch::Receiver<Option<StageFailure>> {
        self.failures.clone()
    }

    /// Whether the scheduler can serve now.
    pub fn serving(&self) -> Serving {
        self.serving.borrow().clone()
    }
}

fn stopped() -> CoordinatorError {
    CoordinatorError::NotReady("the scheduler has stopped".into())
}

struct Core<T: Transport> {
    config: SchedulerConfig,
    metrics: Arc<Metrics>,
    transport: T,
    plan: Option<PlanState>,
    link: Option<T::Link>,
    link_events: (mpsc::Sender<LinkEvent>, mpsc::Receiver<LinkEvent>),
    next_link: u64,
    next_batch: u64,
    next_session: u64,
    next_turn: u64,
    sessions: BTreeMap<u64, Session>,
    waiting: VecDeque<(u64, Session)>,
    inflight: HashMap<u64, InFlight>,
    round_trips: RoundTrips,
    admission: Admission,
    paused: bool,
    pause_waiters: Vec<oneshot::Sender<()>>,
    failover: Option<Failover>,
    /// When the last failover's plan arrived, until the first token after it (the replay's length).
    replaying: Option<Instant>,
    failures: watch::Sender<Option<StageFailure>>,
    serving: watch::Sender<Serving>,
    to_release: Vec<u64>,
    /// Session events held back until the next micro-batch has left (see `deliver`).
    outbox: Vec<(mpsc::Sender<SessionEvent>, SessionEvent)>,
}

impl<T: Transport> Core<T> {
    fn new(
        config: SchedulerConfig,
        metrics: Arc<Metrics>,
        transport: T,
        failures: watch::Sender<Option<StageFailure>>,
        serving: watch::Sender<Serving>,
    ) -> Self {
        let admission = Admission::new(0, config.max_sessions, config.queue_capacity);
        // Session ids are unique across coordinator restarts: workers may still hold an old leader's sessions.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1));
        Self {
            config,
            metrics,
            transport,
            plan: None,
            link: None,
            link_events: mpsc::channel(LINK_EVENT_BUFFER),
            next_link: 1,
            next_batch: 1,
            next_session: start,
            next_turn: 0,
            sessions: BTreeMap::new(),
            waiting: VecDeque::new(),
            inflight: HashMap::new(),
            round_trips: RoundTrips::default(),
            admission,
            paused: false,
            pause_waiters: Vec::new(),
            failover: None,
            replaying: None,
            failures,
            serving,
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
        if self.plan.is_none() && self.failover.is_none() {
            return Err(CoordinatorError::NotReady("no plan is loaded yet".into()));
        }
        self.admission.may_wait(needed, self.waiting.len()).map_err(|r| match r {
            Refusal::QueueFull { .. } => CoordinatorError::Overloaded(r.to_string()),
            Refusal::TooLarge { .. } => CoordinatorError::BadRequest(r.to_string()),
        })?;
        let id = self.next_session;
        self.next_session += 1;
        span.record("session", id);
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let prompt_len = g.prompt.len();
        let session = Session {
            tokens: g.prompt,
            prompt_len,
            max_tokens: g.max_tokens,
            sampling: crate::sampling_wire::encode(&g.sampling),
            reserved: needed,
            sent: 0,
            in_flight: false,
            turn: 0,
            events: tx,
            arrived: Instant::now(),
            last_token: None,
            replays: 0,
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
            if self.plan.is_none() {
                return; // Never served: requests are refused until a first plan is ready.
            }
            // No plan to serve on: this coordinator stood down, or a new plan failed half-loaded.
            // Sessions wait for the next one (up to the failover timeout).
            let why = plan.error.clone().unwrap_or_else(|| "the plan in force was withdrawn".into());
            self.link = None;
            self.inflight.clear();
            self.begin_failover(&why, false);
            return;
        }
        if self.failover.is_none() && self.plan.as_ref().is_some_and(|p| p.epoch == plan.epoch) {
            return; // Same epoch: the workers still hold every session's cache.
        }
        let capacity =
            Admission::capacity_of(&plan.stages, self.config.worker_kv_budget, self.config.kv_bytes_per_token_layer);
        self.admission.set_capacity(capacity);
        if self.link.as_ref().is_some_and(|l| l.key().epoch != plan.epoch) {
            self.link = None;
        }
        // Whatever is still in flight ran on the old plan: its sessions go again from their tokens.
        self.inflight.clear();
        let mut moved = 0;
        for s in self.sessions.values_mut() {
            if s.rewind() {
                moved += 1;
            }
        }
        self.metrics.replayed_sessions.fetch_add(moved, Ordering::Relaxed);
        if let Some(f) = self.failover.take() {
            let stall = f.since.elapsed();
            self.metrics.failover_stall.observe(stall);
            tracing::info!(epoch = plan.epoch, stall_ms = stall.as_millis(), sessions = moved, "failover done");
            self.replaying = Some(Instant::now());
        }
        tracing::info!(
            epoch = plan.epoch,
            capacity_tokens = capacity,
            sessions = self.sessions.len(),
            "scheduler on new plan"
        );
        self.serving.send_replace(Serving::Ready { epoch: plan.epoch });
        self.plan = Some(plan);
        self.admit();
    }

    /// One micro-batch per stage keeps every stage computing; more only cut
    /// the same sessions into smaller batches, which the kernels run less
    /// efficiently (`docs/benchmarks.md`). A lone stage still gets two, so it
    /// computes the next batch while the coordinator turns the last around.
    fn max_inflight(&self) -> usize {
        let stages = self.plan.as_ref().map_or(1, |p| p.stages.len());
        self.config.max_inflight.unwrap_or(stages.max(2)).max(1)
    }

    /// Sends micro-batches while there is room in flight; returns whether
    /// any left.
    async fn dispatch(&mut self) -> bool {
        if self.paused || self.failover.is_some() || !self.sessions.values().any(Session::ready) {
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
            match self.transport.open(crate::transport::LinkKey { id, epoch: plan.epoch }, first, events).await {
                Ok(link) => self.link = Some(link),
                Err(e) => {
                    self.begin_failover(&e.to_string(), true);
                    return false;
                }
            }
        }
        let mut sent_any = false;
        while self.inflight.len() < self.max_inflight() {
            let Some(batch) = self.form_batch() else { break };
            let Some(link) = self.link.as_ref() else { break };
            let sent = link.send(batch.id, batch.rows, batch.tokens).instrument(batch.span).await;
            if let Err(e) = sent {
                self.link_broken(&e.to_string());
                break;
            }
            sent_any = true;
        }
        sent_any
    }

    fn link_event(&mut self, event: LinkEvent) {
        if self.link.as_ref().is_none_or(|l| l.key().id != event.link) {
            return; // A replaced link's late news.
        }
        let reply = match event.reply {
            Ok(r) if r.error.is_empty() => r,
            Ok(r) => return self.link_broken(&r.error),
            Err(e) => return self.link_broken(&e),
        };
        let Some(batch) = self.inflight.remove(&reply.batch_id) else {
            return self.link_broken(&format!("a reply for unknown micro-batch {}", reply.batch_id));
        };
        self.round_trips.observe(batch.sent.elapsed(), batch.rows);
        for id in &batch.members {
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
        s.replays = 0;
        if let Some(since) = self.replaying.take() {
            tracing::info!(replay_ms = since.elapsed().as_millis(), "first token replayed after the failover");
        }
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

    fn fail(&mut self, id: u64, failure: SessionFailure) {
        if let Some(s) = self.sessions.remove(&id) {
            tracing::warn!(session = id, error = %failure, "session failed");
            self.outbox.push((s.events, SessionEvent::Failed(failure)));
            self.admission.release(s.reserved);
            self.to_release.push(id);
            self.admit();
        }
    }

    /// Fails micro-batches past their deadline and sessions that waited out
    /// a failover; drops waiting requests whose client went away, and idle sessions likewise.
    fn reap(&mut self) {
        let late = self.inflight.values().find_map(|b| {
            let deadline = self.round_trips.deadline(&self.config.deadline, b.rows);
            (b.sent.elapsed() > deadline).then_some(deadline)
        });
        if let Some(deadline) = late {
            return self.link_broken(&format!("a micro-batch got no answer in {deadline:?}; a stage is stuck"));
        }
        self.expire_waits();
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
            // A session is scheduled only with room for what its batch brings back,
            // so a full channel is rare: only a failure can meet one.
            if let Err(mpsc::error::TrySendError::Full(event)) = to.try_send(event) {
                tokio::spawn(async move {
                    let _ = to.send(event).await;
                });
            }
        }
    }

    fn flush_releases(&mut self) {
        if self.to_release.is_empty() {
            return;
        }
        let sessions = std::mem::take(&mut self.to_release);
        match (&self.link, self.plan.as_ref().and_then(|p| p.stages.first())) {
            (Some(link), _) => link.release(sessions),
            (None, Some(first)) => self.transport.release_at(first, sessions),
            (None, None) => tracing::debug!(?sessions, "no plan to release sessions on"),
        }
    }

    fn publish(&self) {
        Metrics::set(&self.metrics.queue_depth, self.waiting.len());
        Metrics::set(&self.metrics.active_sessions, self.sessions.len());
    }
}
