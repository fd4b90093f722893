//! A small fixed-size compute pool that sleeps when idle.
//!
//! Why not rayon: its workers spin before sleeping, and two engine processes
//! sharing a core then starve each other. Here a job is split into as many
//! parts as there are threads, the caller runs part 0 itself, and the other
//! threads block on a condition variable between jobs. Work is split by
//! output element, never along a reduction, so results do not depend on the
//! thread count.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A job as the workers see it: a borrowed closure whose lifetime `run` guarantees.
type Job = &'static (dyn Fn(usize) + Sync);

struct State {
    job: Option<Job>,
    generation: u64,
    pending: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
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

impl ComputePool {
    /// Starts a pool; `threads` of 0 means one per available core.
    pub fn new(threads: usize) -> Self {
        let threads =
            if threads == 0 { std::thread::available_parallelism().map_or(1, std::num::NonZero::get) } else { threads };
        let shared = Arc::new(Shared {
            state: Mutex::new(State { job: None, generation: 0, pending: 0, shutdown: false }),
            wake: Condvar::new(),
            done: Condvar::new(),
        });
        let handles = (1..threads)
            .map(|part| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("potluck-compute-{part}"))
                    .spawn(move || worker(&shared, part))
                    .ok()
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
        // SAFETY: the reference is only used by workers between here and the
        // wait below, which does not return until every part has finished
        // (`pending == 0`), so `f` outlives every use.
        let job: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
        {
            let mut st = lock(&self.shared.state);
            st.job = Some(job);
            st.generation += 1;
            st.pending = self.threads - 1;
        }
        self.shared.wake.notify_all();
        f(0);
        let mut st = lock(&self.shared.state);
        while st.pending > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        st.job = None;
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn worker(shared: &Shared, part: usize) {
    let mut seen = 0u64;
    loop {
        let job = {
            let mut st = lock(&shared.state);
            while st.generation == seen && !st.shutdown {
                st = shared.wake.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job
        };
        if let Some(job) = job {
            job(part);
        }
        let mut st = lock(&shared.state);
        st.pending -= 1;
        if st.pending == 0 {
            shared.done.notify_one();
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_all();
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
