//! Forming micro-batches: ready sessions, oldest turn first, spread over the
//! in-flight slots, with prompts cut into chunks within a row budget; and
//! the deadline a micro-batch must be answered by.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use potluck_proto::v1 as pb;

use super::Core;
use crate::pipeline::Finish;
use crate::transport::Transport;

/// Default shortest deadline of a micro-batch, however fast the stages have been.
pub const DEFAULT_DEADLINE_FLOOR: Duration = Duration::from_secs(2);
/// Default multiple of the recent slowest round trip a micro-batch may take.
pub const DEFAULT_DEADLINE_FACTOR: u32 = 8;
/// Deadline before any round trip has been measured on a plan (a cold stage's first prefill).
pub const DEFAULT_FIRST_DEADLINE: Duration = Duration::from_secs(60);
/// How fast the slowest-round-trip estimate forgets a slow micro-batch, per reply.
const ROUND_TRIP_DECAY: f64 = 0.98;

/// How long a micro-batch may stay unanswered before its stage counts as dead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadline {
    /// Never shorter than this.
    pub floor: Duration,
    /// This many times the recent slowest round trip.
    pub factor: u32,
    /// Before anything was measured on the plan in force.
    pub first: Duration,
}

impl Default for Deadline {
    fn default() -> Self {
        Self { floor: DEFAULT_DEADLINE_FLOOR, factor: DEFAULT_DEADLINE_FACTOR, first: DEFAULT_FIRST_DEADLINE }
    }
}

/// The slowest recent round trip, and the slowest per row, each decaying so
/// one slow micro-batch does not stretch deadlines for ever. A micro-batch's
/// expected time is the larger of the two for its rows: a replay's long
/// prefill takes longer than any decode step, and the per-row figure of a
/// small decode batch overstates a large batch's cost, which errs on the
/// side of patience.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct RoundTrips {
    slowest: Option<Duration>,
    per_row: Option<Duration>,
}

impl RoundTrips {
    /// Records one micro-batch's round trip.
    pub fn observe(&mut self, took: Duration, rows: usize) {
        let keep = |old: Option<Duration>, new: Duration| {
            Some(new.max(old.map_or(Duration::ZERO, |s| s.mul_f64(ROUND_TRIP_DECAY))))
        };
        self.slowest = keep(self.slowest, took);
        self.per_row = keep(self.per_row, took / u32::try_from(rows.max(1)).unwrap_or(u32::MAX));
    }

    /// The deadline of a micro-batch of `rows` rows.
    pub fn deadline(&self, d: &Deadline, rows: usize) -> Duration {
        match (self.slowest, self.per_row) {
            (Some(s), Some(r)) => {
                let rows = u32::try_from(rows).unwrap_or(u32::MAX);
                (s.max(r.saturating_mul(rows)).saturating_mul(d.factor)).max(d.floor)
            }
            _ => d.first.max(d.floor),
        }
    }
}

/// Most rows of a micro-batch that replays sessions after a failover. Every
/// session replays at once, and the stage with the most layers must run all
/// their tokens before the last of them resumes; smaller micro-batches let
/// the first sessions resume early and leave only a short tail behind the
/// slowest stage's last batch, where a few large ones would leave a long one.
pub const REPLAY_BATCH_ROWS: usize = 128;

/// A micro-batch ready to send.
pub(super) struct Formed {
    pub id: u64,
    pub rows: Vec<pb::Row>,
    pub tokens: Vec<u32>,
    pub span: tracing::Span,
}

/// A micro-batch in the pipeline.
pub(super) struct InFlight {
    pub members: Vec<u64>,
    pub rows: usize,
    pub sent: Instant,
}

impl<T: Transport> Core<T> {
    /// The next micro-batch: ready sessions, oldest turn first, spread over the in-flight slots.
    pub(super) fn form_batch(&mut self) -> Option<Formed> {
        let cancelled: Vec<u64> =
            self.sessions.iter().filter(|(_, s)| !s.in_flight && s.events.is_closed()).map(|(&id, _)| id).collect();
        for id in cancelled {
            self.finish(id, Finish::Cancelled);
        }
        let mut ready: Vec<(u64, u64)> =
            self.sessions.iter().filter(|(_, s)| s.ready()).map(|(&id, s)| (s.turn, id)).collect();
        if ready.is_empty() {
            return None;
        }
        ready.sort_unstable();
        let slots = self.max_inflight();
        let share = self.sessions.len().div_ceil(slots).max(1);
        let (mut rows, mut tokens, mut members) = (Vec::new(), Vec::new(), Vec::new());
        let mut budget = self.config.max_batch_rows.max(1);
        if ready.first().and_then(|(_, id)| self.sessions.get(id)).is_some_and(|s| s.replays > 0) {
            budget = budget.min(REPLAY_BATCH_ROWS);
        }
        let mut decode = false;
        for (_, id) in ready {
            let turn = self.take_turn();
            let Some(s) = self.sessions.get_mut(&id) else { continue };
            let n = (s.tokens.len() - s.sent).min(self.config.prefill_chunk.max(1)).min(budget);
            if n == 0 {
                break;
            }
            decode |= s.sent >= s.prompt_len;
            for pos in s.sent..s.sent + n {
                rows.push(pb::Row {
                    session: id,
                    // Admission bounds every session by the context, which is far below u32::MAX.
                    position: u32::try_from(pos).unwrap_or(u32::MAX),
                    sample: pos + 1 == s.tokens.len(),
                    sampling: (pos == 0).then_some(s.sampling),
                });
                tokens.push(s.tokens[pos]);
            }
            s.sent += n;
            s.in_flight = true;
            s.turn = turn;
            budget -= n;
            members.push(id);
            if members.len() >= share || budget == 0 {
                break;
            }
        }
        let id = self.next_batch;
        self.next_batch += 1;
        // The micro-batch's span joins the trace of its first request; the others are linked.
        let parent = members.first().and_then(|id| self.sessions.get(id)).map(|s| s.span.clone());
        let span = match (decode, parent) {
            (true, Some(p)) => tracing::info_span!(parent: &p, "decode.step", batch_id = id, rows = rows.len()),
            (false, Some(p)) => tracing::info_span!(parent: &p, "prefill.step", batch_id = id, rows = rows.len()),
            (_, None) => tracing::Span::none(),
        };
        for m in members.iter().skip(1) {
            if let Some(s) = self.sessions.get(m) {
                span.follows_from(&s.span);
            }
        }
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics.batch_rows.fetch_add(rows.len() as u64, Ordering::Relaxed);
        self.inflight.insert(id, InFlight { members, rows: rows.len(), sent: Instant::now() });
        Some(Formed { id, rows, tokens, span })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_follows_the_slowest_recent_round_trip_and_the_rows_above_a_floor() {
        let d = Deadline { floor: Duration::from_secs(2), factor: 8, first: Duration::from_secs(60) };
        let mut r = RoundTrips::default();
        assert_eq!(r.deadline(&d, 4), Duration::from_secs(60), "nothing measured yet");
        r.observe(Duration::from_millis(10), 10);
        assert_eq!(r.deadline(&d, 10), Duration::from_secs(2), "the floor");
        assert_eq!(r.deadline(&d, 1000), Duration::from_secs(8), "a big batch gets its rows' time");
        r.observe(Duration::from_secs(1), 500);
        assert_eq!(r.deadline(&d, 10), Duration::from_secs(8), "the slowest round trip");
        for _ in 0..300 {
            r.observe(Duration::from_millis(10), 10);
        }
        assert_eq!(r.deadline(&d, 10), Duration::from_secs(2), "a slow batch is forgotten");
    }
}
