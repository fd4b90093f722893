//! One packed matmul, in L2, repeated: a fixed workload to count cycles on.
//!
//! Wall-clock rates drift 10–15% within minutes on a shared host, far more
//! than a kernel change moves them; the cycles a process spends in user
//! space drift about 0.5%. So kernel changes are judged by
//!
//! `perf stat -e cycles:u target/release/examples/kernel_cycles q4_1 8`
//!
//! before and after (arguments: `q4_1`, `q8_0`, `q4_0`, `q4_k` or `q6_k`,
//! then 1..=8 activation rows). Shapes: an FFN projection (1,536 × 576, Q4_1
//! or Q4_0), a slice of the lm_head (2,048 × 576, Q8_0) and 1,024 × 1,024 for
//! the K-quants, all small enough to stay in L2, so the
//! kernel's arithmetic is what is timed. The checksum of the output bits
//! must not change either.
//!
//! `cargo build --release --example kernel_cycles -p potluck-engine`

use potluck_engine::fixture::unit_scale_matrix;
use potluck_engine::kernels::matmul::Activations;
use potluck_engine::quant::GgmlType;
use potluck_engine::ComputePool;

/// Matmuls timed per run.
const REPEATS: usize = 20_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (dtype, rows, cols) = match args.next().as_deref() {
        Some("q8_0") => (GgmlType::Q8_0, 2_048, 576),
        Some("q4_1") | None => (GgmlType::Q4_1, 1_536, 576),
        Some("q4_0") => (GgmlType::Q4_0, 1_536, 576),
        Some("q4_k") => (GgmlType::Q4_K, 1_024, 1_024),
        Some("q6_k") => (GgmlType::Q6_K, 1_024, 1_024),
        Some(other) => return Err(format!("unknown type `{other}`: q4_1, q8_0, q4_0, q4_k or q6_k").into()),
    };
    let m: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    if !(1..=8).contains(&m) {
        return Err("activation rows must be 1..=8".into());
    }
    let w = unit_scale_matrix(dtype, rows, cols, 1).ok_or("bad shape")?;
    let pool = ComputePool::new(1);
    #[allow(clippy::cast_precision_loss)]
    let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let mut out = vec![0.0f32; m * rows];
    let started = std::time::Instant::now();
    for _ in 0..REPEATS {
        w.matmul(&Activations::new(&x, m, cols), &mut out, &pool);
    }
    #[allow(clippy::cast_precision_loss)]
    let each = started.elapsed().as_secs_f64() / REPEATS as f64;
    let checksum = out.iter().fold(0u64, |a, v| a.wrapping_add(u64::from(v.to_bits())));
    println!("{dtype:?} × {m} rows: {:.2} µs per matmul, output checksum {checksum}", each * 1e6);
    Ok(())
}
