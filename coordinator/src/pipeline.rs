//! A generation in the coordinator's terms: the request (prompt ids, limits,
//! sampling), each token as the API reports it, and why it ended. The
//! scheduler (`scheduler.rs`) runs generations through the pipeline.

use potluck_engine::SamplingParams;

/// One sampled token, as the API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// Token id.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// Top alternatives.
    pub top: Vec<(u32, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence or end-of-turn token, or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The consumer stopped listening.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Stop | Self::Cancelled => "stop",
            Self::Length => "length",
        }
    }
}

/// A generation request in engine terms.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
}
