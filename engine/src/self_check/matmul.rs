//! One quantized matmul on a device against the native kernel: the same
//! random weights, quantized once, and the same activations, at the batch
//! sizes where GPU kernels change strategy (CUDA: MMVQ up to 8 rows, MMQ
//! above).

use candle_core::quantized::{ggml_file::qtensor_from_ggml, QMatMul};
use candle_core::{Device as CDevice, Module, Tensor};
use serde::Serialize;

use super::Agreement;
use crate::backend::candle::candle_dtype;
use crate::backend::Device;
use crate::error::{EngineError, Result};
use crate::kernels::matmul::{Activations, Matrix};
use crate::pool::ComputePool;
use crate::quant::{quantize_row, GgmlType};
use crate::rng::Rng;

/// The weight types a GPU stage runs (those of common GGUF files).
pub const TYPES: [GgmlType; 7] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

/// Batch sizes checked: one row, a few (vector kernels), just past eight
/// (where CUDA leaves MMVQ), and a prefill-sized batch (MMQ).
pub const BATCHES: [usize; 4] = [1, 4, 9, 64];

/// Output features of the test matrix.
pub const ROWS: usize = 512;
/// Input features (a whole number of K-quant super-blocks).
pub const COLS: usize = 1024;

/// One type at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct MatmulCheck {
    /// The weight type.
    pub dtype: &'static str,
    /// Activation rows.
    pub batch: usize,
    /// The device's output against native's.
    pub agreement: Agreement,
}

/// `rows × cols` weights uniform in ±1 (what quantizers see in practice:
/// values of one scale), seeded so every run checks the same matrix.
fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
    #[allow(clippy::cast_possible_truncation)]
    (0..len).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect()
}

/// candle's handle on `device`, opened once for every check (a CUDA
/// context is costly to make); native has none to compare.
fn open(device: Device) -> Result<CDevice> {
    device.open_candle()?.ok_or(EngineError::NotACandleDevice { device: device.to_string() })
}

/// Multiplies a random `ROWS × COLS` matrix of `dtype` by `batch` random
/// rows on `device` and natively, and compares.
pub fn check(dtype: GgmlType, batch: usize, device: Device, pool: &ComputePool) -> Result<MatmulCheck> {
    check_on(dtype, batch, device, &open(device)?, pool)
}

fn check_on(dtype: GgmlType, batch: usize, device: Device, cdev: &CDevice, pool: &ComputePool) -> Result<MatmulCheck> {
    let fail =
        |op| move |e: candle_core::Error| EngineError::Candle { device: device.to_string(), op, source: Box::new(e) };
    let unsupported = || EngineError::UnsupportedDtype { name: "self-check matrix".into(), dtype: dtype.name().into() };
    let cdtype = candle_dtype(dtype).ok_or_else(unsupported)?;
    let mut rng = Rng::new(0x5E1F_7E57 ^ u64::from(dtype.id()));
    let weights = random(ROWS * COLS, &mut rng);
    let bytes: Vec<u8> = weights.chunks_exact(COLS).flat_map(|row| quantize_row(dtype, row)).collect();
    let native = Matrix::new(dtype, ROWS, COLS, bytes.clone()).ok_or_else(unsupported)?;
    let x = random(batch * COLS, &mut rng);

    let mut reference = vec![0.0f32; batch * ROWS];
    native.matmul(&Activations::new(&x, batch, COLS), &mut reference, pool);

    let q = qtensor_from_ggml(cdtype, &bytes, vec![ROWS, COLS], cdev).map_err(fail("load the test matrix"))?;
    let mm = QMatMul::from_qtensor(q).map_err(fail("load the test matrix"))?;
    let got: Vec<f32> = Tensor::from_slice(&x, (batch, COLS), cdev)
        .and_then(|x| mm.forward(&x))
        .and_then(|y| y.flatten_all())
        .and_then(|y| y.to_vec1())
        .map_err(fail("multiply the test matrix"))?;
    Ok(MatmulCheck { dtype: dtype.name(), batch, agreement: Agreement::of(&reference, &got, ROWS) })
}

/// Every type of [`TYPES`] at every size of [`BATCHES`].
pub fn check_all(device: Device, pool: &ComputePool) -> Result<Vec<MatmulCheck>> {
    let cdev = open(device)?;
    TYPES
        .iter()
        .flat_map(|&t| BATCHES.iter().map(move |&b| (t, b)))
        .map(|(t, b)| check_on(t, b, device, &cdev, pool))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_cpu_matmuls_agree_with_native_and_cpu_is_refused() {
        let pool = ComputePool::new(1);
        let dtypes = if crate::backend::candle_cpu_opens() { &[GgmlType::Q4_1, GgmlType::Q6_K][..] } else { &[] };
        for &dtype in dtypes {
            for batch in [1, 9] {
                let c = check(dtype, batch, Device::CandleCpu, &pool).expect("runs");
                // Both quantize activations to 8 bits and sum in f32; only the order differs.
                assert!(c.agreement.min_cosine > 0.9999, "{c:?}");
                assert!(c.agreement.max_rel < 1e-3, "{c:?}");
            }
        }
        let err = check(GgmlType::Q4_0, 1, Device::Cpu, &pool).expect_err("cpu is the reference");
        assert!(matches!(err, EngineError::NotACandleDevice { .. }), "{err}");
    }
}
