//! `potluck logits`: the logits at every position of a fixed token sequence,
//! written as raw little-endian f32 (`positions × vocab`, row-major).
//!
//! Why: agreement with another engine (`scripts/logits-vs-llamacpp`) is
//! checked on the whole distribution at every position, not on sampled
//! text; token ids, not text, so both engines see the same input whatever
//! their tokenizers do. One sequence, fed in chunks of `--chunk` rows with
//! every row asking for logits, exactly as `LocalPipeline::forward` computes
//! them.

use anyhow::Context as _;
use potluck_engine::{Row, SessionId};

use super::EngineArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Token ids, comma-separated, fed from position 0.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Where to write the logits: `positions × vocab` little-endian f32.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Rows per forward pass (the prompt is fed in chunks of this many).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    chunk: u16,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (file, mut pipe) = a.engine.load()?;
    let vocab = file.config().vocab;
    if let Some(&bad) = a.tokens.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("--tokens: id {bad} is outside the vocabulary (0..{vocab})");
    }
    let session = SessionId(1);
    let mut bytes = Vec::with_capacity(a.tokens.len() * vocab * 4);
    for (c, ids) in a.tokens.chunks(usize::from(a.chunk)).enumerate() {
        let start = c * usize::from(a.chunk);
        let rows: Vec<Row> = (0..ids.len()).map(|i| Row { session, position: start + i, logits: true }).collect();
        let logits = pipe.forward(&rows, ids)?;
        bytes.extend(logits.data.iter().flat_map(|v| v.to_le_bytes()));
    }
    std::fs::write(&a.out, &bytes).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("[potluck] wrote {} positions × {vocab} logits to {}", a.tokens.len(), a.out.display());
    Ok(())
}
