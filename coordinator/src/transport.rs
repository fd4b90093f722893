//! The seam between the scheduler and the pipeline: the scheduler opens a
//! link to stage 0 of a plan epoch, sends micro-batches down it, and reads
//! each reply (or the link's failure) as a [`LinkEvent`].
//!
//! The gRPC stream (`stage_link.rs`) is the implementation a cluster runs;
//! an in-process one over the engine's stages (`in_process.rs`, tests only)
//! lets the scheduler's batching, cancellation, pause, failover and replay
//! be driven, and failures injected, in the debug suite.

use std::future::Future;

use potluck_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::error::CoordinatorError;
use crate::planner::StagePlan;

/// Replies buffered from a link to the scheduler before the link waits: the
/// scheduler drains them at every turn, so this only bounds a burst.
pub const LINK_EVENT_BUFFER: usize = 256;

/// One reply (or the end of the stream) from a link.
#[derive(Debug)]
pub(crate) struct LinkEvent {
    /// Which link it came from, so replies of a replaced link are ignored.
    pub link: u64,
    /// The reply, or why the stream ended.
    pub reply: Result<pb::ForwardReply, String>,
}

/// Where a link delivers its events.
pub(crate) type LinkEvents = mpsc::Sender<LinkEvent>;

/// Hands one reply of link `link` to the scheduler; `false` once the link's
/// reader should stop (the stream ended, or the scheduler is gone).
pub(crate) async fn deliver(events: &LinkEvents, link: u64, reply: Result<pb::ForwardReply, String>) -> bool {
    let end = reply.is_err();
    events.send(LinkEvent { link, reply }).await.is_ok() && !end
}

/// A link's identity: which link, on which plan epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkKey {
    /// Distinguishes a link's events from those of links it replaced.
    pub id: u64,
    /// The plan epoch stamped on every micro-batch.
    pub epoch: u64,
}

/// Opens links to the first stage of a plan.
pub(crate) trait Transport: Send + Sync + 'static {
    /// The open stream.
    type Link: Link;

    /// Opens a stream to `first` for `key.epoch`; its replies go to `events`, tagged `key.id`.
    fn open(
        &self,
        key: LinkKey,
        first: &StagePlan,
        events: LinkEvents,
    ) -> impl Future<Output = Result<Self::Link, CoordinatorError>> + Send;

    /// Frees `sessions` on every stage through `first` when no link is open
    /// (the one that carried them broke), so surviving stages do not keep their caches.
    fn release_at(&self, first: &StagePlan, sessions: Vec<u64>);
}

/// An open stream to stage 0 of one plan epoch.
pub(crate) trait Link: Send + Sync + 'static {
    /// Which link this is, on which epoch.
    fn key(&self) -> LinkKey;

    /// Sends one micro-batch (the epoch and trace are stamped here).
    fn send(
        &self,
        batch_id: u64,
        rows: Vec<pb::Row>,
        tokens: Vec<u32>,
    ) -> impl Future<Output = Result<(), CoordinatorError>> + Send;

    /// Frees `sessions` on every stage, in the background.
    fn release(&self, sessions: Vec<u64>);
}
