//! The client: etcd-client's connection, with a deadline on every call, errors
//! in our terms, and the KV operations Potluck needs (elections and fencing
//! compare create revisions, so transactions say which they compare).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};

use crate::config::EtcdConfig;
use crate::error::EtcdError;

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

impl From<&etcd_client::KeyValue> for KeyValue {
    fn from(kv: &etcd_client::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

/// A connection to an etcd cluster. Cheap to clone; the channel reconnects on its own
/// after etcd restarts, and an expired auth token is renewed and the call retried.
#[derive(Clone)]
pub struct EtcdClient {
    pub(crate) inner: etcd_client::Client,
    config: Arc<EtcdConfig>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient").field("endpoints", &self.config.endpoints).finish_non_exhaustive()
    }
}

impl EtcdClient {
    /// Prepares the channel (connections are made on first use and remade after failures)
    /// and, with credentials, authenticates.
    pub async fn connect(config: EtcdConfig) -> Result<Self, EtcdError> {
        let (urls, options) = config.connect_options()?;
        // Connecting only authenticates (the channel itself is lazy), so with no
        // credentials it succeeds while etcd is still down.
        let rpc = if config.credentials.is_some() { "Auth.Authenticate" } else { "connect" };
        let inner = timed(rpc, config.call_timeout, etcd_client::Client::connect(urls, Some(options))).await?;
        Ok(Self { inner, config: Arc::new(config) })
    }

    /// The configuration in use.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// The deadline of one call.
    pub fn call_timeout(&self) -> Duration {
        self.config.call_timeout
    }

    /// Every call goes through here: the deadline, and errors into [`EtcdError`].
    pub(crate) async fn call<T>(
        &self,
        rpc: &'static str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        timed(rpc, self.call_timeout(), call).await
    }

    /// Authenticates again (streams are not retried by etcd-client on an
    /// expired token, so their openers call this and try once more).
    pub(crate) async fn refresh_token(&self) -> Result<(), EtcdError> {
        self.call("Auth.Authenticate", self.inner.refresh_token()).await
    }

    /// The value of `key`, if present.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        let mut kv = self.inner.kv_client();
        let reply = self.call("KV.Range", kv.get(key, None)).await?;
        Ok(reply.kvs().first().map(KeyValue::from))
    }

    /// Every key under `prefix`, and the store revision they were read at (a watch
    /// started at revision + 1 misses nothing).
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let mut kv = self.inner.kv_client();
        let reply = self.call("KV.Range", kv.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
        let revision = reply.header().map_or(0, etcd_client::ResponseHeader::revision);
        Ok((reply.kvs().iter().map(KeyValue::from).collect(), revision))
    }

    /// Writes `key` (attached to `lease` unless 0) and returns the new revision.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64, EtcdError> {
        let mut kv = self.inner.kv_client();
        let reply = self.call("KV.Put", kv.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
        Ok(reply.header().map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// Deletes `key`; returns how many keys went (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let mut kv = self.inner.kv_client();
        Ok(self.call("KV.DeleteRange", kv.delete(key, None)).await?.deleted())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, EtcdError> {
        let mut kv = self.inner.kv_client();
        self.call("KV.Txn", kv.txn(txn)).await
    }

    /// Creates `key` only if it does not exist (an election's campaign). Returns
    /// whether it was created; on `false` the key's current holder is returned too.
    pub async fn create(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(bool, Option<KeyValue>), EtcdError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))])
            .or_else([TxnOp::get(key, None)]);
        let reply = self.txn(txn).await?;
        if reply.succeeded() {
            return Ok((true, None));
        }
        let holder = reply.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(range) => range.kvs().first().map(KeyValue::from),
            _ => None,
        });
        Ok((false, holder))
    }

    /// Writes `key` only while `guard` still holds the key created at
    /// `guard_create_revision` (a leader writing under its leadership). Returns whether it was written.
    pub async fn put_guarded(
        &self,
        guard: &str,
        guard_create_revision: i64,
        key: &str,
        value: Vec<u8>,
    ) -> Result<bool, EtcdError> {
        let txn = Txn::new()
            .when([Compare::create_revision(guard, CompareOp::Equal, guard_create_revision)])
            .and_then([TxnOp::put(key, value, None)]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// Deletes `key` only if it was created at `create_revision` (resigning a leadership we still hold).
    pub async fn delete_if_created_at(&self, key: &str, create_revision: i64) -> Result<bool, EtcdError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, create_revision)])
            .and_then([TxnOp::delete(key, None)]);
        Ok(self.txn(txn).await?.succeeded())
    }
}

/// `call` under a deadline of `after`, its error in our terms.
async fn timed<T>(
    rpc: &'static str,
    after: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(after, call).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(EtcdError::from_client(rpc, e)),
        Err(_) => Err(EtcdError::Timeout { rpc, after }),
    }
}
