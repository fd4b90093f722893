//! Membership read from etcd: every worker key under
//! `/potluck/<cluster>/workers/`, followed with a watch. Workers write their
//! own keys under leases, so a dead worker's key (and its membership) goes
//! when its lease runs out.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use potluck_etcd::{ClusterKeys, EtcdClient, KeyValue, WatchEvent, WorkerRecord};
use tokio::sync::watch;

use crate::membership::{in_join_order, Membership, MembershipError, WorkerInfo};

/// Pause before re-reading after etcd went away.
const RETRY: Duration = Duration::from_millis(500);

/// Workers as etcd lists them, kept current by a background watch.
#[derive(Debug)]
pub struct EtcdMembership {
    workers: Mutex<BTreeMap<String, WorkerInfo>>,
    version: watch::Sender<u64>,
}

impl EtcdMembership {
    /// Starts following `keys.workers()`; the task ends when the membership is dropped.
    pub fn start(client: EtcdClient, keys: &ClusterKeys) -> Arc<Self> {
        let me = Arc::new(Self { workers: Mutex::default(), version: watch::channel(0).0 });
        let weak = Arc::downgrade(&me);
        let prefix = keys.workers();
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = me.follow(&client, &prefix).await {
                    tracing::warn!(error = %e, "etcd membership watch interrupted; re-reading");
                }
                drop(me);
                tokio::time::sleep(RETRY).await;
            }
        });
        me
    }

    /// Reads the prefix, then applies watch events until the watch breaks.
    async fn follow(&self, client: &EtcdClient, prefix: &str) -> Result<(), potluck_etcd::EtcdError> {
        let (kvs, revision) = client.get_prefix(prefix).await?;
        let fresh: BTreeMap<String, WorkerInfo> = kvs.iter().filter_map(|kv| parse(prefix, kv)).collect();
        self.replace(fresh);
        let mut watch = client.watch_prefix(prefix, revision + 1).await?;
        loop {
            let events = watch.next().await?;
            let mut w = self.lock();
            let before = w.clone();
            for e in events {
                match e {
                    WatchEvent::Put(kv) => {
                        if let Some((id, info)) = parse(prefix, &kv) {
                            w.insert(id, info);
                        }
                    }
                    WatchEvent::Delete(key) => {
                        if let Some(id) = key.strip_prefix(prefix) {
                            w.remove(id);
                        }
                    }
                }
            }
            let changed = *w != before;
            drop(w);
            if changed {
                self.version.send_modify(|v| *v += 1);
            }
        }
    }

    fn replace(&self, fresh: BTreeMap<String, WorkerInfo>) {
        let mut w = self.lock();
        if *w != fresh {
            *w = fresh;
            drop(w);
            self.version.send_modify(|v| *v += 1);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, WorkerInfo>> {
        self.workers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A worker key's value; a malformed one is logged and skipped, never fatal.
fn parse(prefix: &str, kv: &KeyValue) -> Option<(String, WorkerInfo)> {
    let id = kv.key.strip_prefix(prefix)?.to_string();
    let r: WorkerRecord = match serde_json::from_slice(&kv.value) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(key = %kv.key, error = %e, "ignoring a malformed worker record");
            return None;
        }
    };
    if r.id != id || !(r.address.starts_with("http://") || r.address.starts_with("https://")) {
        tracing::warn!(key = %kv.key, "ignoring a worker record whose id or address is wrong");
        return None;
    }
    let info = WorkerInfo {
        id: r.id,
        address: r.address,
        device: r.device,
        threads: r.threads,
        free_memory_bytes: r.free_memory_bytes,
        device_info: r.device_info,
        version: r.version,
        joined: u64::try_from(kv.create_revision).unwrap_or(0),
        layer_micros: r.layer_micros,
        instance: r.instance,
    };
    Some((id, info))
}

impl Membership for EtcdMembership {
    fn join(&self, _worker: WorkerInfo) -> Result<(), MembershipError> {
        Err(MembershipError::ManagedByEtcd)
    }

    fn leave(&self, _id: &str) -> Result<bool, MembershipError> {
        Err(MembershipError::ManagedByEtcd)
    }

    fn workers(&self) -> Vec<WorkerInfo> {
        in_join_order(self.lock().values())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue { key: key.into(), value: value.as_bytes().to_vec(), create_revision: 7, mod_revision: 7, lease: 1 }
    }

    #[test]
    fn records_parse_or_are_skipped() {
        let p = "/potluck/c/workers/";
        let good = r#"{"id":"w1","address":"http://127.0.0.1:1","device":"cpu","threads":2,"free_memory_bytes":9,"version":"0.1.0","layer_micros":12.5,"instance":"x"}"#;
        let (id, w) = parse(p, &kv("/potluck/c/workers/w1", good)).expect("parses");
        assert_eq!((id.as_str(), w.joined, w.layer_micros), ("w1", 7, Some(12.5)));
        assert!(parse(p, &kv("/potluck/c/workers/w2", good)).is_none(), "id must match the key");
        assert!(parse(p, &kv("/potluck/c/workers/w1", "{not json")).is_none());
        let bad_addr = good.replace("http://127.0.0.1:1", "127.0.0.1:1");
        assert!(parse(p, &kv("/potluck/c/workers/w1", &bad_addr)).is_none());
    }
}
