//! Who is in the cluster. One trait, so `potluck up`'s in-memory membership
//! and the etcd membership of a real cluster drive the same planner.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// What a worker told us about itself when it joined.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkerInfo {
    /// Stable id chosen by the worker.
    pub id: String,
    /// gRPC URL other nodes use to reach it.
    pub address: String,
    /// `cpu`, `cuda:N`, `metal`.
    pub device: String,
    /// Compute threads.
    pub threads: u32,
    /// Memory it can give to weights and KV cache.
    pub free_memory_bytes: u64,
    /// Its version string.
    pub version: String,
    /// Order of joining, so plans are stable.
    pub joined: u64,
}

/// Membership as the coordinator needs it.
pub trait Membership: Send + Sync {
    /// Adds or refreshes a worker.
    fn join(&self, worker: WorkerInfo);
    /// Removes a worker; returns whether it was present.
    fn leave(&self, id: &str) -> bool;
    /// Current workers in join order.
    fn workers(&self) -> Vec<WorkerInfo>;
    /// A receiver that changes whenever the membership does.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// Membership held in this process: the embedded default.
#[derive(Debug)]
pub struct InMemoryMembership {
    workers: Mutex<BTreeMap<String, WorkerInfo>>,
    version: watch::Sender<u64>,
}

impl Default for InMemoryMembership {
    fn default() -> Self {
        Self { workers: Mutex::new(BTreeMap::new()), version: watch::channel(0).0 }
    }
}

impl InMemoryMembership {
    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WorkerInfo>> {
        self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Membership for InMemoryMembership {
    fn join(&self, mut worker: WorkerInfo) {
        {
            let mut w = self.lock();
            worker.joined = w.get(&worker.id).map_or(w.len() as u64 + *self.version.borrow(), |old| old.joined);
            w.insert(worker.id.clone(), worker);
        }
        self.bump();
    }

    fn leave(&self, id: &str) -> bool {
        let removed = self.lock().remove(id).is_some();
        if removed {
            self.bump();
        }
        removed
    }

    fn workers(&self) -> Vec<WorkerInfo> {
        let mut v: Vec<WorkerInfo> = self.lock().values().cloned().collect();
        v.sort_by(|a, b| a.joined.cmp(&b.joined).then_with(|| a.id.cmp(&b.id)));
        v
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            address: format!("http://{id}"),
            device: "cpu".into(),
            threads: 1,
            free_memory_bytes: 1 << 30,
            version: "0".into(),
            joined: 0,
        }
    }

    #[test]
    fn join_order_is_kept_and_changes_are_signalled() {
        let m = InMemoryMembership::default();
        let rx = m.changes();
        m.join(w("b"));
        m.join(w("a"));
        m.join(w("b"));
        assert_eq!(m.workers().iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert!(m.leave("b"));
        assert!(!m.leave("b"));
        assert_eq!(*rx.borrow(), 4);
    }
}
