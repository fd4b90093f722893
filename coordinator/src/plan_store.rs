//! The coordinator's side of etcd beyond membership: the plan under
//! `/potluck/<cluster>/plan` (written only under the leader's fencing token)
//! and the model shape the workers' probe reads.

use std::sync::Arc;
use std::time::Duration;

use potluck_etcd::{ClusterKeys, EtcdClient, ModelShape, PlanRecord, PlanStageRecord};

use crate::error::CoordinatorError;
use crate::leader::Election;
use crate::planner::StagePlan;

/// Default TTL of the coordinators' election leases: a dead leader is
/// replaced after about this long.
pub const DEFAULT_LEADER_TTL: Duration = Duration::from_secs(5);

/// What a coordinator needs to run on etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// A connected client.
    pub client: EtcdClient,
    /// TTL of the election lease.
    pub leader_ttl: Duration,
}

/// etcd access for planning, under the election's fencing token.
#[derive(Debug)]
pub struct PlanStore {
    client: EtcdClient,
    keys: ClusterKeys,
    election: Arc<Election>,
}

impl PlanStore {
    /// A store for `keys`, guarded by `election`.
    pub fn new(client: EtcdClient, keys: ClusterKeys, election: Arc<Election>) -> Self {
        Self { client, keys, election }
    }

    /// The election this store writes under.
    pub fn election(&self) -> &Arc<Election> {
        &self.election
    }

    /// The stored plan, if any (a malformed one is an error naming the key).
    pub async fn read(&self) -> Result<Option<PlanRecord>, CoordinatorError> {
        let Some(kv) = self.client.get(&self.keys.plan()).await? else { return Ok(None) };
        serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| CoordinatorError::NotReady(format!("{} holds a malformed plan: {e}", kv.key)))
    }

    /// Writes the plan, only while we still lead.
    pub async fn write(
        &self,
        epoch: u64,
        ready: bool,
        stages: &[StagePlan],
        instances: &[String],
    ) -> Result<(), CoordinatorError> {
        let Some((guard, token)) = self.election.fencing_token() else { return Err(CoordinatorError::NotLeader) };
        let record = PlanRecord {
            epoch,
            ready,
            stages: stages
                .iter()
                .zip(instances.iter().chain(std::iter::repeat(&String::new())))
                .map(|(s, i)| PlanStageRecord {
                    worker: s.worker.clone(),
                    address: s.address.clone(),
                    instance: i.clone(),
                    start: s.start,
                    end: s.end,
                })
                .collect(),
            leader: self.election.me().id.clone(),
        };
        let value =
            serde_json::to_vec(&record).map_err(|e| CoordinatorError::NotReady(format!("encoding the plan: {e}")))?;
        if self.client.put_guarded(guard, token, &self.keys.plan(), value).await? {
            Ok(())
        } else {
            Err(CoordinatorError::NotLeader)
        }
    }

    /// Publishes the model's shape for the workers' probe.
    pub async fn publish_model(&self, shape: &ModelShape) -> Result<(), CoordinatorError> {
        let value = serde_json::to_vec(shape)
            .map_err(|e| CoordinatorError::NotReady(format!("encoding the model shape: {e}")))?;
        self.client.put(&self.keys.model(), value, 0).await?;
        Ok(())
    }
}

/// A stored plan's stages in the planner's terms, with the worker instances they were loaded on.
pub fn stages_of(record: &PlanRecord) -> (Vec<StagePlan>, Vec<String>) {
    record
        .stages
        .iter()
        .map(|s| {
            (
                StagePlan { worker: s.worker.clone(), address: s.address.clone(), start: s.start, end: s.end },
                s.instance.clone(),
            )
        })
        .unzip()
}
