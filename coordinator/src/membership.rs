//! Who is in the cluster. One trait, so `potluck up`'s in-memory membership
//! and the etcd membership of a real cluster drive the same planner.

use std::collections::BTreeMap;
use std::sync::Mutex;

use potluck_etcd::DeviceInfo;
use tokio::sync::watch;

/// What a worker told us about itself when it joined (the JSON a worker
/// writes under `/potluck/<cluster>/workers/<id>` has these fields).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WorkerInfo {
    /// Stable id chosen by the worker.
    pub id: String,
    /// gRPC URL other nodes use to reach it.
    pub address: String,
    /// `cpu`, `cuda:N`, `metal`.
    pub device: String,
    /// Compute threads.
    pub threads: u32,
    /// Host memory it can give to weights and KV cache.
    pub free_memory_bytes: u64,
    /// Its device and the device's memory (a CPU when an older worker did not say).
    #[serde(default)]
    pub device_info: DeviceInfo,
    /// Its version string.
    pub version: String,
    /// Order of joining, so plans are stable (etcd: the key's create revision).
    #[serde(default)]
    pub joined: u64,
    /// Microseconds one decode step spends in one layer of this model, from the
    /// worker's start-up probe (`None` until it has probed).
    #[serde(default)]
    pub layer_micros: Option<f64>,
    /// Changes each time the worker process starts, so a restarted worker (whose
    /// shard is gone) is told apart from one that only re-registered.
    #[serde(default)]
    pub instance: String,
}

impl WorkerInfo {
    /// Bytes a stage on this worker may fill with weights and KV cache: a
    /// GPU's free device memory (host RAM does not hold a GPU stage's
    /// tensors), else the host's free memory.
    pub fn stage_memory_bytes(&self) -> u64 {
        if self.device_info.kind.is_gpu() {
            self.device_info.free_bytes
        } else {
            self.free_memory_bytes
        }
    }
}

/// Why a membership change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// With etcd, workers register themselves under a lease; the `Join` RPC is not used.
    #[error("this cluster's membership lives in etcd: start the worker with --etcd and --cluster")]
    ManagedByEtcd,
}

/// Membership as the coordinator needs it.
pub trait Membership: Send + Sync {
    /// Adds or refreshes a worker (the `Join` RPC).
    fn join(&self, worker: WorkerInfo) -> Result<(), MembershipError>;
    /// Removes a worker; returns whether it was present.
    fn leave(&self, id: &str) -> Result<bool, MembershipError>;
    /// Current workers in join order.
    fn workers(&self) -> Vec<WorkerInfo>;
    /// A receiver that changes whenever the membership does.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// `workers` ordered for planning: those of the plan in force first, in its
/// order (so a re-registration never reshuffles stages), then newcomers in
/// join order.
pub fn plan_order(mut workers: Vec<WorkerInfo>, current: &[String]) -> Vec<WorkerInfo> {
    let rank = |w: &WorkerInfo| current.iter().position(|id| id == &w.id).unwrap_or(usize::MAX);
    workers.sort_by(|a, b| rank(a).cmp(&rank(b)).then(a.joined.cmp(&b.joined)).then_with(|| a.id.cmp(&b.id)));
    workers
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
    fn join(&self, mut worker: WorkerInfo) -> Result<(), MembershipError> {
        {
            let mut w = self.lock();
            worker.joined = w.get(&worker.id).map_or(w.len() as u64 + *self.version.borrow(), |old| old.joined);
            // A worker joins once per process start, so every join is a new instance
            // (its shard is gone): the planner must load it again even at the same address.
            if worker.instance.is_empty() {
                worker.instance = format!("join-{}", *self.version.borrow() + 1);
            }
            w.insert(worker.id.clone(), worker);
        }
        self.bump();
        Ok(())
    }

    fn leave(&self, id: &str) -> Result<bool, MembershipError> {
        let removed = self.lock().remove(id).is_some();
        if removed {
            self.bump();
        }
        Ok(removed)
    }

    fn workers(&self) -> Vec<WorkerInfo> {
        in_join_order(self.lock().values())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// `workers` sorted by when they joined (ties by id), so plans are stable.
pub(crate) fn in_join_order<'a>(workers: impl Iterator<Item = &'a WorkerInfo>) -> Vec<WorkerInfo> {
    let mut v: Vec<WorkerInfo> = workers.cloned().collect();
    v.sort_by(|a, b| a.joined.cmp(&b.joined).then_with(|| a.id.cmp(&b.id)));
    v
}

/// A worker record for tests: one thread, 1 GiB, at `http://<id>`.
#[cfg(test)]
pub(crate) fn test_worker(id: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.into(),
        address: format!("http://{id}"),
        device: "cpu".into(),
        threads: 1,
        free_memory_bytes: 1 << 30,
        device_info: DeviceInfo::default(),
        version: "0".into(),
        joined: 0,
        layer_micros: None,
        instance: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str) -> WorkerInfo {
        test_worker(id)
    }

    #[test]
    fn join_order_is_kept_and_changes_are_signalled() {
        let m = InMemoryMembership::default();
        let rx = m.changes();
        for id in ["b", "a", "b"] {
            m.join(w(id)).expect("in-memory join");
        }
        assert_eq!(m.workers().iter().map(|w| w.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        let instances: Vec<String> = m.workers().into_iter().map(|w| w.instance).collect();
        assert_eq!(instances, ["join-3", "join-2"], "a re-join is a new instance");
        assert_eq!(m.leave("b"), Ok(true));
        assert_eq!(m.leave("b"), Ok(false));
        assert_eq!(*rx.borrow(), 4);
    }

    #[test]
    fn plan_order_keeps_planned_workers_first() {
        let mut ws: Vec<WorkerInfo> = ["a", "b", "c"].into_iter().map(w).collect();
        ws[0].joined = 3;
        ws[1].joined = 1;
        ws[2].joined = 2;
        let ids = |v: Vec<WorkerInfo>| v.into_iter().map(|w| w.id).collect::<Vec<_>>();
        assert_eq!(ids(plan_order(ws.clone(), &[])), ["b", "c", "a"]);
        assert_eq!(ids(plan_order(ws, &["a".into(), "c".into()])), ["a", "c", "b"]);
    }
}
