//! A micro-batch as the worker computes it, decoded from (and re-encoded to)
//! `ForwardRequest`.
//!
//! Decoding checks everything a message can get wrong on its own: counts,
//! dtype names, byte lengths, non-finite values, sampling ranges. What depends
//! on the loaded stage (epoch, first or later stage, wire dtype, hidden size)
//! is checked by the compute thread, which owns that state.

use potluck_engine::{Hidden, Row, SamplingParams, SessionId, WireDtype};
use potluck_proto::v1 as pb;

use crate::error::InvalidRequest;

/// One micro-batch: rows, their token ids, and hidden states from the previous stage.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    /// The plan epoch the sender believes in.
    pub epoch: u64,
    /// The sender's id for matching replies.
    pub batch_id: u64,
    /// Engine rows; `logits` is the proto's `sample` flag.
    pub rows: Vec<Row>,
    /// Sampling settings sent with each row (normally only a session's first).
    pub sampling: Vec<Option<SamplingParams>>,
    /// One token id per row.
    pub tokens: Vec<u32>,
    /// Hidden states and the dtype they travelled in (absent for the first stage).
    pub hidden: Option<(WireDtype, Hidden)>,
}

impl TryFrom<pb::ForwardRequest> for Batch {
    type Error = InvalidRequest;

    fn try_from(req: pb::ForwardRequest) -> Result<Self, InvalidRequest> {
        if req.rows.is_empty() {
            return Err(InvalidRequest::NoRows);
        }
        if req.tokens.len() != req.rows.len() {
            return Err(InvalidRequest::TokenCount { tokens: req.tokens.len(), rows: req.rows.len() });
        }
        let mut rows = Vec::with_capacity(req.rows.len());
        let mut sampling = Vec::with_capacity(req.rows.len());
        for r in req.rows {
            rows.push(Row { session: SessionId(r.session), position: r.position as usize, logits: r.sample });
            sampling.push(r.sampling.map(|s| decode_sampling(r.session, s)).transpose()?);
        }
        let hidden = req.hidden.map(|h| decode_hidden(h, rows.len())).transpose()?;
        Ok(Self { epoch: req.epoch, batch_id: req.batch_id, rows, sampling, tokens: req.tokens, hidden })
    }
}

impl Batch {
    /// The request the next stage receives: these rows and tokens, with this stage's output.
    pub fn to_request(&self, dtype: WireDtype, rows: usize, dim: usize, data: Vec<u8>) -> pb::ForwardRequest {
        let to_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        pb::ForwardRequest {
            epoch: self.epoch,
            batch_id: self.batch_id,
            rows: self
                .rows
                .iter()
                .zip(&self.sampling)
                .map(|(r, s)| pb::Row {
                    session: r.session.0,
                    position: to_u32(r.position),
                    sample: r.logits,
                    sampling: s.as_ref().map(encode_sampling),
                })
                .collect(),
            tokens: self.tokens.clone(),
            hidden: Some(pb::Hidden { dtype: dtype.name().to_string(), rows: to_u32(rows), dim: to_u32(dim), data }),
            // The forwarding stage sets these from its own span.
            traceparent: String::new(),
            tracestate: String::new(),
        }
    }
}

/// Parses a wire dtype name into the engine's type.
pub(crate) fn parse_dtype(name: &str) -> Result<WireDtype, InvalidRequest> {
    name.parse().map_err(|_| InvalidRequest::Dtype(name.to_string()))
}

fn decode_hidden(h: pb::Hidden, batch_rows: usize) -> Result<(WireDtype, Hidden), InvalidRequest> {
    let dtype = parse_dtype(&h.dtype)?;
    let (rows, dim) = (h.rows as usize, h.dim as usize);
    if rows != batch_rows {
        return Err(InvalidRequest::HiddenShape { rows, dim, expected_rows: batch_rows, expected_dim: dim });
    }
    let hidden = Hidden::decode(dtype, rows, dim, &h.data).map_err(InvalidRequest::HiddenData)?;
    Ok((dtype, hidden))
}

/// Proto3 cannot tell an unset float from 0, and 0 is meaningless for
/// `top_p` and `repetition_penalty`, so 0 there means "off" (1).
fn decode_sampling(session: u64, s: pb::Sampling) -> Result<SamplingParams, InvalidRequest> {
    let off_if_zero = |v: f32| if v == 0.0 { 1.0 } else { v };
    let p = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: off_if_zero(s.top_p),
        min_p: s.min_p,
        repetition_penalty: off_if_zero(s.repetition_penalty),
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        top_logprobs: s.top_logprobs as usize,
        logprobs: s.logprobs,
    };
    p.validate().map_err(|source| InvalidRequest::Sampling { session, source })?;
    Ok(p)
}

fn encode_sampling(p: &SamplingParams) -> pb::Sampling {
    pb::Sampling {
        temperature: p.temperature,
        top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
        top_logprobs: u32::try_from(p.top_logprobs).unwrap_or(u32::MAX),
        logprobs: p.logprobs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::ForwardRequest {
        pb::ForwardRequest {
            epoch: 3,
            batch_id: 9,
            rows: vec![
                pb::Row { session: 1, position: 0, sample: false, sampling: Some(pb::Sampling::default()) },
                pb::Row { session: 1, position: 1, sample: true, sampling: None },
            ],
            tokens: vec![5, 6],
            hidden: None,
            traceparent: String::new(),
            tracestate: String::new(),
        }
    }

    #[test]
    fn decodes_and_re_encodes() {
        let b = Batch::try_from(request()).expect("valid");
        assert_eq!(b.rows[1], Row { session: SessionId(1), position: 1, logits: true });
        assert_eq!(b.sampling[0].as_ref().map(|p| p.top_p), Some(1.0));
        let out = b.to_request(WireDtype::F16, 2, 1, vec![0; 4]);
        assert_eq!((out.epoch, out.batch_id, out.tokens.clone()), (3, 9, vec![5, 6]));
        let again = Batch::try_from(out).expect("round trip");
        assert_eq!(again.rows, b.rows);
        assert_eq!(again.sampling, b.sampling);
    }

    #[test]
    fn rejects_malformed_batches() {
        let mut r = request();
        r.tokens.pop();
        assert!(matches!(Batch::try_from(r), Err(InvalidRequest::TokenCount { tokens: 1, rows: 2 })));
        let mut r = request();
        r.hidden = Some(pb::Hidden { dtype: "f8".into(), rows: 2, dim: 1, data: vec![0; 2] });
        assert!(matches!(Batch::try_from(r), Err(InvalidRequest::Dtype(_))));
        let mut r = request();
        r.hidden = Some(pb::Hidden { dtype: "f32".into(), rows: 2, dim: 2, data: vec![0; 12] });
        assert!(matches!(Batch::try_from(r), Err(InvalidRequest::HiddenData(_))));
        let mut r = request();
        r.rows[0].sampling = Some(pb::Sampling { temperature: -1.0, ..Default::default() });
        assert!(matches!(Batch::try_from(r), Err(InvalidRequest::Sampling { session: 1, .. })));
        assert!(matches!(Batch::try_from(pb::ForwardRequest::default()), Err(InvalidRequest::NoRows)));
    }
}
