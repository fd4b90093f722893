//! The scheduler driven through the in-process pipeline: batching,
//! cancellation, pause, failover with replay (faults before, during and
//! after each stage's part of a micro-batch, and a hang), and no capacity.
//! Every output is compared with one process generating alone.

use std::sync::Arc;
use std::time::Duration;

use potluck_engine::fixture::TinyModel;
use potluck_engine::{LocalPipeline, ModelFile, Sampler, SamplingParams, SessionId, WireDtype};

use super::*;
use crate::in_process::{Fault, InProcess, When};
use crate::planner::StagePlan;

const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
const LAYERS: usize = 6;
const MAX_TOKENS: usize = 24;
const KV_BUDGET: usize = 8 << 20;

fn model(dir: &std::path::Path) -> std::path::PathBuf {
    TinyModel { layers: LAYERS, context: 256, ..TinyModel::default() }.write_gguf(dir).expect("fixture model")
}

/// Half greedy, half seeded at 0.8.
fn requests(n: usize) -> Vec<Generation> {
    (0..n)
        .map(|i| {
            let temperature = if i % 2 == 0 { 0.0 } else { 0.8 };
            let prompt = (0..5 + i).map(|j| u32::try_from(30 + 7 * i + j).expect("small")).collect();
            Generation {
                prompt,
                max_tokens: MAX_TOKENS,
                sampling: SamplingParams { temperature, seed: 100 + i as u64, ..Default::default() },
            }
        })
        .collect()
}

/// Each request generated alone, in one process.
fn reference(file: &ModelFile, gens: &[Generation]) -> Vec<Vec<u32>> {
    let mut pipe = LocalPipeline::load(file, &[0, LAYERS], WireDtype::F32, KV_BUDGET, 1).expect("load");
    gens.iter()
        .enumerate()
        .map(|(i, g)| {
            let mut sampler = Sampler::new(g.sampling.clone()).expect("sampler");
            pipe.generate(SessionId(i as u64), &g.prompt, g.max_tokens, &mut sampler, |_| false, |_| {})
                .expect("generate")
        })
        .collect()
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        max_sessions: 64,
        queue_capacity: 64,
        prefill_chunk: 4,
        max_batch_rows: 64,
        max_inflight: None,
        worker_kv_budget: KV_BUDGET as u64,
        kv_bytes_per_token_layer: 1,
        context: 256,
        stop_ids: Vec::new(),
        deadline: Deadline { floor: Duration::from_millis(300), factor: 50, first: Duration::from_secs(2) },
        failover_timeout: Duration::from_secs(30),
    }
}

/// A scheduler over in-process workers, and the cluster's part: loading plans.
struct Harness {
    scheduler: Scheduler,
    workers: InProcess,
    epoch: u64,
    _dir: tempfile::TempDir,
    file: ModelFile,
}

impl Harness {
    async fn start(config: SchedulerConfig) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = model(dir.path());
        let workers = InProcess::new(ModelFile::open(&path).expect("open"), &WORKERS, KV_BUDGET);
        let scheduler = Scheduler::start(config, Arc::new(Metrics::default()), workers.clone());
        let mut h = Self { scheduler, workers, epoch: 0, file: ModelFile::open(&path).expect("open"), _dir: dir };
        assert!(h.replan(), "the first plan loads");
        h
    }

    /// Plans over the workers that are up, as the cluster would; false if none is.
    fn replan(&mut self) -> bool {
        let alive = self.workers.alive(&WORKERS);
        if alive.is_empty() {
            return false;
        }
        let bounds = LocalPipeline::even_boundaries(LAYERS, alive.len());
        let stages: Vec<StagePlan> = alive
            .iter()
            .zip(bounds.windows(2))
            .map(|(w, b)| StagePlan { worker: w.clone(), address: format!("in-process://{w}"), start: b[0], end: b[1] })
            .collect();
        self.epoch += 1;
        self.workers.load(self.epoch, &stages).expect("load");
        self.scheduler.set_plan(PlanState {
            epoch: self.epoch,
            stages,
            ready: true,
            error: None,
            instances: Vec::new(),
        });
        true
    }

    /// Answers every failure the scheduler reports with a plan over the survivors, until `stop`.
    fn heal(mut self) -> (tokio::task::JoinHandle<Self>, oneshot::Sender<()>) {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut failures = self.scheduler.failures();
            loop {
                tokio::select! {
                    r = failures.changed() => {
                        if r.is_err() {
                            return self;
                        }
                        self.replan();
                    }
                    _ = &mut stopped => return self,
                }
            }
        });
        (task, stop)
    }
}

/// Every token of a stream, or its failure.
async fn drain(mut s: SessionStream) -> Result<Vec<u32>, SessionFailure> {
    let mut out = Vec::new();
    loop {
        match s.next().await.expect("the scheduler runs") {
            SessionEvent::Token(t) => out.push(t.id),
            SessionEvent::Finished(_) => return Ok(out),
            SessionEvent::Failed(f) => return Err(f),
        }
    }
}

async fn run_all(scheduler: &Scheduler, gens: &[Generation]) -> Vec<Result<Vec<u32>, SessionFailure>> {
    let mut streams = Vec::new();
    for g in gens {
        streams.push(scheduler.submit(g.clone()).await.expect("admitted"));
    }
    let tasks: Vec<_> = streams.into_iter().map(|s| tokio::spawn(drain(s))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("drain task"));
    }
    out
}

#[tokio::test]
async fn concurrent_sessions_equal_each_alone() {
    let h = Harness::start(config()).await;
    let gens = requests(6);
    let want = reference(&h.file, &gens);
    let got = run_all(&h.scheduler, &gens).await;
    for (i, (g, w)) in got.into_iter().zip(want).enumerate() {
        assert_eq!(g.expect("no failure"), w, "session {i}");
    }
    assert_eq!(h.workers.kv_bytes(), 0, "every finished session is released on every stage");
}

#[tokio::test]
async fn a_stage_failing_at_any_point_of_a_micro_batch_is_invisible() {
    let gens = requests(4);
    for (stage, worker) in WORKERS.iter().enumerate() {
        for when in [When::Before, When::During, When::After, When::Hang] {
            let h = Harness::start(config()).await;
            let want = reference(&h.file, &gens);
            // Late enough that every session is decoding, early enough that all still are.
            h.workers.inject(Fault { worker: worker.to_string(), nth: 12, when });
            let scheduler = h.scheduler.clone();
            let (healer, stop) = h.heal();
            let got = run_all(&scheduler, &gens).await;
            let _ = stop.send(());
            let h = healer.await.expect("healer");
            for (i, (g, w)) in got.into_iter().zip(&want).enumerate() {
                assert_eq!(g.as_ref().ok(), Some(w), "stage {stage}, {when:?}: session {i} ({g:?})");
            }
            assert_eq!(h.workers.alive(&WORKERS).len(), 2, "stage {stage}, {when:?}: the fault struck");
            assert_eq!(h.epoch, 2, "stage {stage}, {when:?}: one failover");
            assert_eq!(h.workers.kv_bytes(), 0, "stage {stage}, {when:?}: the survivors hold no KV");
        }
    }
}

#[tokio::test]
async fn with_no_pipeline_sessions_and_new_requests_wait_out_the_failover_timeout_then_fail() {
    let h = Harness::start(SchedulerConfig { failover_timeout: Duration::from_millis(300), ..config() }).await;
    for w in WORKERS {
        h.workers.inject(Fault { worker: w.into(), nth: 3, when: When::Before });
    }
    let gens = requests(2);
    let got = run_all(&h.scheduler, &gens).await;
    for g in got {
        assert!(matches!(g, Err(SessionFailure::NoCapacity(_))), "{g:?}");
    }
    assert!(matches!(h.scheduler.serving(), Serving::Failover { .. }));
    let late = run_all(&h.scheduler, &gens[..1]).await;
    assert!(
        matches!(late[0], Err(SessionFailure::NoCapacity(_))),
        "a request arriving during the outage waits, then fails"
    );
}

#[tokio::test]
async fn a_waiting_request_is_served_when_a_pipeline_returns() {
    let mut h = Harness::start(config()).await;
    h.workers.inject(Fault { worker: "w1".into(), nth: 1, when: When::Before });
    let gens = requests(1);
    let want = reference(&h.file, &gens);
    let stream = h.scheduler.submit(gens[0].clone()).await.expect("admitted");
    let mut failures = h.scheduler.failures();
    failures.changed().await.expect("a failure is reported");
    assert!(matches!(h.scheduler.serving(), Serving::Failover { .. }));
    assert!(h.replan());
    assert_eq!(drain(stream).await, Ok(want[0].clone()));
    assert_eq!(h.scheduler.serving(), Serving::Ready { epoch: 2 });
}

#[tokio::test]
async fn a_cancelled_session_frees_its_cache_and_the_others_go_on() {
    let h = Harness::start(config()).await;
    let gens = requests(3);
    let want = reference(&h.file, &gens);
    let mut cancelled = h.scheduler.submit(gens[0].clone()).await.expect("admitted");
    let others: Vec<_> = [&gens[1], &gens[2]]
        .into_iter()
        .map(|g| {
            let s = h.scheduler.clone();
            let g = g.clone();
            tokio::spawn(async move { drain(s.submit(g).await.expect("admitted")).await })
        })
        .collect();
    assert!(matches!(cancelled.next().await, Some(SessionEvent::Token(_))));
    drop(cancelled);
    for (t, w) in others.into_iter().zip(&want[1..]) {
        assert_eq!(t.await.expect("task").as_ref(), Ok(w));
    }
    // The cancelled session is noticed within a reap interval; the release follows.
    let mut waited = 0;
    while h.workers.kv_bytes() > 0 {
        waited += 1;
        assert!(waited < 1000, "the cancelled session's cache was never freed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_pause_holds_micro_batches_back_and_a_resume_goes_on_exactly() {
    let h = Harness::start(config()).await;
    let gens = requests(3);
    let want = reference(&h.file, &gens);
    let mut a = h.scheduler.submit(gens[0].clone()).await.expect("admitted");
    let Some(SessionEvent::Token(first)) = a.next().await else { panic!("a first token") };
    let pause = h.scheduler.pause().await;
    let before = h.workers.batches();
    // Each submit is a turn of the scheduler's loop, which would dispatch if it could.
    let b = h.scheduler.submit(gens[1].clone()).await.expect("admitted");
    let c = h.scheduler.submit(gens[2].clone()).await.expect("admitted");
    tokio::task::yield_now().await;
    assert_eq!(h.workers.batches(), before, "nothing reaches a stage while paused");
    drop(pause);
    let mut got = vec![first.id];
    got.extend(drain(a).await.expect("no failure"));
    assert_eq!(got, want[0]);
    assert_eq!(drain(b).await.as_ref(), Ok(&want[1]));
    assert_eq!(drain(c).await.as_ref(), Ok(&want[2]));
}
