//! The Potluck coordinator: API, scheduler, planner and membership
//! (pipeline and serving issues). For now it re-exports the engine pieces a
//! coordinator is built from.

pub use potluck_engine::{Sampler, Tokenizer};
