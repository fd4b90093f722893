//! The compute kernels, in one place: every loop the engine spends its time
//! in, so their `unsafe` SIMD code, their bit-exactness rules and their
//! run-time ISA choice are reviewed together.
//!
//! - [`matmul`]: weight matrices in their file format and the batched matmul;
//! - `simd`: the run-time selected quantized dot products and activation
//!   quantizers (AVX-512 VNNI, AVX-VNNI, AVX2, NEON with dotprod);
//! - [`attention`]: grouped-query attention over the KV cache;
//! - `softmax`, [`activation`] (SiLU), [`norm`] (RMSNorm), [`rope`]:
//!   the element-wise steps, each a fixed-order reduction so results never
//!   depend on the batch or the thread count.

pub mod activation;
pub mod attention;
pub(crate) mod lanes;
pub mod matmul;
pub mod norm;
pub mod rope;
pub(crate) mod simd;
pub(crate) mod softmax;
