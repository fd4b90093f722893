//! Hidden-state byte counters, so `Info` can show that activations travel
//! stage to stage and never through the coordinator.

use std::sync::atomic::{AtomicU64, Ordering};

/// Payload bytes of hidden states this stage moved since start.
#[derive(Debug, Default)]
pub(crate) struct HiddenTraffic {
    sent: AtomicU64,
    received: AtomicU64,
}

impl HiddenTraffic {
    /// Counts `bytes` sent to the next stage.
    pub fn sent(&self, bytes: usize) {
        self.sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `bytes` received from the previous stage.
    pub fn received(&self, bytes: usize) {
        self.received.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// (sent, received) so far.
    pub fn totals(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.received.load(Ordering::Relaxed))
    }
}
