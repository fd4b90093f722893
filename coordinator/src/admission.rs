//! Admission control: how many tokens of KV cache the pipeline can hold, and
//! who gets to use them.
//!
//! Every stage keeps every session's keys and values for its own layers, so
//! the stage with the most layers per byte of budget bounds the pipeline.
//! A session reserves its worst case (prompt + `max_tokens`) when it starts,
//! so a running session can never hit a full cache mid-stream; requests
//! beyond capacity wait in a bounded queue, and a full queue is refused.

use crate::planner::StagePlan;

/// Default most sessions decoding at once.
pub const DEFAULT_MAX_SESSIONS: usize = 64;
/// Default most requests waiting for capacity.
pub const DEFAULT_QUEUE_CAPACITY: usize = 64;

/// Why a request cannot be admitted now or ever.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The queue is full: try again later.
    #[error("the server is at capacity ({waiting} requests already waiting); retry later")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },
    /// The request alone needs more KV cache than the whole pipeline has.
    #[error("the request needs {needed} tokens of KV cache but the pipeline holds at most {capacity}")]
    TooLarge {
        /// Tokens the request reserves.
        needed: usize,
        /// Tokens the pipeline can hold.
        capacity: usize,
    },
}

/// What the pipeline can hold, and what is reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// KV tokens the tightest stage can hold.
    capacity_tokens: usize,
    max_sessions: usize,
    queue_capacity: usize,
    reserved_tokens: usize,
    sessions: usize,
}

impl Admission {
    /// Limits for a pipeline whose stages hold `capacity_tokens` tokens each at least.
    pub fn new(capacity_tokens: usize, max_sessions: usize, queue_capacity: usize) -> Self {
        Self { capacity_tokens, max_sessions: max_sessions.max(1), queue_capacity, reserved_tokens: 0, sessions: 0 }
    }

    /// Tokens of KV cache the tightest stage of `stages` holds, with `budget` bytes per worker
    /// and `bytes_per_token_layer` bytes per token and layer.
    pub fn capacity_of(stages: &[StagePlan], budget: u64, bytes_per_token_layer: usize) -> usize {
        stages
            .iter()
            .map(|s| {
                let per_token = (s.end.saturating_sub(s.start) * bytes_per_token_layer).max(1) as u64;
                usize::try_from(budget / per_token).unwrap_or(usize::MAX)
            })
            .min()
            .unwrap_or(0)
    }

    /// Replaces the capacity (a new plan); reservations stay.
    pub fn set_capacity(&mut self, capacity_tokens: usize) {
        self.capacity_tokens = capacity_tokens;
    }

    /// Tokens the pipeline holds.
    pub fn capacity(&self) -> usize {
        self.capacity_tokens
    }

    /// Whether a request reserving `tokens` can start now.
    pub fn fits(&self, tokens: usize) -> bool {
        self.sessions < self.max_sessions && self.reserved_tokens + tokens <= self.capacity_tokens
    }

    /// Whether a request reserving `tokens` may wait, given `waiting` already do.
    pub fn may_wait(&self, tokens: usize, waiting: usize) -> Result<(), Refusal> {
        if tokens > self.capacity_tokens && self.capacity_tokens > 0 {
            return Err(Refusal::TooLarge { needed: tokens, capacity: self.capacity_tokens });
        }
        if waiting >= self.queue_capacity {
            return Err(Refusal::QueueFull { waiting });
        }
        Ok(())
    }

    /// Takes `tokens` for a starting session.
    pub fn reserve(&mut self, tokens: usize) {
        self.reserved_tokens += tokens;
        self.sessions += 1;
    }

    /// Gives back a finished session's `tokens`.
    pub fn release(&mut self, tokens: usize) {
        self.reserved_tokens = self.reserved_tokens.saturating_sub(tokens);
        self.sessions = self.sessions.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(start: usize, end: usize) -> StagePlan {
        StagePlan { worker: "w".into(), address: "http://w".into(), start, end }
    }

    #[test]
    fn the_stage_with_most_layers_bounds_capacity() {
        // 10 bytes per token and layer, 1000 bytes per worker.
        let cases: [(&[StagePlan], usize); 3] = [
            (&[stage(0, 10)], 10),
            (&[stage(0, 4), stage(4, 10)], 16),
            (&[stage(0, 2), stage(2, 5), stage(5, 10)], 20),
        ];
        for (stages, want) in cases {
            assert_eq!(Admission::capacity_of(stages, 1000, 10), want, "{stages:?}");
        }
        assert_eq!(Admission::capacity_of(&[], 1000, 10), 0);
    }

    #[test]
    fn reservations_queue_and_refusals() {
        let mut a = Admission::new(100, 2, 3);
        assert!(a.fits(60));
        a.reserve(60);
        assert!(!a.fits(50), "over the token capacity");
        assert!(a.fits(40));
        a.reserve(40);
        assert!(!a.fits(0), "over the session limit");
        assert_eq!(a.may_wait(10, 2), Ok(()));
        assert_eq!(a.may_wait(10, 3), Err(Refusal::QueueFull { waiting: 3 }));
        assert_eq!(a.may_wait(101, 0), Err(Refusal::TooLarge { needed: 101, capacity: 100 }));
        a.release(60);
        assert!(a.fits(60));
        a.set_capacity(50);
        assert!(!a.fits(20));
    }
}
