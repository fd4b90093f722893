//! The engine's one error type.
//!
//! Every failure on input (a model file, a batch, a prompt) is a variant with
//! the fields a user needs to act on it, never a panic and never a bare string
//! from deep inside a parser.

use std::path::PathBuf;

/// What went wrong inside the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A GGUF file is malformed: truncated, wrong magic, or inconsistent.
    #[error("malformed GGUF file: {0}")]
    Gguf(String),
    /// A safetensors file or its `config.json` is malformed.
    #[error("malformed safetensors model: {0}")]
    Safetensors(String),
    /// The model's architecture is not one the engine implements.
    #[error("unsupported architecture `{0}` (supported: llama, qwen2)")]
    UnknownArchitecture(String),
    /// A metadata key the engine needs is absent or has the wrong type.
    #[error("model metadata `{key}` is missing or not {expected}")]
    MissingMetadata {
        /// The metadata key.
        key: String,
        /// The type the engine expected.
        expected: &'static str,
    },
    /// A tensor the requested layer range needs is not in the file.
    #[error("tensor `{0}` is missing from the model file")]
    MissingTensor(String),
    /// A tensor has a shape other than the one the config implies.
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor name.
        name: String,
        /// The shape the config implies (innermost dimension first).
        expected: Vec<usize>,
        /// The shape found in the file.
        actual: Vec<usize>,
    },
    /// A tensor is stored in a data type the engine cannot compute with.
    #[error("tensor `{name}` has unsupported data type {dtype}")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The data type's name.
        dtype: String,
    },
    /// The requested layer range does not fit the model.
    #[error("layer range {start}..{end} is invalid for a model with {layers} layers")]
    LayerRange {
        /// First layer.
        start: usize,
        /// One past the last layer.
        end: usize,
        /// Layers in the model.
        layers: usize,
    },
    /// A batch is inconsistent with the stage or the session state.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// A position is past the model's context window.
    #[error("position {position} is past the context length {context}")]
    ContextExceeded {
        /// The offending position (0-based).
        position: usize,
        /// The model's context length.
        context: usize,
    },
    /// Writing the batch's keys and values would exceed the KV cache budget.
    #[error("KV cache budget exceeded: need {needed} bytes, {used} of {budget} in use")]
    KvBudgetExceeded {
        /// Bytes the batch needs.
        needed: usize,
        /// Bytes already in use.
        used: usize,
        /// The budget in bytes.
        budget: usize,
    },
    /// The tokenizer could not be built or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template failed to parse or render.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// Sampling parameters are out of range.
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    /// Hidden-state bytes do not match their declared dtype and shape.
    #[error("invalid hidden states: {0}")]
    Hidden(String),
    /// A device cannot be used (unknown, not built in, absent).
    #[error(transparent)]
    Device(#[from] crate::backend::DeviceError),
    /// The device ran out of memory while a stage loaded onto it.
    #[error("device {device} is out of memory loading `{tensor}` ({bytes} bytes); give it fewer layers: {reason}")]
    DeviceOutOfMemory {
        /// The device.
        device: String,
        /// The tensor being loaded.
        tensor: String,
        /// Its size in the file.
        bytes: usize,
        /// What the driver said.
        reason: String,
    },
    /// A self-check was asked to compare native with itself.
    #[error("device `{device}` is the native reference; name a candle device (candle-cpu, cuda[:N], metal)")]
    NotACandleDevice {
        /// The device asked for.
        device: String,
    },
    /// candle failed while loading onto or computing on a device.
    #[error("candle on {device} failed to {op}: {source}")]
    Candle {
        /// The device.
        device: String,
        /// What the stage was doing.
        op: &'static str,
        /// candle's error (boxed: it is large, and every engine result carries the enum).
        source: Box<candle_core::Error>,
    },
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
