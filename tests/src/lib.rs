//! Shared helpers for Potluck's integration tests: locating the real model
//! and the built `potluck` binary, background processes, a real etcd.

pub mod etcd;
pub mod process;

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

/// A `potluck up` cluster started for a test; stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct UpCluster {
    child: std::process::Child,
    /// `host:port` of its HTTP API.
    pub http: String,
}

impl UpCluster {
    /// Starts `potluck up` with `args` and waits until it reports its URL.
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        use std::io::BufRead as _;
        let model = require_real_model()?;
        let mut child = std::process::Command::new(potluck_bin()?)
            .args(["up", "--http", "127.0.0.1:0", "--model"])
            .arg(&model)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.split(" on http://").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let mut cluster = Self { child, http: String::new() };
        cluster.http = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .map_err(|_| anyhow::anyhow!("potluck up did not become ready in 120 s"))?;
        Ok(cluster)
    }

    /// POSTs JSON and returns (status, body).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<(u16, String)> {
        http_request(&self.http, "POST", path, Some(&body.to_string()))
    }

    /// GETs a path and returns (status, body).
    pub fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_request(&self.http, "GET", path, None)
    }
}

impl Drop for UpCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 client (Connection: close), enough for JSON APIs in tests.
pub fn http_request(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("malformed response"))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
