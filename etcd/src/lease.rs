//! Leases: granted with a TTL, kept alive over one stream, revoked on a clean exit.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::EtcdClient;
use crate::error::EtcdError;
use crate::pb;

impl EtcdClient {
    /// Grants a lease of `ttl` (etcd may raise very short TTLs to its minimum);
    /// returns its id and granted TTL.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let req = pb::LeaseGrantRequest { ttl: secs, id: 0 };
        let reply = self
            .unary("Lease.Grant", req, |ch, r| async move { pb::lease_client::LeaseClient::new(ch).lease_grant(r).await })
            .await?;
        if !reply.error.is_empty() {
            return Err(EtcdError::Rpc { rpc: "Lease.Grant", code: tonic::Code::Unknown, message: reply.error });
        }
        Ok((reply.id, Duration::from_secs(u64::try_from(reply.ttl).unwrap_or(1))))
    }

    /// Revokes a lease: every key attached to it goes at once.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let req = pb::LeaseRevokeRequest { id: lease };
        self.unary("Lease.Revoke", req, |ch, r| async move { pb::lease_client::LeaseClient::new(ch).lease_revoke(r).await })
            .await?;
        Ok(())
    }

    /// Seconds left on a lease (`None` once it is gone).
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let req = pb::LeaseTimeToLiveRequest { id: lease, keys: false };
        let reply = self
            .unary("Lease.TimeToLive", req, |ch, r| async move {
                pb::lease_client::LeaseClient::new(ch).lease_time_to_live(r).await
            })
            .await?;
        Ok((reply.ttl > 0).then_some(reply.ttl))
    }

    /// Opens a keep-alive stream for `lease`.
    pub async fn keep_alive(&self, lease: i64) -> Result<KeepAlive, EtcdError> {
        let (tx, rx) = mpsc::channel(4);
        let mut client = pb::lease_client::LeaseClient::new(self.channel.clone());
        let opened = tokio::time::timeout(
            self.call_timeout(),
            client.lease_keep_alive(self.request(ReceiverStream::new(rx))),
        )
        .await;
        let replies = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(EtcdError::rpc("Lease.KeepAlive", &s)),
            Err(_) => return Err(EtcdError::Timeout { rpc: "Lease.KeepAlive", after: self.call_timeout() }),
        };
        Ok(KeepAlive { lease, tx, replies, timeout: self.call_timeout() })
    }
}

/// An open keep-alive stream for one lease.
#[derive(Debug)]
pub struct KeepAlive {
    lease: i64,
    tx: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    replies: tonic::Streaming<pb::LeaseKeepAliveResponse>,
    timeout: Duration,
}

impl KeepAlive {
    /// Refreshes the lease once; returns the TTL it now has. A lease etcd no
    /// longer knows (TTL 0) is [`EtcdError::LeaseLost`].
    pub async fn refresh(&mut self) -> Result<Duration, EtcdError> {
        let ended = |reason: String| EtcdError::StreamEnded { rpc: "Lease.KeepAlive", reason };
        self.tx.send(pb::LeaseKeepAliveRequest { id: self.lease }).await.map_err(|_| ended("closed".into()))?;
        let reply = match tokio::time::timeout(self.timeout, self.replies.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Err(ended("etcd closed it".into())),
            Ok(Err(s)) => return Err(EtcdError::rpc("Lease.KeepAlive", &s)),
            Err(_) => return Err(EtcdError::Timeout { rpc: "Lease.KeepAlive", after: self.timeout }),
        };
        if reply.ttl <= 0 {
            return Err(EtcdError::LeaseLost(self.lease));
        }
        Ok(Duration::from_secs(u64::try_from(reply.ttl).unwrap_or(1)))
    }
}
