//! The coordinator's gRPC face: workers join and fetch their shards.
//! Handlers decode, call the domain, encode; errors map in `error.rs`.

use std::sync::Arc;

use potluck_etcd::{DeviceInfo, UnknownDeviceKind};
use potluck_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::cluster::Cluster;
use crate::membership::WorkerInfo;

/// `potluck.v1.Coordinator`.
#[derive(Debug, Clone)]
pub struct CoordinatorService {
    cluster: Arc<Cluster>,
}

impl CoordinatorService {
    /// Serves `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

impl TryFrom<pb::JoinRequest> for WorkerInfo {
    type Error = Status;

    fn try_from(r: pb::JoinRequest) -> Result<Self, Status> {
        if r.worker_id.is_empty() || r.worker_id.len() > 256 {
            return Err(Status::invalid_argument("worker_id must be 1–256 bytes"));
        }
        if !(r.address.starts_with("http://") || r.address.starts_with("https://")) {
            return Err(Status::invalid_argument(format!("address `{}` is not an http(s) URL", r.address)));
        }
        let device_info = match r.device_info {
            None => DeviceInfo::default(),
            Some(d) => DeviceInfo {
                kind: d.kind.parse().map_err(|e: UnknownDeviceKind| Status::invalid_argument(e.to_string()))?,
                name: d.name,
                total_bytes: d.total_bytes,
                free_bytes: d.free_bytes,
            },
        };
        Ok(Self {
            id: r.worker_id,
            address: r.address,
            device: r.device,
            threads: r.threads,
            free_memory_bytes: r.free_memory_bytes,
            device_info,
            version: r.version,
            joined: 0,
            layer_micros: None,
            instance: String::new(),
        })
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let token = req.get_ref().join_token.clone();
        if !self.cluster.join_token_ok(&token) {
            return Err(Status::permission_denied("bad join token"));
        }
        let worker = WorkerInfo::try_from(req.into_inner())?;
        tracing::info!(worker = %worker.id, address = %worker.address, "worker joined");
        self.cluster.membership().join(worker).map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::JoinReply { cluster: self.cluster.name().to_string() }))
    }

    async fn shard_manifest(&self, req: Request<pb::ShardRequest>) -> Result<Response<pb::Manifest>, Status> {
        let r = req.into_inner();
        let (start, end) = (r.layer_start as usize, r.layer_end as usize);
        let shard = self.cluster.shard(start..end).await?;
        Ok(Response::new(pb::Manifest {
            digest: shard.digest,
            total_bytes: shard.total_bytes,
            chunk_bytes: shard.chunk_bytes,
            chunk_sha256: shard.chunk_sha256,
            header: Vec::new(),
        }))
    }

    async fn shard_chunk(&self, req: Request<pb::ChunkRequest>) -> Result<Response<pb::Chunk>, Status> {
        let r = req.into_inner();
        let (data, sha256) = self.cluster.chunk(r.digest, r.index as usize).await?;
        Ok(Response::new(pb::Chunk { index: r.index, data, sha256 }))
    }
}

#[cfg(test)]
mod tests {
    use potluck_etcd::DeviceKind;

    use super::*;

    fn join(device_info: Option<pb::DeviceInfo>) -> pb::JoinRequest {
        pb::JoinRequest {
            worker_id: "w".into(),
            address: "http://127.0.0.1:1".into(),
            device: "cuda:0".into(),
            threads: 1,
            free_memory_bytes: 64 << 30,
            version: "0".into(),
            join_token: String::new(),
            device_info,
        }
    }

    #[test]
    fn device_info_decodes_or_is_refused_by_name() {
        let older = WorkerInfo::try_from(join(None)).expect("an older worker joins");
        assert_eq!(older.device_info, DeviceInfo::default());
        let gpu = pb::DeviceInfo { kind: "cuda".into(), name: "H100".into(), total_bytes: 80, free_bytes: 70 };
        let w = WorkerInfo::try_from(join(Some(gpu.clone()))).expect("decodes");
        assert_eq!((w.device_info.kind, w.stage_memory_bytes()), (DeviceKind::Cuda, 70));
        let bad = WorkerInfo::try_from(join(Some(pb::DeviceInfo { kind: "tpu".into(), ..gpu }))).expect_err("tpu");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("`tpu`"), "{}", bad.message());
    }
}
