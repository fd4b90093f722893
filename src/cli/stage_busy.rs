//! Each pipeline stage's busy seconds, read from the coordinator's
//! `/metrics`, once or sampled through a benchmark phase.
//!
//! Why sampled: a phase's ends (the ramp-up, when every stream's first
//! prefill runs at once, and the tail, when streams finish one by one) are
//! times when fewer streams run. Sampling lets `bench serve` report the
//! busy fraction over exactly the stretch when every stream is running,
//! next to the whole phase's.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a running phase samples `/metrics`: each scrape asks every
/// worker, so this stays far from the stages' micro-batch rate.
const POLL: Duration = Duration::from_millis(50);

/// Each stage's busy seconds so far, in stage order, from `/metrics`.
pub fn busy_seconds(http: &str) -> anyhow::Result<Vec<f64>> {
    let mut s = std::net::TcpStream::connect(http)?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n")?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text)?;
    let mut stages: Vec<(usize, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("potluck_stage_busy_seconds_total{stage=\""))
        .filter_map(|rest| {
            let (stage, rest) = rest.split_once('"')?;
            Some((stage.parse().ok()?, rest.rsplit_once(' ')?.1.parse().ok()?))
        })
        .collect();
    stages.sort_by_key(|&(s, _)| s);
    Ok(stages.into_iter().map(|(_, v)| v).collect())
}

/// A background thread sampling [`busy_seconds`] every [`POLL`].
pub struct BusySampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, Vec<f64>)>>,
}

impl BusySampler {
    /// Starts sampling; a failed scrape is skipped (the next one counts).
    pub fn start(http: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, http) = (Arc::clone(&stop), http.to_string());
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            loop {
                let done = flag.load(Ordering::Relaxed);
                if let Ok(busy) = busy_seconds(&http) {
                    samples.push((Instant::now(), busy));
                }
                if done {
                    return samples;
                }
                std::thread::sleep(POLL);
            }
        });
        Self { stop, thread }
    }

    /// Stops sampling (after one last sample) and returns the samples in time order.
    pub fn finish(self) -> Vec<(Instant, Vec<f64>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Each stage's busy fraction from `from` to `to`, with its busy seconds
/// interpolated linearly between the samples around each end; `None` when
/// the samples do not cover both ends.
pub fn busy_between(samples: &[(Instant, Vec<f64>)], from: Instant, to: Instant) -> Option<Vec<f64>> {
    let at = |t: Instant| -> Option<Vec<f64>> {
        let i = samples.windows(2).position(|w| w[0].0 <= t && t <= w[1].0)?;
        let ((t0, a), (t1, b)) = (&samples[i], &samples[i + 1]);
        let span = (*t1 - *t0).as_secs_f64();
        let f = if span > 0.0 { (t - *t0).as_secs_f64() / span } else { 0.0 };
        (a.len() == b.len()).then(|| a.iter().zip(b).map(|(x, y)| x + (y - x) * f).collect())
    };
    let seconds = (to - from).as_secs_f64();
    if seconds <= 0.0 {
        return None;
    }
    let (a, b) = (at(from)?, at(to)?);
    (a.len() == b.len()).then(|| a.iter().zip(&b).map(|(x, y)| (y - x) / seconds).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_between_interpolates_and_refuses_uncovered_ends() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Stage 0 busy all the time, stage 1 half the time.
        let samples = vec![(at(0), vec![0.0, 0.0]), (at(100), vec![0.1, 0.05]), (at(200), vec![0.2, 0.1])];
        let got = busy_between(&samples, at(50), at(150)).expect("covered");
        assert!((got[0] - 1.0).abs() < 1e-9 && (got[1] - 0.5).abs() < 1e-9, "{got:?}");
        assert_eq!(busy_between(&samples, at(150), at(250)), None);
        assert_eq!(busy_between(&samples, at(150), at(150)), None);
    }
}
