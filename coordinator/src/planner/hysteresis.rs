//! Hysteresis: a plan in force stays unless a new one predicts a real gain.
//! Loading new ranges quiesces serving and may ship shards, so a join that
//! would speed decode up by a few percent is not worth the pause, and two
//! plans of near-equal merit must not flip back and forth as figures jitter.

use super::{predict, ModelCost, Pipeline, PlanOptions, StagePlan, WorkerProfile};
use crate::membership::WorkerInfo;

/// Whether a plan predicting `proposed` tokens per second should replace
/// one predicting `current`: only for a gain above `min_gain` (a fraction).
/// A plan in force that cannot serve (zero, or no prediction) is always replaced.
pub fn worth_replanning(current: f64, proposed: f64, min_gain: f64) -> bool {
    if !(current.is_finite() && current > 0.0) {
        return true;
    }
    proposed.is_finite() && proposed > current * (1.0 + min_gain.max(0.0))
}

/// Whether the plan in force (`stages`, loaded on the worker processes
/// `instances`) should stay rather than give way to `proposed`: every one of
/// its members is still here, in the same process, and `proposed` does not
/// gain more than `min_gain` at saturation over it under today's figures.
pub fn keep_plan_in_force(
    cost: &ModelCost,
    stages: &[StagePlan],
    instances: &[String],
    workers: &[WorkerInfo],
    proposed: &Pipeline,
    options: &PlanOptions,
    min_gain: f64,
) -> bool {
    let alive = stages.len() == instances.len()
        && stages
            .iter()
            .zip(instances)
            .all(|(s, inst)| workers.iter().any(|w| w.id == s.worker && &w.instance == inst));
    if !alive || stages.is_empty() {
        return false;
    }
    let profiles: Vec<WorkerProfile> = workers.iter().map(WorkerProfile::from).collect();
    let Some(current) = predict(cost, stages, &profiles, options) else { return false };
    let rate = |p: &Pipeline| p.tokens_per_sec_saturated(options.batch);
    !worth_replanning(rate(&current), rate(proposed), min_gain)
}

#[cfg(test)]
mod tests {
    use super::worth_replanning;

    #[test]
    fn replans_only_past_the_threshold() {
        type Case = (&'static str, f64, f64, f64, bool);
        let cases: [Case; 8] = [
            ("a 5% gain stays", 100.0, 105.0, 0.10, false),
            ("exactly 10% stays", 100.0, 110.0, 0.10, false),
            ("a 10.5% gain replans", 100.0, 110.5, 0.10, true),
            ("a loss stays", 100.0, 80.0, 0.10, false),
            ("a zero threshold replans on any gain", 100.0, 100.1, 0.0, true),
            ("a plan in force that cannot serve is replaced", 0.0, 1.0, 0.10, true),
            ("no prediction for the plan in force: replaced", f64::NAN, 1.0, 0.10, true),
            ("a nonsense proposal never replaces a working plan", 100.0, f64::INFINITY, 0.10, false),
        ];
        for (name, current, proposed, gain, want) in cases {
            assert_eq!(worth_replanning(current, proposed, gain), want, "{name}");
        }
    }
}
