//! Showing a shard download to an operator: a bar redrawn in place when
//! stderr is a terminal, a log line at every tenth and at the end otherwise
//! (journald, a pipe, a container log), and one line for a cache hit.
//!
//! The arithmetic and the wording are pure functions, so they are tested
//! without a terminal or a subscriber.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// The `tracing` target of progress log lines, so a binary can show them
/// while keeping its other logs at `warn`.
pub const PROGRESS_TARGET: &str = "potluck_worker::progress";
/// Least time between two redraws of the bar: smooth to the eye, cheap on a slow terminal.
pub const BAR_REDRAW: Duration = Duration::from_millis(100);
/// Cells in the bar.
const BAR_CELLS: u64 = 24;

/// How a worker shows shard downloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressStyle {
    /// A bar redrawn in place on stderr; right for a terminal only.
    Bar,
    /// A log line (target [`PROGRESS_TARGET`], level info) at every tenth and at the end.
    #[default]
    Log,
    /// Nothing at all.
    Off,
}

impl ProgressStyle {
    /// `Bar` when stderr is a terminal, else `Log`: what `auto` means.
    pub fn for_stderr() -> Self {
        Self::for_terminal(std::io::stderr().is_terminal())
    }

    fn for_terminal(terminal: bool) -> Self {
        if terminal {
            Self::Bar
        } else {
            Self::Log
        }
    }
}

impl std::str::FromStr for ProgressStyle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::for_stderr()),
            "bar" => Ok(Self::Bar),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!("unknown progress style `{s}` (use auto, bar, log or off)")),
        }
    }
}

/// One shard download as it goes.
#[derive(Debug)]
pub(crate) struct ShardProgress {
    style: ProgressStyle,
    label: String,
    total: u64,
    kept: u64,
    fetched: u64,
    started: Instant,
    last_draw: Option<Instant>,
}

impl ShardProgress {
    /// Reports a shard found complete in the cache, verified in `took`.
    pub fn cached(style: ProgressStyle, label: &str, total: u64, took: Duration) {
        let line = format!("{label}: {:.1} MB cached, verified in {:.2} s", mb(total), took.as_secs_f64());
        match style {
            ProgressStyle::Bar => eprintln!("{line}"),
            ProgressStyle::Log => tracing::info!(target: PROGRESS_TARGET, "{line}"),
            ProgressStyle::Off => {}
        }
    }

    /// Starts showing a fetch of a `total`-byte shard of which `kept` bytes were already on disk.
    pub fn start(style: ProgressStyle, label: &str, total: u64, kept: u64) -> Self {
        let mut p =
            Self { style, label: label.to_string(), total, kept, fetched: 0, started: Instant::now(), last_draw: None };
        match style {
            ProgressStyle::Bar => p.draw(false),
            ProgressStyle::Log => {
                tracing::info!(target: PROGRESS_TARGET, "{}", start_line(&p.label, total, kept));
            }
            ProgressStyle::Off => {}
        }
        p
    }

    /// Counts `bytes` more verified and written.
    pub fn advance(&mut self, bytes: u64) {
        let before = self.kept + self.fetched;
        self.fetched += bytes;
        match self.style {
            ProgressStyle::Bar => {
                if self.last_draw.is_none_or(|t| t.elapsed() >= BAR_REDRAW) {
                    self.draw(false);
                }
            }
            ProgressStyle::Log => {
                if let Some(tenth) = tenth_crossed(before, self.kept + self.fetched, self.total) {
                    if tenth < 10 {
                        let line = progress_line(&self.label, tenth, self.kept + self.fetched, self.total, self.rate());
                        tracing::info!(target: PROGRESS_TARGET, "{line}");
                    }
                }
            }
            ProgressStyle::Off => {}
        }
    }

    /// The shard is complete: the last bar, or the summary line.
    pub fn finish(mut self) {
        match self.style {
            ProgressStyle::Bar => self.draw(true),
            ProgressStyle::Log => {
                let line = done_line(&self.label, self.fetched, self.kept, self.started.elapsed());
                tracing::info!(target: PROGRESS_TARGET, "{line}");
            }
            ProgressStyle::Off => {}
        }
    }

    /// Fetch speed so far, in MB/s.
    fn rate(&self) -> f64 {
        rate(self.fetched, self.started.elapsed())
    }

    fn draw(&mut self, last: bool) {
        self.last_draw = Some(Instant::now());
        let line = bar_line(&self.label, self.kept + self.fetched, self.total, self.rate());
        let mut err = std::io::stderr().lock();
        // `\x1b[K` clears what a longer previous line left behind. A failed write to stderr has nowhere to go.
        let _ = write!(err, "\r{line}\x1b[K{}", if last { "\n" } else { "" });
        let _ = err.flush();
    }
}

/// Megabytes (10^6 bytes), the unit of network speeds.
#[allow(clippy::cast_precision_loss)]
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// MB/s of `bytes` over `took`; 0 before any time has passed.
fn rate(bytes: u64, took: Duration) -> f64 {
    let s = took.as_secs_f64();
    if s > 0.0 {
        mb(bytes) / s
    } else {
        0.0
    }
}

/// The tenth (1 to 10) that `before → after` out of `total` bytes reached, if it crossed one.
fn tenth_crossed(before: u64, after: u64, total: u64) -> Option<u64> {
    let tenth = |b: u64| if total == 0 { 10 } else { u128::from(b.min(total)) * 10 / u128::from(total) };
    let (a, b) = (tenth(before), tenth(after));
    (b > a).then(|| u64::try_from(b).unwrap_or(10))
}

fn start_line(label: &str, total: u64, kept: u64) -> String {
    if kept == 0 {
        format!("{label}: fetching {:.1} MB", mb(total))
    } else {
        format!("{label}: fetching {:.1} of {:.1} MB ({:.1} MB already on disk)", mb(total - kept), mb(total), mb(kept))
    }
}

fn progress_line(label: &str, tenth: u64, done: u64, total: u64, rate: f64) -> String {
    format!("{label}: {}% ({:.1} of {:.1} MB), {rate:.1} MB/s", tenth * 10, mb(done), mb(total))
}

fn done_line(label: &str, fetched: u64, kept: u64, took: Duration) -> String {
    let mut line = format!(
        "{label}: fetched {:.1} MB in {:.2} s ({:.1} MB/s)",
        mb(fetched),
        took.as_secs_f64(),
        rate(fetched, took)
    );
    if kept > 0 {
        line.push_str(&format!(", {:.1} MB were already on disk", mb(kept)));
    }
    line
}

fn bar_line(label: &str, done: u64, total: u64, rate: f64) -> String {
    let filled = if total == 0 {
        BAR_CELLS
    } else {
        u64::try_from(u128::from(done.min(total)) * u128::from(BAR_CELLS) / u128::from(total)).unwrap_or(BAR_CELLS)
    };
    let percent = if total == 0 { 100 } else { u128::from(done.min(total)) * 100 / u128::from(total) };
    let bar: String = (0..BAR_CELLS).map(|i| if i < filled { '#' } else { '.' }).collect();
    format!("{label} [{bar}] {percent:>3}% {:.1}/{:.1} MB {rate:.1} MB/s", mb(done), mb(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_gets_a_bar_and_anything_else_log_lines() {
        assert_eq!(ProgressStyle::for_terminal(true), ProgressStyle::Bar);
        assert_eq!(ProgressStyle::for_terminal(false), ProgressStyle::Log);
        assert_eq!("log".parse(), Ok(ProgressStyle::Log));
        assert_eq!("off".parse(), Ok(ProgressStyle::Off));
        assert!("fancy".parse::<ProgressStyle>().is_err_and(|e| e.contains("auto, bar, log or off")));
    }

    #[test]
    fn log_lines_come_at_each_tenth_once() {
        // 1000 bytes in chunks of 70: every tenth is reported exactly once, in order.
        let (total, mut done, mut seen) = (1000, 0, Vec::new());
        while done < total {
            let next = (done + 70).min(total);
            seen.extend(tenth_crossed(done, next, total));
            done = next;
        }
        assert_eq!(seen, (1..=10).collect::<Vec<_>>());
        // A big chunk that jumps two tenths reports the higher one.
        assert_eq!(tenth_crossed(50, 250, 1000), Some(2));
        assert_eq!(tenth_crossed(100, 150, 1000), None);
        // A resumed download starts from its kept bytes; an empty shard is complete.
        assert_eq!(tenth_crossed(400, 480, 1000), None);
        assert_eq!(tenth_crossed(0, 0, 0), None);
        // No overflow near u64::MAX.
        assert_eq!(tenth_crossed(0, u64::MAX, u64::MAX), Some(10));
    }

    #[test]
    fn lines_say_bytes_speed_and_whether_fetched_or_kept() {
        assert_eq!(start_line("w0 shard ab", 48_300_000, 0), "w0 shard ab: fetching 48.3 MB");
        assert_eq!(
            start_line("w0 shard ab", 48_300_000, 8_300_000),
            "w0 shard ab: fetching 40.0 of 48.3 MB (8.3 MB already on disk)"
        );
        assert_eq!(
            progress_line("w0 shard ab", 4, 19_320_000, 48_300_000, 12.44),
            "w0 shard ab: 40% (19.3 of 48.3 MB), 12.4 MB/s"
        );
        assert_eq!(
            done_line("w0 shard ab", 40_000_000, 8_300_000, Duration::from_secs(4)),
            "w0 shard ab: fetched 40.0 MB in 4.00 s (10.0 MB/s), 8.3 MB were already on disk"
        );
        assert_eq!(rate(1_000_000, Duration::ZERO), 0.0);
        assert_eq!(
            bar_line("w0", 24_160_000, 48_300_000, 31.26),
            "w0 [############............]  50% 24.2/48.3 MB 31.3 MB/s"
        );
        assert!(bar_line("w0", 5, 0, 0.0).contains("[########################] 100%"));
    }
}
