//! Spares: workers the plan does not use hold some of the plan's shards
//! loaded, so that one of them replaces a dead stage without a transfer or a
//! reload.
//!
//! Which shards a spare holds: the plan's stages, largest first (a larger
//! range costs more to load, and its loss the longest stall), as many as its
//! memory holds beside one KV budget. With several spares, spare `k` starts
//! `k` places further down that order and goes round, so two spares cover
//! the two largest stages before either holds a second one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use potluck_proto::v1 as pb;

use crate::membership::WorkerInfo;
use crate::planner::{ModelCost, StagePlan};
use crate::replacement::stage_bytes;
use crate::stage_rpc::StageRpc;

/// The stages (indexes into `stages`) each spare should hold warm, by spare id.
pub fn warm_choice(cost: ModelCost, stages: &[StagePlan], spares: &[WorkerInfo]) -> HashMap<String, Vec<usize>> {
    let last = stages.len().saturating_sub(1);
    let weight = |i: usize| stage_bytes(ModelCost { kv_budget_bytes: 0, ..cost }, &stages[i], i == 0, i == last);
    let mut order: Vec<usize> = (0..stages.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(weight(i)), i));
    let mut choice = HashMap::new();
    for (k, spare) in spares.iter().enumerate() {
        let mut room = spare.stage_memory_bytes().saturating_sub(cost.kv_budget_bytes);
        let mut held = Vec::new();
        for j in 0..order.len() {
            let i = order[(k + j) % order.len()];
            if weight(i) <= room {
                room -= weight(i);
                held.push(i);
            }
        }
        choice.insert(spare.id.clone(), held);
    }
    choice
}

/// What was last asked of each spare, so an unchanged choice is not sent again.
#[derive(Debug, Default)]
pub struct WarmLedger {
    asked: HashMap<String, (String, Vec<String>)>,
}

impl WarmLedger {
    /// Records `digests` for the spare `worker`; returns whether that differs from what it was last asked.
    pub fn changed(&mut self, worker: &WorkerInfo, digests: &[String]) -> bool {
        let entry = (worker.instance.clone(), digests.to_vec());
        if self.asked.get(&worker.id) == Some(&entry) {
            return false;
        }
        self.asked.insert(worker.id.clone(), entry);
        true
    }

    /// Forgets a worker (it serves now, or asking it failed), so it is asked again when it is a spare.
    pub fn forget(&mut self, worker: &str) {
        self.asked.remove(worker);
    }
}

/// The `Warm` request holding `shards` (layer range and digest each).
pub fn warm_request(shards: &[(StagePlan, String)], shard_source: &str) -> pb::WarmRequest {
    pb::WarmRequest {
        shards: shards
            .iter()
            .map(|(s, digest)| pb::WarmShard {
                layer_start: u32::try_from(s.start).unwrap_or(u32::MAX),
                layer_end: u32::try_from(s.end).unwrap_or(u32::MAX),
                shard_digest: digest.clone(),
            })
            .collect(),
        shard_source: shard_source.to_string(),
    }
}

/// How long a spare may take to fetch and load what it is asked to hold.
pub const WARM_TIMEOUT: Duration = Duration::from_secs(300);

/// Sends `request` to `spare`; a failure is logged and forgotten in
/// `ledger`, so the next planning pass asks again.
pub async fn ask_to_warm(
    rpc: Arc<StageRpc>,
    spare: WorkerInfo,
    request: pb::WarmRequest,
    ledger: Arc<Mutex<WarmLedger>>,
) {
    let outcome = rpc.call(&spare.address, "Warm", WARM_TIMEOUT, |mut c| async move { c.warm(request).await }).await;
    match outcome {
        Ok(reply) => tracing::info!(spare = %spare.id, held = reply.held, "spare holds shards warm"),
        Err(e) => {
            tracing::warn!(spare = %spare.id, error = %e, "a spare could not warm its shards");
            ledger.lock().unwrap_or_else(std::sync::PoisonError::into_inner).forget(&spare.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::test_worker;

    fn cost() -> ModelCost {
        crate::planner::test_cost(50, 500, 1000)
    }

    fn stages() -> Vec<StagePlan> {
        // Bytes: 12 layers + embedding = 1250, 10 layers = 1000, 8 layers + head = 1300.
        [(0, 12), (12, 22), (22, 30)]
            .iter()
            .map(|&(start, end)| StagePlan { worker: format!("w{start}"), address: String::new(), start, end })
            .collect()
    }

    fn spare(id: &str, memory: u64) -> WorkerInfo {
        WorkerInfo { free_memory_bytes: memory, ..test_worker(id) }
    }

    #[test]
    fn spares_hold_the_largest_stages_first_and_go_round() {
        // What happens, the spares with their memory, the stages each should hold.
        type Case<'a> = (&'a str, &'a [(&'a str, u64)], &'a [(&'a str, &'a [usize])]);
        let cases: &[Case] = &[
            ("room for all", &[("s", 10_000)], &[("s", &[2, 0, 1])]),
            ("room for the largest only", &[("s", 2400)], &[("s", &[2])]),
            ("room for the largest and the smallest", &[("s", 3400)], &[("s", &[2, 1])]),
            ("no room beside the KV budget", &[("s", 1200)], &[("s", &[])]),
            ("two spares cover two stages first", &[("s", 2400), ("t", 2400)], &[("s", &[2]), ("t", &[0])]),
            (
                "three spares, one stage each",
                &[("s", 2400), ("t", 2400), ("u", 2400)],
                &[("s", &[2]), ("t", &[0]), ("u", &[1])],
            ),
        ];
        for (what, spares, want) in cases {
            let spares: Vec<WorkerInfo> = spares.iter().map(|(id, m)| spare(id, *m)).collect();
            let got = warm_choice(cost(), &stages(), &spares);
            for (id, held) in *want {
                assert_eq!(got.get(*id).map(Vec::as_slice), Some(*held), "{what}: {id}");
            }
        }
    }

    #[test]
    fn the_ledger_asks_again_only_on_a_change() {
        let mut ledger = WarmLedger::default();
        let s = spare("s", 1);
        let d = vec!["ab".to_string()];
        assert!(ledger.changed(&s, &d));
        assert!(!ledger.changed(&s, &d));
        let restarted = WorkerInfo { instance: "again".into(), ..s.clone() };
        assert!(ledger.changed(&restarted, &d), "a new instance holds nothing");
        ledger.forget("s");
        assert!(ledger.changed(&restarted, &d));
    }
}
