//! Flags shared by every command that talks to etcd, and `potluck status`.

use std::path::PathBuf;

use anyhow::Context as _;
use potluck_etcd::{ClusterKeys, EtcdClient, EtcdConfig, EtcdTls, LeaderRecord, PlanRecord, WorkerRecord};
use serde_json::json;

/// Where etcd is, which cluster, and how to authenticate.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd client endpoints, comma-separated (e.g. 127.0.0.1:2379); turns on etcd membership.
    #[arg(long)]
    pub etcd: Option<String>,
    /// Cluster name: its keys live under /potluck/<cluster>/.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// PEM CA that signed etcd's certificate (turns on TLS).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (with --etcd-key).
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (with --etcd-password or POTLUCK_ETCD_PASSWORD).
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// etcd password.
    #[arg(long, env = "POTLUCK_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

impl EtcdArgs {
    /// The client configuration, or `None` without `--etcd`.
    pub fn config(&self) -> anyhow::Result<Option<EtcdConfig>> {
        let Some(endpoints) = &self.etcd else {
            anyhow::ensure!(
                self.etcd_ca.is_none()
                    && self.etcd_cert.is_none()
                    && self.etcd_key.is_none()
                    && self.etcd_user.is_none(),
                "etcd TLS and auth flags need --etcd"
            );
            return Ok(None);
        };
        let mut c = EtcdConfig::new(endpoints);
        anyhow::ensure!(!c.endpoints.is_empty(), "--etcd needs at least one endpoint");
        ClusterKeys::new(&self.cluster)?;
        if self.etcd_ca.is_some() || self.etcd_cert.is_some() || self.etcd_key.is_some() {
            c.tls = Some(EtcdTls {
                ca: self.etcd_ca.clone(),
                cert: self.etcd_cert.clone(),
                key: self.etcd_key.clone(),
                domain: None,
            });
        }
        c.credentials = match (&self.etcd_user, &self.etcd_password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            (Some(_), None) => anyhow::bail!("--etcd-user needs --etcd-password (or POTLUCK_ETCD_PASSWORD)"),
            (None, Some(_)) => anyhow::bail!("--etcd-password needs --etcd-user"),
        };
        Ok(Some(c))
    }

    /// A connected client (authenticated when credentials are given).
    pub async fn client(&self, config: EtcdConfig) -> anyhow::Result<EtcdClient> {
        EtcdClient::connect(config)
            .await
            .with_context(|| format!("connecting to etcd at {}", self.etcd.as_deref().unwrap_or("")))
    }
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Print JSON (the same fields as the coordinator's /v1/cluster) instead of text.
    #[arg(long)]
    json: bool,
}

/// `potluck status`: the cluster as etcd holds it (workers, plan, leader).
pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let config = a.etcd.config()?.context("potluck status needs --etcd ENDPOINTS")?;
    super::cluster::runtime()?.block_on(async move {
        let client = a.etcd.client(config).await?;
        let keys = ClusterKeys::new(&a.etcd.cluster)?;
        let (kvs, _) = client.get_prefix(&keys.workers()).await?;
        let mut workers: Vec<(i64, WorkerRecord)> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<WorkerRecord>(&kv.value).ok().map(|w| (kv.create_revision, w)))
            .collect();
        workers.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        let plan: Option<PlanRecord> = match client.get(&keys.plan()).await? {
            Some(kv) => Some(serde_json::from_slice(&kv.value).with_context(|| format!("{} is malformed", kv.key))?),
            None => None,
        };
        let leader: Option<LeaderRecord> = match client.get(&keys.leader()).await? {
            Some(kv) => Some(serde_json::from_slice(&kv.value).with_context(|| format!("{} is malformed", kv.key))?),
            None => None,
        };
        if a.json {
            let v = json!({
                "cluster": a.etcd.cluster,
                "epoch": plan.as_ref().map_or(0, |p| p.epoch),
                "ready": plan.as_ref().is_some_and(|p| p.ready),
                "leader": leader.as_ref().map(|l| l.id.clone()),
                "leader_http": leader.as_ref().map(|l| l.http.clone()),
                "workers": workers.iter().map(|(_, w)| w).collect::<Vec<_>>(),
                "stages": plan.as_ref().map(|p| p.stages.iter().map(|s| json!({
                    "worker": s.worker, "address": s.address, "layers": [s.start, s.end]})).collect::<Vec<_>>()).unwrap_or_default(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        println!("cluster {}", a.etcd.cluster);
        match &leader {
            Some(l) => println!("leader  {} (http {}, grpc {})", l.id, l.http, l.grpc),
            None => println!("leader  none elected"),
        }
        match &plan {
            Some(p) => println!("epoch   {}{}", p.epoch, if p.ready { "" } else { " (loading)" }),
            None => println!("epoch   0 (no plan yet)"),
        }
        println!("workers {}", workers.len());
        for (_, w) in &workers {
            let probe = w.layer_micros.map_or_else(|| "not probed".to_string(), |us| format!("{us:.0} µs/layer"));
            let d = &w.device_info;
            let memory = if d.kind.is_gpu() {
                format!("{} ({} of {} MiB free)", d.name, d.free_bytes >> 20, d.total_bytes >> 20)
            } else {
                format!("{} MiB free", w.free_memory_bytes >> 20)
            };
            println!(
                "  {:<16} {:<28} {} × {} threads, {memory}, v{}, {probe}",
                w.id, w.address, w.device, w.threads, w.version
            );
        }
        let stages = plan.map(|p| p.stages).unwrap_or_default();
        println!("stages  {}", stages.len());
        for (i, s) in stages.iter().enumerate() {
            println!("  {i}  {:<16} layers [{}, {})", s.worker, s.start, s.end);
        }
        Ok(())
    })
}
