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

/// The real model, or a failure that says how to get it. End-to-end tests
/// fail rather than skip without it: a skipped fidelity test proves nothing.
pub fn require_real_model() -> anyhow::Result<PathBuf> {
    real_model()
        .ok_or_else(|| anyhow::anyhow!("SmolLM2 model not found: run `scripts/fetch-model` or set POTLUCK_MODEL"))
}

/// The `potluck` binary built in the same profile as this test.
pub fn potluck_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/potluck
    let dir = exe.parent().and_then(std::path::Path::parent).ok_or_else(|| anyhow::anyhow!("odd test path"))?;
    let bin = dir.join("potluck");
    anyhow::ensure!(bin.exists(), "{} is missing: build it first (`cargo build --release`)", bin.display());
    Ok(bin)
}

/// Output of one `potluck` run.
#[derive(Debug)]
pub struct Run {
    /// Whether it exited 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `potluck` with `args` and collects its output.
pub fn potluck(args: &[&str]) -> anyhow::Result<Run> {
    let out = std::process::Command::new(potluck_bin()?).args(args).output()?;
    Ok(Run {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
