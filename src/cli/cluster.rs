//! `potluck worker`, `potluck coordinator` and `potluck up`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use potluck_coordinator::{CoordinatorConfig, EtcdMembership, EtcdSettings, InMemoryMembership, Membership};
use potluck_engine::WireDtype;

use super::etcd::EtcdArgs;
use super::serving::ServingArgs;
use super::telemetry::{self, Export, OtlpArgs};

/// Default HTTP address of the API.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";
/// The model `scripts/fetch-model` puts in place.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// Address to serve the Stage service on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The coordinator's gRPC address (host:port or URL); not used with --etcd.
    #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
    coordinator: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// TTL in seconds of the etcd registration lease (a dead worker vanishes after about this long).
    #[arg(long, default_value_t = potluck_worker::DEFAULT_LEASE_TTL.as_secs())]
    lease_ttl: u64,
    /// URL other nodes use to reach this worker (default: http://127.0.0.1:<port>).
    #[arg(long)]
    advertise: Option<String>,
    /// Compute threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Device the stages run on: `cpu` (native kernels), `candle-cpu`, `cuda[:N]` or `metal`.
    #[arg(long, default_value = "cpu")]
    device: potluck_engine::Device,
    /// Where shards are cached by digest (default: ~/.cache/potluck/shards).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Token the coordinator requires to join.
    #[arg(long, env = "POTLUCK_JOIN_TOKEN", default_value = "")]
    join_token: String,
    /// This worker's id (default: its address).
    #[arg(long, default_value = "")]
    id: String,
    /// How shard downloads are shown: auto (a bar if stderr is a terminal, else log lines), bar, log or off.
    #[arg(long, default_value = "auto")]
    progress: potluck_worker::ProgressStyle,
    #[command(flatten)]
    otlp: OtlpArgs,
}

impl WorkerArgs {
    /// Span export as `potluck-worker`, told apart by its id (else its process id).
    pub fn export(&self) -> Option<Export> {
        let instance = if self.id.is_empty() { std::process::id().to_string() } else { self.id.clone() };
        export(&self.otlp, telemetry::WORKER_SERVICE, instance)
    }
}

impl CoordinatorArgs {
    /// Span export as `potluck-coordinator`.
    pub fn export(&self) -> Option<Export> {
        export(&self.otlp, telemetry::COORDINATOR_SERVICE, std::process::id().to_string())
    }
}

impl UpArgs {
    /// Span export as `potluck-coordinator` (it runs in this process; its workers export on their own).
    pub fn export(&self) -> Option<Export> {
        export(&self.otlp, telemetry::COORDINATOR_SERVICE, std::process::id().to_string())
    }
}

fn export(otlp: &OtlpArgs, service: &'static str, instance: String) -> Option<Export> {
    otlp.endpoint.clone().filter(|e| !e.is_empty()).map(|endpoint| Export { endpoint, service, instance })
}

#[derive(Debug, clap::Args)]
pub struct CoordinatorArgs {
    /// The model file (GGUF).
    #[arg(long)]
    model: PathBuf,
    /// Address of the gRPC service workers join.
    #[arg(long, default_value = "127.0.0.1:7070")]
    grpc: String,
    /// Address of the HTTP API.
    #[arg(long, default_value = DEFAULT_HTTP)]
    http: String,
    /// How hidden states travel between stages.
    #[arg(long, default_value = "f16")]
    wire_dtype: WireDtype,
    /// Wait for this many workers before the first plan.
    #[arg(long, default_value_t = 1)]
    min_workers: usize,
    /// Most stages a plan uses; further workers are spares that replace a stage whose worker dies.
    #[arg(long)]
    max_stages: Option<usize>,
    /// Token workers must present (empty = open).
    #[arg(long, env = "POTLUCK_JOIN_TOKEN", default_value = "")]
    join_token: String,
    #[command(flatten)]
    serving: ServingArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Milliseconds to wait after a membership change before re-planning (a shorter flap causes no re-plan).
    #[arg(long, default_value_t = u64::try_from(potluck_coordinator::cluster::DEFAULT_HOLD_DOWN.as_millis()).unwrap_or(300))]
    hold_down_ms: u64,
    /// TTL in seconds of the election lease (a dead leader is replaced after about this long).
    #[arg(long, default_value_t = potluck_coordinator::DEFAULT_LEADER_TTL.as_secs())]
    leader_ttl: u64,
    /// This coordinator's id (default: coordinator-<pid>).
    #[arg(long)]
    id: Option<String>,
    /// HTTP URL standbys redirect clients to (default: http://<--http address>).
    #[arg(long)]
    advertise_http: Option<String>,
    /// gRPC URL workers fetch shards from (default: http://<--grpc address>).
    #[arg(long)]
    advertise_grpc: Option<String>,
    #[command(flatten)]
    otlp: OtlpArgs,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The model file (default: the one `scripts/fetch-model` fetched).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Worker processes the plan uses (its stages), all on `cpu`.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Start one plan worker per listed device instead, e.g. `cpu,candle-cpu`.
    #[arg(long, value_delimiter = ',', conflicts_with = "workers")]
    devices: Vec<potluck_engine::Device>,
    /// Extra worker processes kept as spares (on `cpu`): one replaces a stage whose worker dies.
    #[arg(long, default_value_t = 0)]
    spares: usize,
    /// Address of the HTTP API.
    #[arg(long, default_value = DEFAULT_HTTP)]
    http: String,
    /// How hidden states travel between stages.
    #[arg(long, default_value = "f16")]
    wire_dtype: WireDtype,
    /// Total compute threads, split across the workers (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where workers cache their shards (default: ~/.cache/potluck/shards).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[command(flatten)]
    serving: ServingArgs,
    /// Also passed on to the workers.
    #[command(flatten)]
    otlp: OtlpArgs,
}

/// `$XDG_CACHE_HOME/potluck/shards`, else `~/.cache/potluck/shards`.
fn default_cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map_or_else(|| PathBuf::from(potluck_worker::config::DEFAULT_CACHE_DIR), |c| c.join("potluck").join("shards"))
}

fn url(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Resolves on Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c().await,
    };
    tokio::select! {
        () = ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.lease_ttl >= 1, "--lease-ttl must be at least 1 second");
    let etcd = a.etcd.config()?.map(|etcd| potluck_worker::EtcdRegistration {
        etcd,
        cluster: a.etcd.cluster.clone(),
        lease_ttl: std::time::Duration::from_secs(a.lease_ttl),
    });
    runtime()?.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("binding {}", a.listen))?;
        let config = potluck_worker::WorkerConfig {
            coordinator: a.coordinator.as_deref().map(url),
            etcd,
            advertise: a.advertise,
            threads: a.threads,
            device: a.device,
            cache_dir: a.cache_dir.unwrap_or_else(default_cache_dir),
            worker_id: a.id,
            join_token: a.join_token,
            progress: a.progress,
            ..potluck_worker::WorkerConfig::default()
        };
        eprintln!("[potluck] worker listening on {}", listener.local_addr()?);
        potluck_worker::run(listener, config, terminated()).await?;
        Ok(())
    })
}

pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(&a.grpc).await.with_context(|| format!("binding {}", a.grpc))?;
        let http = tokio::net::TcpListener::bind(&a.http).await.with_context(|| format!("binding {}", a.http))?;
        let mut config = CoordinatorConfig::new(a.model);
        config.wire_dtype = a.wire_dtype;
        config.min_workers = a.min_workers;
        anyhow::ensure!(a.max_stages != Some(0), "--max-stages must be at least 1");
        config.max_stages = a.max_stages;
        config.join_token = a.join_token;
        a.serving.apply(&mut config)?;
        config.hold_down = std::time::Duration::from_millis(a.hold_down_ms);
        config.cluster = a.etcd.cluster.clone();
        config.advertise_http = a.advertise_http;
        config.advertise_grpc = a.advertise_grpc;
        if let Some(id) = a.id {
            config.id = id;
        }
        let membership: Arc<dyn Membership> = match a.etcd.config()? {
            None => Arc::new(InMemoryMembership::default()),
            Some(etcd) => {
                anyhow::ensure!(a.leader_ttl >= 1, "--leader-ttl must be at least 1 second");
                let client = a.etcd.client(etcd).await?;
                let keys = potluck_etcd::ClusterKeys::new(&config.cluster)?;
                config.etcd = Some(EtcdSettings {
                    client: client.clone(),
                    leader_ttl: std::time::Duration::from_secs(a.leader_ttl),
                });
                EtcdMembership::start(client, &keys)
            }
        };
        eprintln!("[potluck] coordinator: gRPC {}, HTTP http://{}", grpc.local_addr()?, http.local_addr()?);
        potluck_coordinator::run(grpc, http, config, membership, terminated()).await?;
        Ok(())
    })
}

pub fn up(mut a: UpArgs) -> anyhow::Result<()> {
    let devices = match std::mem::take(&mut a.devices) {
        some if !some.is_empty() => some,
        _ => vec![potluck_engine::Device::Cpu; a.workers],
    };
    a.workers = devices.len();
    anyhow::ensure!(a.workers >= 1, "--workers must be at least 1");
    anyhow::ensure!(
        a.model.exists(),
        "model {} not found: run scripts/fetch-model, or pass --model",
        a.model.display()
    );
    let total =
        if a.threads == 0 { std::thread::available_parallelism().map_or(1, std::num::NonZero::get) } else { a.threads };
    let processes = a.workers + a.spares;
    let per_worker = (total / processes).max(1);
    runtime()?.block_on(async move {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let grpc_addr = grpc.local_addr()?;
        let http = tokio::net::TcpListener::bind(&a.http).await.with_context(|| format!("binding {}", a.http))?;
        let http_addr = http.local_addr()?;
        let mut config = CoordinatorConfig::new(a.model.clone());
        config.wire_dtype = a.wire_dtype;
        config.min_workers = a.workers;
        config.max_stages = Some(a.workers);
        a.serving.apply(&mut config)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let coordinator = tokio::spawn(potluck_coordinator::run(
            grpc,
            http,
            config,
            Arc::new(InMemoryMembership::default()),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let fleet = Fleet {
            exe: std::env::current_exe()?,
            coordinator: grpc_addr.to_string(),
            threads: per_worker,
            devices,
            cache_dir: a.cache_dir.clone().unwrap_or_else(default_cache_dir),
            otlp: a.otlp.endpoint.clone(),
        };
        let mut children = Vec::new();
        for i in 0..processes {
            children.push(fleet.start(i)?);
        }
        let base = format!("http://{http_addr}");
        eprintln!("[potluck] {} workers + {} spares × {per_worker} threads; waiting for the plan…", a.workers, a.spares);
        let ready = async {
            loop {
                if let Ok(s) = std::net::TcpStream::connect(http_addr) {
                    drop(s);
                    if http_ready(http_addr).await {
                        break;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let stop = terminated();
        tokio::pin!(stop);
        let mut stopping = false;
        tokio::select! {
            () = ready => {
                println!("Potluck is serving {} on {base}", a.model.display());
                println!("  cluster: curl -s {base}/v1/cluster");
                println!(
                    "  try:     curl -s {base}/v1/completions -H 'Content-Type: application/json' \\\n             -d '{{\"prompt\": \"The capital of France is\", \"max_tokens\": 32, \"temperature\": 0}}'"
                );
                println!("Ctrl-C stops the cluster.");
            }
            () = &mut stop => stopping = true,
        }
        // Serve until Ctrl-C; a worker that exits is started again and rejoins as a new member.
        while !stopping {
            tokio::select! {
                () = &mut stop => stopping = true,
                i = first_exit(&mut children) => {
                    eprintln!("[potluck] worker {i} exited; starting it again");
                    tokio::select! {
                        () = &mut stop => break,
                        () = tokio::time::sleep(RESTART_DELAY) => {}
                    }
                    match fleet.start(i) {
                        Ok(c) => children[i] = c,
                        Err(e) => eprintln!("[potluck] could not restart worker {i}: {e:#}"),
                    }
                }
            }
        }
        stop_all(&mut children).await;
        let _ = stop_tx.send(());
        coordinator.await??;
        Ok(())
    })
}

/// Wait before starting a worker that exited again, so a worker that fails at once does not spin.
const RESTART_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a worker has to stop after SIGTERM before it is killed.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How `potluck up` starts its worker processes.
struct Fleet {
    exe: PathBuf,
    coordinator: String,
    threads: usize,
    /// The plan workers' devices, in order; spares (beyond the list) run on `cpu`.
    devices: Vec<potluck_engine::Device>,
    cache_dir: PathBuf,
    otlp: Option<String>,
}

impl Fleet {
    /// Starts worker `i` (`worker-<i>`); it is killed if its handle is dropped.
    fn start(&self, i: usize) -> anyhow::Result<tokio::process::Child> {
        tokio::process::Command::new(&self.exe)
            .args(["worker", "--listen", "127.0.0.1:0", "--coordinator", &self.coordinator])
            .args(["--device", &self.devices.get(i).cloned().unwrap_or(potluck_engine::Device::Cpu).to_string()])
            .args(["--threads", &self.threads.to_string(), "--id", &format!("worker-{i}")])
            // Several workers share this terminal: bars redrawn in place would overwrite each other.
            .args(["--progress", "log"])
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .args(self.otlp.iter().flat_map(|e| ["--otlp-endpoint", e.as_str()]))
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")
    }
}

/// SIGTERM to every worker, so they shut down cleanly; SIGKILL to any still running after the grace.
async fn stop_all(children: &mut [tokio::process::Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
        }
    }
    for c in children.iter_mut() {
        if tokio::time::timeout(STOP_GRACE, c.wait()).await.is_err() {
            let _ = c.kill().await;
        }
    }
}

/// The index of the first worker to exit.
async fn first_exit(children: &mut [tokio::process::Child]) -> usize {
    loop {
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(_)) = c.try_wait() {
                return i;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn http_ready(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return false };
    let req = format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}
