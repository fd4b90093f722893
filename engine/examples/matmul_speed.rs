//! Throughput of the quantized matmul at one and at eight activation rows,
//! on SmolLM2's lm_head shape (Q8_0, 49,152 × 576) and an FFN shape (Q4_1,
//! 1,536 × 576): cycling over enough copies that the weights stream from
//! memory, as in a forward pass, and once with weights that stay in L2.
//! The two show whether a kernel waits on memory or on arithmetic: eight
//! rows are what each stage computes when serving 16 streams.
//!
//! With the argument `llama`, Llama-2-7B's shapes instead (4,096 × 4,096
//! and 11,008 × 4,096, in Q4_K, Q5_K, Q6_K, Q4_0 and Q5_0, or only the type
//! named after `llama`) at 1, 8 and 16 rows, with enough copies (about
//! 600 MB) that the weights stream from memory.
//!
//! `cargo run --release --example matmul_speed -p potluck-engine [-- llama [Q5_K]]`

use potluck_engine::fixture::unit_scale_matrix;
use potluck_engine::kernels::matmul::{Activations, Matrix};
use potluck_engine::quant::GgmlType;
use potluck_engine::ComputePool;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = ComputePool::new(1);
    let llama = std::env::args().nth(1).as_deref() == Some("llama");
    let shapes: Vec<(&str, GgmlType, usize, usize, usize)> = if llama {
        let mut v = Vec::new();
        let types = [
            ("Q4_K", GgmlType::Q4_K),
            ("Q5_K", GgmlType::Q5_K),
            ("Q6_K", GgmlType::Q6_K),
            ("Q4_0", GgmlType::Q4_0),
            ("Q5_0", GgmlType::Q5_0),
        ];
        let only = std::env::args().nth(2);
        for (name, dtype) in types.into_iter().filter(|(n, _)| only.as_deref().is_none_or(|o| o == *n)) {
            for (rows, cols) in [(4_096, 4_096), (11_008, 4_096)] {
                let bytes = rows * dtype.row_bytes(cols).ok_or("bad shape")?;
                v.push((name, dtype, rows, cols, (600usize << 20).div_ceil(bytes)));
            }
        }
        v
    } else {
        vec![
            ("lm_head Q8_0", GgmlType::Q8_0, 49_152, 576, 3),
            ("ffn up Q4_1", GgmlType::Q4_1, 1_536, 576, 120),
            ("ffn up Q4_1 in L2", GgmlType::Q4_1, 1_536, 576, 1),
            ("lm_head slice Q8_0 in L2", GgmlType::Q8_0, 2_048, 576, 1),
        ]
    };
    let batches: &[usize] = if llama { &[1, 8, 16] } else { &[1, 8] };
    for (name, dtype, rows, cols, copies) in shapes {
        let mats: Vec<Matrix> = (0..copies)
            .map(|c| unit_scale_matrix(dtype, rows, cols, c as u64).ok_or("bad shape"))
            .collect::<Result<_, _>>()?;
        let bytes: usize = mats[0].bytes();
        for &m in batches {
            #[allow(clippy::cast_precision_loss)]
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let mut out = vec![0.0f32; m * rows];
            let mut times = Vec::new();
            for _ in 0..7 {
                let started = std::time::Instant::now();
                for w in &mats {
                    w.matmul(&Activations::new(&x, m, cols), &mut out, &pool);
                }
                times.push(started.elapsed().as_secs_f64() / copies as f64);
            }
            times.sort_by(f64::total_cmp);
            let t = times[times.len() / 2];
            #[allow(clippy::cast_precision_loss)]
            let (gmac, gbs) = ((m * rows * cols) as f64 / t / 1e9, bytes as f64 / t / 1e9);
            println!(
                "{name} {rows}x{cols} m={m}: {:.1} µs per matmul, {gmac:.0} GMAC/s, {gbs:.1} GB/s of weights",
                t * 1e6
            );
        }
    }
    Ok(())
}
