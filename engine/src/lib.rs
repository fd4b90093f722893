//! Potluck's model engine: runs any layer range of a Llama-family model for
//! many sessions at once, with deterministic, batch-invariant numerics.
//!
//! No networking lives here. The worker and the coordinator build on:
//! - [`ModelFile`]: GGUF or safetensors, read one tensor at a time;
//! - [`Stage`]: a layer range with `forward` over a batch of rows;
//! - [`KvCache`]: per-session keys and values under a byte budget;
//! - [`Tokenizer`] and [`ChatTemplate`];
//! - [`Sampler`]: greedy, temperature, top-k/p, min-p, penalties, logprobs.

pub mod backend;
pub mod chat;
pub mod config;
pub mod error;
pub mod fixture;
pub mod gguf;
pub mod hidden;
pub mod kernels;
pub mod kv_cache;
pub mod local;
pub mod model_file;
pub mod perplexity;
pub mod pool;
pub mod quant;
pub mod rng;
pub mod sampling;
pub mod self_check;
pub mod shard;
pub mod stage;
pub mod synth;
pub mod tokenizer;
mod weight_bytes;

pub use backend::{Device, DeviceCache, DeviceError, DeviceStage, SessionCache, StageBackend};
pub use chat::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig};
pub use error::{EngineError, Result};
pub use hidden::{Hidden, WireDtype};
pub use kv_cache::{KvCache, SessionId};
pub use local::LocalPipeline;
pub use model_file::ModelFile;
pub use pool::ComputePool;
pub use sampling::{Sampled, Sampler, SamplingParams};
pub use stage::{Logits, Row, Stage, StageInput, StageOutput};
pub use tokenizer::Tokenizer;
