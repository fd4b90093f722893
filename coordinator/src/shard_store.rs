//! Shards cut from the coordinator's model file, served in verified chunks.

use std::collections::HashMap;
use std::io::Read as _;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use potluck_engine::gguf::GgufFile;
use sha2::{Digest, Sha256};

use crate::error::CoordinatorError;

/// Default chunk size: large enough to stream fast, small enough to retry cheaply.
pub const DEFAULT_CHUNK_BYTES: u64 = 4 << 20;

/// A built shard: a GGUF file and the hashes of its chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// sha256 of the whole file (hex); the workers' cache key.
    pub digest: String,
    /// Where it lives on the coordinator.
    pub path: PathBuf,
    /// File size.
    pub total_bytes: u64,
    /// Chunk size (the last chunk may be shorter).
    pub chunk_bytes: u64,
    /// sha256 of each chunk (hex).
    pub chunk_sha256: Vec<String>,
}

/// Builds shards on demand and remembers them.
#[derive(Debug)]
pub struct ShardStore {
    model: PathBuf,
    dir: PathBuf,
    chunk_bytes: u64,
    shards: std::sync::Mutex<HashMap<(usize, usize), Shard>>,
    /// Whether the directory is this process's own scratch, removed on drop.
    scratch: bool,
}

/// Prefix of the per-process scratch directories under the temp dir.
const SCRATCH_PREFIX: &str = "potluck-shards-";

/// This process's scratch directory for shards under `tmp`.
pub fn scratch_dir(tmp: &Path) -> PathBuf {
    tmp.join(format!("{SCRATCH_PREFIX}{}", std::process::id()))
}

/// Removes the scratch directories under `tmp` of coordinators that no
/// longer run, and returns how many. Why: a coordinator stopped by SIGKILL
/// (or a crash) never drops its store, and each one left 100–350 MB of
/// shards behind; a host that restarts coordinators, as the test suite does
/// hundreds of times, filled its disk. Liveness is read from `/proc`, so this
/// only runs on Linux.
pub fn reap_scratch_dirs(tmp: &Path) -> usize {
    if !cfg!(target_os = "linux") {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(SCRATCH_PREFIX)).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Lower-case hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

impl ShardStore {
    /// Shards of `model` will be written under `dir`. A `dir` that is this
    /// process's [`scratch_dir`] is removed when the store is dropped.
    pub fn new(model: &Path, dir: &Path, chunk_bytes: u64) -> Self {
        Self {
            model: model.to_path_buf(),
            dir: dir.to_path_buf(),
            chunk_bytes: chunk_bytes.max(1),
            shards: std::sync::Mutex::new(HashMap::new()),
            scratch: dir == scratch_dir(&std::env::temp_dir()),
        }
    }

    /// The shard of `range`, built if needed (blocking: call from a blocking thread).
    pub fn shard(&self, range: Range<usize>) -> Result<Shard, CoordinatorError> {
        let key = (range.start, range.end);
        if let Some(s) = self.lock().get(&key) {
            return Ok(s.clone());
        }
        let src = GgufFile::open(&self.model)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| CoordinatorError::Io(self.dir.clone(), e))?;
        let path = self.dir.join(format!("shard-{}-{}.gguf", range.start, range.end));
        potluck_engine::shard::write_shard(&src, range, &path)?;
        let mut file = std::fs::File::open(&path).map_err(|e| CoordinatorError::Io(path.clone(), e))?;
        let mut whole = Sha256::new();
        let mut chunk_sha256 = Vec::new();
        let mut total_bytes = 0u64;
        let mut buf = vec![0u8; usize::try_from(self.chunk_bytes).unwrap_or(usize::MAX)];
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                let n = file.read(&mut buf[filled..]).map_err(|e| CoordinatorError::Io(path.clone(), e))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            whole.update(&buf[..filled]);
            chunk_sha256.push(sha256_hex(&buf[..filled]));
            total_bytes += filled as u64;
        }
        let digest: String = whole.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let shard = Shard { digest, path, total_bytes, chunk_bytes: self.chunk_bytes, chunk_sha256 };
        self.lock().insert(key, shard.clone());
        Ok(shard)
    }

    /// Chunk `index` of the shard with `digest`, and its sha256.
    pub fn chunk(&self, digest: &str, index: usize) -> Result<(Vec<u8>, String), CoordinatorError> {
        let shard = self
            .lock()
            .values()
            .find(|s| s.digest == digest)
            .cloned()
            .ok_or_else(|| CoordinatorError::UnknownShard(digest.to_string()))?;
        let sha = shard
            .chunk_sha256
            .get(index)
            .cloned()
            .ok_or_else(|| CoordinatorError::UnknownShard(format!("{digest} chunk {index}")))?;
        let start = index as u64 * shard.chunk_bytes;
        let len = shard.chunk_bytes.min(shard.total_bytes - start);
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let file = std::fs::File::open(&shard.path).map_err(|e| CoordinatorError::Io(shard.path.clone(), e))?;
        file.read_exact_at(&mut buf, start).map_err(|e| CoordinatorError::Io(shard.path.clone(), e))?;
        Ok((buf, sha))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(usize, usize), Shard>> {
        self.shards.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for ShardStore {
    fn drop(&mut self) {
        if self.scratch {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the scratch directories of processes that are gone are removed.
    #[test]
    fn reaping_removes_only_dead_coordinators_dirs() {
        let tmp = std::env::temp_dir().join(format!("potluck-reap-test-{}", std::process::id()));
        let dead = tmp.join(format!("{SCRATCH_PREFIX}{}", u32::MAX - 1));
        let mine = scratch_dir(&tmp);
        let other = tmp.join("potluck-shards-not-a-pid");
        for d in [&dead, &mine, &other] {
            std::fs::create_dir_all(d).expect("create");
            std::fs::write(d.join("shard-0-1.gguf"), b"x").expect("write");
        }
        let removed = reap_scratch_dirs(&tmp);
        if cfg!(target_os = "linux") {
            assert_eq!(removed, 1);
            assert!(!dead.exists(), "a dead process's shards are removed");
        }
        assert!(mine.exists() && other.exists(), "live and foreign directories stay");
        std::fs::remove_dir_all(&tmp).expect("clean up");
    }

    /// The store removes its directory when dropped if it is this process's scratch.
    #[test]
    fn a_scratch_store_removes_its_directory() {
        let dir = scratch_dir(&std::env::temp_dir());
        std::fs::create_dir_all(&dir).expect("create");
        std::fs::write(dir.join("shard-0-1.gguf"), b"x").expect("write");
        drop(ShardStore::new(Path::new("model.gguf"), &dir, DEFAULT_CHUNK_BYTES));
        assert!(!dir.exists());
        let kept = std::env::temp_dir().join(format!("potluck-kept-{}", std::process::id()));
        std::fs::create_dir_all(&kept).expect("create");
        drop(ShardStore::new(Path::new("model.gguf"), &kept, DEFAULT_CHUNK_BYTES));
        assert!(kept.exists(), "a directory the operator chose stays");
        std::fs::remove_dir_all(&kept).expect("clean up");
    }
}
