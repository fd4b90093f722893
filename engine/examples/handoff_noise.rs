//! How sensitive is perplexity to a tiny change at a stage boundary?
//!
//! Splits the model at layer 15 and perturbs the hand-off: `none`, `f16`
//! rounding, or `noise` (every value times `1 + eps·u`, u uniform in [-1, 1]).
//! Used to show the noise floor of the f16/bf16 hand-off perplexity check
//! (see docs/benchmarks.md):
//!
//!     cargo run --release -p potluck-engine --example handoff_noise -- MODEL 1e-6 noise
#![allow(missing_docs, clippy::cast_precision_loss)]
use potluck_engine::*;
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(model), Some(eps), Some(mode)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: handoff_noise MODEL EPS none|f16|noise");
        return Ok(());
    };
    let eps: f32 = eps.parse().unwrap_or(0.0);
    let file = ModelFile::open(std::path::Path::new(model))?;
    let tok = file.tokenizer()?;
    let text = std::fs::read_to_string("testdata/apache-2.0.txt").unwrap_or_default();
    let tokens = tok.encode(&text, false)?;
    let a = Stage::load(&file, 0..15)?;
    let b = Stage::load(&file, 15..30)?;
    let pool = ComputePool::new(2);
    let (mut nll, mut n) = (0.0f64, 0usize);
    let ctx = 256;
    for w in 0..tokens.len() / ctx {
        let win = &tokens[w * ctx..(w + 1) * ctx];
        let mut ca = a.new_cache(1 << 30);
        let mut cb = b.new_cache(1 << 30);
        let rows: Vec<Row> =
            (0..ctx).map(|p| Row { session: SessionId(1), position: p, logits: p >= 128 && p + 1 < ctx }).collect();
        let StageOutput::Hidden(mut h) = a.forward(&rows, StageInput::Tokens(win), &mut ca, &pool)? else {
            return Ok(());
        };
        let mut s = 12345u64;
        for v in h.data.iter_mut() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            let r = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            match mode.as_str() {
                "noise" => *v *= 1.0 + eps * r,
                "f16" => *v = half::f16::from_f32(*v).to_f32(),
                _ => {}
            }
        }
        let StageOutput::Logits(l) = b.forward(&rows, StageInput::Hidden(&h), &mut cb, &pool)? else { return Ok(()) };
        for (i, &p) in l.rows.iter().enumerate() {
            nll -= f64::from(sampling::log_probs(l.row(i), win[p + 1], 0).0);
            n += 1;
        }
    }
    println!("{mode} {eps}: ppl {}", (nll / n as f64).exp());
    Ok(())
}
