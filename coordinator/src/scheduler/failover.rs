//! Failover: when the pipeline fails unplanned (its stream breaks, a
//! micro-batch misses its deadline, the plan is withdrawn) the scheduler
//! drops what was in flight, rewinds every session to replay from its
//! tokens, tells the cluster, and holds everything until a plan of a new
//! epoch arrives. Sessions that wait longer than the failover timeout fail
//! as "no capacity".

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Core, Session, SessionEvent, SessionFailure, MAX_REPLAYS};
use crate::transport::Transport;

/// An unplanned failure of the pipeline, for the cluster to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageFailure {
    /// Counts failures, so two alike are still two.
    pub serial: u64,
    /// The epoch of the plan that failed.
    pub epoch: u64,
    /// What was seen (it names the stage when the pipeline told).
    pub message: String,
}

/// Whether the scheduler can serve now, for `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    /// No plan has been handed over yet.
    NoPlan,
    /// A plan is in force and working.
    Ready {
        /// Its epoch.
        epoch: u64,
    },
    /// The pipeline failed; sessions wait for a new plan.
    Failover {
        /// Why.
        reason: String,
        /// Since when.
        since: Instant,
    },
}

/// A failover under way: since when, and why.
pub(super) struct Failover {
    pub since: Instant,
    pub reason: String,
}

impl<T: Transport> Core<T> {
    /// The stream to stage 0 broke, or a micro-batch on it was lost.
    pub(super) fn link_broken(&mut self, message: &str) {
        self.link = None;
        self.inflight.clear();
        self.begin_failover(message, true);
    }

    /// Holds every session back until a plan of a new epoch arrives: what
    /// the pipeline held is gone, so each goes again from its tokens then.
    /// `report` tells the cluster, which finds the dead stage and re-plans.
    pub(super) fn begin_failover(&mut self, message: &str, report: bool) {
        let epoch = self.plan.as_ref().map_or(0, |p| p.epoch);
        if self.failover.is_none() {
            if self.sessions.is_empty() {
                tracing::info!(epoch, error = %message, "pipeline failed while idle");
            } else {
                tracing::warn!(epoch, error = %message, sessions = self.sessions.len(), "pipeline failed; failing over");
            }
            self.metrics.failovers.fetch_add(1, Ordering::Relaxed);
            self.metrics.record_event("failover", epoch, message);
            self.failover = Some(Failover { since: Instant::now(), reason: message.to_string() });
        }
        let mut given_up = Vec::new();
        for (&id, s) in &mut self.sessions {
            if s.in_flight || s.sent > 0 {
                s.replays += 1;
                if s.replays > MAX_REPLAYS {
                    given_up.push(id);
                }
            }
            s.rewind();
        }
        for id in given_up {
            self.fail(id, SessionFailure::Pipeline(format!("{message} (on {MAX_REPLAYS} pipelines in a row)")));
        }
        if report {
            self.failures.send_modify(|f| {
                let serial = f.as_ref().map_or(1, |f| f.serial + 1);
                *f = Some(StageFailure { serial, epoch, message: message.to_string() });
            });
        }
        if let Some(f) = &self.failover {
            self.serving.send_replace(Serving::Failover { reason: f.reason.clone(), since: f.since });
        }
        self.wake_pausers();
    }

    /// Fails the sessions and waiting requests that have waited out the failover timeout.
    pub(super) fn expire_waits(&mut self) {
        let Some(f) = &self.failover else { return };
        let (since, reason) = (f.since, f.reason.clone());
        let timeout = self.config.failover_timeout;
        let waited_out = |s: &Session| since.max(s.arrived).elapsed() > timeout;
        let message = format!("no pipeline for {timeout:?} after: {reason}");
        let expired: Vec<u64> = self.sessions.iter().filter(|(_, s)| waited_out(s)).map(|(&id, _)| id).collect();
        let (gone, kept): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|(_, s)| waited_out(s));
        self.waiting = kept.into();
        for (_, s) in gone {
            self.outbox.push((s.events, SessionEvent::Failed(SessionFailure::NoCapacity(message.clone()))));
        }
        for id in expired {
            self.fail(id, SessionFailure::NoCapacity(message.clone()));
        }
    }
}
