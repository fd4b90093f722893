//! The client: one channel to etcd, and the KV operations Potluck needs.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::config::EtcdConfig;
use crate::error::EtcdError;
use crate::pb;

/// A key and its value as stored, with the revisions elections and fencing compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key (UTF-8; Potluck's keys are paths).
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision that created the key (0 = absent in comparisons).
    pub create_revision: i64,
    /// Revision of the last change.
    pub mod_revision: i64,
    /// Lease the key is attached to (0 = none).
    pub lease: i64,
}

impl From<pb::KeyValue> for KeyValue {
    fn from(kv: pb::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

/// The end of the key range holding every key that starts with `prefix` (etcd's `range_end`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range runs to the end of the keyspace.
    vec![0]
}

/// A connection to an etcd cluster. Cheap to clone; the channel reconnects on its own
/// after etcd restarts.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    pub(crate) channel: Channel,
    config: Arc<EtcdConfig>,
    token: Arc<RwLock<Option<MetadataValue<tonic::metadata::Ascii>>>>,
}

impl EtcdClient {
    /// Prepares the channel (connections are made on first use and remade after failures)
    /// and, with credentials, authenticates.
    pub async fn connect(config: EtcdConfig) -> Result<Self, EtcdError> {
        let endpoints = config.endpoints()?;
        let channel = if endpoints.len() == 1 {
            endpoints
                .into_iter()
                .next()
                .map(|e| e.connect_lazy())
                .ok_or_else(|| EtcdError::Config("no endpoints".into()))?
        } else {
            Channel::balance_list(endpoints.into_iter())
        };
        let client = Self { channel, config: Arc::new(config), token: Arc::default() };
        if client.config.credentials.is_some() {
            client.authenticate().await?;
        }
        Ok(client)
    }

    /// The configuration in use.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// The deadline of one call.
    pub fn call_timeout(&self) -> Duration {
        self.config.call_timeout
    }

    async fn authenticate(&self) -> Result<(), EtcdError> {
        let Some((name, password)) = self.config.credentials.clone() else { return Ok(()) };
        let req = pb::AuthenticateRequest { name, password };
        let mut auth = pb::auth_client::AuthClient::new(self.channel.clone());
        let reply = match tokio::time::timeout(self.call_timeout(), auth.authenticate(req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(EtcdError::rpc("Auth.Authenticate", &s)),
            Err(_) => return Err(EtcdError::Timeout { rpc: "Auth.Authenticate", after: self.call_timeout() }),
        };
        let token = MetadataValue::try_from(reply.token.as_str())
            .map_err(|e| EtcdError::Config(format!("etcd returned an unusable token: {e}")))?;
        *self.token.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token);
        Ok(())
    }

    /// `msg` as a request carrying the auth token, if any.
    pub(crate) fn request<M>(&self, msg: M) -> tonic::Request<M> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = self.token.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            r.metadata_mut().insert("token", t);
        }
        r
    }

    /// Every unary call goes through here: deadline, token, one re-authentication
    /// on an expired token, statuses into [`EtcdError`].
    pub(crate) async fn unary<Req, Resp, F, Fut>(&self, rpc: &'static str, msg: Req, call: F) -> Result<Resp, EtcdError>
    where
        Req: Clone,
        F: Fn(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        let mut retried = false;
        loop {
            let fut = call(self.channel.clone(), self.request(msg.clone()));
            match tokio::time::timeout(self.call_timeout(), fut).await {
                Ok(Ok(reply)) => return Ok(reply.into_inner()),
                Ok(Err(s)) if !retried && self.config.credentials.is_some() && EtcdError::is_token_error(&s) => {
                    retried = true;
                    self.authenticate().await?;
                }
                Ok(Err(s)) => return Err(EtcdError::rpc(rpc, &s)),
                Err(_) => return Err(EtcdError::Timeout { rpc, after: self.call_timeout() }),
            }
        }
    }

    async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, EtcdError> {
        self.unary("KV.Range", req, |ch, r| async move { pb::kv_client::KvClient::new(ch).range(r).await }).await
    }

    /// The value of `key`, if present.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let reply = self.range(pb::RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() }).await?;
        Ok(reply.kvs.into_iter().next().map(KeyValue::from))
    }

    /// Every key under `prefix`, and the store revision they were read at (a watch
    /// started at revision + 1 misses nothing).
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let key = prefix.as_bytes().to_vec();
        let range_end = prefix_end(&key);
        let reply = self.range(pb::RangeRequest { key, range_end, ..Default::default() }).await?;
        let revision = reply.header.map_or(0, |h| h.revision);
        Ok((reply.kvs.into_iter().map(KeyValue::from).collect(), revision))
    }

    /// Writes `key` (attached to `lease` unless 0) and returns the new revision.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64, EtcdError> {
        let req = pb::PutRequest { key: key.as_bytes().to_vec(), value, lease, prev_kv: false };
        let reply =
            self.unary("KV.Put", req, |ch, r| async move { pb::kv_client::KvClient::new(ch).put(r).await }).await?;
        Ok(reply.header.map_or(0, |h| h.revision))
    }

    /// Deletes `key`; returns how many keys went (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let req = pb::DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() };
        let reply = self
            .unary("KV.DeleteRange", req, |ch, r| async move { pb::kv_client::KvClient::new(ch).delete_range(r).await })
            .await?;
        Ok(reply.deleted)
    }

    async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, EtcdError> {
        self.unary("KV.Txn", req, |ch, r| async move { pb::kv_client::KvClient::new(ch).txn(r).await }).await
    }

    /// Creates `key` only if it does not exist (an election's campaign). Returns
    /// whether it was created; on `false` the key's current holder is returned too.
    pub async fn create(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(bool, Option<KeyValue>), EtcdError> {
        let k = key.as_bytes().to_vec();
        let compare = pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Create as i32,
            key: k.clone(),
            target_union: Some(pb::compare::TargetUnion::CreateRevision(0)),
            range_end: Vec::new(),
        };
        let put = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: k.clone(),
                value,
                lease,
                prev_kv: false,
            })),
        };
        let get = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest { key: k, ..Default::default() })),
        };
        let reply = self.txn(pb::TxnRequest { compare: vec![compare], success: vec![put], failure: vec![get] }).await?;
        if reply.succeeded {
            return Ok((true, None));
        }
        let holder = reply.responses.into_iter().find_map(|r| match r.response {
            Some(pb::response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next().map(KeyValue::from),
            _ => None,
        });
        Ok((false, holder))
    }

    /// Writes `key` only while `guard` still holds `guard_value` at `guard_create_revision`
    /// (a leader writing under its leadership). Returns whether it was written.
    pub async fn put_guarded(
        &self,
        guard: &str,
        guard_create_revision: i64,
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, EtcdError> {
        let compare = pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Create as i32,
            key: guard.as_bytes().to_vec(),
            target_union: Some(pb::compare::TargetUnion::CreateRevision(guard_create_revision)),
            range_end: Vec::new(),
        };
        let put = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                lease: 0,
                prev_kv: false,
            })),
        };
        Ok(self.txn(pb::TxnRequest { compare: vec![compare], success: vec![put], failure: vec![] }).await?.succeeded)
    }

    /// Deletes `key` only if it was created at `create_revision` (resigning a leadership we still hold).
    pub async fn delete_if_created_at(&self, key: &str, create_revision: i64) -> Result<bool, EtcdError> {
        let k = key.as_bytes().to_vec();
        let compare = pb::Compare {
            result: pb::compare::CompareResult::Equal as i32,
            target: pb::compare::CompareTarget::Create as i32,
            key: k.clone(),
            target_union: Some(pb::compare::TargetUnion::CreateRevision(create_revision)),
            range_end: Vec::new(),
        };
        let del = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: k,
                ..Default::default()
            })),
        };
        Ok(self.txn(pb::TxnRequest { compare: vec![compare], success: vec![del], failure: vec![] }).await?.succeeded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
