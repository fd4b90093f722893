//! Connections to other stages. One lazily connected HTTP/2 channel per
//! address carries every forward stream and release call to that stage.

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

/// Channels to the stages this worker sends to, by URL.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Peers {
    /// A client of the stage at `address`; connects on first use.
    pub fn client(&self, address: &str) -> Result<StageClient<Channel>, WorkerError> {
        let mut channels = self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let endpoint = Endpoint::from_shared(address.to_string())
                    .map_err(|e| WorkerError::NextStage {
                        address: address.to_string(),
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
            Ok(Err(s)) => Err(status::next_stage(address, &s)),
            Err(_) => Err(status::next_stage(address, &tonic::Status::deadline_exceeded("release timed out"))),
        }
    }
}
