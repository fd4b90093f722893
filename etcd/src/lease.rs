//! Leases: granted with a TTL, kept alive over one stream, revoked on a clean exit.

use std::time::Duration;

use crate::client::EtcdClient;
use crate::error::EtcdError;

impl EtcdClient {
    /// Grants a lease of `ttl` (etcd may raise very short TTLs to its minimum);
    /// returns its id and granted TTL.
    pub async fn grant(&self, ttl: Duration) -> Result<(i64, Duration), EtcdError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let mut lease = self.inner.lease_client();
        let reply = self.call("Lease.Grant", lease.grant(secs, None)).await?;
        if !reply.error().is_empty() {
            return Err(EtcdError::Rpc {
                rpc: "Lease.Grant",
                code: tonic::Code::Unknown,
                message: reply.error().to_string(),
            });
        }
        Ok((reply.id(), ttl_of(reply.ttl())))
    }

    /// Revokes a lease: every key attached to it goes at once.
    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let mut client = self.inner.lease_client();
        self.call("Lease.Revoke", client.revoke(lease)).await.map(drop)
    }

    /// Seconds left on a lease (`None` once it is gone).
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let mut client = self.inner.lease_client();
        let reply = self.call("Lease.TimeToLive", client.time_to_live(lease, None)).await?;
        Ok((reply.ttl() > 0).then_some(reply.ttl()))
    }

    /// Opens a keep-alive stream for `lease`, refreshing it once on the way.
    /// A refused auth token is renewed and the stream opened once more.
    pub async fn keep_alive(&self, lease: i64) -> Result<KeepAlive, EtcdError> {
        match self.open_keep_alive(lease).await {
            Err(e) if e.is_token_error() => {
                self.refresh_token().await?;
                self.open_keep_alive(lease).await
            }
            other => other,
        }
    }

    async fn open_keep_alive(&self, lease: i64) -> Result<KeepAlive, EtcdError> {
        let mut client = self.inner.lease_client();
        match self.call("Lease.KeepAlive", client.keep_alive(lease)).await {
            Ok((sender, replies)) => Ok(KeepAlive { lease, sender, replies, timeout: self.call_timeout() }),
            // etcd-client's words for a first reply with TTL 0.
            Err(EtcdError::StreamEnded { reason, .. }) if reason.contains("lease not found") => {
                Err(EtcdError::LeaseLost(lease))
            }
            Err(e) => Err(e),
        }
    }
}

/// A TTL in etcd's seconds as a duration (never below one second).
fn ttl_of(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs).unwrap_or(1).max(1))
}

/// An open keep-alive stream for one lease.
#[derive(Debug)]
pub struct KeepAlive {
    lease: i64,
    sender: etcd_client::LeaseKeeper,
    replies: etcd_client::LeaseKeepAliveStream,
    timeout: Duration,
}

impl KeepAlive {
    /// Refreshes the lease once; returns the TTL it now has. A lease etcd no
    /// longer knows (TTL 0) is [`EtcdError::LeaseLost`].
    pub async fn refresh(&mut self) -> Result<Duration, EtcdError> {
        let rpc = "Lease.KeepAlive";
        self.sender.keep_alive().await.map_err(|e| EtcdError::from_client(rpc, e))?;
        let reply = match tokio::time::timeout(self.timeout, self.replies.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => return Err(EtcdError::StreamEnded { rpc, reason: "etcd closed it".into() }),
            Ok(Err(e)) => return Err(EtcdError::from_client(rpc, e)),
            Err(_) => return Err(EtcdError::Timeout { rpc, after: self.timeout }),
        };
        if reply.ttl() <= 0 {
            return Err(EtcdError::LeaseLost(self.lease));
        }
        Ok(ttl_of(reply.ttl()))
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
