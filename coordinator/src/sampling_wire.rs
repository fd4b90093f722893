//! Sampling settings on the wire: the scheduler encodes each session's
//! settings once, and the in-process test stages decode them. Both
//! directions live here so the round trip is tested in one place.

use potluck_engine::SamplingParams;
use potluck_proto::v1 as pb;

/// The wire form of a request's sampling settings.
pub(crate) fn encode(s: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        temperature: s.temperature,
        top_k: u32::try_from(s.top_k).unwrap_or(u32::MAX),
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        top_logprobs: u32::try_from(s.top_logprobs).unwrap_or(u32::MAX),
        logprobs: s.logprobs,
    }
}

/// A request's sampling settings from their wire form (the in-process
/// test stages decode what the scheduler sends, as a worker does).
#[cfg(test)]
pub(crate) fn decode(s: pb::Sampling) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        top_logprobs: s.top_logprobs as usize,
        logprobs: s.logprobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_the_round_trip() {
        let s = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.1,
            presence_penalty: 0.2,
            frequency_penalty: 0.3,
            seed: 7,
            top_logprobs: 3,
            logprobs: true,
        };
        assert_eq!(decode(encode(&s)), s);
    }
}
