//! What the planner knows about each worker and the links between them:
//! memory, time per layer at batch 1 and at a larger batch, round-trip time
//! and bandwidth. A profile comes from a worker's registration or from a
//! pool file; the planner checks it and leaves out a worker whose figures
//! make no sense rather than planning on them.

use std::collections::HashMap;

use super::model_cost::ModelCost;
use super::LeftOutCause;
use crate::membership::WorkerInfo;

/// A layer's decode time on one worker, measured at batch 1 and, where
/// known, at a larger batch; between and beyond the two it is linear, which
/// is how a step goes from bandwidth-bound to compute-bound.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LayerTime {
    /// Seconds one layer takes for one row.
    pub batch1_secs: f64,
    /// Seconds one layer takes for a batch of that many rows.
    pub at_batch: Option<(u32, f64)>,
}

impl LayerTime {
    /// The same time at every batch size (what a batch-1 probe alone says).
    pub fn flat(batch1_secs: f64) -> Self {
        Self { batch1_secs, at_batch: None }
    }

    /// Seconds one layer takes for a micro-batch of `batch` rows.
    pub fn at(&self, batch: f64) -> f64 {
        match self.at_batch {
            Some((b, t)) if b > 1 => {
                let slope = (t - self.batch1_secs) / f64::from(b - 1);
                (self.batch1_secs + slope * (batch - 1.0)).max(self.batch1_secs.min(t))
            }
            _ => self.batch1_secs,
        }
    }

    /// Why these figures cannot be planned on, if they cannot.
    fn nonsense(&self) -> Option<String> {
        let bad = |t: f64| !t.is_finite() || t <= 0.0;
        if bad(self.batch1_secs) {
            return Some(format!("reports a time per layer of {} s, which is not a positive number", self.batch1_secs));
        }
        match self.at_batch {
            Some((b, t)) if bad(t) || b == 0 => {
                Some(format!("reports a time per layer of {t} s at batch {b}, which is not a positive time"))
            }
            _ => None,
        }
    }
}

/// A link between two workers, as measured or as a pool file gives it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Link {
    /// Round-trip time: a hidden state goes one way, the sampled token comes back the other.
    pub rtt_secs: f64,
    /// Bytes per second one way.
    pub bytes_per_sec: f64,
}

impl Link {
    /// A link that costs nothing: what the planner assumes where it knows nothing better.
    pub const FREE: Self = Self { rtt_secs: 0.0, bytes_per_sec: f64::INFINITY };

    /// Seconds to send `bytes` over it and hear back.
    pub fn secs(&self, bytes: f64) -> f64 {
        self.rtt_secs + if self.bytes_per_sec > 0.0 { bytes / self.bytes_per_sec } else { f64::INFINITY }
    }
}

/// The link table: measured pairs; else each worker's own access link (a
/// worker on Wi-Fi), the slower of the two; else a default.
#[derive(Debug, Clone, PartialEq)]
pub struct Links {
    default: Link,
    access: HashMap<String, Link>,
    pairs: HashMap<String, HashMap<String, Link>>,
}

impl Default for Links {
    fn default() -> Self {
        Self::new(Link::FREE)
    }
}

impl Links {
    /// A table where every pair has `default` until told otherwise.
    pub fn new(default: Link) -> Self {
        Self { default, access: HashMap::new(), pairs: HashMap::new() }
    }

    /// Records the link between `a` and `b`, both ways.
    pub fn insert(&mut self, a: &str, b: &str, link: Link) {
        self.pairs.entry(a.to_string()).or_default().insert(b.to_string(), link);
        self.pairs.entry(b.to_string()).or_default().insert(a.to_string(), link);
    }

    /// Records `id`'s own access link: every pair with it is at most as good.
    pub fn attach(&mut self, id: &str, link: Link) {
        self.access.insert(id.to_string(), link);
    }

    /// The link from `a` to `b`.
    pub fn get(&self, a: &str, b: &str) -> Link {
        if let Some(link) = self.pairs.get(a).and_then(|m| m.get(b)) {
            return *link;
        }
        match (self.access.get(a), self.access.get(b)) {
            (None, None) => self.default,
            (x, y) => {
                let (x, y) = (x.unwrap_or(&self.default), y.unwrap_or(&self.default));
                Link { rtt_secs: x.rtt_secs.max(y.rtt_secs), bytes_per_sec: x.bytes_per_sec.min(y.bytes_per_sec) }
            }
        }
    }
}

/// A worker as the planner sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkerProfile {
    /// Its id.
    pub id: String,
    /// Its gRPC URL (empty in a pool file that does not say).
    pub address: String,
    /// Bytes a stage on it may fill: device memory for a GPU, else host memory.
    pub memory_bytes: u64,
    /// Which memory that is, in words, for the reasons the planner gives.
    pub memory_label: String,
    /// Its measured time per layer (`None`: unmeasured, speed from threads).
    pub layer_time: Option<LayerTime>,
    /// Compute threads: its speed when not every worker has a measurement.
    pub threads: u32,
}

impl From<&WorkerInfo> for WorkerProfile {
    fn from(w: &WorkerInfo) -> Self {
        let d = &w.device_info;
        let memory_label =
            if d.kind.is_gpu() { format!("{} device `{}`", d.kind.name(), d.name) } else { "host memory".to_string() };
        Self {
            id: w.id.clone(),
            address: w.address.clone(),
            memory_bytes: w.stage_memory_bytes(),
            memory_label,
            layer_time: w.layer_micros.map(|t| LayerTime::flat(t / 1e6)),
            threads: w.threads,
        }
    }
}

impl WorkerProfile {
    /// Why this worker cannot take part, whatever the others: nonsense
    /// figures, or no room for one layer and the KV budget.
    pub(crate) fn unusable(&self, cost: &ModelCost) -> Option<(LeftOutCause, String)> {
        if self.memory_bytes == 0 {
            return Some((LeftOutCause::Invalid, format!("{} reports no free memory", self.memory_label)));
        }
        if let Some(reason) = self.layer_time.as_ref().and_then(LayerTime::nonsense) {
            return Some((LeftOutCause::Invalid, reason));
        }
        let needed = cost.one_layer_bytes();
        (self.memory_bytes < needed).then(|| {
            let reason = format!(
                "{} has {} MiB free; one layer and the KV budget need {} MiB",
                self.memory_label,
                self.memory_bytes >> 20,
                needed.div_ceil(1 << 20)
            );
            (LeftOutCause::Memory, reason)
        })
    }
}

/// A kind of device priced from its memory bandwidth and arithmetic rate: a
/// decode step reads every weight once (bandwidth-bound at batch 1) and does
/// one multiply-add per weight per row (compute-bound at large batches). For
/// pools described before any probe ran.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceClass {
    /// The name a pool file uses.
    pub name: &'static str,
    /// Bytes per second the device reads weights at.
    pub bytes_per_sec: f64,
    /// Multiply-adds per second on quantized weights.
    pub macs_per_sec: f64,
}

/// The batch the classes' second time is priced at.
pub const CLASS_BATCH: u32 = 16;

/// Device classes with their vendors' peak figures, derated alike.
pub const DEVICE_CLASSES: &[DeviceClass] = &[
    DeviceClass { name: "cpu-laptop", bytes_per_sec: 40e9, macs_per_sec: 0.2e12 },
    DeviceClass { name: "cpu-desktop", bytes_per_sec: 60e9, macs_per_sec: 0.5e12 },
    DeviceClass { name: "cpu-server", bytes_per_sec: 200e9, macs_per_sec: 2e12 },
    DeviceClass { name: "apple-m2", bytes_per_sec: 100e9, macs_per_sec: 1.8e12 },
    DeviceClass { name: "apple-m2-max", bytes_per_sec: 400e9, macs_per_sec: 7e12 },
    DeviceClass { name: "rtx-3060", bytes_per_sec: 360e9, macs_per_sec: 6e12 },
    DeviceClass { name: "rtx-3090", bytes_per_sec: 936e9, macs_per_sec: 17e12 },
    DeviceClass { name: "rtx-4090", bytes_per_sec: 1008e9, macs_per_sec: 40e12 },
    DeviceClass { name: "a100", bytes_per_sec: 2039e9, macs_per_sec: 150e12 },
    DeviceClass { name: "h100", bytes_per_sec: 3350e9, macs_per_sec: 490e12 },
];

/// Share of the peak figures a decode step reaches.
const CLASS_EFFICIENCY: f64 = 0.6;

impl DeviceClass {
    /// The class called `name`.
    pub fn named(name: &str) -> Option<Self> {
        DEVICE_CLASSES.iter().copied().find(|c| c.name == name)
    }

    /// The time per layer of `cost`'s model on this class.
    #[allow(clippy::cast_precision_loss)]
    pub fn layer_time(&self, cost: &ModelCost) -> LayerTime {
        let step = |batch: f64| {
            let read = cost.layer_bytes as f64 / (self.bytes_per_sec * CLASS_EFFICIENCY);
            let work = batch * cost.layer_macs as f64 / (self.macs_per_sec * CLASS_EFFICIENCY);
            read.max(work)
        };
        LayerTime { batch1_secs: step(1.0), at_batch: Some((CLASS_BATCH, step(f64::from(CLASS_BATCH)))) }
    }
}
