//! Shared helpers for Potluck's integration tests: locating the real model
//! and the built `potluck` binary, background processes, a real etcd.

pub mod etcd;
pub mod etcd_cluster;
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

/// `potluck perplexity` of the real model on `testdata/apache-2.0.txt` at
/// ctx 256 on 2 threads, plus `extra` flags: the figure every fidelity check
/// compares (llama.cpp's is in `../shared/eval/README.md`).
pub fn apache_perplexity(extra: &[&str]) -> anyhow::Result<f64> {
    use anyhow::Context as _;
    let model = require_real_model()?;
    let text = workspace_root().join("testdata/apache-2.0.txt");
    let mut args = vec!["perplexity", "--model", model.to_str().context("path")?];
    args.extend_from_slice(&["--file", text.to_str().context("path")?, "--ctx", "256", "--threads", "2"]);
    args.extend_from_slice(extra);
    let run = potluck(&args)?;
    anyhow::ensure!(run.success, "perplexity {extra:?} failed: {}", run.stderr);
    let last = run.stdout.lines().last().context("no output")?;
    Ok(last.strip_prefix("perplexity: ").context("last line format")?.parse()?)
}

/// Which output of a [`Daemon`] announces that it is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// Standard output (`potluck up` prints its URL there).
    Stdout,
    /// Standard error (`potluck coordinator` and `potluck worker` log their addresses there).
    Stderr,
}

/// A long-running `potluck` process started for a test: SIGTERM, then SIGKILL, on drop.
///
/// Its announcing output is read on a thread for its whole life (a full pipe
/// would stall it) and kept, so a failing test can show what it said.
#[derive(Debug)]
pub struct Daemon {
    child: std::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    /// Starts `potluck args…` and waits (up to 120 s) for a line of `announce`
    /// containing `marker`; returns the daemon and the rest of that line after the marker.
    pub fn start(args: &[&std::ffi::OsStr], announce: Announce, marker: &str) -> anyhow::Result<(Self, String)> {
        use std::io::BufRead as _;
        use std::process::Stdio;
        let mut cmd = std::process::Command::new(potluck_bin()?);
        cmd.args(args);
        match announce {
            Announce::Stdout => cmd.stdout(Stdio::piped()),
            Announce::Stderr => cmd.stderr(Stdio::piped()),
        };
        let mut child = cmd.spawn()?;
        let out: Box<dyn std::io::Read + Send> = match announce {
            Announce::Stdout => Box::new(child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?),
            Announce::Stderr => Box::new(child.stderr.take().ok_or_else(|| anyhow::anyhow!("no stderr"))?),
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let (kept, marker_owned) = (std::sync::Arc::clone(&log), marker.to_string());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.split_once(marker_owned.as_str()).map(|(_, r)| r) {
                    let _ = tx.send(rest.trim().to_string());
                }
                if let Ok(mut l) = kept.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let daemon = Self { child, log };
        let rest = rx.recv_timeout(std::time::Duration::from_secs(120)).map_err(|_| {
            anyhow::anyhow!("potluck {args:?} did not print `{marker}` in 120 s; it said:\n{}", daemon.log())
        })?;
        Ok((daemon, rest))
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it printed on its announcing output so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Kills it at once (SIGKILL: no clean shutdown, sockets reset) and reaps it.
    pub fn kill_hard(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
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

/// A `potluck up` cluster started for a test; stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct UpCluster {
    _daemon: Daemon,
    /// `host:port` of its HTTP API.
    pub http: String,
}

impl UpCluster {
    /// Starts `potluck up` with `args` and waits until it reports its URL.
    pub fn start(args: &[&str]) -> anyhow::Result<Self> {
        let model = require_real_model()?;
        let mut all: Vec<&std::ffi::OsStr> =
            ["up", "--http", "127.0.0.1:0", "--model"].iter().map(std::ffi::OsStr::new).collect();
        all.push(model.as_os_str());
        all.extend(args.iter().map(std::ffi::OsStr::new));
        let (daemon, http) = Daemon::start(&all, Announce::Stdout, " on http://")?;
        Ok(Self { _daemon: daemon, http })
    }

    /// The `potluck up` process's id.
    pub fn pid(&self) -> u32 {
        self._daemon.pid()
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

/// A minimal HTTP/1.1 client (Connection: close), enough for JSON APIs in tests.
pub fn http_request(addr: &str, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let (status, _, body) = http_exchange(addr, method, path, body.unwrap_or("").as_bytes(), "")?;
    Ok((status, body))
}

/// Sends raw `body` bytes with `extra_headers` (each ending in `\r\n`); returns (status, head, body).
///
/// The body is written from another thread while the response is read, so a
/// server that answers before reading a huge body (413) is still heard.
pub fn http_exchange(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    extra_headers: &str,
) -> anyhow::Result<(u16, String, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n",
        body.len()
    );
    let mut writer = s.try_clone()?;
    let payload = [head.as_bytes(), body].concat();
    let sender = std::thread::spawn(move || {
        // The server may answer and close before taking all of a body it refuses.
        let _ = writer.write_all(&payload);
    });
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    let _ = sender.join();
    if raw.is_empty() {
        read?;
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("malformed response"))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok((status, head.to_string(), body))
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

/// A server-sent-event stream on a raw HTTP/1.0 connection.
///
/// HTTP/1.0 has no chunked framing, so the events arrive as plain lines and
/// the test can stop reading, and hang up, after any event: exactly what a
/// client that goes away does.
#[derive(Debug)]
pub struct SseStream {
    reader: std::io::BufReader<std::net::TcpStream>,
    /// The response's HTTP status.
    pub status: u16,
}

impl SseStream {
    /// POSTs `body` to `path` and reads the response head.
    pub fn open(addr: &str, path: &str, body: &serde_json::Value) -> anyhow::Result<Self> {
        use std::io::{BufRead as _, Write as _};
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(300)))?;
        let body = body.to_string();
        write!(
            s,
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut reader = std::io::BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let status = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
        }
        Ok(Self { reader, status })
    }

    /// The payload of the next `data:` line, or `None` at the end of the stream.
    pub fn next_data(&mut self) -> anyhow::Result<Option<String>> {
        use std::io::BufRead as _;
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                return Ok(Some(data.trim_start().to_string()));
            }
        }
    }

    /// Every remaining `data:` payload, up to and including `[DONE]`.
    pub fn rest(&mut self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(d) = self.next_data()? {
            let done = d == "[DONE]";
            out.push(d);
            if done {
                break;
            }
        }
        Ok(out)
    }
}

/// Values of the Prometheus series `name` in `text`, with their label sets.
pub fn metric(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').map_or((series, ""), |(n, rest)| (n, rest.trim_end_matches('}')));
            (n == name).then(|| Some((labels.to_string(), value.parse().ok()?)))?
        })
        .collect()
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: std::time::Duration, mut check: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "gave up after {limit:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
