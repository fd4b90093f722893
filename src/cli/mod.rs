//! Subcommands. Each lives in its own module and owns its flags.

mod bench;
mod cluster;
mod etcd;
mod generate;
mod perplexity;
mod telemetry;

use clap::{Parser, Subcommand};

/// Potluck: one LLM served from a pool of mixed machines.
#[derive(Debug, Parser)]
#[command(name = "potluck", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text from a prompt in this process.
    Generate(generate::Args),
    /// Measure perplexity on a text file (llama.cpp's method).
    Perplexity(perplexity::Args),
    /// Start a local cluster: a coordinator and N worker processes on 127.0.0.1.
    Up(cluster::UpArgs),
    /// Run a worker that serves a pipeline stage.
    Worker(cluster::WorkerArgs),
    /// Run a coordinator: HTTP API, planner and shard server.
    Coordinator(cluster::CoordinatorArgs),
    /// Show a cluster as etcd holds it: workers, stages, epoch and leader.
    Status(etcd::StatusArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Bench),
}

impl Cli {
    /// Installs logging (stderr, `RUST_LOG`) and, for cluster commands given `--otlp-endpoint`, span
    /// export. Keep the guard until exit: dropping it flushes the spans still queued.
    pub fn init_telemetry(&self) -> anyhow::Result<telemetry::Telemetry> {
        let export = match &self.command {
            Command::Up(a) => a.export(),
            Command::Worker(a) => a.export(),
            Command::Coordinator(a) => a.export(),
            Command::Generate(_) | Command::Perplexity(_) | Command::Bench(_) | Command::Status(_) => None,
        };
        telemetry::init(export)
    }

    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Generate(a) => generate::run(a),
            Command::Perplexity(a) => perplexity::run(a),
            Command::Bench(b) => b.run(),
            Command::Up(a) => cluster::up(a),
            Command::Worker(a) => cluster::worker(a),
            Command::Coordinator(a) => cluster::coordinator(a),
            Command::Status(a) => etcd::status(a),
        }
    }
}

/// Flags shared by every command that loads a model in-process.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// Model file: a .gguf, or a safetensors directory with config.json.
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// Compute threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Split the model into this many in-process stages (for testing splits).
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// How hidden states pass between in-process stages.
    #[arg(long, default_value = "f32")]
    pub wire_dtype: potluck_engine::WireDtype,
    /// KV cache budget in MiB, per stage.
    #[arg(long, default_value_t = 1024)]
    pub kv_budget_mib: usize,
}

impl EngineArgs {
    /// Opens the model and loads its stages.
    pub fn load(&self) -> anyhow::Result<(potluck_engine::ModelFile, potluck_engine::LocalPipeline)> {
        use anyhow::Context as _;
        let file = potluck_engine::ModelFile::open(&self.model)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let bounds = potluck_engine::LocalPipeline::even_boundaries(file.config().layers, self.stages);
        let pipe = potluck_engine::LocalPipeline::load(
            &file,
            &bounds,
            self.wire_dtype,
            self.kv_budget_mib << 20,
            self.threads,
        )?;
        Ok((file, pipe))
    }
}
