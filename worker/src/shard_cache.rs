//! Shards on local disk, keyed by content digest.
//!
//! A shard is fetched chunk by chunk into `<digest>.gguf.part`, each chunk
//! checked against the manifest's sha256, then renamed to `<digest>.gguf`.
//! The part file survives a restart: on the next attempt every chunk already
//! on disk is re-verified and only missing or damaged ones are fetched. A
//! complete cached shard is re-verified too and costs no transfer.

use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use potluck_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use crate::config::DEFAULT_MAX_MESSAGE_BYTES;
use crate::error::{InvalidManifest, WorkerError};
use crate::shard_progress::{ProgressStyle, ShardProgress};

/// Fetch attempts per chunk before the load fails.
pub const CHUNK_TRIES: u32 = 3;

/// Where chunks come from: the coordinator, or a test's in-memory shard.
pub(crate) trait ChunkSource: Sync {
    /// The bytes of chunk `index` of shard `digest`.
    fn chunk(&self, digest: &str, index: u32) -> impl Future<Output = Result<Vec<u8>, WorkerError>> + Send;
}

/// A shard's size, chunking and per-chunk checksums, as the coordinator serves them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ShardManifest {
    /// Content digest (the cache key).
    pub digest: String,
    /// Bytes in the shard file.
    pub total_bytes: u64,
    /// Bytes per chunk (the last may be shorter).
    pub chunk_bytes: u64,
    /// Lower-case hex sha256 of each chunk.
    pub chunk_sha256: Vec<String>,
}

impl TryFrom<pb::Manifest> for ShardManifest {
    type Error = InvalidManifest;

    fn try_from(m: pb::Manifest) -> Result<Self, InvalidManifest> {
        // Room for the chunk message's other fields within one gRPC message.
        let max_chunk = (DEFAULT_MAX_MESSAGE_BYTES / 2) as u64;
        if m.chunk_bytes == 0 || m.chunk_bytes > max_chunk {
            return Err(InvalidManifest::ChunkBytes(m.chunk_bytes));
        }
        let expected = m.total_bytes.div_ceil(m.chunk_bytes);
        if expected != m.chunk_sha256.len() as u64 || expected > u64::from(u32::MAX) {
            let (hashes, total, chunk) = (m.chunk_sha256.len(), m.total_bytes, m.chunk_bytes);
            return Err(InvalidManifest::ChunkCount { hashes, total, chunk });
        }
        let mut chunk_sha256 = m.chunk_sha256;
        for (i, h) in chunk_sha256.iter_mut().enumerate() {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(InvalidManifest::Checksum(i));
            }
            h.make_ascii_lowercase();
        }
        Ok(Self { digest: m.digest, total_bytes: m.total_bytes, chunk_bytes: m.chunk_bytes, chunk_sha256 })
    }
}

impl ShardManifest {
    /// Number of chunks.
    #[allow(clippy::cast_possible_truncation)] // `try_from` bounds the count by u32::MAX.
    pub fn chunks(&self) -> u32 {
        self.chunk_sha256.len() as u32
    }

    /// Byte offset and length of chunk `index`.
    pub fn span(&self, index: u32) -> (u64, u64) {
        let start = u64::from(index) * self.chunk_bytes;
        (start, self.chunk_bytes.min(self.total_bytes.saturating_sub(start)))
    }
}

/// Lower-case hex sha256, the form manifests use.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// A shard ready on disk.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CachedShard {
    /// The complete, verified file.
    pub path: PathBuf,
    /// Bytes received from the source to complete it (0 on a cache hit).
    pub transferred: u64,
}

/// A directory of shards named by digest.
#[derive(Debug, Clone)]
pub(crate) struct ShardCache {
    dir: PathBuf,
    progress: ProgressStyle,
    label: String,
}

impl ShardCache {
    /// A cache in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<Self, WorkerError> {
        std::fs::create_dir_all(dir).map_err(|source| WorkerError::Io { path: dir.to_path_buf(), source })?;
        Ok(Self { dir: dir.to_path_buf(), progress: ProgressStyle::default(), label: String::new() })
    }

    /// Shows downloads in `style`, each line starting with `label` (the worker's id).
    pub fn with_progress(self, style: ProgressStyle, label: &str) -> Self {
        Self { progress: style, label: label.to_string(), ..self }
    }

    /// How progress lines name a shard: the worker, then the digest's first 12 hex digits.
    fn shard_label(&self, digest: &str) -> String {
        let short = digest.get(..12).unwrap_or(digest);
        if self.label.is_empty() {
            format!("shard {short}")
        } else {
            format!("{} shard {short}", self.label)
        }
    }

    /// The path of a complete shard. `digest` must already be checked to be hex.
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.gguf"))
    }

    /// Makes sure the shard of `manifest` is complete and verified on disk,
    /// fetching only the chunks that are missing or damaged.
    pub async fn ensure(
        &self,
        manifest: &ShardManifest,
        source: &impl ChunkSource,
    ) -> Result<CachedShard, WorkerError> {
        let done = self.path(&manifest.digest);
        let part = self.dir.join(format!("{}.gguf.part", manifest.digest));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| WorkerError::Io { path, source }
        };
        let label = self.shard_label(&manifest.digest);
        if done.exists() {
            let checking = std::time::Instant::now();
            let missing = scan(&done, manifest).await?;
            if missing.is_empty() {
                ShardProgress::cached(self.progress, &label, manifest.total_bytes, checking.elapsed());
                return Ok(CachedShard { path: done, transferred: 0 });
            }
            tracing::warn!(digest = %manifest.digest, damaged = missing.len(), "cached shard is damaged; repairing");
            tokio::fs::rename(&done, &part).await.map_err(io(&done))?;
        }
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .await
            .map_err(io(&part))?;
        file.set_len(manifest.total_bytes).await.map_err(io(&part))?;
        let missing = scan(&part, manifest).await?;
        let to_fetch: u64 = missing.iter().map(|&i| manifest.span(i).1).sum();
        let mut progress =
            ShardProgress::start(self.progress, &label, manifest.total_bytes, manifest.total_bytes - to_fetch);
        let mut transferred = 0;
        for &index in &missing {
            let data = fetch_verified(manifest, source, index, &mut transferred).await?;
            let (offset, _) = manifest.span(index);
            file.seek(SeekFrom::Start(offset)).await.map_err(io(&part))?;
            file.write_all(&data).await.map_err(io(&part))?;
            progress.advance(data.len() as u64);
        }
        file.sync_all().await.map_err(io(&part))?;
        drop(file);
        tokio::fs::rename(&part, &done).await.map_err(io(&part))?;
        progress.finish();
        Ok(CachedShard { path: done, transferred })
    }
}

/// Fetches chunk `index` until its checksum matches, counting every byte received.
async fn fetch_verified(
    manifest: &ShardManifest,
    source: &impl ChunkSource,
    index: u32,
    transferred: &mut u64,
) -> Result<Vec<u8>, WorkerError> {
    let (_, len) = manifest.span(index);
    for attempt in 1..=CHUNK_TRIES {
        let data = source.chunk(&manifest.digest, index).await?;
        *transferred += data.len() as u64;
        if data.len() as u64 == len && sha256_hex(&data) == manifest.chunk_sha256[index as usize] {
            return Ok(data);
        }
        tracing::warn!(digest = %manifest.digest, index, attempt, bytes = data.len(), "chunk failed verification");
    }
    Err(WorkerError::ChunkCorrupt { digest: manifest.digest.clone(), index, tries: CHUNK_TRIES })
}

/// Indices of the chunks of `path` that are missing or do not match the manifest.
async fn scan(path: &Path, manifest: &ShardManifest) -> Result<Vec<u32>, WorkerError> {
    let (path, manifest) = (path.to_path_buf(), manifest.clone());
    let err_path = path.clone();
    tokio::task::spawn_blocking(move || scan_blocking(&path, &manifest))
        .await
        .map_err(|e| WorkerError::Io { path: err_path.clone(), source: std::io::Error::other(e.to_string()) })?
        .map_err(|source| WorkerError::Io { path: err_path, source })
}

fn scan_blocking(path: &Path, manifest: &ShardManifest) -> std::io::Result<Vec<u32>> {
    let mut file = std::fs::File::open(path)?;
    let on_disk = file.metadata()?.len();
    let mut buf = Vec::new();
    let mut missing = Vec::new();
    for index in 0..manifest.chunks() {
        let (offset, len) = manifest.span(index);
        let good = offset + len <= on_disk && {
            buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut buf)?;
            sha256_hex(&buf) == manifest.chunk_sha256[index as usize]
        };
        if !good {
            missing.push(index);
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// An in-memory shard that corrupts the first `bad` answers for chunk `bad_index`.
    struct Memory {
        data: Vec<u8>,
        chunk: usize,
        bad_index: u32,
        bad: Mutex<u32>,
        fetched: Mutex<Vec<u32>>,
    }

    impl ChunkSource for Memory {
        async fn chunk(&self, _digest: &str, index: u32) -> Result<Vec<u8>, WorkerError> {
            self.fetched.lock().expect("lock").push(index);
            let start = index as usize * self.chunk;
            let mut out = self.data[start..(start + self.chunk).min(self.data.len())].to_vec();
            let mut bad = self.bad.lock().expect("lock");
            if index == self.bad_index && *bad > 0 {
                *bad -= 1;
                out[0] ^= 0xff;
            }
            Ok(out)
        }
    }

    fn shard(bad: u32) -> (Memory, ShardManifest) {
        #[allow(clippy::cast_possible_truncation)]
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let chunk = 1024;
        let manifest = ShardManifest {
            digest: "ab".into(),
            total_bytes: data.len() as u64,
            chunk_bytes: chunk as u64,
            chunk_sha256: data.chunks(chunk).map(sha256_hex).collect(),
        };
        (Memory { data, chunk, bad_index: 2, bad: Mutex::new(bad), fetched: Mutex::new(Vec::new()) }, manifest)
    }

    #[tokio::test]
    async fn fetches_verifies_resumes_and_repairs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ShardCache::open(dir.path()).expect("cache");
        let (source, manifest) = shard(1);
        let got = cache.ensure(&manifest, &source).await.expect("fetch");
        assert_eq!(std::fs::read(&got.path).expect("read"), source.data);
        assert_eq!(got.transferred, 10_000 + 1024, "the corrupted chunk is fetched twice");

        assert_eq!(cache.ensure(&manifest, &source).await.expect("hit").transferred, 0);

        // Damage chunk 5 of the cached file: only it is fetched again.
        let mut bytes = source.data.clone();
        bytes[5 * 1024 + 3] ^= 1;
        std::fs::write(&got.path, &bytes).expect("write");
        source.fetched.lock().expect("lock").clear();
        assert_eq!(cache.ensure(&manifest, &source).await.expect("repair").transferred, 1024);
        assert_eq!(*source.fetched.lock().expect("lock"), vec![5]);

        // A part file holding the first 4 chunks resumes from chunk 4.
        std::fs::remove_file(&got.path).expect("remove");
        std::fs::write(dir.path().join("ab.gguf.part"), &source.data[..4 * 1024 + 10]).expect("part");
        source.fetched.lock().expect("lock").clear();
        let got = cache.ensure(&manifest, &source).await.expect("resume");
        assert_eq!(*source.fetched.lock().expect("lock"), (4..10).collect::<Vec<_>>());
        assert_eq!(std::fs::read(&got.path).expect("read"), source.data);
    }

    #[tokio::test]
    async fn a_chunk_that_never_verifies_fails_the_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (source, manifest) = shard(u32::MAX);
        let err = ShardCache::open(dir.path()).expect("cache").ensure(&manifest, &source).await.expect_err("corrupt");
        assert!(matches!(err, WorkerError::ChunkCorrupt { index: 2, tries: CHUNK_TRIES, .. }), "{err}");
    }

    #[test]
    fn manifests_are_checked() {
        let ok = pb::Manifest {
            digest: "ab".into(),
            total_bytes: 10,
            chunk_bytes: 4,
            chunk_sha256: vec!["A".repeat(64), "0".repeat(64), "f".repeat(64)],
            header: Vec::new(),
        };
        let m = ShardManifest::try_from(ok.clone()).expect("valid");
        assert_eq!(m.chunk_sha256[0], "a".repeat(64));
        assert_eq!(m.span(2), (8, 2));
        let bad = pb::Manifest { chunk_bytes: 0, ..ok.clone() };
        assert!(matches!(ShardManifest::try_from(bad), Err(InvalidManifest::ChunkBytes(0))));
        let bad = pb::Manifest { total_bytes: 20, ..ok.clone() };
        assert!(matches!(ShardManifest::try_from(bad), Err(InvalidManifest::ChunkCount { .. })));
        let bad = pb::Manifest { chunk_sha256: vec!["x".into(), "0".repeat(64), "f".repeat(64)], ..ok };
        assert!(matches!(ShardManifest::try_from(bad), Err(InvalidManifest::Checksum(0))));
    }
}
