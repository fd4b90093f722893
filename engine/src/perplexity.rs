//! Perplexity by llama.cpp's method, so figures compare directly.
//!
//! Cut the tokens into non-overlapping windows of `ctx`; run each window as a
//! fresh sequence; score the second half: the logits at positions
//! `ctx/2 .. ctx-1` predict the tokens after them. PPL = exp(mean NLL).

use crate::error::{EngineError, Result};
use crate::kv_cache::SessionId;
use crate::local::LocalPipeline;
use crate::sampling::log_probs;
use crate::stage::Row;

/// The result of a perplexity run.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood).
    pub ppl: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens scored.
    pub scored: usize,
}

/// Scores `tokens` in windows of `ctx`; `progress(done, total, ppl_so_far)` runs after each window.
#[allow(clippy::cast_precision_loss)]
pub fn perplexity(
    pipe: &mut LocalPipeline,
    tokens: &[u32],
    ctx: usize,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    if ctx < 4 {
        return Err(EngineError::InvalidBatch(format!("context {ctx} is too small to score")));
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(EngineError::InvalidBatch(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let first = ctx / 2;
    let (mut nll, mut scored) = (0.0f64, 0usize);
    for w in 0..windows {
        let window = &tokens[w * ctx..(w + 1) * ctx];
        let session = SessionId(u64::MAX - w as u64);
        let rows: Vec<Row> =
            (0..ctx).map(|p| Row { session, position: p, logits: p >= first && p + 1 < ctx }).collect();
        let logits = pipe.forward(&rows, window);
        pipe.release(session);
        let logits = logits?;
        for (i, &p) in logits.rows.iter().enumerate() {
            let (lp, _) = log_probs(logits.row(i), window[p + 1], 0);
            nll -= f64::from(lp);
            scored += 1;
        }
        progress(w + 1, windows, (nll / scored as f64).exp());
    }
    Ok(Perplexity { ppl: (nll / scored as f64).exp(), windows, scored })
}
