//! Freezes: a worker that was stopped (SIGSTOP), paused by its hypervisor or
//! starved of CPU for longer than [`FROZEN_AFTER`] has missed its micro-batch
//! deadlines, so the coordinator has treated it as dead, fenced it and moved
//! its layers elsewhere. Nothing tells a fenced worker so; it finds out from
//! its own clock, which jumps across the freeze, and joins again as a new
//! member instead of waiting for a restart.
//!
//! The threshold sits at the coordinator's default deadline floor: a shorter
//! freeze is usually survived in place, and a false alarm costs only a
//! re-join (the coordinator re-plans if the worker was serving).

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// A gap this long between two ticks of the watch counts as a freeze.
pub const FROZEN_AFTER: Duration = Duration::from_secs(2);

/// How often the watch ticks.
pub const TICK: Duration = Duration::from_millis(250);

/// Counts freezes until `stopping` turns true: the receiver sees the count
/// change after each one.
pub(crate) fn watch_freezes(stopping: watch::Receiver<bool>) -> watch::Receiver<u64> {
    watch_every(stopping, TICK, FROZEN_AFTER)
}

/// [`watch_freezes`] with its tick and threshold given.
fn watch_every(mut stopping: watch::Receiver<bool>, tick: Duration, frozen_after: Duration) -> watch::Receiver<u64> {
    let (tx, rx) = watch::channel(0);
    tokio::spawn(async move {
        let mut last = Instant::now();
        loop {
            tokio::select! {
                () = tokio::time::sleep(tick) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
            let now = Instant::now();
            let gap = now.duration_since(last);
            last = now;
            if gap > frozen_after {
                tracing::warn!(gap = ?gap, "this worker was frozen; joining again as a new member");
                tx.send_modify(|n| *n += 1);
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stalled_runtime_counts_as_a_freeze_and_ticks_do_not() {
        let (_stop, stopping) = watch::channel(false);
        let mut freezes = watch_every(stopping, Duration::from_millis(20), Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(*freezes.borrow_and_update(), 0, "steady ticks are no freeze");
        // Blocking this single-threaded runtime stops the watch as SIGSTOP stops a process.
        std::thread::sleep(Duration::from_millis(1200));
        tokio::time::timeout(Duration::from_secs(5), freezes.changed()).await.expect("seen").expect("open");
        assert_eq!(*freezes.borrow(), 1);
    }

    #[tokio::test]
    async fn the_watch_ends_when_the_worker_stops() {
        let (stop, stopping) = watch::channel(false);
        let mut freezes = watch_freezes(stopping);
        stop.send_replace(true);
        assert!(freezes.changed().await.is_err(), "the sender is dropped with the task");
    }
}
