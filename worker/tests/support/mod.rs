//! Test doubles and helpers: an in-test coordinator serving one shard file in
//! chunks, and workers started with `run` on port 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use potluck_proto::v1 as pb;
use potluck_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use potluck_proto::v1::stage_client::StageClient;
use potluck_worker::{run, WorkerConfig, WorkerError};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Chunk size the test coordinator serves.
pub const CHUNK: usize = 64 << 10;

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A stand-in for the coordinator: serves `shard` for any layer range.
pub struct TestCoordinator {
    pub shard: Vec<u8>,
    pub digest: String,
    /// Chunk index whose first answer is corrupted.
    pub corrupt: Option<u32>,
    pub chunk_requests: Mutex<HashMap<u32, u32>>,
    /// Manifests asked for: every load that fetches (or checks) a shard asks one.
    pub manifests: std::sync::atomic::AtomicU32,
    pub joins: Mutex<Vec<pb::JoinRequest>>,
}

#[tonic::async_trait]
impl Coordinator for TestCoordinator {
    async fn join(&self, r: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        self.joins.lock().expect("lock").push(r.into_inner());
        Ok(Response::new(pb::JoinReply { cluster: "test".into() }))
    }

    async fn shard_manifest(&self, _r: Request<pb::ShardRequest>) -> Result<Response<pb::Manifest>, Status> {
        self.manifests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Response::new(pb::Manifest {
            digest: self.digest.clone(),
            total_bytes: self.shard.len() as u64,
            chunk_bytes: CHUNK as u64,
            chunk_sha256: self.shard.chunks(CHUNK).map(sha256_hex).collect(),
            header: Vec::new(),
        }))
    }

    async fn shard_chunk(&self, r: Request<pb::ChunkRequest>) -> Result<Response<pb::Chunk>, Status> {
        let r = r.into_inner();
        if r.digest != self.digest {
            return Err(Status::not_found("unknown digest"));
        }
        let data = self.shard.chunks(CHUNK).nth(r.index as usize).ok_or_else(|| Status::out_of_range("index"))?;
        let mut data = data.to_vec();
        let sha256 = sha256_hex(&data);
        let seen = {
            let mut counts = self.chunk_requests.lock().expect("lock");
            let n = counts.entry(r.index).or_default();
            *n += 1;
            *n
        };
        if self.corrupt == Some(r.index) && seen == 1 {
            data[10] ^= 0x5a;
        }
        Ok(Response::new(pb::Chunk { index: r.index, data, sha256 }))
    }
}

/// Starts the test coordinator serving the file at `path`; returns it and its URL.
pub async fn start_coordinator(path: &Path, corrupt: Option<u32>) -> (Arc<TestCoordinator>, String) {
    let shard = std::fs::read(path).expect("read shard");
    let digest = sha256_hex(&shard);
    let coordinator = Arc::new(TestCoordinator {
        shard,
        digest,
        corrupt,
        chunk_requests: Mutex::new(HashMap::new()),
        manifests: std::sync::atomic::AtomicU32::new(0),
        joins: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tonic::transport::Server::builder()
        .add_service(CoordinatorServer::from_arc(coordinator.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener).map(|c| {
            if let Ok(c) = &c {
                let _ = c.set_nodelay(true);
            }
            c
        }));
    tokio::spawn(server);
    (coordinator, url)
}

/// A worker running in this test.
pub struct TestWorker {
    pub url: String,
    pub cache_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    pub handle: JoinHandle<Result<(), WorkerError>>,
}

impl TestWorker {
    /// Starts a worker joined to `coordinator`, caching shards in `cache_dir`.
    pub async fn start(coordinator: &str, cache_dir: &Path) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let config = WorkerConfig {
            coordinator: Some(coordinator.to_string()),
            threads: 1,
            cache_dir: cache_dir.to_path_buf(),
            ..WorkerConfig::default()
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self { url, cache_dir: cache_dir.to_path_buf(), stop: Some(stop), handle }
    }

    pub async fn client(&self) -> StageClient<Channel> {
        for _ in 0..100 {
            if let Ok(c) = StageClient::connect(self.url.clone()).await {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("worker {} never came up", self.url);
    }

    /// Stops the worker and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), WorkerError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.handle).await.expect("stops in time").expect("join")
    }
}

/// A `Load` of `layers` for `epoch` with an f32 wire.
pub fn load_request(epoch: u64, layers: (u32, u32), digest: &str, next_stage: &str) -> pb::LoadRequest {
    pb::LoadRequest {
        epoch,
        layer_start: layers.0,
        layer_end: layers.1,
        model_id: "tiny".into(),
        shard_digest: digest.into(),
        next_stage: next_stage.into(),
        wire_dtype: "f32".into(),
        kv_budget_bytes: 0,
        shard_source: String::new(),
    }
}
