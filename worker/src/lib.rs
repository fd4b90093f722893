//! The Potluck worker: serves one stage of a model over gRPC.
//!
//! A worker joins the coordinator, loads the layer range a plan assigns it
//! (fetching its shard in verified chunks unless cached), runs micro-batches
//! on one compute thread, forwards hidden states to the next stage over a
//! long-lived stream, and on the last stage samples tokens.
//!
//! The binary parses flags into a [`WorkerConfig`], installs telemetry and
//! calls [`run`]; tests call [`run`] on `127.0.0.1:0`.
//!
//! Map of the crate:
//! - `config`: [`WorkerConfig`], [`Device`];
//! - `error`, `status`: [`WorkerError`] and its one mapping to gRPC statuses;
//! - `service`: the `Stage` handlers (decode, call, encode);
//! - `load_spec`, `batch`: requests decoded into domain types;
//! - `worker`: load, release, info; `forward`: one forward stream;
//! - `compute`: the thread that owns the stage, KV cache and samplers;
//! - `sampler_state`: per-session samplers and histories (last stage);
//! - `shard_cache`, `coordinator_link`: verified, resumable shard download;
//!   `shard_progress`: a bar on a terminal, log lines otherwise;
//! - `peers`: channels to the next stage; `capability`: the device and its
//!   memory;
//! - `registration`, `probe`: the etcd record under a kept-alive lease, with
//!   the per-layer time measured on the cluster's model shape.

mod batch;
pub mod capability;
mod compute;
pub mod config;
mod coordinator_link;
pub mod error;
mod forward;
mod freeze;
pub mod gpu_memory;
mod load_spec;
mod peers;
mod probe;
mod registration;
mod sampler_state;
mod service;
mod shard_cache;
pub mod shard_progress;
mod status;
mod traffic;
mod worker;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use potluck_proto::v1 as pb;
use potluck_proto::v1::stage_server::StageServer;
use tokio::sync::{watch, Mutex};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;

pub use config::DEFAULT_MAX_MESSAGE_BYTES;
pub use config::{
    EtcdRegistration, WorkerConfig, DEFAULT_CACHE_DIR, DEFAULT_DEVICE, DEFAULT_JOIN_TIMEOUT, DEFAULT_LEASE_TTL,
    DEFAULT_THREADS,
};
pub use error::{InvalidManifest, InvalidRequest, WorkerError};
pub use potluck_engine::Device;
pub use shard_cache::CHUNK_TRIES;
pub use shard_progress::{ProgressStyle, PROGRESS_TARGET};

/// The worker's version, reported when joining and in `Info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Serves a worker on `listener` until `shutdown` completes.
///
/// With a coordinator configured, the worker first joins it (retrying for
/// `config.join_timeout`), so a worker that cannot join fails at start with
/// an error naming the coordinator.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let device = config.device;
    // Opened once here so a GPU this machine lacks fails at start, not at the first load.
    device.open_candle()?;
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    };
    let local = listener.local_addr().map_err(|source| WorkerError::Io { path: "listener".into(), source })?;
    let advertise = config.advertise.clone().unwrap_or_else(|| format!("http://127.0.0.1:{}", local.port()));
    let id = if config.worker_id.is_empty() { advertise.clone() } else { config.worker_id.clone() };
    let shards = shard_cache::ShardCache::open(&config.cache_dir)?.with_progress(config.progress, &id);

    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|&s| s).await;
    };

    let freezes = freeze::watch_freezes(stopping.clone());
    let device_info = capability::device_info(device, &capability::GpuProbeEnv::from_process())?;
    let coordinator = match &config.coordinator {
        None => None,
        Some(address) => {
            let request = pb::JoinRequest {
                worker_id: id.clone(),
                address: advertise.clone(),
                device: device.to_string(),
                threads: u32::try_from(threads).unwrap_or(u32::MAX),
                free_memory_bytes: capability::free_memory_bytes(),
                version: VERSION.to_string(),
                join_token: config.join_token.clone(),
                device_info: Some(pb::DeviceInfo {
                    kind: device_info.kind.name().to_string(),
                    name: device_info.name.clone(),
                    total_bytes: device_info.total_bytes,
                    free_bytes: device_info.free_bytes,
                }),
            };
            let join = coordinator_link::CoordinatorLink::join(address, request.clone(), config.join_timeout);
            tokio::select! {
                joined = join => {
                    let (link, cluster) = joined?;
                    tracing::info!(coordinator = link.address(), cluster, worker = id, "joined");
                    let rejoin = coordinator_link::rejoin_after_freezes(address.clone(), request, config.join_timeout, freezes.clone());
                    tokio::spawn(rejoin);
                    Some(link)
                }
                () = stopped(stopping.clone()) => return Ok(()),
            }
        }
    };

    // With etcd, the worker registers itself under a lease instead of joining.
    let registration = match &config.etcd {
        None => None,
        Some(reg) => {
            let client = potluck_etcd::EtcdClient::connect(reg.etcd.clone()).await?;
            let keys = potluck_etcd::ClusterKeys::new(&reg.cluster)?;
            let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let record = potluck_etcd::WorkerRecord {
                id: id.clone(),
                address: advertise.clone(),
                device: device.to_string(),
                threads: u32::try_from(threads).unwrap_or(u32::MAX),
                free_memory_bytes: capability::free_memory_bytes(),
                device_info,
                version: VERSION.to_string(),
                layer_micros: None,
                instance: format!("{}-{}", std::process::id(), started.as_nanos()),
            };
            let r = registration::Registration { client, keys, record, ttl: reg.lease_ttl, threads, device };
            Some(tokio::spawn(r.run(stopping.clone(), freezes.clone())))
        }
    };

    let worker = Arc::new(worker::Worker {
        id,
        device,
        threads,
        compute: compute::Compute::start(threads)?,
        peers: peers::Peers::default(),
        shards,
        coordinator,
        transferred: AtomicU64::new(0),
        hidden: traffic::HiddenTraffic::default(),
        loading: Mutex::new(()),
        warm: std::sync::Mutex::default(),
        serving_loads: AtomicU64::new(0),
        stopping: stopping.clone(),
    });
    tracing::info!(listen = %local, advertise, threads, device = %device, "worker serving");
    // Decode steps are small messages: without TCP_NODELAY, Nagle's algorithm adds tens of milliseconds per hop.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    });
    let service =
        StageServer::new(service::StageService::new(worker)).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES);
    let served = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stopped(stopping))
        .await;
    if let Some(r) = registration {
        // Deregistration started when the stop signal came; let it finish.
        let _ = r.await;
    }
    served.map_err(|e| WorkerError::Serve(coordinator_link::error_chain(&e)))
}
