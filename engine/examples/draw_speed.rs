//! Time of one untruncated draw (temperature 0.8, no top-k/p, min-p) over a
//! SmolLM2-sized vocabulary of 49,152 logits: the per-row sampling cost the
//! last stage pays when serving.
//!
//! `cargo run --release --example draw_speed -p potluck-engine`

use potluck_engine::{Sampler, SamplingParams};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let vocab = 49_152;
    #[allow(clippy::cast_precision_loss)]
    let logits: Vec<f32> = (0..vocab).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
    let mut sampler = Sampler::new(SamplingParams { temperature: 0.8, seed: 3, ..SamplingParams::default() })?;
    let draws = 2000;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        // The sum of the drawn ids shows that every build draws the same tokens.
        let ids: u64 = (0..draws).map(|_| u64::from(sampler.sample(&logits, &[]).token)).sum();
        #[allow(clippy::cast_precision_loss)]
        let micros = started.elapsed().as_secs_f64() / f64::from(draws) * 1e6;
        println!("{micros:.1} µs per draw (drawn ids sum to {ids})");
    }
    Ok(())
}
