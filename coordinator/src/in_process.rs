//! An in-process pipeline behind the scheduler's [`Transport`], for unit
//! tests: each "worker" holds an engine [`Stage`] of the plan it loaded, its
//! KV cache and (on the last stage) per-session samplers, as a real worker
//! does, and a micro-batch walks the stages in order with its hidden states
//! passed along in f32 (so the output is bit-identical to one process).
//!
//! Faults can be injected at every point of a micro-batch's life on every
//! stage: a worker dies before it computes its part, after it computed
//! (its cache moved, nothing passed on), or after it passed its output on
//! (the reply relayed back through it is lost); or it hangs, answering
//! nothing, as a stopped process does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use potluck_engine::{ComputePool, KvCache, ModelFile, Row, Sampler, SessionId, Stage, StageInput, StageOutput};
use potluck_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::error::CoordinatorError;
use crate::planner::StagePlan;
use crate::transport::{deliver, Link, LinkEvents, LinkKey, Transport};

/// Where in a micro-batch's life on one stage a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum When {
    /// The batch arrives and the worker dies before computing it.
    Before,
    /// The worker computes its part (its cache moves) and dies before passing it on.
    During,
    /// The worker passes its output on and dies before the reply comes back through it.
    After,
    /// The worker stops answering anything, as under SIGSTOP.
    Hang,
}

/// A fault to inject: on `worker`'s `nth` micro-batch (counting from 1), at `when`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fault {
    pub worker: String,
    pub nth: u64,
    pub when: When,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Up,
    Dead,
    Hung,
}

struct Loaded {
    stage: Stage,
    cache: KvCache,
    epoch: u64,
    next: Option<String>,
    samplers: HashMap<SessionId, (Sampler, Vec<u32>)>,
}

struct Worker {
    health: Health,
    batches: u64,
    loaded: Option<Loaded>,
}

struct Workers {
    file: ModelFile,
    kv_budget: usize,
    by_id: HashMap<String, Worker>,
    faults: Vec<Fault>,
    pool: ComputePool,
}

/// What became of one micro-batch.
enum Fate {
    Reply(pb::ForwardReply),
    Broken(String),
    Lost,
}

/// The in-process cluster of workers; clones share it.
#[derive(Clone)]
pub(crate) struct InProcess {
    inner: Arc<Mutex<Workers>>,
}

impl InProcess {
    /// Workers named `ids`, each able to load any range of `file`.
    pub fn new(file: ModelFile, ids: &[&str], kv_budget: usize) -> Self {
        let by_id =
            ids.iter().map(|id| (id.to_string(), Worker { health: Health::Up, batches: 0, loaded: None })).collect();
        let workers = Workers { file, kv_budget, by_id, faults: Vec::new(), pool: ComputePool::new(1) };
        Self { inner: Arc::new(Mutex::new(workers)) }
    }

    fn lock(&self) -> MutexGuard<'_, Workers> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Arms a fault.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Workers that are up, in the order they were named.
    pub fn alive(&self, order: &[&str]) -> Vec<String> {
        let w = self.lock();
        order
            .iter()
            .filter(|id| w.by_id.get(**id).is_some_and(|x| x.health == Health::Up))
            .map(|s| s.to_string())
            .collect()
    }

    /// Loads `stages` as `epoch` on their workers (a fresh cache each, as a real load gives).
    pub fn load(&self, epoch: u64, stages: &[StagePlan]) -> Result<(), CoordinatorError> {
        let mut w = self.lock();
        for (i, st) in stages.iter().enumerate() {
            let stage = Stage::load(&w.file, st.start..st.end)?;
            let cache = stage.new_cache(w.kv_budget);
            let next = stages.get(i + 1).map(|n| n.worker.clone());
            let worker = w.by_id.get_mut(&st.worker).filter(|x| x.health == Health::Up).ok_or_else(|| gone(st))?;
            worker.loaded = Some(Loaded { stage, cache, epoch, next, samplers: HashMap::new() });
        }
        Ok(())
    }

    /// Micro-batch parts every worker has received so far.
    pub fn batches(&self) -> u64 {
        self.lock().by_id.values().map(|x| x.batches).sum()
    }

    /// KV bytes held by the workers that are up.
    pub fn kv_bytes(&self) -> usize {
        let w = self.lock();
        w.by_id
            .values()
            .filter(|x| x.health == Health::Up)
            .filter_map(|x| x.loaded.as_ref())
            .map(|l| l.cache.used_bytes())
            .sum()
    }

    fn release(&self, sessions: &[u64]) {
        let mut w = self.lock();
        for worker in w.by_id.values_mut().filter(|x| x.health == Health::Up) {
            if let Some(l) = worker.loaded.as_mut() {
                for &s in sessions {
                    l.cache.release(SessionId(s));
                    l.samplers.remove(&SessionId(s));
                }
            }
        }
    }
}

fn gone(st: &StagePlan) -> CoordinatorError {
    CoordinatorError::Worker { worker: st.worker.clone(), address: st.address.clone(), message: "not up".into() }
}

impl Workers {
    /// Runs one micro-batch through the stages from `first`.
    fn run(&mut self, first: &str, request: &pb::ForwardRequest) -> Fate {
        let rows: Vec<Row> = request
            .rows
            .iter()
            .map(|r| Row { session: SessionId(r.session), position: r.position as usize, logits: r.sample })
            .collect();
        let mut at = first.to_string();
        let mut hidden = None;
        // Set when a stage died after passing its output on: the reply cannot come back.
        let mut lost_on_return: Option<String> = None;
        loop {
            let Some(worker) = self.by_id.get_mut(&at) else { return Fate::Broken(format!("no worker {at}")) };
            match worker.health {
                Health::Dead => return Fate::Broken(format!("worker {at} is gone")),
                Health::Hung => return Fate::Lost,
                Health::Up => {}
            }
            worker.batches += 1;
            let nth = worker.batches;
            let fault = self.faults.iter().position(|f| f.worker == at && f.nth == nth).map(|i| self.faults.remove(i));
            let Some(worker) = self.by_id.get_mut(&at) else { return Fate::Broken(format!("no worker {at}")) };
            match fault.as_ref().map(|f| f.when) {
                Some(When::Before) => {
                    kill(worker);
                    return Fate::Broken(format!("worker {at} died"));
                }
                Some(When::Hang) => {
                    worker.health = Health::Hung;
                    return Fate::Lost;
                }
                _ => {}
            }
            let Some(l) = worker.loaded.as_mut() else { return Fate::Broken(format!("worker {at} has no stage")) };
            if l.epoch != request.epoch {
                return Fate::Broken(format!("worker {at}: stale epoch {} (loaded {})", request.epoch, l.epoch));
            }
            let input = match &hidden {
                None => StageInput::Tokens(&request.tokens),
                Some(h) => StageInput::Hidden(h),
            };
            let out = match l.stage.forward(&rows, input, &mut l.cache, &self.pool) {
                Ok(o) => o,
                Err(e) => return Fate::Broken(format!("worker {at}: {e}")),
            };
            let dies_after = match fault.as_ref().map(|f| f.when) {
                Some(When::During) => {
                    kill(worker);
                    return Fate::Broken(format!("worker {at} died"));
                }
                Some(When::After) => {
                    lost_on_return = Some(format!("worker {at} died"));
                    true
                }
                _ => false,
            };
            match out {
                StageOutput::Hidden(h) => {
                    hidden = Some(h);
                    let Some(next) = l.next.clone() else {
                        return Fate::Broken(format!("worker {at} has no next stage"));
                    };
                    if dies_after {
                        kill(worker);
                    }
                    at = next;
                }
                StageOutput::Logits(logits) => {
                    let reply = sample(l, request, &logits);
                    l.stage.recycle(logits);
                    if dies_after {
                        kill(worker);
                    }
                    return match (reply, lost_on_return) {
                        (_, Some(why)) => Fate::Broken(why),
                        (Ok(r), None) => Fate::Reply(r),
                        (Err(e), None) => Fate::Broken(e),
                    };
                }
            }
        }
    }
}

fn kill(worker: &mut Worker) {
    worker.health = Health::Dead;
    worker.loaded = None;
}

/// Records every row's token in its session's history and samples the rows that ask, as the last stage does.
fn sample(
    l: &mut Loaded,
    request: &pb::ForwardRequest,
    logits: &potluck_engine::Logits,
) -> Result<pb::ForwardReply, String> {
    let mut tokens = Vec::new();
    let mut next = 0;
    for (i, row) in request.rows.iter().enumerate() {
        let id = SessionId(row.session);
        let (sampler, history) = match l.samplers.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let params = row.sampling.map(crate::sampling_wire::decode).unwrap_or_default();
                e.insert((Sampler::new(params).map_err(|e| e.to_string())?, Vec::new()))
            }
        };
        history.push(request.tokens[i]);
        if logits.rows.get(next) == Some(&i) {
            let s = sampler.sample(logits.row(next), history);
            tokens.push(pb::SampledToken { session: row.session, token: s.token, logprob: s.logprob, top: Vec::new() });
            next += 1;
        }
    }
    Ok(pb::ForwardReply { batch_id: request.batch_id, tokens, error: String::new() })
}

/// A link into the in-process workers.
pub(crate) struct InProcessLink {
    id: u64,
    epoch: u64,
    requests: mpsc::Sender<pb::ForwardRequest>,
    workers: InProcess,
}

impl Transport for InProcess {
    type Link = InProcessLink;

    async fn open(
        &self,
        key: LinkKey,
        first: &StagePlan,
        events: LinkEvents,
    ) -> Result<InProcessLink, CoordinatorError> {
        let LinkKey { id, epoch } = key;
        {
            let w = self.lock();
            let up = w.by_id.get(&first.worker).filter(|x| x.health == Health::Up);
            match up.and_then(|x| x.loaded.as_ref()) {
                Some(l) if l.epoch == epoch => {}
                _ => return Err(gone(first)),
            }
        }
        let (requests, mut rx) = mpsc::channel::<pb::ForwardRequest>(64);
        let workers = self.clone();
        let first = first.worker.clone();
        tokio::spawn(async move {
            while let Some(request) = rx.recv().await {
                let fate = workers.lock().run(&first, &request);
                let reply = match fate {
                    Fate::Reply(r) => Ok(r),
                    Fate::Broken(why) => Err(why),
                    Fate::Lost => continue,
                };
                if !deliver(&events, id, reply).await {
                    return;
                }
            }
        });
        Ok(InProcessLink { id, epoch, requests, workers: self.clone() })
    }

    fn release_at(&self, _first: &StagePlan, sessions: Vec<u64>) {
        self.release(&sessions);
    }
}

impl Link for InProcessLink {
    fn key(&self) -> LinkKey {
        LinkKey { id: self.id, epoch: self.epoch }
    }

    async fn send(&self, batch_id: u64, rows: Vec<pb::Row>, tokens: Vec<u32>) -> Result<(), CoordinatorError> {
        let request = pb::ForwardRequest { epoch: self.epoch, batch_id, rows, tokens, ..Default::default() };
        self.requests.send(request).await.map_err(|_| CoordinatorError::NotReady("the in-process link closed".into()))
    }

    fn release(&self, sessions: Vec<u64>) {
        self.workers.release(&sessions);
    }
}
