//! Coordinator election on etcd. Each coordinator holds a lease and tries to
//! create `/potluck/<cluster>/leader` under it in one transaction (create only
//! if absent); the one that succeeds leads until its lease goes. Standbys poll
//! the key, so when the leader dies its lease runs out and a standby takes
//! over within about one TTL plus one poll.
//!
//! The leader's key's create revision is its fencing token: plan writes are
//! transactions that succeed only while that key is still the one it created.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use potluck_etcd::{EtcdClient, LeaderRecord, LeaseKeeper};
use tokio::sync::watch;

/// How often a standby looks at the leader key.
pub const DEFAULT_POLL: Duration = Duration::from_millis(500);

/// This coordinator's part in the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It plans and serves.
    Leader,
    /// Another coordinator leads (if known); requests go there.
    Standby(Option<LeaderRecord>),
}

/// One coordinator's campaign.
#[derive(Debug)]
pub struct Election {
    client: EtcdClient,
    key: String,
    me: LeaderRecord,
    ttl: Duration,
    role: watch::Sender<Role>,
    /// Create revision of our leader key while we lead.
    token: Mutex<Option<i64>>,
}

impl Election {
    /// A campaign for `key` as `me`, with leases of `ttl`. Starts as a standby.
    pub fn new(client: EtcdClient, key: String, me: LeaderRecord, ttl: Duration) -> Arc<Self> {
        Arc::new(Self { client, key, me, ttl, role: watch::channel(Role::Standby(None)).0, token: Mutex::default() })
    }

    /// The role, as it changes.
    pub fn role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// This coordinator's record.
    pub fn me(&self) -> &LeaderRecord {
        &self.me
    }

    /// The leader key and its create revision, while we lead (the guard of plan writes).
    pub fn fencing_token(&self) -> Option<(&str, i64)> {
        let t = *self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        t.map(|rev| (self.key.as_str(), rev))
    }

    fn set(&self, role: Role, token: Option<i64>) {
        *self.token.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = token;
        self.role.send_if_modified(|r| {
            let changed = *r != role;
            if changed {
                tracing::info!(?role, "coordinator role");
            }
            *r = role;
            changed
        });
    }

    /// Campaigns until `stop` turns true, then resigns (revokes the lease, so a
    /// standby takes over at once).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let value = match serde_json::to_vec(&self.me) {
            Ok(v) => v,
            Err(e) => return tracing::error!(error = %e, "cannot encode the leader record"),
        };
        loop {
            let mut lease = match LeaseKeeper::grant(&self.client, self.ttl).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "election: no lease from etcd yet");
                    if wait(&mut stop, DEFAULT_POLL).await {
                        return;
                    }
                    continue;
                }
            };
            let stopped = self.hold(&mut lease, &value, &mut stop).await;
            self.set(Role::Standby(None), None);
            if stopped {
                lease.revoke().await;
                return;
            }
        }
    }

    /// Campaigns and leads on one lease; returns whether we were told to stop
    /// (`false`: the lease was lost).
    async fn hold(&self, lease: &mut LeaseKeeper, value: &[u8], stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            let leading = self.fencing_token().is_some();
            if !leading {
                match self.client.create(&self.key, value.to_vec(), lease.id()).await {
                    Ok((true, _)) => match self.client.get(&self.key).await {
                        Ok(Some(kv)) if kv.lease == lease.id() => self.set(Role::Leader, Some(kv.create_revision)),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "election: reading our leader key"),
                    },
                    Ok((false, holder)) => {
                        let record =
                            holder.as_ref().and_then(|kv| serde_json::from_slice::<LeaderRecord>(&kv.value).ok());
                        match (holder, record) {
                            // Our own key from a lease we lost (etcd was away): take it back now
                            // rather than wait for that lease to run out.
                            (Some(kv), Some(r)) if r.id == self.me.id && kv.lease != lease.id() => {
                                if let Err(e) = self.client.delete_if_created_at(&self.key, kv.create_revision).await {
                                    tracing::warn!(error = %e, "election: clearing our stale leader key");
                                }
                                continue;
                            }
                            (_, record) => self.set(Role::Standby(record), None),
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "election: campaign failed"),
                }
            }
            let pause = if self.fencing_token().is_some() { lease.ttl() / 3 } else { DEFAULT_POLL };
            if wait(stop, pause).await {
                return true;
            }
            if !lease.refresh().await {
                tracing::warn!("election: lease lost");
                return false;
            }
        }
    }
}

/// Sleeps `d`; `true` if `stop` turned true meanwhile.
async fn wait(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    let woken = tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    woken || *stop.borrow()
}
