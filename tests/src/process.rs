//! Potluck processes started by tests: output to a log file, stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// SIGTERM, then SIGKILL if it has not exited within 10 s.
pub fn terminate(child: &mut Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `potluck` subcommand running in the background.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
    /// A name for messages.
    pub name: String,
}

impl Proc {
    /// Starts `potluck args…`, its stderr and stdout going to `log_dir/<name>.log`.
    pub fn start(name: &str, log_dir: &std::path::Path, args: &[&str]) -> anyhow::Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(crate::potluck_bin()?)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .spawn()?;
        Ok(Self { child: Some(child), log, name: name.to_string() })
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log has a line containing `needle`, and returns that line.
    pub fn wait_for_line(&self, needle: &str, within: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return Ok(l.to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("{}: no line with `{needle}` in {within:?}; log:\n{}", self.name, self.log())
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Graceful stop (SIGTERM), waiting for exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
