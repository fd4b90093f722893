//! Prefix watches: every put and delete under a prefix, from a given revision.

use etcd_client::{EventType, WatchOptions, WatchStream};

use crate::client::{EtcdClient, KeyValue};
use crate::error::EtcdError;

/// One change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was written.
    Put(KeyValue),
    /// A key was deleted (or its lease ran out); the key's name.
    Delete(String),
}

impl EtcdClient {
    /// Watches every key under `prefix`, from `start_revision` (0 = from now).
    /// etcd refuses a watch whose auth token has expired by cancelling it at
    /// once; the token is then renewed and the watch opened once more.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<Watch, EtcdError> {
        match self.open_watch(prefix, start_revision).await {
            Err(e) if e.is_token_error() => {
                self.refresh_token().await?;
                self.open_watch(prefix, start_revision).await
            }
            other => other,
        }
    }

    /// Opens the watch and waits for etcd to confirm (or refuse) it.
    async fn open_watch(&self, prefix: &str, start_revision: i64) -> Result<Watch, EtcdError> {
        let options = WatchOptions::new().with_prefix().with_start_revision(start_revision);
        let mut client = self.inner.watch_client();
        let stream = self.call("Watch", client.watch(prefix, Some(options))).await?;
        let mut watch = Watch { stream, pending: Vec::new() };
        let first = self.call("Watch", watch.stream.message()).await?;
        watch.pending = watch.events(first)?;
        Ok(watch)
    }
}

/// An open watch.
#[derive(Debug)]
pub struct Watch {
    stream: WatchStream,
    /// Events that came with etcd's confirmation, not yet handed out.
    pending: Vec<WatchEvent>,
}

impl Watch {
    /// The next batch of changes (waits as long as it takes). An error means the
    /// watch is over (etcd restarted, compacted past us, or cancelled): re-read and re-watch.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, EtcdError> {
        if !self.pending.is_empty() {
            return Ok(std::mem::take(&mut self.pending));
        }
        loop {
            let reply = self.stream.message().await.map_err(|e| EtcdError::from_client("Watch", e))?;
            let events = self.events(reply)?;
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    /// A reply's events; an ended or cancelled watch is an error saying why.
    fn events(&self, reply: Option<etcd_client::WatchResponse>) -> Result<Vec<WatchEvent>, EtcdError> {
        let ended = |reason: String| EtcdError::StreamEnded { rpc: "Watch", reason };
        let Some(reply) = reply else { return Err(ended("etcd closed it".into())) };
        if reply.canceled() || reply.compact_revision() > 0 {
            return Err(ended(if reply.cancel_reason().is_empty() {
                format!("cancelled (compacted at {})", reply.compact_revision())
            } else {
                reply.cancel_reason().to_string()
            }));
        }
        Ok(reply
            .events()
            .iter()
            .filter_map(|e| {
                let kv = KeyValue::from(e.kv()?);
                Some(match e.event_type() {
                    EventType::Delete => WatchEvent::Delete(kv.key),
                    EventType::Put => WatchEvent::Put(kv),
                })
            })
            .collect())
    }
}
