//! The last stage's per-session sampling state: each session's sampler (its
//! settings and seeded random stream) and the token history penalties read.
//!
//! The history is every input token of the session seen so far. A sampled
//! token joins it only when it comes back as an input row, so a replay that
//! re-sends the same rows rebuilds exactly the same state.

use std::collections::HashMap;

use potluck_engine::{EngineError, Sampled, Sampler, SamplingParams, SessionId};

#[derive(Debug)]
struct SessionSampler {
    sampler: Sampler,
    history: Vec<u32>,
}

/// Samplers and histories of every session on this (last) stage.
#[derive(Debug, Default)]
pub(crate) struct SamplerState {
    sessions: HashMap<SessionId, SessionSampler>,
}

impl SamplerState {
    /// Records an input token of `session`, creating its sampler from `params`
    /// the first time the session is seen (greedy when none are sent).
    pub fn observe(
        &mut self,
        session: SessionId,
        token: u32,
        params: Option<&SamplingParams>,
    ) -> Result<(), EngineError> {
        let entry = match self.sessions.entry(session) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let sampler = Sampler::new(params.cloned().unwrap_or_default())?;
                e.insert(SessionSampler { sampler, history: Vec::new() })
            }
        };
        entry.history.push(token);
        Ok(())
    }

    /// Samples the next token of `session` from `logits`; `None` if the session was never observed.
    pub fn sample(&mut self, session: SessionId, logits: &[f32]) -> Option<Sampled> {
        let s = self.sessions.get_mut(&session)?;
        Some(s.sampler.sample(logits, &s.history))
    }

    /// Forgets a session; returns whether it was known.
    pub fn release(&mut self, session: SessionId) -> bool {
        self.sessions.remove(&session).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_drives_penalties_and_release_forgets() {
        let mut s = SamplerState::default();
        let params = SamplingParams { presence_penalty: 10.0, ..Default::default() };
        let logits = [0.0, 3.0, 2.0];
        s.observe(SessionId(1), 1, Some(&params)).expect("params");
        assert_eq!(s.sample(SessionId(1), &logits).map(|x| x.token), Some(2));
        s.observe(SessionId(2), 0, None).expect("greedy");
        assert_eq!(s.sample(SessionId(2), &logits).map(|x| x.token), Some(1));
        assert!(s.release(SessionId(1)));
        assert!(!s.release(SessionId(1)));
        assert!(s.sample(SessionId(1), &logits).is_none());
    }
}
