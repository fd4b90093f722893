//! The Potluck coordinator: accepts workers, plans layer ranges, ships
//! shards, and serves the OpenAI-compatible HTTP API by driving the pipeline.
//!
//! Entry point: [`run`], on listeners the caller binds (tests use port 0).

pub mod admission;
pub mod cluster;
pub mod completion;
pub mod config;
pub mod error;
pub mod etcd_membership;
pub mod fencing;
pub mod grpc;
pub mod http;
#[cfg(test)]
mod in_process;
pub mod leader;
pub mod membership;
pub mod metrics;
pub mod openai;
pub mod pipeline;
pub mod plan_store;
pub mod planner;
pub mod replacement;
mod sampling_wire;
pub mod scheduler;
pub mod shard_store;
pub mod spares;
mod stage_link;
pub mod stage_rpc;
pub mod standby;
pub mod stop;
pub mod traffic;
mod transport;

use std::future::Future;
use std::sync::Arc;

pub use cluster::{Cluster, CoordinatorConfig};
pub use error::CoordinatorError;
pub use etcd_membership::EtcdMembership;
pub use leader::Role;
pub use membership::{InMemoryMembership, Membership, MembershipError, WorkerInfo};
pub use plan_store::{EtcdSettings, DEFAULT_LEADER_TTL};

/// Serves gRPC (workers) on `grpc` and HTTP (clients) on `http` until `shutdown`.
pub async fn run(
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    mut config: CoordinatorConfig,
    membership: Arc<dyn Membership>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let local = |l: &tokio::net::TcpListener| {
        l.local_addr().map(|a| format!("http://{a}")).map_err(|e| CoordinatorError::NotReady(format!("listener: {e}")))
    };
    if config.advertise_grpc.is_none() {
        config.advertise_grpc = Some(local(&grpc)?);
    }
    if config.advertise_http.is_none() {
        config.advertise_http = Some(local(&http)?);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // With etcd, coordinators elect a leader; only it plans, and standbys redirect HTTP to it.
    let election = match &config.etcd {
        None => None,
        Some(etcd) => {
            let keys = potluck_etcd::ClusterKeys::new(&config.cluster)?;
            let me = potluck_etcd::LeaderRecord {
                id: config.id.clone(),
                http: config.advertise_http.clone().unwrap_or_default(),
                grpc: config.advertise_grpc.clone().unwrap_or_default(),
            };
            Some(leader::Election::new(etcd.client.clone(), keys.leader(), me, etcd.leader_ttl))
        }
    };
    let campaign = election.clone().map(|e| tokio::spawn(e.run(stop_rx.clone())));
    let cluster = Arc::new(Cluster::with_election(config, membership, election)?);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let planner = tokio::spawn(Arc::clone(&cluster).planning_loop());
    let grpc_server = tonic::transport::Server::builder()
        .add_service(potluck_proto::v1::coordinator_server::CoordinatorServer::new(grpc::CoordinatorService::new(
            Arc::clone(&cluster),
        )))
        .serve_with_incoming_shutdown(nodelay(grpc), stopped(stop_rx.clone()));
    let app = standby::leader_only(http::router(Arc::clone(&cluster)), cluster.role());
    let http_server = axum::serve(http, app).with_graceful_shutdown(stopped(stop_rx.clone()));
    let grpc_task = tokio::spawn(grpc_server);
    let http_task = tokio::spawn(async move { http_server.await });
    shutdown.await;
    let _ = stop_tx.send(true);
    planner.abort();
    if let Some(c) = campaign {
        // Resigns: revokes the election lease so a standby takes over at once.
        let _ = c.await;
    }
    let io = |e: String| CoordinatorError::NotReady(format!("server: {e}"));
    grpc_task.await.map_err(|e| io(e.to_string()))?.map_err(|e| io(e.to_string()))?;
    http_task.await.map_err(|e| io(e.to_string()))?.map_err(|e| io(e.to_string()))?;
    Ok(())
}

/// Accepted connections with Nagle off: shard chunks and tokens are small
/// messages, and Nagle's delayed ACK dance adds ~40 ms to each.
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt as _;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}
