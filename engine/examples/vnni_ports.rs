//! Which operations of the packed kernels compete for the same execution
//! pipes: the arithmetic bound of batched decode on this CPU.
//!
//! A Q4_1 kernel pass over one block of eight activation rows issues 64
//! `vpdpbusd` (the integer dot products) and 24 `vmulps` (the scales), plus
//! conversions and adds. If the multiplies run on the pipes that run
//! `vpdpbusd`, they cost as much as 24 more dot products. This times fixed
//! instruction mixes with many independent chains, so only throughput
//! counts, and prints each mix's time per iteration against the pure
//! `vpdpbusd` mix: about 1.33 for "+ 4 mul" means the multiplies share the
//! pipes; about 1.0 means they are free. No clock frequency is needed.
//!
//! `cargo run --release --example vnni_ports -p potluck-engine`

#[cfg(target_arch = "x86_64")]
mod mixes {
    use std::arch::x86_64::*;
    use std::time::Instant;

    /// Iterations per timing.
    const ITERS: usize = 10_000_000;

    /// Seconds for `ITERS` iterations of the mix `mode`: 12 independent
    /// `vpdpbusd`, then (1) 4 `vmulps`, (2) also 4 conversions and 4 adds,
    /// (3) also 6 integer adds; mode 9 is one dependent chain of 12.
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn time(mode: u32) -> f64 {
        let mut a: [__m512i; 12] = std::array::from_fn(|i| _mm512_set1_epi32(i as i32));
        let mut f: [__m512; 8] = std::array::from_fn(|i| _mm512_set1_ps(1.0 + i as f32 * 1e-3));
        let (w, x, m) = (_mm512_set1_epi8(3), _mm512_set1_epi32(0x0102_0304), _mm512_set1_ps(1.000_000_1));
        let started = Instant::now();
        for _ in 0..ITERS {
            if mode == 9 {
                for _ in 0..12 {
                    a[0] = _mm512_dpbusd_epi32(a[0], w, x);
                }
            } else {
                for v in &mut a {
                    *v = _mm512_dpbusd_epi32(*v, w, x);
                }
            }
            if (1..=3).contains(&mode) {
                for v in &mut f[..4] {
                    *v = _mm512_mul_ps(*v, m);
                }
            }
            if (2..=3).contains(&mode) {
                for k in 4..8 {
                    f[k] = _mm512_add_ps(f[k], _mm512_cvtepi32_ps(a[k]));
                }
            }
            if mode == 3 {
                for k in 0..6 {
                    a[k] = _mm512_add_epi32(a[k], a[k + 6]);
                }
            }
            // SAFETY: an empty template; it only keeps the compiler from
            // folding iterations together.
            unsafe { std::arch::asm!("", options(nomem, nostack)) };
        }
        let seconds = started.elapsed().as_secs_f64();
        std::hint::black_box((a, f));
        seconds
    }

    /// Prints every mix's time relative to the pure `vpdpbusd` mix (median of five).
    pub fn run() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
            println!("this CPU has no AVX-512 VNNI: nothing to measure");
            return;
        }
        let median = |mode: u32| {
            // SAFETY: the features were detected above.
            let mut t: Vec<f64> = (0..5).map(|_| unsafe { time(mode) }).collect();
            t.sort_by(f64::total_cmp);
            t[2]
        };
        let base = median(0);
        println!("12 vpdpbusd, independent: 1.00");
        for (mode, name) in [
            (1, "+ 4 vmulps"),
            (2, "+ 4 vmulps + 4 vcvtdq2ps + 4 vaddps"),
            (3, "+ 4 vmulps + 4 vcvtdq2ps + 4 vaddps + 6 vpaddd"),
            (9, "12 vpdpbusd in one dependent chain"),
        ] {
            println!("{name}: {:.2}", median(mode) / base);
        }
    }
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    mixes::run();
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
