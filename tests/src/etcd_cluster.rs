//! A Potluck cluster on a real etcd: `potluck coordinator` and `potluck
//! worker` processes that find each other through one etcd, with short
//! leases and hold-downs so tests of membership changes finish quickly.

use std::time::Duration;

use anyhow::Context as _;

use crate::etcd::Etcd;
use crate::process::Proc;
use crate::require_real_model;

/// etcd's shortest lease (it raises shorter ones to this).
pub const TTL: &str = "2";
/// The coordinator's hold-down before it plans.
pub const HOLD_DOWN_MS: &str = "500";

/// One etcd, a cluster name, and where the processes' logs and shard caches go.
pub struct EtcdCluster {
    /// The etcd the processes share.
    pub etcd: Etcd,
    /// The cluster's name in etcd.
    pub name: String,
    /// Logs of every process started.
    pub logs: tempfile::TempDir,
    /// The workers' shard cache.
    pub cache: tempfile::TempDir,
    /// The real model's path.
    pub model: String,
}

impl EtcdCluster {
    /// Starts etcd for a cluster called `name` serving the real model.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        Ok(Self {
            etcd: Etcd::start()?,
            name: name.into(),
            logs: tempfile::tempdir()?,
            cache: tempfile::tempdir()?,
            model: require_real_model()?.to_str().context("model path")?.to_string(),
        })
    }

    /// Starts a coordinator and returns it with its HTTP `host:port`.
    pub fn coordinator(&self, id: &str) -> anyhow::Result<(Proc, String)> {
        self.coordinator_with(id, &[])
    }

    /// [`EtcdCluster::coordinator`] with `extra` flags (a wire dtype, a
    /// minimum worker count).
    pub fn coordinator_with(&self, id: &str, extra: &[&str]) -> anyhow::Result<(Proc, String)> {
        let etcd = self.etcd.endpoint();
        let mut args = vec!["coordinator", "--model", &self.model, "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"];
        args.extend(self.membership(&etcd, id));
        args.extend(["--leader-ttl", TTL, "--hold-down-ms", HOLD_DOWN_MS]);
        args.extend_from_slice(extra);
        let p = Proc::start(id, self.logs.path(), &args)?;
        let line = p.wait_for_line("HTTP http://", Duration::from_secs(60))?;
        let http = line.rsplit("http://").next().context("HTTP address")?.trim().to_string();
        Ok((p, http))
    }

    /// Starts a one-thread worker on the native CPU.
    pub fn worker(&self, id: &str) -> anyhow::Result<Proc> {
        self.worker_on(id, "cpu")
    }

    /// Starts a one-thread worker on `device` (`cpu`, `candle-cpu`, …).
    pub fn worker_on(&self, id: &str, device: &str) -> anyhow::Result<Proc> {
        let etcd = self.etcd.endpoint();
        let cache = self.cache.path().to_str().context("cache path")?.to_string();
        let mut args = vec!["worker", "--listen", "127.0.0.1:0"];
        args.extend(self.membership(&etcd, id));
        args.extend(["--lease-ttl", TTL, "--threads", "1", "--cache-dir", &cache, "--device", device]);
        Proc::start(id, self.logs.path(), &args)
    }

    /// The flags that put a process in this cluster under `id`.
    fn membership<'a>(&'a self, etcd: &'a str, id: &'a str) -> [&'a str; 6] {
        ["--etcd", etcd, "--cluster", &self.name, "--id", id]
    }
}
