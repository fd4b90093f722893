//! Table tests of placement: the shapes a good plan must have on small pools.

use potluck_etcd::{DeviceInfo, DeviceKind};

use super::*;
use crate::membership::test_worker;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A model of `layers` 1 MiB layers whose head costs `head` layers of work; no KV budget, 1 KiB hidden rows.
fn model(layers: usize, head: u64) -> ModelCost {
    ModelCost {
        layers,
        layer_bytes: MIB,
        embed_bytes: MIB,
        head_bytes: MIB,
        layer_macs: 10,
        head_macs: head * 10,
        kv_budget_bytes: 0,
        hidden_bytes: 1024,
    }
}

fn profile(id: &str, memory: u64, layer_ms: f64) -> WorkerProfile {
    WorkerProfile {
        id: id.into(),
        address: format!("http://{id}"),
        memory_bytes: memory,
        memory_label: "host memory".into(),
        layer_time: Some(LayerTime::flat(layer_ms / 1e3)),
        threads: 1,
    }
}

fn one_pipeline() -> PlanOptions {
    PlanOptions { max_replicas: 1, ..PlanOptions::default() }
}

fn layers_of(p: &Pipeline) -> Vec<(&str, usize)> {
    p.stages.iter().map(|s| (s.worker.as_str(), s.end - s.start)).collect()
}

fn placed(cost: &ModelCost, workers: &[WorkerProfile], options: &PlanOptions) -> Placement {
    let got = place(cost, workers, options).unwrap_or_else(|e| panic!("plans: {e}"));
    check_invariants(cost, workers, &got);
    got
}

/// What every plan must satisfy: contiguous ranges over the whole model, and no stage over its memory.
fn check_invariants(cost: &ModelCost, workers: &[WorkerProfile], got: &Placement) {
    for p in &got.pipelines {
        assert_eq!(p.stages.first().map(|s| s.start), Some(0));
        assert_eq!(p.stages.last().map(|s| s.end), Some(cost.layers));
        for (i, s) in p.stages.iter().enumerate() {
            assert!(s.end > s.start, "empty stage {s:?}");
            if i > 0 {
                assert_eq!(p.stages[i - 1].end, s.start);
            }
            let w = workers.iter().find(|w| w.id == s.worker).expect("a known worker");
            let need = cost.stage_bytes(s.end - s.start, i == 0, i == p.stages.len() - 1);
            assert!(need <= w.memory_bytes, "{} over-committed: {need} > {}", w.id, w.memory_bytes);
        }
    }
}

#[test]
fn equal_workers_split_near_evenly_with_lighter_ends() {
    // 30 layers and a head worth 8: 38 units over three workers.
    type Case = (&'static str, usize, u64, usize, Vec<usize>);
    let cases: Vec<Case> = vec![
        ("three workers: first and last lighter", 30, 8, 3, vec![12, 13, 5]),
        ("four workers, no head cost: even", 32, 0, 4, vec![8, 8, 8, 8]),
        ("four workers: the head's stage lighter", 32, 4, 4, vec![9, 9, 9, 5]),
        ("two workers", 30, 8, 2, vec![19, 11]),
    ];
    for (name, layers, head, n, want) in cases {
        let workers: Vec<WorkerProfile> = (0..n).map(|i| profile(&format!("w{i}"), GIB, 1.0)).collect();
        let got = placed(&model(layers, head), &workers, &one_pipeline());
        let counts: Vec<usize> = got.best().stages.iter().map(|s| s.end - s.start).collect();
        assert_eq!(counts, want, "{name}");
        assert!(got.left_out.is_empty(), "{name}: {:?}", got.left_out);
    }
}

#[test]
fn a_ten_times_faster_worker_takes_layers_up_to_its_memory() {
    let cost = model(30, 8);
    type Case = (&'static str, u64, usize);
    // Room on the fast worker, at either end (embedding and head weigh the same here).
    let cases: Vec<Case> = vec![
        ("room for 20 layers", 21 * MIB, 20),
        ("room for 5 layers", 6 * MIB, 5),
        ("room for one layer", 2 * MIB, 1),
    ];
    for (name, room, want) in cases {
        let workers = [profile("slow", 8 * GIB, 10.0), profile("fast", room, 1.0)];
        let got = placed(&cost, &workers, &one_pipeline());
        let fast = got.best().stages.iter().find(|s| s.worker == "fast").map(|s| s.end - s.start);
        assert_eq!(fast, Some(want), "{name}: {:?}", layers_of(got.best()));
    }
    // With room for all, the slow worker takes the three layers that balance the head's stage.
    let workers = [profile("slow", 8 * GIB, 10.0), profile("fast", 8 * GIB, 1.0)];
    let got = placed(&cost, &workers, &one_pipeline());
    assert_eq!(layers_of(got.best()), vec![("slow", 3), ("fast", 27)]);
}

#[test]
fn a_worker_that_would_slow_the_pipeline_is_left_out_with_its_reason() {
    let cost = model(30, 0);
    // A worker 100 times slower: even one layer on it is slower than fifteen on the others.
    let workers = [profile("a", GIB, 1.0), profile("pi", GIB, 100.0), profile("b", GIB, 1.0)];
    let got = placed(&cost, &workers, &one_pipeline());
    assert_eq!(layers_of(got.best()), vec![("a", 15), ("b", 15)]);
    assert_eq!(got.left_out.len(), 1);
    let out = &got.left_out[0];
    assert_eq!((out.worker.as_str(), out.cause), ("pi", LeftOutCause::Slower));
    assert!(out.reason.contains("slowest stage would take 100.000 ms per micro-batch instead of 15.000 ms"), "{out:?}");

    // A fast worker behind a slow link: sending to it or from it costs more than its share of compute saves.
    let mut options = one_pipeline();
    for other in ["a", "b"] {
        options.links.insert("wifi", other, Link { rtt_secs: 0.05, bytes_per_sec: 1e6 });
    }
    let workers = [profile("a", GIB, 1.0), profile("wifi", GIB, 1.0), profile("b", GIB, 1.0)];
    let got = placed(&cost, &workers, &options);
    assert_eq!(layers_of(got.best()), vec![("a", 15), ("b", 15)]);
    assert_eq!(
        got.left_out.iter().map(|l| (l.worker.as_str(), l.cause)).collect::<Vec<_>>(),
        [("wifi", LeftOutCause::Slower)]
    );
}

#[test]
fn a_slow_link_changes_the_order_or_the_cut() {
    let cost = model(30, 0);
    // a↔b is slow: the pipeline goes round it through c.
    let mut options = one_pipeline();
    options.links = Links::new(Link { rtt_secs: 1e-4, bytes_per_sec: 1e9 });
    options.links.insert("a", "b", Link { rtt_secs: 0.02, bytes_per_sec: 1e7 });
    let workers = [profile("a", GIB, 1.0), profile("b", GIB, 1.0), profile("c", GIB, 1.0)];
    let got = placed(&cost, &workers, &options);
    let order: Vec<&str> = got.best().stages.iter().map(|s| s.worker.as_str()).collect();
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(order[1], "c", "a and b must not be neighbours: {order:?}");

    // Two workers over a link worth 6 ms a micro-batch: the sender takes 6 fewer layers' worth of compute.
    let mut options = one_pipeline();
    options.links.insert("a", "b", Link { rtt_secs: 0.006, bytes_per_sec: f64::INFINITY });
    let workers = [profile("a", GIB, 1.0), profile("b", GIB, 1.0)];
    let got = placed(&cost, &workers, &options);
    assert_eq!(layers_of(got.best()), vec![("a", 12), ("b", 18)]);
    let without = placed(&cost, &workers, &one_pipeline());
    assert_eq!(layers_of(without.best()), vec![("a", 15), ("b", 15)]);
}

#[test]
fn spare_capacity_becomes_a_second_replica() {
    let cost = model(30, 4);
    let mut options =
        PlanOptions { links: Links::new(Link { rtt_secs: 1e-3, bytes_per_sec: 1e9 }), ..PlanOptions::default() };
    // Each worker holds 20 of the 30 layers: two of them hold a copy.
    let workers: Vec<WorkerProfile> = (0..4).map(|i| profile(&format!("w{i}"), 21 * MIB, 1.0)).collect();
    let got = placed(&cost, &workers, &options);
    assert_eq!(got.pipelines.len(), 2, "{:?}", got.pipelines);
    assert!(got.pipelines.iter().all(|p| p.stages.len() == 2));
    assert!(got.left_out.is_empty());
    let one = placed(&cost, &workers, &PlanOptions { max_replicas: 1, ..options.clone() });
    assert_eq!(one.pipelines.len(), 1);
    assert!(got.tokens_per_sec_saturated() > one.tokens_per_sec_saturated() * 1.02, "{got:?} {one:?}");
    // A fifth worker too small for any copy of its own joins a replica or stays out, with a reason.
    options.max_replicas = 8;
    let mut five = workers.clone();
    five.push(profile("small", 2 * MIB, 1.0));
    let got = placed(&cost, &five, &options);
    assert_eq!(got.pipelines.len(), 2);
    let used: usize = got.pipelines.iter().map(|p| p.stages.len()).sum();
    assert_eq!(used + got.left_out.len(), 5);
}

#[test]
fn the_search_matches_the_exhaustive_optimum_on_small_pools() {
    // Seeded pools of 2..=5 workers of mixed speed, memory and links.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let cost = model(16, 3);
    for pool in 0..40 {
        let n = 2 + pool % 4;
        let ids: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
        let workers: Vec<WorkerProfile> =
            ids.iter().map(|id| profile(id, (2 + (next() * 14.0) as u64) * MIB, 0.5 + next() * 10.0)).collect();
        let mut options = one_pipeline();
        for a in 0..n {
            for b in a + 1..n {
                let link = Link { rtt_secs: next() * 0.004, bytes_per_sec: 1e6 + next() * 1e8 };
                options.links.insert(&ids[a], &ids[b], link);
            }
        }
        let Some(best) = exhaustive(&cost, &workers, &options) else {
            assert!(place(&cost, &workers, &options).is_err(), "pool {pool}: the search fits where nothing does");
            continue;
        };
        let got = placed(&cost, &workers, &options);
        let ratio = got.best().bottleneck_secs / best.bottleneck_secs;
        assert!(ratio <= 1.02, "pool {pool}: {ratio} ({:?} vs {:?})", layers_of(got.best()), layers_of(&best));
    }
}

#[test]
fn bad_figures_are_left_out_with_a_reason_or_refused() {
    let cost = model(10, 0);
    let mut negative = profile("negative", GIB, 1.0);
    negative.layer_time = Some(LayerTime::flat(-0.001));
    let mut nan_batch = profile("nan", GIB, 1.0);
    nan_batch.layer_time = Some(LayerTime { batch1_secs: 0.001, at_batch: Some((16, f64::NAN)) });
    let workers = [profile("ok", GIB, 1.0), profile("empty", 0, 1.0), negative.clone(), nan_batch];
    let got = placed(&cost, &workers, &one_pipeline());
    assert_eq!(layers_of(got.best()), vec![("ok", 10)]);
    let why: Vec<(&str, LeftOutCause)> = got.left_out.iter().map(|l| (l.worker.as_str(), l.cause)).collect();
    assert_eq!(
        why,
        [("empty", LeftOutCause::Invalid), ("negative", LeftOutCause::Invalid), ("nan", LeftOutCause::Invalid)]
    );
    assert!(got.left_out[0].reason.contains("no free memory"));
    assert!(got.left_out[1].reason.contains("not a positive number"));

    assert_eq!(place(&cost, &[], &one_pipeline()), Err(PlanError::NoWorkers));
    let err = place(&cost, &[negative], &one_pipeline()).expect_err("nothing usable");
    assert!(matches!(err, PlanError::NoUsableWorker { ref worker, .. } if worker == "negative"), "{err}");
    let err = place(&cost, &[profile("a", 5 * MIB, 1.0), profile("b", 5 * MIB, 1.0)], &one_pipeline());
    assert_eq!(err, Err(PlanError::NotEnoughMemory { needed: 12 * MIB, available: 10 * MIB }));
    // Enough bytes in sum, but no worker holds the embedding beside a layer.
    let cost = ModelCost { embed_bytes: 8 * MIB, ..cost };
    let err = place(&cost, &[profile("a", 8 * MIB, 1.0), profile("b", 20 * MIB, 1.0)], &one_pipeline());
    assert!(err.is_ok(), "b holds the embedding: {err:?}");
    let err =
        place(&cost, &(0..4).map(|i| profile(&format!("w{i}"), 8 * MIB, 1.0)).collect::<Vec<_>>(), &one_pipeline());
    assert_eq!(err, Err(PlanError::EndDoesNotFit { part: "embedding", needed: 9 * MIB, largest: 8 * MIB }));
}

#[test]
fn the_join_threshold_keeps_or_replaces_the_plan_in_force() {
    let cost = model(30, 0);
    let worker = |id: &str, ms: f64| WorkerInfo {
        layer_micros: Some(ms * 1e3),
        instance: format!("{id}-1"),
        free_memory_bytes: GIB,
        ..test_worker(id)
    };
    let (a, b) = (worker("a", 1.0), worker("b", 1.0));
    let current = plan(cost, &[a.clone(), b.clone()], &one_pipeline()).expect("fits");
    let (stages, instances) = (current.best().stages.clone(), vec!["a-1".to_string(), "b-1".to_string()]);
    type Case = (&'static str, f64, bool);
    let cases: [Case; 3] = [
        ("a slow join gains a few percent: the plan stays", 12.0, true),
        ("an equal join gains half again: re-plan", 1.0, false),
        ("a fast join: re-plan", 0.2, false),
    ];
    for (name, ms, keep) in cases {
        let workers = [a.clone(), b.clone(), worker("c", ms)];
        let proposed = plan(cost, &workers, &one_pipeline()).expect("fits");
        let kept = keep_plan_in_force(
            &cost,
            &stages,
            &instances,
            &workers,
            proposed.best(),
            &one_pipeline(),
            DEFAULT_REPLAN_GAIN,
        );
        assert_eq!(kept, keep, "{name}: {:?}", layers_of(proposed.best()));
    }
    // A member of the plan in force restarted: its shard is gone, so the plan cannot stay.
    let workers = [a, WorkerInfo { instance: "b-2".into(), ..b }];
    let proposed = plan(cost, &workers, &one_pipeline()).expect("fits");
    assert!(!keep_plan_in_force(&cost, &stages, &instances, &workers, proposed.best(), &one_pipeline(), 0.1));
}

/// SmolLM2-135M Q4_1's shape in MiB-sized units: 30 blocks of 3 MiB, a
/// 30 MiB embedding and head, a 64 MiB KV budget per stage.
const SMOL: ModelCost = ModelCost {
    layers: 30,
    layer_bytes: 3 * MIB,
    embed_bytes: 30 * MIB,
    head_bytes: 30 * MIB,
    layer_macs: 35,
    head_macs: 283,
    kv_budget_bytes: 64 * MIB,
    hidden_bytes: 1152,
};

/// A CUDA worker with `device` bytes of GPU memory free (and plenty of host RAM, which must not count).
fn gpu(id: &str, device: u64, layer_micros: f64) -> WorkerInfo {
    WorkerInfo {
        device: "cuda:0".into(),
        device_info: DeviceInfo {
            kind: DeviceKind::Cuda,
            name: format!("{id}-gpu"),
            total_bytes: device,
            free_bytes: device,
        },
        layer_micros: Some(layer_micros),
        free_memory_bytes: 1 << 40,
        threads: 8,
        ..test_worker(id)
    }
}

fn cpu(id: &str, host: u64, layer_micros: f64) -> WorkerInfo {
    WorkerInfo { free_memory_bytes: host, threads: 8, layer_micros: Some(layer_micros), ..test_worker(id) }
}

#[test]
fn a_gpu_too_small_for_any_layer_is_left_out_with_its_reason() {
    // 66 MiB: less than one 3 MiB layer plus the 64 MiB KV budget.
    let workers = [gpu("small", 66 * MIB, 1.0), cpu("a", 8 << 30, 100.0), cpu("b", 8 << 30, 100.0)];
    let got = plan(SMOL, &workers, &one_pipeline()).expect("the CPUs carry the model");
    assert_eq!(got.best().stages.iter().map(|s| s.worker.as_str()).collect::<Vec<_>>(), vec!["a", "b"]);
    let out = left_out(SMOL, &workers);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].worker.as_str(), out[0].needed_bytes, out[0].available_bytes), ("small", 67 * MIB, 66 * MIB));
    assert!(out[0].reason.contains("cuda device `small-gpu` has 66 MiB free"), "{}", out[0].reason);
    assert!(out[0].reason.contains("need 67 MiB"), "{}", out[0].reason);
    assert_eq!(got.left_out, out);
    // Alone, it is an error that says what one layer needs.
    assert_eq!(
        plan(SMOL, &workers[..1], &one_pipeline()),
        Err(PlanError::NoWorkerHoldsALayer { needed: 67 * MIB, largest: 66 * MIB })
    );
}

#[test]
fn a_gpu_stage_is_budgeted_by_device_memory_not_host_ram() {
    // Host RAM is 1 TiB; the GPU has room for an end (30 MiB), the KV budget and 2 layers.
    let workers = [gpu("gpu", (30 + 64 + 2 * 3) * MIB, 1.0), cpu("cpu", 8 << 30, 10.0)];
    assert_eq!(workers[0].stage_memory_bytes(), (30 + 64 + 6) * MIB);
    let got = plan(SMOL, &workers, &one_pipeline()).expect("fits");
    let on_gpu = |p: &Placement| p.best().stages.iter().find(|s| s.worker == "gpu").map(|s| s.end - s.start);
    assert_eq!(on_gpu(&got), Some(2));
    // The KV budget counts: without it the same GPU holds 23 layers.
    let got = plan(ModelCost { kv_budget_bytes: 0, ..SMOL }, &workers, &one_pipeline()).expect("fits");
    assert_eq!(on_gpu(&got), Some(23));
}

#[test]
fn unmeasured_workers_are_weighed_by_threads() {
    let cost = model(30, 0);
    let mut fast = cpu("fast", GIB, 100.0);
    let mut slow = cpu("slow", GIB, 300.0);
    (fast.threads, slow.threads) = (1, 2);
    // Measured: `fast` does three times the work, though it has fewer threads.
    let got = plan(cost, &[fast.clone(), slow.clone()], &one_pipeline()).expect("fits");
    assert_eq!(layers_of(got.best()), vec![("fast", 23), ("slow", 7)]);
    assert!(got.measured);
    // One worker without a measurement: threads decide for all.
    slow.layer_micros = None;
    let got = plan(cost, &[fast, slow], &one_pipeline()).expect("fits");
    assert_eq!(layers_of(got.best()), vec![("fast", 10), ("slow", 20)]);
    assert!(!got.measured);
}

#[test]
fn more_workers_than_layers_use_one_stage_a_layer_at_most() {
    let cost = model(2, 0);
    let workers: Vec<WorkerProfile> = (0..5).map(|i| profile(&format!("w{i}"), GIB, 1.0)).collect();
    let got = placed(&cost, &workers, &one_pipeline());
    assert_eq!(got.best().stages.len(), 2);
    assert_eq!(got.left_out.len(), 3);
}

#[test]
fn a_batch_time_prices_the_expected_batch() {
    let t = LayerTime { batch1_secs: 1.0, at_batch: Some((16, 4.0)) };
    assert!((t.at(1.0) - 1.0).abs() < 1e-12);
    assert!((t.at(6.0) - 2.0).abs() < 1e-12);
    assert!((t.at(31.0) - 7.0).abs() < 1e-12);
    assert!((LayerTime::flat(2.0).at(8.0) - 2.0).abs() < 1e-12);
    // A class is bandwidth-bound at batch 1 and compute-bound at a large batch.
    let cpu = DeviceClass::named("cpu-laptop").expect("known").layer_time(&SMOL);
    let gpu = DeviceClass::named("rtx-4090").expect("known").layer_time(&SMOL);
    assert!(cpu.batch1_secs > gpu.batch1_secs);
    assert!(DeviceClass::named("abacus").is_none());
}

#[test]
fn a_pair_link_wins_over_access_links_and_the_slower_access_link_bounds_a_pair() {
    let lan = Link { rtt_secs: 1e-4, bytes_per_sec: 1e9 };
    let wifi = Link { rtt_secs: 5e-3, bytes_per_sec: 1e7 };
    let direct = Link { rtt_secs: 1e-3, bytes_per_sec: 5e7 };
    let mut links = Links::new(lan);
    links.attach("laptop", wifi);
    links.insert("laptop", "dock", direct);
    assert_eq!(links.get("a", "b"), lan);
    assert_eq!(links.get("a", "laptop"), wifi);
    assert_eq!(links.get("laptop", "a"), wifi);
    assert_eq!(links.get("dock", "laptop"), direct);
}

#[test]
fn the_cluster_view_predicts_the_plan_in_force_and_names_idle_workers() {
    let cost = model(30, 0);
    let w = |id: &str, ms: f64| WorkerInfo { layer_micros: Some(ms * 1e3), free_memory_bytes: GIB, ..test_worker(id) };
    let workers = [w("a", 1.0), w("b", 1.0), w("pi", 100.0)];
    let stages = plan(cost, &workers[..2], &one_pipeline()).expect("fits").best().stages.clone();
    let (predicted, out) = in_force(cost, &stages, &workers);
    let predicted = predicted.expect("the plan in force runs");
    assert!((predicted.bottleneck_secs - 0.015).abs() < 1e-9, "{predicted:?}");
    assert_eq!(out.iter().map(|l| (l.worker.as_str(), l.cause)).collect::<Vec<_>>(), [("pi", LeftOutCause::Slower)]);
    // A stage whose worker has gone: no prediction.
    assert!(in_force(cost, &stages, &workers[..1]).0.is_none());
    assert!(in_force(cost, &[], &workers).0.is_none());
}
