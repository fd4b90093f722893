//! The Potluck worker: serves a stage of the model over gRPC (pipeline issue).
//! For now it re-exports the engine pieces a worker is built from.

pub use potluck_engine::{KvCache, Stage};
