//! `potluck generate`: the completion goes to stdout as it is produced;
//! statistics go to stderr.

use std::io::Write as _;
use std::time::Instant;

use potluck_engine::{ChatMessage, SamplingParams, SessionId};

use super::EngineArgs;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Top-k truncation (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus truncation (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Min-p truncation (0 = off).
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let (file, mut pipe) = a.engine.load()?;
    let tok = file.tokenizer()?;
    let text = if a.chat {
        let template = tok.chat_template().ok_or_else(|| anyhow::anyhow!("--chat: the model has no chat template"))?;
        template.render(&[ChatMessage { role: "user".into(), content: a.prompt.clone() }], true)?
    } else {
        a.prompt.clone()
    };
    let prompt = tok.encode(&text, true)?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut sampler = potluck_engine::Sampler::new(SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repeat_penalty,
        seed: a.seed,
        ..SamplingParams::default()
    })?;
    let mut out = std::io::stdout().lock();
    let mut decoder = tok.stream_decoder();
    let mut first_token = None;
    let start = Instant::now();
    let mut write_err = None;
    let generated = pipe.generate(
        SessionId(1),
        &prompt,
        a.max_tokens,
        &mut sampler,
        |t| tok.is_stop(t),
        |s| {
            first_token.get_or_insert_with(Instant::now);
            if tok.is_stop(s.token) {
                return;
            }
            match decoder.push(s.token) {
                Ok(piece) => {
                    if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                        write_err.get_or_insert(e);
                    }
                }
                Err(e) => {
                    write_err.get_or_insert(std::io::Error::other(e.to_string()));
                }
            }
        },
    )?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    out.write_all(decoder.finish()?.as_bytes())?;
    out.flush()?;
    let prefill_s = first_token.map_or(0.0, |t| (t - start).as_secs_f64());
    let decode_s = first_token.map_or(0.0, |t| t.elapsed().as_secs_f64());
    #[allow(clippy::cast_precision_loss)]
    let (np, ng) = (prompt.len() as f64, generated.len() as f64);
    eprintln!(
        "\n[potluck] load {load_s:.2}s | prompt {np} tok, {:.1} tok/s | generated {ng} tok, {:.1} tok/s | {} threads",
        np / prefill_s.max(1e-9),
        (ng - 1.0).max(0.0) / decode_s.max(1e-9),
        pipe.threads()
    );
    Ok(())
}
