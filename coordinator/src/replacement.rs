//! Replacement: after a stage dies, a spare takes over the dead stage's layer
//! range and every surviving stage keeps its own.
//!
//! A fresh plan could move every boundary (the planner balances measured
//! speeds, and a spare differs from the worker it replaces), and a stage whose
//! range moves must load another shard. Keeping the ranges means the
//! survivors only start a new epoch on the layers they hold, and the spare
//! loads one shard (or takes it from what it holds warm): the failover costs
//! the re-prefill and little else.

use crate::membership::WorkerInfo;
use crate::planner::{ModelCost, StagePlan};

/// Bytes a stage of `layers` layers needs, with the embedding when it is the
/// first stage, the head when it is the last, and the KV budget.
pub fn stage_bytes(cost: ModelCost, stage: &StagePlan, first: bool, last: bool) -> u64 {
    let layers = stage.end.saturating_sub(stage.start) as u64;
    layers.saturating_mul(cost.layer_bytes)
        + if first { cost.embed_bytes } else { 0 }
        + if last { cost.head_bytes } else { 0 }
        + cost.kv_budget_bytes
}

/// The plan in force with each stage whose worker is gone (absent from
/// `workers`, or back as a new instance that no longer holds its shard)
/// handed to an unused worker of `workers`, ranges unchanged (the plan as
/// it is when none is gone: a failure with every stage alive only needs a
/// new epoch). `workers` comes in order of preference. `None` when there
/// is no plan, or a gone stage finds no worker with the memory for it: the
/// planner decides then.
pub fn swap_in(
    cost: ModelCost,
    current: &[StagePlan],
    instances: &[String],
    workers: &[WorkerInfo],
) -> Option<(Vec<StagePlan>, Vec<String>)> {
    let alive = |i: usize, s: &StagePlan| {
        workers.iter().find(|w| w.id == s.worker && Some(&w.instance) == instances.get(i) && w.address == s.address)
    };
    let mut used: Vec<&str> =
        current.iter().enumerate().filter(|(i, s)| alive(*i, s).is_some()).map(|(_, s)| s.worker.as_str()).collect();
    if current.is_empty() {
        return None;
    }
    let last = current.len().saturating_sub(1);
    let mut stages = Vec::with_capacity(current.len());
    let mut kept = Vec::with_capacity(current.len());
    for (i, s) in current.iter().enumerate() {
        if let Some(w) = alive(i, s) {
            stages.push(s.clone());
            kept.push(w.instance.clone());
            continue;
        }
        let need = stage_bytes(cost, s, i == 0, i == last);
        let spare = workers.iter().find(|w| !used.contains(&w.id.as_str()) && w.stage_memory_bytes() >= need)?;
        used.push(&spare.id);
        stages.push(StagePlan { worker: spare.id.clone(), address: spare.address.clone(), ..s.clone() });
        kept.push(spare.instance.clone());
    }
    Some((stages, kept))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::test_worker;

    fn cost() -> ModelCost {
        crate::planner::test_cost(1000, 1000, 0)
    }

    fn worker(id: &str, memory: u64) -> WorkerInfo {
        WorkerInfo { free_memory_bytes: memory, instance: format!("{id}-1"), ..test_worker(id) }
    }

    fn plan(ids: &[&str]) -> (Vec<StagePlan>, Vec<String>) {
        let bounds = [0, 10, 20, 30];
        let stages = ids
            .iter()
            .enumerate()
            .map(|(i, id)| StagePlan {
                worker: (*id).into(),
                address: format!("http://{id}"),
                start: bounds[i],
                end: bounds[i + 1],
            })
            .collect();
        (stages, ids.iter().map(|id| format!("{id}-1")).collect())
    }

    #[test]
    fn a_spare_takes_the_dead_stage_and_survivors_keep_their_ranges() {
        let big = 1 << 20;
        let (current, instances) = plan(&["a", "b", "c"]);
        // What happens, the workers alive with their memory, the stages' workers wanted.
        type Case<'a> = (&'a str, &'a [(&'a str, u64)], Option<&'a [&'a str]>);
        let cases: &[Case] = &[
            ("all alive: the plan as it is", &[("a", big), ("b", big), ("c", big), ("s", big)], Some(&["a", "b", "c"])),
            ("middle dies", &[("a", big), ("c", big), ("s", big)], Some(&["a", "s", "c"])),
            ("first dies", &[("b", big), ("c", big), ("s", big)], Some(&["s", "b", "c"])),
            ("two die, two spares in order", &[("b", big), ("s", big), ("t", big)], Some(&["s", "b", "t"])),
            ("no spare: the planner decides", &[("a", big), ("c", big)], None),
            ("the spare is too small for the head", &[("a", big), ("b", big), ("s", 1500)], None),
            (
                "the small spare is passed over",
                &[("a", big), ("b", big), ("s", 1500), ("t", big)],
                Some(&["a", "b", "t"]),
            ),
        ];
        for (what, alive, want) in cases {
            let workers: Vec<WorkerInfo> = alive.iter().map(|(id, m)| worker(id, *m)).collect();
            let got = swap_in(cost(), &current, &instances, &workers);
            let ids = got.as_ref().map(|(s, _)| s.iter().map(|s| s.worker.as_str()).collect::<Vec<_>>());
            assert_eq!(ids.as_deref(), *want, "{what}");
            if let Some((stages, kept)) = got {
                let ranges: Vec<_> = stages.iter().map(|s| (s.start, s.end)).collect();
                assert_eq!(ranges, [(0, 10), (10, 20), (20, 30)], "{what}: ranges move");
                let want_instances: Vec<String> = stages.iter().map(|s| format!("{}-1", s.worker)).collect();
                assert_eq!(kept, want_instances, "{what}");
                assert!(stages.iter().all(|s| s.address == format!("http://{}", s.worker)), "{what}");
            }
        }
    }

    #[test]
    fn a_restarted_worker_counts_as_gone() {
        let big = 1 << 20;
        let (current, instances) = plan(&["a", "b", "c"]);
        let mut restarted = worker("b", big);
        restarted.instance = "b-2".into();
        let workers = vec![worker("a", big), restarted, worker("c", big)];
        let (stages, kept) = swap_in(cost(), &current, &instances, &workers).expect("b is a new member");
        let ids: Vec<_> = stages.iter().map(|s| s.worker.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"], "the new instance of b may take its old range");
        assert_eq!(kept[1], "b-2");
        assert!(swap_in(cost(), &[], &[], &workers).is_none(), "no plan: the planner makes the first");
    }
}
