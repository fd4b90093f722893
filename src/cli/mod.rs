//! Subcommands. Each lives in its own module and owns its flags.

mod bench;
mod cluster;
mod etcd;
mod generate;
mod logits;
mod perplexity;
mod plan;
mod selftest;
mod serving;
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
    /// Write the logits at every position of a token sequence (for agreement checks).
    Logits(logits::Args),
    /// Measure perplexity on a text file (llama.cpp's method).
    Perplexity(perplexity::Args),
    /// Start a local cluster: a coordinator and N worker processes on 127.0.0.1.
    Up(cluster::UpArgs),
    /// Run a worker that serves a pipeline stage.
    Worker(cluster::WorkerArgs),
    /// Run a coordinator: HTTP API, planner and shard server.
    Coordinator(cluster::CoordinatorArgs),
    /// Show what the planner would do with a pool described in a file: pipelines, cuts, who is left out, predicted tok/s.
    Plan(plan::Args),
    /// Show a cluster as etcd holds it: workers, stages, epoch and leader.
    Status(etcd::StatusArgs),
    /// Check a device's kernels against the native CPU ones: matmul types, layers, perplexity, decode speed.
    Selftest(selftest::Args),
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
            Command::Generate(_)
            | Command::Logits(_)
            | Command::Perplexity(_)
            | Command::Selftest(_)
            | Command::Plan(_)
            | Command::Bench(_)
            | Command::Status(_) => None,
        };
        telemetry::init(export)
    }

    /// Runs the chosen subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Generate(a) => generate::run(a),
            Command::Logits(a) => logits::run(a),
            Command::Perplexity(a) => perplexity::run(a),
            Command::Selftest(a) => selftest::run(a),
            Command::Plan(a) => plan::run(a),
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
    /// Cut the model into stages at these layers instead, e.g. `10,20` runs
    /// layers [0, 10), [10, 20) and [20, end): the boundaries a cluster plan
    /// reports, so a pipeline can be compared with one process exactly.
    #[arg(long, value_delimiter = ',', conflicts_with = "stages")]
    pub split_at: Vec<usize>,
    /// How hidden states pass between in-process stages.
    #[arg(long, default_value = "f32")]
    pub wire_dtype: potluck_engine::WireDtype,
    /// KV cache budget in MiB, per stage.
    #[arg(long, default_value_t = 1024)]
    pub kv_budget_mib: usize,
    /// Device of every stage: `cpu` (native kernels), `candle-cpu`, `cuda[:N]` or `metal`.
    #[arg(long, default_value = "cpu", conflicts_with = "devices")]
    pub device: potluck_engine::Device,
    /// One device per stage instead, e.g. `cpu,candle-cpu` with `--stages 2`.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<potluck_engine::Device>,
}

impl EngineArgs {
    /// Opens the model and loads its stages.
    pub fn load(&self) -> anyhow::Result<(potluck_engine::ModelFile, potluck_engine::LocalPipeline)> {
        use anyhow::Context as _;
        let file = potluck_engine::ModelFile::open(&self.model)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let bounds = stage_boundaries(file.config().layers, self.stages, &self.split_at)?;
        let devices = match self.devices.as_slice() {
            [] => vec![self.device; bounds.len() - 1],
            some => some.to_vec(),
        };
        let pipe = potluck_engine::LocalPipeline::load_on(
            &file,
            &bounds,
            &devices,
            self.wire_dtype,
            self.kv_budget_mib << 20,
            self.threads,
        )?;
        Ok((file, pipe))
    }
}

/// The boundaries `[0, …, layers]` of the stages: cut at `split_at` if given,
/// else `stages` near-equal parts. A cut outside `1..layers` or out of order
/// is an error naming the flag, so a typo cannot silently run another split.
fn stage_boundaries(layers: usize, stages: usize, split_at: &[usize]) -> anyhow::Result<Vec<usize>> {
    if split_at.is_empty() {
        anyhow::ensure!(stages >= 1, "--stages must be at least 1");
        anyhow::ensure!(stages <= layers, "--stages {stages}: the model has only {layers} layers");
        return Ok(potluck_engine::LocalPipeline::even_boundaries(layers, stages));
    }
    let shown = split_at.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let mut bounds = vec![0];
    for &cut in split_at {
        anyhow::ensure!(
            (1..layers).contains(&cut),
            "--split-at {shown}: cut {cut} is outside 1..{layers} (the model has {layers} layers)"
        );
        anyhow::ensure!(
            bounds.last().is_some_and(|&prev| cut > prev),
            "--split-at {shown}: cuts must increase strictly"
        );
        bounds.push(cut);
    }
    bounds.push(layers);
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::stage_boundaries;

    #[test]
    fn stage_boundaries_come_from_cuts_or_a_stage_count() {
        assert_eq!(stage_boundaries(30, 1, &[]).ok(), Some(vec![0, 30]));
        assert_eq!(stage_boundaries(30, 3, &[]).ok(), Some(vec![0, 10, 20, 30]));
        assert_eq!(stage_boundaries(30, 1, &[7, 19]).ok(), Some(vec![0, 7, 19, 30]));
        assert_eq!(stage_boundaries(30, 1, &[29]).ok(), Some(vec![0, 29, 30]));
        for (stages, cuts, needle) in [
            (1, &[0][..], "outside 1..30"),
            (1, &[30][..], "outside 1..30"),
            (1, &[12, 12][..], "increase strictly"),
            (1, &[20, 10][..], "increase strictly"),
            (0, &[][..], "at least 1"),
            (31, &[][..], "only 30 layers"),
        ] {
            let err = stage_boundaries(30, stages, cuts).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(needle), "{stages} stages, cuts {cuts:?}: {err:?}");
        }
    }
}
