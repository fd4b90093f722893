//! Prefix watches: every put and delete under a prefix, from a given revision.

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{prefix_end, EtcdClient, KeyValue};
use crate::error::EtcdError;
use crate::pb;

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
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<Watch, EtcdError> {
        let key = prefix.as_bytes().to_vec();
        let create = pb::WatchCreateRequest {
            range_end: prefix_end(&key),
            key,
            start_revision,
            progress_notify: false,
            prev_kv: false,
        };
        let (tx, rx) = mpsc::channel(1);
        tx.send(pb::WatchRequest { request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)) })
            .await
            .map_err(|_| EtcdError::StreamEnded { rpc: "Watch", reason: "closed".into() })?;
        let mut client = pb::watch_client::WatchClient::new(self.channel.clone());
        let opened =
            tokio::time::timeout(self.call_timeout(), client.watch(self.request(ReceiverStream::new(rx)))).await;
        let replies = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(EtcdError::rpc("Watch", &s)),
            Err(_) => return Err(EtcdError::Timeout { rpc: "Watch", after: self.call_timeout() }),
        };
        Ok(Watch { _tx: tx, replies })
    }
}

/// An open watch.
#[derive(Debug)]
pub struct Watch {
    /// Kept so the request side stays open: closing it ends the watch.
    _tx: mpsc::Sender<pb::WatchRequest>,
    replies: tonic::Streaming<pb::WatchResponse>,
}

impl Watch {
    /// The next batch of changes (waits as long as it takes). An error means the
    /// watch is over (etcd restarted, compacted past us, or cancelled): re-read and re-watch.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>, EtcdError> {
        loop {
            let reply = match self.replies.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(EtcdError::StreamEnded { rpc: "Watch", reason: "etcd closed it".into() }),
                Err(s) => return Err(EtcdError::rpc("Watch", &s)),
            };
            if reply.canceled || reply.compact_revision > 0 {
                let reason = if reply.cancel_reason.is_empty() {
                    format!("cancelled (compacted at {})", reply.compact_revision)
                } else {
                    reply.cancel_reason
                };
                return Err(EtcdError::StreamEnded { rpc: "Watch", reason });
            }
            if reply.events.is_empty() {
                continue;
            }
            return Ok(reply
                .events
                .into_iter()
                .filter_map(|e| {
                    let kv = KeyValue::from(e.kv?);
                    Some(if e.r#type == pb::event::EventType::Delete as i32 {
                        WatchEvent::Delete(kv.key)
                    } else {
                        WatchEvent::Put(kv)
                    })
                })
                .collect());
        }
    }
}
