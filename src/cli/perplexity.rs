//! `potluck perplexity`: llama.cpp's method; the last stdout line is `perplexity: X`.

use anyhow::Context as _;

use super::EngineArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// The text to score.
    #[arg(long)]
    file: std::path::PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (file, mut pipe) = a.engine.load()?;
    let tok = file.tokenizer()?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let tokens = tok.encode(&text, true)?;
    eprintln!("[potluck] {} tokens, windows of {}", tokens.len(), a.ctx);
    let report = potluck_engine::perplexity::perplexity(&mut pipe, &tokens, a.ctx, |done, total, ppl| {
        eprintln!("[potluck] window {done}/{total}: running perplexity {ppl:.4}");
    })?;
    println!("windows: {}, scored tokens: {}", report.windows, report.scored);
    println!("perplexity: {:.4}", report.ppl);
    Ok(())
}
