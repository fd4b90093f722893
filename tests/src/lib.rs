//! Shared helpers for Potluck's integration tests: locating the real model
//! and the built `potluck` binary.

use std::path::PathBuf;

/// The SmolLM2 GGUF the README's test command fetched, if present.
///
/// `POTLUCK_MODEL` wins; otherwise `models/SmolLM2-135M-Instruct.Q4_1.gguf`
/// at the workspace root.
pub fn real_model() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("POTLUCK_MODEL") {
        return Some(PathBuf::from(p));
    }
    let p = workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    p.exists().then_some(p)
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}
