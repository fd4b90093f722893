//! Connections to other stages. One lazily connected HTTP/2 channel per
//! address carries every forward stream and release call to that stage.
//!
//! A plan names the next stage by URL only; its worker id is asked for (with
//! `Info`) when a stage is loaded, so an error about it can name the worker
//! as well as the URL, even after that worker has died.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use potluck_engine::SessionId;
use potluck_proto::v1 as pb;
use potluck_proto::v1::stage_client::StageClient;
use tonic::transport::{Channel, Endpoint};

use crate::config::DEFAULT_MAX_MESSAGE_BYTES;
use crate::coordinator_link::DEFAULT_CONNECT_TIMEOUT;
use crate::error::WorkerError;
use crate::status;

/// How often an idle stream to the next stage is probed, so a dead stage is noticed.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(20);
/// Deadline of a release forwarded to the next stage.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of the `Info` call that learns a next stage's worker id; a stage
/// that does not answer in time is named by its URL alone.
pub const DEFAULT_NAME_TIMEOUT: Duration = Duration::from_secs(2);

/// Channels to the stages this worker sends to, by URL.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    /// Worker ids learned from `Info`, by URL.
    names: Mutex<HashMap<String, String>>,
}

impl Peers {
    /// Asks the stage at `address` for its worker id and remembers it; best effort.
    pub async fn learn_name(&self, address: &str) {
        let Ok(mut client) = self.client(address) else { return };
        let id = match tokio::time::timeout(DEFAULT_NAME_TIMEOUT, client.info(pb::InfoRequest {})).await {
            Ok(Ok(reply)) => Some(reply.into_inner().worker_id).filter(|id| !id.is_empty() && id != address),
            Ok(Err(s)) => {
                tracing::debug!(address, status = %s, "next stage did not say its id");
                None
            }
            Err(_) => {
                tracing::debug!(address, "next stage did not say its id in time");
                None
            }
        };
        // A name learnt for an earlier plan may belong to another worker now.
        match id {
            Some(id) => lock(&self.names).insert(address.to_string(), id),
            None => lock(&self.names).remove(address),
        };
    }

    /// How errors name the stage at `address`: `worker-1 (http://…)` once its id is known, else the URL.
    pub fn describe(&self, address: &str) -> String {
        describe(lock(&self.names).get(address).map(String::as_str), address)
    }

    /// A client of the stage at `address`; connects on first use.
    pub fn client(&self, address: &str) -> Result<StageClient<Channel>, WorkerError> {
        let mut channels = lock(&self.channels);
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(address.to_string())
                    .map_err(|e| WorkerError::NextStage {
                        stage: address.to_string(),
                        code: tonic::Code::InvalidArgument,
                        message: format!("bad URL: {e}"),
                    })?
                    .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(DEFAULT_KEEP_ALIVE)
                    .keep_alive_while_idle(true);
                let c = endpoint.connect_lazy();
                channels.insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(StageClient::new(channel).max_decoding_message_size(DEFAULT_MAX_MESSAGE_BYTES))
    }

    /// Asks the stage at `address` to release `sessions` (and pass it on); returns how many it held.
    pub async fn release(&self, address: &str, sessions: &[SessionId]) -> Result<u32, WorkerError> {
        let mut client = self.client(address)?;
        let req = pb::ReleaseRequest { sessions: sessions.iter().map(|s| s.0).collect() };
        let mut request = tonic::Request::new(req);
        potluck_proto::trace_context::TraceHeaders::current().inject(&mut request);
        match tokio::time::timeout(DEFAULT_RELEASE_TIMEOUT, client.release(request)).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().released),
            Ok(Err(s)) => Err(status::next_stage(&self.describe(address), &s)),
            Err(_) => {
                Err(status::next_stage(&self.describe(address), &tonic::Status::deadline_exceeded("release timed out")))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn describe(id: Option<&str>, address: &str) -> String {
    match id {
        Some(id) => format!("{id} ({address})"),
        None => address.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_is_named_by_id_and_url_once_known() {
        let peers = Peers::default();
        assert_eq!(peers.describe("http://10.0.0.2:7001"), "http://10.0.0.2:7001");
        lock(&peers.names).insert("http://10.0.0.2:7001".into(), "worker-1".into());
        assert_eq!(peers.describe("http://10.0.0.2:7001"), "worker-1 (http://10.0.0.2:7001)");
    }
}
