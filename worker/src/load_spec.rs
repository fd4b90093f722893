//! What a `Load` asks for, decoded and checked: the digest becomes a file
//! name in the cache, so it must be plain hex.

use std::ops::Range;

use potluck_engine::kv_cache::DEFAULT_KV_BUDGET_BYTES;
use potluck_engine::WireDtype;
use potluck_proto::v1 as pb;

use crate::batch::parse_dtype;
use crate::error::InvalidRequest;

/// A stage assignment for one plan epoch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LoadSpec {
    /// The plan epoch; later forwards must carry it.
    pub epoch: u64,
    /// Layers to run.
    pub layers: Range<usize>,
    /// Content hash of the shard (the cache key).
    pub digest: String,
    /// Where outputs go; `None` on the last stage.
    pub next_stage: Option<String>,
    /// Hidden-state dtype between stages.
    pub wire: WireDtype,
    /// KV cache budget in bytes.
    pub kv_budget: usize,
    /// The coordinator to fetch the shard from; `None` = the one joined at start.
    pub shard_source: Option<String>,
}

impl TryFrom<pb::LoadRequest> for LoadSpec {
    type Error = InvalidRequest;

    fn try_from(r: pb::LoadRequest) -> Result<Self, InvalidRequest> {
        if r.layer_start >= r.layer_end {
            return Err(InvalidRequest::LayerRange { start: r.layer_start, end: r.layer_end });
        }
        check_digest(&r.shard_digest)?;
        let next_stage = match r.next_stage.trim() {
            "" => None,
            url if url.starts_with("http://") || url.starts_with("https://") => Some(url.to_string()),
            other => return Err(InvalidRequest::NextStage(other.to_string())),
        };
        let shard_source = shard_source(&r.shard_source)?;
        let kv_budget = match r.kv_budget_bytes {
            0 => DEFAULT_KV_BUDGET_BYTES,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        Ok(Self {
            epoch: r.epoch,
            layers: r.layer_start as usize..r.layer_end as usize,
            digest: r.shard_digest,
            next_stage,
            wire: parse_dtype(&r.wire_dtype)?,
            kv_budget,
            shard_source,
        })
    }
}

/// The shards a spare is asked to hold loaded, decoded and checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct WarmSpec {
    /// Each shard's layers and digest.
    pub shards: Vec<(Range<usize>, String)>,
    /// The coordinator to fetch them from; `None` = the one joined at start.
    pub shard_source: Option<String>,
}

impl TryFrom<pb::WarmRequest> for WarmSpec {
    type Error = InvalidRequest;

    fn try_from(r: pb::WarmRequest) -> Result<Self, InvalidRequest> {
        let shards = r
            .shards
            .into_iter()
            .map(|s| {
                if s.layer_start >= s.layer_end {
                    return Err(InvalidRequest::LayerRange { start: s.layer_start, end: s.layer_end });
                }
                check_digest(&s.shard_digest)?;
                Ok((s.layer_start as usize..s.layer_end as usize, s.shard_digest))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { shards, shard_source: shard_source(&r.shard_source)? })
    }
}

/// An optional coordinator URL: empty means the coordinator joined at start.
fn shard_source(url: &str) -> Result<Option<String>, InvalidRequest> {
    match url.trim() {
        "" => Ok(None),
        url if url.starts_with("http://") || url.starts_with("https://") => Ok(Some(url.to_string())),
        other => Err(InvalidRequest::ShardSource(other.to_string())),
    }
}

/// A digest names a file, so only lower-case hex passes (no `/`, no `..`).
pub(crate) fn check_digest(digest: &str) -> Result<(), InvalidRequest> {
    let ok =
        (1..=128).contains(&digest.len()) && digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidRequest::Digest(digest.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::LoadRequest {
        pb::LoadRequest {
            epoch: 2,
            layer_start: 0,
            layer_end: 2,
            model_id: "tiny".into(),
            shard_digest: "ab12".into(),
            next_stage: "http://127.0.0.1:1".into(),
            wire_dtype: "bf16".into(),
            kv_budget_bytes: 0,
            shard_source: String::new(),
        }
    }

    #[test]
    fn decodes_a_load() {
        let s = LoadSpec::try_from(request()).expect("valid");
        assert_eq!(s.layers, 0..2);
        assert_eq!(s.wire, WireDtype::BF16);
        assert_eq!(s.kv_budget, DEFAULT_KV_BUDGET_BYTES);
        assert_eq!(s.next_stage.as_deref(), Some("http://127.0.0.1:1"));
    }

    #[test]
    fn rejects_bad_loads() {
        for digest in ["", "../etc/passwd", "ABCD", "ab/cd"] {
            let r = pb::LoadRequest { shard_digest: digest.into(), ..request() };
            assert!(matches!(LoadSpec::try_from(r), Err(InvalidRequest::Digest(_))), "{digest}");
        }
        let r = pb::LoadRequest { layer_start: 2, ..request() };
        assert!(matches!(LoadSpec::try_from(r), Err(InvalidRequest::LayerRange { .. })));
        let r = pb::LoadRequest { wire_dtype: "f64".into(), ..request() };
        assert!(matches!(LoadSpec::try_from(r), Err(InvalidRequest::Dtype(_))));
        let r = pb::LoadRequest { next_stage: "10.0.0.1:7000".into(), ..request() };
        assert!(matches!(LoadSpec::try_from(r), Err(InvalidRequest::NextStage(_))));
        let r = pb::LoadRequest { shard_source: "10.0.0.1:7070".into(), ..request() };
        assert!(matches!(LoadSpec::try_from(r), Err(InvalidRequest::ShardSource(_))));
        let r = pb::LoadRequest { shard_source: "http://10.0.0.1:7070".into(), ..request() };
        assert_eq!(LoadSpec::try_from(r).expect("valid").shard_source.as_deref(), Some("http://10.0.0.1:7070"));
    }

    #[test]
    fn decodes_a_warm_request_and_rejects_bad_shards() {
        let shard = |start, end, digest: &str| pb::WarmShard {
            layer_start: start,
            layer_end: end,
            shard_digest: digest.into(),
        };
        let r = pb::WarmRequest { shards: vec![shard(0, 10, "ab"), shard(10, 30, "cd")], shard_source: String::new() };
        let s = WarmSpec::try_from(r).expect("valid");
        assert_eq!(s.shards, vec![(0..10, "ab".to_string()), (10..30, "cd".to_string())]);
        assert_eq!(s.shard_source, None);
        let r = pb::WarmRequest { shards: vec![shard(3, 3, "ab")], shard_source: String::new() };
        assert!(matches!(WarmSpec::try_from(r), Err(InvalidRequest::LayerRange { .. })));
        let r = pb::WarmRequest { shards: vec![shard(0, 3, "../x")], shard_source: String::new() };
        assert!(matches!(WarmSpec::try_from(r), Err(InvalidRequest::Digest(_))));
    }
}
