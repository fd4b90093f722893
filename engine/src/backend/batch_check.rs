//! The checks every backend runs on a batch before computing anything, so
//! a bad batch fails the same way whichever backend a stage runs on.

use std::collections::HashMap;

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::SessionId;
use crate::stage::{Row, StageInput};

/// Checks `rows` and `input` against a stage (`first`: it takes token ids)
/// and each session's cached length (`cached`); returns each session's
/// growth in tokens.
pub(crate) fn growth(
    c: &ModelConfig,
    first: bool,
    rows: &[Row],
    input: StageInput<'_>,
    cached: impl Fn(SessionId) -> usize,
) -> Result<HashMap<SessionId, usize>> {
    let bad = |m: String| Err(EngineError::InvalidBatch(m));
    if rows.is_empty() {
        return bad("the batch has no rows".into());
    }
    match (input, first) {
        (StageInput::Tokens(_), false) => return bad("this stage takes hidden states, not tokens".into()),
        (StageInput::Hidden(_), true) => return bad("the first stage takes token ids, not hidden states".into()),
        (StageInput::Tokens(ids), true) => {
            if ids.len() != rows.len() {
                return bad(format!("{} token ids for {} rows", ids.len(), rows.len()));
            }
            if let Some(id) = ids.iter().find(|&&id| id as usize >= c.vocab) {
                return bad(format!("token id {id} is outside the vocabulary of {}", c.vocab));
            }
        }
        (StageInput::Hidden(h), false) => {
            if h.rows != rows.len() || h.dim != c.hidden || h.data.len() != h.rows * h.dim {
                let (n, d) = (rows.len(), c.hidden);
                return bad(format!("hidden states are {}×{} for {n} rows of width {d}", h.rows, h.dim));
            }
        }
    }
    let mut next: HashMap<SessionId, usize> = HashMap::new();
    for r in rows {
        if r.position >= c.context {
            return Err(EngineError::ContextExceeded { position: r.position, context: c.context });
        }
        let expected = next.entry(r.session).or_insert_with(|| cached(r.session));
        if r.position != *expected {
            let (s, p) = (r.session, r.position);
            return bad(format!("session {s} row at position {p} but the cache expects position {expected}"));
        }
        *expected += 1;
    }
    Ok(next.into_iter().map(|(s, end)| (s, end - cached(s))).collect())
}
