//! A small fixed-size compute pool that spins briefly, then sleeps.
//!
//! Why not rayon: its workers spin for a long time before sleeping, and two
//! engine processes sharing a core then starve each other. Here a job is
//! split into as many parts as there are threads, the caller runs part 0
//! itself, and the other threads wait between jobs: first a short bounded
//! spin (a forward pass issues jobs a few microseconds apart, and a futex
//! round trip costs more than that), then a sleep on a condition variable.
//! The spin is bounded in time ([`SPIN`]), so an idle or preempted pool
//! gives its core back quickly. Work is split by output element, never along
//! a reduction, so results do not depend on the thread count.
//!
//! Parts are not tied to threads: the caller and the workers claim part
//! numbers from a shared counter, so when a worker is descheduled (another
//! process holds its core) the caller runs that part itself instead of
//! waiting for the worker to be scheduled again. Each part still runs
//! exactly once per job.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a waiting thread spins before it sleeps. Long enough to bridge
/// the gap between two jobs of one forward pass, short enough that a pool
/// between tokens (or on a shared host) stops burning the core at once.
/// `POTLUCK_POOL_SPIN_US` overrides it (0 disables spinning).
pub const SPIN: Duration = Duration::from_micros(40);

/// A job as the workers see it: a borrowed closure whose lifetime `run` guarantees.
type Job = &'static (dyn Fn(usize) + Sync);

struct Shared {
    /// The current job; written by `run` only while no worker is inside a job.
    job: Mutex<Option<Job>>,
    /// Bumped once per job; workers look for parts when they see a new value.
    generation: AtomicU64,
    /// Parts per job.
    parts: usize,
    /// The next part number to claim in the current job (values past
    /// `parts` mean none is left).
    next_part: AtomicUsize,
    /// Parts of the current job finished.
    finished: AtomicUsize,
    shutdown: AtomicBool,
    /// Workers asleep (or about to sleep) on `wake`.
    sleepers: AtomicUsize,
    /// Whether the caller of `run` sleeps on `done`.
    caller_sleeping: AtomicBool,
    /// Guards the sleeps; holds no data.
    sleep: Mutex<()>,
    wake: Condvar,
    done: Condvar,
    spin: Duration,
}

/// A pool of `threads - 1` helpers plus the calling thread.
pub struct ComputePool {
    threads: usize,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool").field("threads", &self.threads).finish()
    }
}

/// Spins until `ready()` or until `limit` has passed; returns whether it became ready.
#[inline]
fn spin_until(limit: Duration, ready: impl Fn() -> bool) -> bool {
    if ready() {
        return true;
    }
    if limit.is_zero() {
        return false;
    }
    let start = Instant::now();
    loop {
        for _ in 0..32 {
            std::hint::spin_loop();
            if ready() {
                return true;
            }
        }
        if start.elapsed() >= limit {
            return ready();
        }
    }
}

impl ComputePool {
    /// Starts a pool; `threads` of 0 means one per available core.
    pub fn new(threads: usize) -> Self {
        let threads =
            if threads == 0 { std::thread::available_parallelism().map_or(1, std::num::NonZero::get) } else { threads };
        let spin = std::env::var("POTLUCK_POOL_SPIN_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(SPIN, Duration::from_micros);
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            generation: AtomicU64::new(0),
            parts: threads,
            next_part: AtomicUsize::new(usize::MAX / 2),
            finished: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            caller_sleeping: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            done: Condvar::new(),
            spin,
        });
        let handles = (1..threads)
            .map(|part| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new().name(format!("potluck-compute-{part}")).spawn(move || worker(&shared)).ok()
            })
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        // If the OS refused a thread, run single-threaded rather than fail.
        let threads = if handles.len() + 1 == threads { threads } else { 1 };
        Self { threads, shared, handles }
    }

    /// Number of parts each job is split into.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(part)` for every part in `0..threads()` and returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.threads == 1 {
            f(0);
            return;
        }
        let sh = &*self.shared;
        // SAFETY: the reference is only used by workers between here and the
        // wait below, which does not return until every part has finished
        // (`finished == threads`), so `f` outlives every use.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        *lock(&sh.job) = Some(job);
        sh.finished.store(0, Ordering::SeqCst);
        // Opening the counter after storing the job: whoever claims a part
        // then finds this job in `sh.job`, and it stays there until every
        // part has finished.
        sh.next_part.store(0, Ordering::SeqCst);
        sh.generation.fetch_add(1, Ordering::SeqCst);
        // A worker that registered as a sleeper before the bump is woken here;
        // one registering after it sees the new generation before sleeping.
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = lock(&sh.sleep);
            sh.wake.notify_all();
        }
        // The caller runs every part no worker has claimed yet.
        while let Some(part) = sh.claim() {
            f(part);
            sh.finished.fetch_add(1, Ordering::SeqCst);
        }
        // SeqCst on both sides of each sleep handshake (flag store, then counter
        // load; counter update, then flag load), so one side always sees the other.
        let finished = || sh.finished.load(Ordering::SeqCst) == self.threads;
        if !spin_until(sh.spin, finished) {
            let mut g = lock(&sh.sleep);
            sh.caller_sleeping.store(true, Ordering::SeqCst);
            while !finished() {
                g = sh.done.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            sh.caller_sleeping.store(false, Ordering::SeqCst);
        }
        *lock(&sh.job) = None;
    }

    /// Runs `f` over `0..n` cut into one contiguous range per part, or
    /// inline over all of it when `n < min` (too little work to pay for
    /// a hand-off). For row-wise work whose result does not depend on who
    /// computes a row.
    pub fn rows(&self, n: usize, min: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        if self.threads == 1 || n < min.max(2) {
            f(0..n);
            return;
        }
        self.run(&|part| {
            let r = split(n, part, self.threads);
            if !r.is_empty() {
                f(r);
            }
        });
    }
}

impl Shared {
    /// Claims the next unrun part of the current job, if any is left.
    fn claim(&self) -> Option<usize> {
        let part = self.next_part.fetch_add(1, Ordering::SeqCst);
        (part < self.parts).then_some(part)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn worker(sh: &Shared) {
    let mut seen = 0u64;
    loop {
        let fresh = || sh.generation.load(Ordering::SeqCst) != seen || sh.shutdown.load(Ordering::SeqCst);
        if !spin_until(sh.spin, fresh) {
            let mut g = lock(&sh.sleep);
            sh.sleepers.fetch_add(1, Ordering::SeqCst);
            while !fresh() {
                g = sh.wake.wait(g).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            sh.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        seen = sh.generation.load(Ordering::Acquire);
        // A part claimed here belongs to the job in `sh.job` (stored before
        // the counter opened, cleared only once every part has finished).
        while let Some(part) = sh.claim() {
            let job = *lock(&sh.job);
            if let Some(job) = job {
                job(part);
            }
            if sh.finished.fetch_add(1, Ordering::SeqCst) + 1 == sh.parts && sh.caller_sleeping.load(Ordering::SeqCst) {
                let _g = lock(&sh.sleep);
                sh.done.notify_one();
            }
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _g = lock(&self.shared.sleep);
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The `part`-th of `parts` contiguous slices of `0..n`.
pub fn split(n: usize, part: usize, parts: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(parts.max(1));
    (part * per).min(n)..((part + 1) * per).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_part_runs_once_per_job() {
        let pool = ComputePool::new(3);
        let hits = AtomicUsize::new(0);
        for _ in 0..100 {
            pool.run(&|part| {
                hits.fetch_add(1 << (part * 8), Ordering::Relaxed);
            });
        }
        assert_eq!(hits.load(Ordering::Relaxed), 100 + (100 << 8) + (100 << 16));
    }

    #[test]
    fn split_covers_range() {
        let parts: Vec<_> = (0..3).map(|p| split(10, p, 3)).collect();
        assert_eq!(parts, vec![0..4, 4..8, 8..10]);
        assert_eq!(split(2, 2, 3), 2..2);
    }
}
