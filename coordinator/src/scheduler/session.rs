//! A session as the scheduler keeps it: its tokens (prompt and generated, so
//! it can be replayed on any pipeline), how far they have been sent, and the
//! bounded channel its consumer reads events from.

use std::time::Instant;

use potluck_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::pipeline::{Finish, Token};

/// Events buffered toward a session's consumer. A session is not scheduled
/// again while its consumer lags this far behind, so a slow client slows
/// only its own stream.
pub const SESSION_BUFFER: usize = 16;

/// What a session's consumer receives.
#[derive(Debug)]
pub enum SessionEvent {
    /// A generated token (never an end-of-sequence token).
    Token(Token),
    /// Generation ended; no more events follow.
    Finished(Finish),
    /// The session could not go on; no more events follow.
    Failed(SessionFailure),
}

/// Why a session ended without finishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionFailure {
    /// No pipeline could be formed from the workers left within the failover timeout.
    NoCapacity(String),
    /// The session itself could not be served (it failed on every replay).
    Pipeline(String),
}

impl std::fmt::Display for SessionFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoCapacity(m) => write!(f, "no capacity: {m}"),
            Self::Pipeline(m) => write!(f, "pipeline failed: {m}"),
        }
    }
}

/// A running generation. Dropping it cancels the session and frees its KV
/// cache on every stage.
#[derive(Debug)]
pub struct SessionStream {
    /// The session's id on the workers.
    pub session: u64,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    pub(crate) events: mpsc::Receiver<SessionEvent>,
}

impl SessionStream {
    /// The next event; `None` only if the scheduler is gone.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        self.events.recv().await
    }
}

/// One session in the scheduler.
pub(super) struct Session {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub sampling: pb::Sampling,
    pub reserved: usize,
    /// Tokens handed to the pipeline (their rows sent).
    pub sent: usize,
    pub in_flight: bool,
    /// Dispatch order: the smallest goes first.
    pub turn: u64,
    pub events: mpsc::Sender<SessionEvent>,
    pub arrived: Instant,
    pub last_token: Option<Instant>,
    /// Failovers since this session's last token: one that fails every
    /// pipeline it meets is given up on rather than replayed for ever.
    pub replays: u32,
    pub span: tracing::Span,
}

impl Session {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Whether it has rows to send, none in flight, and room for the events they bring back
    /// (a token and the end of the stream).
    pub fn ready(&self) -> bool {
        !self.in_flight && self.sent < self.tokens.len() && self.events.capacity() >= 2
    }

    /// Forgets what the pipeline holds: its tokens go again from the first.
    pub fn rewind(&mut self) -> bool {
        let moved = self.sent > 0;
        self.sent = 0;
        self.in_flight = false;
        moved
    }
}
