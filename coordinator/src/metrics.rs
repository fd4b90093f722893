//! The coordinator's Prometheus metrics, rendered in the text exposition
//! format at `/metrics`.
//!
//! A handful of counters, gauges and fixed-bucket histograms, so no registry
//! crate is needed; per-worker figures (KV bytes in use, busy time) are asked
//! of the workers when scraped and appended by the HTTP layer.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0];

/// A histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds (integer, so it can be atomic).
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: std::array::from_fn(|_| AtomicU64::new(0)), count: AtomicU64::new(0), sum_us: AtomicU64::new(0) }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, c) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            cumulative += c.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        #[allow(clippy::cast_precision_loss)]
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Everything the coordinator counts.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Requests waiting for capacity.
    pub queue_depth: AtomicU64,
    /// Sessions admitted and not yet finished.
    pub active_sessions: AtomicU64,
    /// Micro-batches sent to the pipeline.
    pub batches: AtomicU64,
    /// Rows in those micro-batches.
    pub batch_rows: AtomicU64,
    /// Running sessions moved to a new plan (re-prefilled from their tokens).
    pub replayed_sessions: AtomicU64,
    /// Unplanned pipeline failures the scheduler failed over from.
    pub failovers: AtomicU64,
    /// Time from a pipeline failure to the plan that replaced it.
    pub failover_stall: Histogram,
    /// The latest cluster events (failovers, fenced workers, re-plans), oldest first.
    events: Mutex<VecDeque<ClusterEvent>>,
    /// Time from a request's arrival to its first token.
    pub time_to_first_token: Histogram,
    /// Time between consecutive tokens of one request.
    pub inter_token_latency: Histogram,
}

/// Cluster events kept for `/v1/cluster`.
pub const EVENTS_KEPT: usize = 32;

/// Something that happened to the pipeline, as `/v1/cluster` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterEvent {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `failover`, `fenced`, …
    pub kind: String,
    /// The plan epoch it concerns.
    pub epoch: u64,
    /// What happened.
    pub detail: String,
}

impl Metrics {
    /// Keeps one cluster event (the oldest beyond [`EVENTS_KEPT`] goes).
    pub fn record_event(&self, kind: &str, epoch: u64, detail: &str) {
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut events = self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(ClusterEvent { at, kind: kind.to_string(), epoch, detail: detail.to_string() });
    }

    /// The latest cluster events, oldest first.
    pub fn events(&self) -> Vec<ClusterEvent> {
        self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
    }

    /// Counts one API response with HTTP status `status`.
    pub fn request(&self, status: u16) {
        *self.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(status).or_default() += 1;
    }

    /// Responses so far with HTTP status `status`.
    pub fn requests_with(&self, status: u16) -> u64 {
        self.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&status).copied().unwrap_or(0)
    }

    /// Adds a gauge's current value to a counter-like field.
    pub fn set(gauge: &AtomicU64, v: usize) {
        gauge.store(v as u64, Ordering::Relaxed);
    }

    /// The coordinator's own metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP potluck_requests_total API responses by HTTP status.\n");
        out.push_str("# TYPE potluck_requests_total counter\n");
        for (status, n) in self.requests.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            let _ = writeln!(out, "potluck_requests_total{{status=\"{status}\"}} {n}");
        }
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}", v.load(Ordering::Relaxed));
        };
        scalar(
            &mut out,
            "potluck_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            &self.prompt_tokens,
        );
        scalar(&mut out, "potluck_generated_tokens_total", "counter", "Tokens generated.", &self.generated_tokens);
        scalar(&mut out, "potluck_queue_depth", "gauge", "Requests waiting for KV capacity.", &self.queue_depth);
        scalar(&mut out, "potluck_active_sessions", "gauge", "Sessions being served.", &self.active_sessions);
        scalar(&mut out, "potluck_batches_total", "counter", "Micro-batches sent to the pipeline.", &self.batches);
        scalar(&mut out, "potluck_batch_rows_total", "counter", "Rows in those micro-batches.", &self.batch_rows);
        scalar(
            &mut out,
            "potluck_replayed_sessions_total",
            "counter",
            "Running sessions moved to a new plan by re-prefilling their tokens.",
            &self.replayed_sessions,
        );
        scalar(
            &mut out,
            "potluck_failovers_total",
            "counter",
            "Unplanned pipeline failures the scheduler failed over from.",
            &self.failovers,
        );
        self.failover_stall.render(
            &mut out,
            "potluck_failover_stall_seconds",
            "Time from a pipeline failure to the plan that replaced it.",
        );
        self.time_to_first_token.render(
            &mut out,
            "potluck_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "potluck_inter_token_latency_seconds",
            "Time between consecutive tokens of one request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.time_to_first_token.observe(Duration::from_millis(4));
        m.time_to_first_token.observe(Duration::from_millis(150));
        m.time_to_first_token.observe(Duration::from_secs(100));
        m.request(200);
        m.request(200);
        m.request(429);
        let text = m.render();
        for line in [
            "potluck_time_to_first_token_seconds_bucket{le=\"0.005\"} 1",
            "potluck_time_to_first_token_seconds_bucket{le=\"0.1\"} 1",
            "potluck_time_to_first_token_seconds_bucket{le=\"0.2\"} 2",
            "potluck_time_to_first_token_seconds_bucket{le=\"30\"} 2",
            "potluck_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3",
            "potluck_time_to_first_token_seconds_count 3",
            "potluck_requests_total{status=\"200\"} 2",
            "potluck_requests_total{status=\"429\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing `{line}` in\n{text}");
        }
        assert_eq!(m.requests_with(429), 1);
    }
}
