//! A real etcd for integration tests: Debian's `etcd` binary (package
//! `etcd-server`) on free loopback ports with a temporary data directory.
//! It can be stopped and started again on the same ports and data, to test
//! what survives an etcd restart. Dropped, it is stopped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A running (or stopped, restartable) etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<ServerTls>,
    /// Flags added to every start (e.g. a short `--auth-token-ttl`).
    extra: Vec<String>,
}

/// PEM files for an etcd that serves TLS and requires client certificates.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// Server certificate (valid for 127.0.0.1).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

/// The etcd binary: `POTLUCK_ETCD`, else `etcd` on the PATH.
fn binary() -> PathBuf {
    std::env::var_os("POTLUCK_ETCD").map_or_else(|| PathBuf::from("etcd"), PathBuf::from)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts etcd and waits until it reports healthy.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None, &[])
    }

    /// Starts etcd serving TLS on its client port, requiring client certificates signed by `tls.ca`.
    pub fn start_tls(tls: ServerTls) -> anyhow::Result<Self> {
        Self::start_with(Some(tls), &[])
    }

    /// Starts etcd with TLS if given and `extra` flags on every start (and restart).
    pub fn start_with(tls: Option<ServerTls>, extra: &[&str]) -> anyhow::Result<Self> {
        let mut e = Self {
            child: None,
            dir: tempfile::tempdir()?,
            client_port: free_port()?,
            peer_port: free_port()?,
            tls,
            extra: extra.iter().map(|a| (*a).to_string()).collect(),
        };
        e.spawn()?;
        Ok(e)
    }

    /// The client endpoint, `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log"))?;
        let mut command = Command::new(binary());
        if let Some(t) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "potluck-test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("potluck-test={peer}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&self.extra)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {} (install Debian's etcd-server package)", binary().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // With TLS, /health needs a client certificate: an accepting port will do.
            if self.tls.is_some() && std::net::TcpStream::connect(self.endpoint()).is_ok() {
                return Ok(());
            }
            if let Ok((200, body)) = crate::http_request(&self.endpoint(), "GET", "/health", None) {
                if body.contains("true") {
                    return Ok(());
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    anyhow::bail!("etcd exited with {status}: {}", self.log());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        anyhow::bail!("etcd did not become healthy in 30 s: {}", self.log())
    }

    /// Its log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Stops etcd gracefully (SIGTERM), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::process::terminate(&mut c);
        }
    }

    /// Stops it, stays down for `down`, and starts it again on the same ports and data directory.
    pub fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        self.stop();
        std::thread::sleep(down);
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Standard base64 (etcd's JSON gateway carries keys and values this way).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Etcd {
    /// Calls etcd's JSON gateway (`/v3/...`) on a plain-text etcd.
    pub fn gateway(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let (code, reply) = crate::http_request(&self.endpoint(), "POST", path, Some(&body.to_string()))?;
        anyhow::ensure!(code == 200, "etcd {path}: {code} {reply}");
        Ok(serde_json::from_str(&reply)?)
    }

    /// Deletes `key` and writes it back with the same value and lease: to the
    /// watchers, the key went away and came back (a flap).
    pub fn flap(&self, key: &str) -> anyhow::Result<()> {
        let k = base64(key.as_bytes());
        let got = self.gateway("/v3/kv/range", &serde_json::json!({"key": k}))?;
        let kv = got["kvs"].get(0).ok_or_else(|| anyhow::anyhow!("{key} is not in etcd"))?.clone();
        self.gateway("/v3/kv/deleterange", &serde_json::json!({"key": k}))?;
        self.gateway("/v3/kv/put", &serde_json::json!({"key": k, "value": kv["value"], "lease": kv["lease"]}))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard() {
        for (raw, enc) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("/potluck/a", "L3BvdGx1Y2svYQ==")]
        {
            assert_eq!(super::base64(raw.as_bytes()), enc);
        }
    }
}
