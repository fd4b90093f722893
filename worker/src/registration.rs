//! Registration in etcd: the worker's record under
//! `/potluck/<cluster>/workers/<id>`, attached to a lease it keeps alive.
//! If the lease is lost (etcd restarted without it, or was unreachable for a
//! whole TTL) the worker registers again with a new one; no restart needed.
//! On a graceful stop it revokes the lease, so its key goes at once.

use std::time::Duration;

use potluck_etcd::{ClusterKeys, EtcdClient, LeaseKeeper, ModelShape, WorkerRecord};
use tokio::sync::watch;

/// Pause before retrying an unreachable etcd.
const RETRY: Duration = Duration::from_millis(500);

/// One worker's registration.
#[derive(Debug)]
pub(crate) struct Registration {
    /// Connected client.
    pub client: EtcdClient,
    /// The cluster's keys.
    pub keys: ClusterKeys,
    /// What is written (its probe figure fills in once the model shape is known).
    pub record: WorkerRecord,
    /// Lease TTL.
    pub ttl: Duration,
    /// Threads for the probe.
    pub threads: usize,
    /// The device the probe (and every stage) runs on.
    pub device: potluck_engine::Device,
}

impl Registration {
    /// Keeps the worker registered until `stopping` turns true, then deregisters.
    /// After a freeze (counted by `freezes`) it registers again as a new
    /// instance, since the coordinator has fenced the old one.
    pub async fn run(mut self, mut stopping: watch::Receiver<bool>, mut freezes: watch::Receiver<u64>) {
        let key = self.keys.worker(&self.record.id);
        let first_instance = self.record.instance.clone();
        loop {
            self.probe_once().await;
            let lease = match LeaseKeeper::grant(&self.client, self.ttl).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "registration: etcd unreachable; retrying");
                    None
                }
            };
            let Some(mut lease) = lease else {
                if stopped(&mut stopping, RETRY).await {
                    return;
                }
                continue;
            };
            if let Err(e) = self.put(&key, lease.id()).await {
                tracing::warn!(error = %e, "registration: write failed; retrying");
                lease.revoke().await;
                if stopped(&mut stopping, RETRY).await {
                    return;
                }
                continue;
            }
            tracing::info!(key, lease = format!("{:x}", lease.id()), ttl = ?lease.ttl(), "registered in etcd");
            loop {
                if stopped(&mut stopping, lease.ttl() / 3).await {
                    lease.revoke().await;
                    tracing::info!(key, "deregistered from etcd");
                    return;
                }
                if freezes.has_changed().unwrap_or(false) {
                    let n = *freezes.borrow_and_update();
                    self.record.instance = format!("{first_instance}-{n}");
                    lease.revoke().await;
                    tracing::warn!(key, "registering again as a new member after a freeze");
                    break;
                }
                let alive = tokio::select! {
                    alive = lease.refresh() => Some(alive),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                match alive {
                    None => {
                        lease.revoke().await;
                        tracing::info!(key, "deregistered from etcd");
                        return;
                    }
                    Some(false) => {
                        tracing::warn!(key, "registration lease lost; registering again");
                        break;
                    }
                    Some(true) => {}
                }
                if self.record.layer_micros.is_none() && self.probe_once().await {
                    if let Err(e) = self.put(&key, lease.id()).await {
                        tracing::warn!(error = %e, "registration: could not publish the probe figure");
                    }
                }
            }
        }
    }

    async fn put(&self, key: &str, lease: i64) -> Result<(), potluck_etcd::EtcdError> {
        let value = serde_json::to_vec(&self.record)
            .map_err(|e| potluck_etcd::EtcdError::Config(format!("encoding the worker record: {e}")))?;
        self.client.put(key, value, lease).await.map(drop)
    }

    /// Runs the probe if the model's shape is published and it has not run yet; `true` if it ran now.
    async fn probe_once(&mut self) -> bool {
        if self.record.layer_micros.is_some() {
            return false;
        }
        let shape = match self.client.get(&self.keys.model()).await {
            Ok(Some(kv)) => match serde_json::from_slice::<ModelShape>(&kv.value) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "the published model shape is malformed; not probing");
                    return false;
                }
            },
            Ok(None) | Err(_) => return false,
        };
        let (threads, device) = (self.threads, self.device);
        match tokio::task::spawn_blocking(move || crate::probe::layer_micros(&shape, threads, device)).await {
            Ok(Ok(us)) => {
                tracing::info!(layer_micros = us, "start-up probe");
                self.record.layer_micros = Some(us);
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "start-up probe failed");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "start-up probe task failed");
                false
            }
        }
    }
}

/// Waits `d`; `true` if the worker is stopping.
async fn stopped(stopping: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stopping.borrow() {
        return true;
    }
    let woken = tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = stopping.wait_for(|s| *s) => true,
    };
    woken || *stopping.borrow()
}
