//! One grouped-attention call (SmolLM2's shape: 9 query heads over 3
//! key/value heads of 64), repeated over caches that stay in L1/L2 or that
//! must come from memory: how far attention is from its arithmetic.
//!
//! `cargo run --release --example attention_cycles -p potluck-engine -- TOKENS`
//!
//! Prints nanoseconds per call and per cached token, in cache and cold.

use std::time::Instant;

use half::f16;
use potluck_engine::kernels::attention::{attend_group, AttnShape, Visible};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tokens: usize = std::env::args().nth(1).map_or(Ok(80), |a| a.parse())?;
    let shape = AttnShape { heads: 9, kv_heads: 3, head_dim: 64 };
    let kv_dim = shape.kv_heads * shape.head_dim;
    // Many sessions' caches, about 256 MB in all: walking them is cold.
    let sessions = (256 << 20) / (2 * tokens * kv_dim * 2);
    #[allow(clippy::cast_precision_loss)]
    let fill = |i: usize| f16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5);
    let keys: Vec<f16> = (0..sessions * tokens * kv_dim).map(fill).collect();
    let values: Vec<f16> = (0..sessions * tokens * kv_dim).map(|i| fill(i + 13)).collect();
    #[allow(clippy::cast_precision_loss)]
    let q: Vec<f32> = (0..3 * 64).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let mut scores = vec![0.0; 3 * tokens];
    let mut out = vec![0.0; 3 * 64];
    let span = tokens * kv_dim;
    let mut run = |label: &str, pick: &dyn Fn(usize) -> usize, calls: usize| {
        let started = Instant::now();
        for c in 0..calls {
            let at = |s: usize| Visible {
                keys: &keys[s * span..(s + 1) * span],
                values: &values[s * span..(s + 1) * span],
                tokens,
            };
            let (seen, ahead) = (at(pick(c)), at(pick(c + 1)));
            for kvh in 0..3 {
                attend_group(shape, kvh, &q, seen, Some(ahead), &mut scores, &mut out);
            }
        }
        #[allow(clippy::cast_precision_loss)]
        let ns = started.elapsed().as_nanos() as f64 / (calls * 3) as f64;
        #[allow(clippy::cast_precision_loss)]
        let per_token = ns / tokens as f64;
        println!("{label}: {ns:.0} ns per (row, kv head), {per_token:.2} ns per token");
    };
    run("in cache", &|_| 0, 300_000);
    run("cold    ", &|c| (c * 7) % sessions, 100_000);
    std::hint::black_box(&out);
    Ok(())
}
