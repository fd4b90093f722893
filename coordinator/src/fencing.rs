//! Fencing: workers the coordinator found dead are kept out of every plan
//! until they come back as a new member.
//!
//! A member is a worker id *and* the process behind it (`instance`) *and*
//! its registration (`joined`: the etcd key's create revision, or the join
//! order in memory). A worker that was stopped and continues is the same
//! member and stays out; one that restarts, or registers again (after its
//! lease ran out, or on its own when it notices it was frozen), is a new
//! member and may be planned again. Its old epoch is
//! refused by every stage meanwhile, so a stale process can do no harm.

use std::sync::Arc;
use std::time::Duration;

use potluck_proto::v1 as pb;

use crate::membership::WorkerInfo;
use crate::planner::StagePlan;
use crate::stage_rpc::StageRpc;

/// How long a stage may take to answer `Info` before it counts as dead.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One registration of one worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    id: String,
    instance: String,
    joined: u64,
}

impl Member {
    fn of(w: &WorkerInfo) -> Self {
        Self { id: w.id.clone(), instance: w.instance.clone(), joined: w.joined }
    }
}

/// The members found dead.
#[derive(Debug, Default)]
pub struct Fence {
    fenced: Vec<Member>,
}

impl Fence {
    /// Keeps `worker`, as registered now, out of plans.
    pub fn fence(&mut self, worker: &WorkerInfo) {
        let m = Member::of(worker);
        if !self.fenced.contains(&m) {
            self.fenced.push(m);
        }
    }

    /// The workers that may be planned: all but fenced members. Fences of
    /// members no longer registered are forgotten (they can only come back as new ones).
    pub fn admit(&mut self, workers: Vec<WorkerInfo>) -> Vec<WorkerInfo> {
        self.fenced.retain(|f| workers.iter().any(|w| Member::of(w) == *f));
        workers.into_iter().filter(|w| !self.fenced.contains(&Member::of(w))).collect()
    }

    /// How many members are fenced.
    pub fn len(&self) -> usize {
        self.fenced.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.fenced.is_empty()
    }
}

/// The stages of a plan that do not answer `Info` within `timeout`: killed
/// (connection refused), stopped (SIGSTOP: the kernel accepts, nobody
/// answers) or cut off.
pub async fn dead_stages(rpc: &Arc<StageRpc>, stages: &[StagePlan], timeout: Duration) -> Vec<StagePlan> {
    let probes: Vec<_> = stages
        .iter()
        .map(|s| {
            let (rpc, address) = (Arc::clone(rpc), s.address.clone());
            tokio::spawn(async move { answers(&rpc, &address, timeout).await })
        })
        .collect();
    let mut dead = Vec::new();
    for (stage, probe) in stages.iter().zip(probes) {
        if !probe.await.unwrap_or(false) {
            dead.push(stage.clone());
        }
    }
    dead
}

/// Whether the stage at `address` answers `Info` within `timeout` (a
/// killed worker's connection is refused at once; a stopped one runs into the deadline).
async fn answers(rpc: &StageRpc, address: &str, timeout: Duration) -> bool {
    rpc.call(address, "Info", timeout, |mut c| async move { c.info(pb::InfoRequest {}).await }).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str, instance: &str, joined: u64) -> WorkerInfo {
        WorkerInfo { instance: instance.into(), joined, ..crate::membership::test_worker(id) }
    }

    fn ids(ws: &[WorkerInfo]) -> Vec<&str> {
        ws.iter().map(|w| w.id.as_str()).collect()
    }

    #[test]
    fn a_fenced_member_stays_out_until_it_comes_back_as_a_new_one() {
        let mut fence = Fence::default();
        fence.fence(&w("a", "p1", 1));
        let cases = [
            (vec![w("a", "p1", 1), w("b", "p2", 2)], vec!["b"], "the same process, same registration"),
            (vec![w("a", "p1", 7), w("b", "p2", 2)], vec!["a", "b"], "registered again after its lease"),
        ];
        for (workers, want, why) in cases {
            let mut f = Fence::default();
            f.fence(&w("a", "p1", 1));
            assert_eq!(ids(&f.admit(workers)), want, "{why}");
        }
        assert_eq!(ids(&fence.admit(vec![w("a", "p9", 1)])), ["a"], "a restarted process");
        assert!(fence.is_empty(), "the fence of a member gone from the membership is forgotten");
    }

    #[tokio::test]
    async fn a_stage_nobody_listens_on_is_dead() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let stage = StagePlan { worker: "gone".into(), address, start: 0, end: 1 };
        // A stopped process: the kernel completes the handshake, nothing ever answers.
        let stopped = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let frozen = StagePlan {
            worker: "stopped".into(),
            address: format!("http://{}", stopped.local_addr().expect("addr")),
            start: 1,
            end: 2,
        };
        let stages = [stage, frozen];
        let dead = dead_stages(&Arc::new(StageRpc::default()), &stages, Duration::from_millis(500)).await;
        assert_eq!(dead, stages);
    }
}
