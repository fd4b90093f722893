//! Counters that show the coordinator is not a hub: it sends and receives
//! only token-sized messages, while hidden states go worker to worker.
//!
//! The coordinator counts its own `Forward` traffic; per-stage hidden-state
//! bytes come from each worker's `Info`, asked only when `/v1/cluster` is read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use potluck_proto::v1 as pb;
use serde_json::{json, Value};

use crate::stage_rpc::StageRpc;

/// How long `/v1/cluster` waits for one stage's `Info` before showing nulls.
pub const INFO_TIMEOUT: Duration = Duration::from_millis(500);

/// Messages and encoded bytes on the coordinator's streams to stage 0.
#[derive(Debug, Default)]
pub struct Traffic {
    requests: AtomicU64,
    request_bytes: AtomicU64,
    replies: AtomicU64,
    reply_bytes: AtomicU64,
}

impl Traffic {
    /// Counts one `ForwardRequest` of `bytes` encoded bytes sent.
    pub fn request(&self, bytes: usize) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.request_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts one `ForwardReply` of `bytes` encoded bytes received.
    pub fn reply(&self, bytes: usize) {
        self.replies.fetch_add(1, Ordering::Relaxed);
        self.reply_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The counters as `/v1/cluster` shows them.
    pub fn to_json(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "forward_requests": get(&self.requests),
            "forward_request_bytes": get(&self.request_bytes),
            "forward_replies": get(&self.replies),
            "forward_reply_bytes": get(&self.reply_bytes),
        })
    }
}

/// What the stage at `address` reports about itself (`Info`), or `None` if it
/// does not answer within [`INFO_TIMEOUT`]. Asked only when `/v1/cluster` or
/// `/metrics` is read: the forward path never waits on it.
pub async fn stage_info(rpc: &StageRpc, address: &str) -> Option<pb::InfoReply> {
    rpc.call(address, "Info", INFO_TIMEOUT, |mut c| async move { c.info(pb::InfoRequest {}).await }).await.ok()
}
