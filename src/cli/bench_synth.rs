//! `potluck bench synth`: writes a synthetic model with a real 7-8B model's
//! shape and llama.cpp's per-tensor type mix, so engine and llama.cpp can be
//! measured side by side at full size without downloading a model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use potluck_engine::synth::{self, FileType, Progress, Shape, SynthSpec};

/// Options of `potluck bench synth`.
#[derive(Debug, clap::Args)]
pub struct SynthBench {
    /// Model shape: llama2-7b, llama3-8b, qwen2-7b or mistral-7b.
    #[arg(long)]
    shape: String,
    /// File type: q4_k_m, q5_k_m, q4_0, q8_0, q6_k or f16.
    #[arg(long)]
    dtype: String,
    /// Output file (written as OUT.partial, renamed when complete).
    #[arg(long)]
    out: PathBuf,
    /// GGUF file whose tokenizer metadata (`tokenizer.*`, chat template
    /// included) is copied. Its vocabulary sets the token_embd and output
    /// rows: from SmolLM2, 49,152 tokens, not the named model's.
    #[arg(long)]
    tokenizer_from: PathBuf,
    /// Seed of the random weights; the same seed writes the same file.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write only this many layers (for tests and quick checks).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    layers: Option<u64>,
    /// Generator threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

impl SynthBench {
    /// Writes the file, reporting progress on stderr.
    #[allow(clippy::cast_precision_loss)]
    pub fn run(self) -> anyhow::Result<()> {
        let mut model = Shape::parse(&self.shape)?.config();
        if let Some(layers) = self.layers {
            model.layers = usize::try_from(layers)?;
        }
        let spec =
            SynthSpec { model, file_type: FileType::parse(&self.dtype)?, seed: self.seed, threads: self.threads };
        let started = Instant::now();
        let mut last_report = 0.0;
        let mut report = |p: &Progress| {
            if p.seconds - last_report >= 1.0 || p.tensors_done == p.tensors {
                last_report = p.seconds;
                eprintln!(
                    "[synth] tensor {}/{}: {:.0} of {:.0} MB, {:.0} MB/s",
                    p.tensors_done,
                    p.tensors,
                    p.bytes_done as f64 / 1e6,
                    p.bytes as f64 / 1e6,
                    p.bytes_done as f64 / 1e6 / p.seconds.max(1e-9),
                );
            }
        };
        let done = synth::write(&spec, &self.tokenizer_from, &self.out, &mut report)
            .with_context(|| format!("writing {}", self.out.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        let report = serde_json::json!({
            "out": self.out.display().to_string(),
            "shape": self.shape,
            "dtype": self.dtype,
            "layers": spec.model.layers,
            "tensors": done.tensors,
            "tensor_bytes": done.bytes,
            "seconds": seconds,
            "mb_per_s": done.bytes as f64 / 1e6 / seconds.max(1e-9),
        });
        println!("{report}");
        Ok(())
    }
}
