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
        let reply =
            self.unary("Lease.Grant", req, |ch, r| async move {
                pb::lease_client::LeaseClient::new(ch).lease_grant(r).await
            })
            .await?;
        if !reply.error.is_empty() {
            return Err(EtcdError::Rpc { rpc: "Lease.Grant", code: tonic::Code::Unknown, message: reply.error });
        }
        Ok((reply.id, Duration::from_secs(u64::try_from(reply.ttl).unwrap_or(1))))
    }

    /// Revokes a lease: every key attached to it goes at once.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let req = pb::LeaseRevokeRequest { id: lease };
        self.unary(
            "Lease.Revoke",
            req,
            |ch, r| async move { pb::lease_client::LeaseClient::new(ch).lease_revoke(r).await },
        )
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

    /// Opens a keep-alive stream for `lease`, refreshing it once on the way
    /// (etcd sends the stream's headers only with its first reply, so the first
    /// request must be on its way before the call can complete).
    pub async fn keep_alive(&self, lease: i64) -> Result<KeepAlive, EtcdError> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::LeaseKeepAliveRequest { id: lease })
            .await
            .map_err(|_| EtcdError::StreamEnded { rpc: "Lease.KeepAlive", reason: "closed".into() })?;
        let mut client = pb::lease_client::LeaseClient::new(self.channel.clone());
        let opened =
            tokio::time::timeout(self.call_timeout(), client.lease_keep_alive(self.request(ReceiverStream::new(rx))))
                .await;
        let replies = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(EtcdError::rpc("Lease.KeepAlive", &s)),
            Err(_) => return Err(EtcdError::Timeout { rpc: "Lease.KeepAlive", after: self.call_timeout() }),
        };
        let mut keep = KeepAlive { lease, tx, replies, timeout: self.call_timeout() };
        keep.receive().await?;
        Ok(keep)
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
        self.tx
            .send(pb::LeaseKeepAliveRequest { id: self.lease })
            .await
            .map_err(|_| EtcdError::StreamEnded { rpc: "Lease.KeepAlive", reason: "closed".into() })?;
        self.receive().await
    }

    async fn receive(&mut self) -> Result<Duration, EtcdError> {
        let ended = |reason: String| EtcdError::StreamEnded { rpc: "Lease.KeepAlive", reason };
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

/// Pause between attempts to reach etcd again while keeping a lease.
const RETRY: Duration = Duration::from_millis(200);

/// A lease held for as long as this process wants it: refreshed over a
/// keep-alive stream that is reopened after etcd restarts. Shared by worker
/// registration and the coordinators' election.
#[derive(Debug)]
pub struct LeaseKeeper {
    client: EtcdClient,
    lease: i64,
    ttl: Duration,
    stream: Option<KeepAlive>,
}

impl LeaseKeeper {
    /// Grants a fresh lease of `ttl`.
    pub async fn grant(client: &EtcdClient, ttl: Duration) -> Result<Self, EtcdError> {
        let (lease, granted) = client.grant(ttl).await?;
        Ok(Self { client: client.clone(), lease, ttl: granted, stream: None })
    }

    /// The lease id, to attach keys to.
    pub fn id(&self) -> i64 {
        self.lease
    }

    /// The TTL etcd granted; refresh well within it (a third is customary).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Refreshes the lease. `false` means it is lost: etcd says it is gone, or
    /// etcd could not be reached for a whole TTL (someone else may hold what it guarded).
    pub async fn refresh(&mut self) -> bool {
        let give_up = tokio::time::Instant::now() + self.ttl;
        loop {
            let outcome = match self.stream.as_mut() {
                // Opening the stream refreshes the lease once.
                None => self.client.keep_alive(self.lease).await.map(|s| self.stream = Some(s)),
                Some(s) => s.refresh().await.map(drop),
            };
            match outcome {
                Ok(()) => return true,
                Err(EtcdError::LeaseLost(_)) => return false,
                Err(e) => {
                    tracing::debug!(lease = self.lease, error = %e, "keep-alive interrupted; reopening");
                    self.stream = None;
                }
            }
            if tokio::time::Instant::now() >= give_up {
                return false;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Revokes the lease (best effort: it expires on its own otherwise).
    pub async fn revoke(self) {
        if let Err(e) = self.client.revoke(self.lease).await {
            tracing::warn!(lease = self.lease, error = %e, "could not revoke the lease; it will expire");
        }
    }
}
