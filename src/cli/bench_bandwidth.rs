//! `potluck bench bandwidth`: how fast one thread reads memory on this host.
//!
//! Why: batch-1 decode reads every weight once per token, so its speed is
//! bounded by the read bandwidth one core gets, and two processes on a host
//! share the memory system. Measured side by side with decode, this tells a
//! slow kernel from a saturated memory bus: `scripts/bench-vs-llamacpp
//! --contention` runs it alone and then two at once, next to the engine.

use std::time::Instant;

/// Options of `potluck bench bandwidth`.
#[derive(Debug, clap::Args)]
pub struct BandwidthBench {
    /// Buffer size in MiB; far past the last-level cache, so reads come from memory.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(64..=16_384))]
    mib: u64,
    /// Timed passes over the buffer (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    passes: u64,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    json: bool,
}

impl BandwidthBench {
    /// Reads the buffer `passes` times with one thread and reports the median rate.
    #[allow(clippy::cast_precision_loss)]
    pub fn run(self) -> anyhow::Result<()> {
        let bytes = usize::try_from(self.mib << 20)?;
        let words = bytes / std::mem::size_of::<u64>();
        let mut buf: Vec<u64> = Vec::new();
        buf.try_reserve_exact(words)
            .map_err(|e| anyhow::anyhow!("cannot allocate {} MiB for the bandwidth buffer: {e}", self.mib))?;
        // Written once, so every page is backed before the timed passes.
        buf.extend((0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        let mut rates = Vec::new();
        for pass in 0..=self.passes {
            let started = Instant::now();
            std::hint::black_box(read_all(&buf));
            let gb_s = bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
            if pass > 0 {
                rates.push(gb_s);
            }
        }
        let mut sorted = rates.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        if self.json {
            let report = serde_json::json!({ "read_gb_s": median, "passes_gb_s": rates, "mib": self.mib });
            println!("{report}");
        } else {
            println!("one thread reads {median:.1} GB/s (median of {} passes over {} MiB)", rates.len(), self.mib);
        }
        Ok(())
    }
}

/// Sums every word with eight independent chains, so the loop waits on
/// memory, not on the adds.
fn read_all(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = buf.chunks_exact(8);
    let tail: u64 = chunks.remainder().iter().fold(0, |a, &x| a.wrapping_add(x));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(x);
        }
    }
    acc.iter().fold(tail, |a, &x| a.wrapping_add(x))
}
