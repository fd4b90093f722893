//! Tensors read from a [`ModelFile`] onto a candle device: matrices stay in
//! their GGUF quantized layout (`QMatMul`), norms and biases become dense
//! f32 vectors.

use std::sync::Arc;

use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{Device as CDevice, Tensor};

use crate::backend::Device;
use crate::error::{EngineError, Result};
use crate::model_file::ModelFile;
use crate::quant::GgmlType;

/// The storage types candle keeps on a device, and candle's name for each.
/// Why not all of ours: these are the ones its CUDA and Metal kernels
/// implement; the rest are refused by name at load.
pub(crate) fn candle_dtype(t: GgmlType) -> Option<GgmlDType> {
    Some(match t {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q2_K => GgmlDType::Q2K,
        GgmlType::Q3_K => GgmlDType::Q3K,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
        GgmlType::Q8_1 | GgmlType::Q8_K => return None,
    })
}

/// Reads tensors of one model onto one device, naming the device in every error.
pub(super) struct Loader<'a> {
    pub file: &'a ModelFile,
    pub device: &'a CDevice,
    pub name: Device,
}

impl Loader<'_> {
    /// The `rows × cols` matrix `name`, quantized as stored.
    pub fn qtensor(&self, name: &str, rows: usize, cols: usize) -> Result<Arc<QTensor>> {
        let (dtype, dims, bytes) = self.file.raw(name)?;
        if dims != [cols, rows] {
            return Err(EngineError::TensorShape { name: name.into(), expected: vec![cols, rows], actual: dims });
        }
        let unsupported = || EngineError::UnsupportedDtype { name: name.into(), dtype: dtype.name().into() };
        let cdtype = candle_dtype(dtype).ok_or_else(unsupported)?;
        let expected = dtype.row_bytes(cols).and_then(|rb| rb.checked_mul(rows));
        if expected != Some(bytes.len()) || !cols.is_multiple_of(cdtype.block_size()) {
            return Err(unsupported());
        }
        qtensor_from_ggml(cdtype, &bytes, vec![rows, cols], self.device)
            .map(Arc::new)
            .map_err(|e| self.load_error(name, bytes.len(), e))
    }

    /// The matrix `name` ready to multiply.
    pub fn matmul(&self, name: &str, rows: usize, cols: usize) -> Result<QMatMul> {
        let q = self.qtensor(name, rows, cols)?;
        let bytes = q.storage_size_in_bytes();
        QMatMul::from_arc(q).map_err(|e| self.load_error(name, bytes, e))
    }

    /// A vector (a norm weight or a bias) as a dense f32 tensor.
    pub fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        let v = self.file.vector(name, len)?;
        Tensor::from_vec(v, len, self.device).map_err(|e| self.load_error(name, len * 4, e))
    }

    /// Out of memory when the driver says so, a candle error otherwise.
    pub fn load_error(&self, tensor: &str, bytes: usize, e: candle_core::Error) -> EngineError {
        let reason = e.to_string();
        let lower = reason.to_ascii_lowercase();
        if lower.contains("out of memory") || lower.contains("out_of_memory") {
            EngineError::DeviceOutOfMemory { device: self.name.to_string(), tensor: tensor.into(), bytes, reason }
        } else {
            EngineError::Candle { device: self.name.to_string(), op: "load weights", source: Box::new(e) }
        }
    }
}

/// Bytes a matrix holds on its device.
pub(super) fn matmul_bytes(m: &QMatMul) -> usize {
    match m {
        QMatMul::QTensor(q) => q.storage_size_in_bytes(),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.elem_count() * t.dtype().size_in_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_weight_type_but_the_activation_ones_maps_to_candle() {
        for t in GgmlType::ALL {
            assert!(candle_dtype(t).is_some(), "{t:?}");
        }
        assert!(candle_dtype(GgmlType::Q8_K).is_none());
    }

    #[test]
    fn out_of_memory_is_told_apart_from_other_failures() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = crate::fixture::TinyModel::default().write_gguf(dir.path()).expect("fixture");
        let file = ModelFile::open(&path).expect("model");
        let l = Loader { file: &file, device: &CDevice::Cpu, name: Device::CandleCpu };
        let oom = l.load_error("blk.0.attn_q.weight", 9, candle_core::Error::Msg("CUDA_ERROR_OUT_OF_MEMORY".into()));
        assert!(matches!(oom, EngineError::DeviceOutOfMemory { bytes: 9, .. }), "{oom}");
        assert!(oom.to_string().contains("fewer layers"));
        let other = l.load_error("x", 1, candle_core::Error::Msg("driver gone".into()));
        assert!(matches!(other, EngineError::Candle { .. }), "{other}");
        let d = file.config().hidden;
        assert!(matches!(l.qtensor("blk.0.attn_q.weight", d + 1, d), Err(EngineError::TensorShape { .. })));
    }
}
