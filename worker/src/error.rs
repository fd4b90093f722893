//! The worker's error types. Each variant carries what an operator or the
//! coordinator needs to act on it; `status.rs` alone turns them into gRPC statuses.

use std::path::PathBuf;

use potluck_engine::EngineError;

/// What went wrong in a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The configured device cannot be opened on this machine.
    #[error(transparent)]
    Device(#[from] potluck_engine::DeviceError),
    /// The device's memory cannot be read, or the GPU does not exist.
    #[error("device memory: {0}")]
    DeviceMemory(#[from] crate::capability::DeviceInfoError),
    /// A local file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The start-up probe could not build or run its layer.
    #[error("start-up probe: {0}")]
    Probe(String),
    /// etcd refused or could not be reached (registration).
    #[error(transparent)]
    Etcd(#[from] potluck_etcd::EtcdError),
    /// The listener or the gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
    /// The coordinator could not be reached in time.
    #[error("coordinator {address} is unreachable: {reason}")]
    CoordinatorUnreachable {
        /// The coordinator's URL.
        address: String,
        /// The last connection error.
        reason: String,
    },
    /// A call to the coordinator failed.
    #[error("coordinator {address}: {call} failed: {status}")]
    Coordinator {
        /// The coordinator's URL.
        address: String,
        /// The RPC that failed.
        call: &'static str,
        /// The status it returned.
        status: tonic::Status,
    },
    /// A shard was requested but no coordinator is configured to serve it.
    #[error("no coordinator is configured, so shards cannot be fetched")]
    NoCoordinator,
    /// The coordinator serves a different shard than the plan names.
    #[error("shard digest mismatch: the plan names {requested} but the coordinator serves {served}")]
    DigestMismatch {
        /// The digest in the `Load` request.
        requested: String,
        /// The digest in the coordinator's manifest.
        served: String,
    },
    /// The coordinator's manifest or a chunk is malformed.
    #[error("coordinator sent a bad shard: {0}")]
    InvalidManifest(#[from] InvalidManifest),
    /// A chunk kept failing its checksum.
    #[error("shard {digest} chunk {index} failed its sha256 check {tries} times")]
    ChunkCorrupt {
        /// The shard.
        digest: String,
        /// The chunk index.
        index: u32,
        /// Fetch attempts made.
        tries: u32,
    },
    /// A request is malformed.
    #[error(transparent)]
    InvalidRequest(#[from] InvalidRequest),
    /// A request carries an older plan epoch than the one loaded.
    #[error("stale epoch {got}, current {current}")]
    StaleEpoch {
        /// The request's epoch.
        got: u64,
        /// The loaded epoch.
        current: u64,
    },
    /// A forward arrived before any `Load`.
    #[error("no layers are loaded on this worker")]
    NotLoaded,
    /// The engine rejected the shard or the batch.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The next stage could not be reached or failed the batch.
    #[error("next stage {stage}: {message}")]
    NextStage {
        /// The next stage: its worker id and URL when known, else its URL.
        stage: String,
        /// The gRPC code to pass upstream.
        code: tonic::Code,
        /// What happened.
        message: String,
    },
    /// The compute thread is gone (the worker is shutting down).
    #[error("the compute thread has stopped")]
    ComputeStopped,
}

/// Ways a `Load` or `Forward` request can be malformed, found while decoding it.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRequest {
    /// The layer range is empty or reversed.
    #[error("layer range {start}..{end} is empty")]
    LayerRange {
        /// First layer.
        start: u32,
        /// One past the last layer.
        end: u32,
    },
    /// A shard digest is not lower-case hex (it names a file in the cache).
    #[error("shard digest `{0}` is not 1 to 128 lower-case hex digits")]
    Digest(String),
    /// The next stage's address is not a usable URL.
    #[error("next stage `{0}` is not an http:// or https:// URL")]
    NextStage(String),
    /// The shard source is not a usable URL.
    #[error("shard source `{0}` is not an http:// or https:// URL")]
    ShardSource(String),
    /// An unknown hidden-state dtype.
    #[error("unknown dtype `{0}` (use f32, f16 or bf16)")]
    Dtype(String),
    /// The batch has no rows.
    #[error("the batch has no rows")]
    NoRows,
    /// Token ids and rows disagree in number.
    #[error("{tokens} token ids for {rows} rows")]
    TokenCount {
        /// Token ids sent.
        tokens: usize,
        /// Rows sent.
        rows: usize,
    },
    /// The first stage received hidden states.
    #[error("the first stage takes token ids, not hidden states")]
    UnexpectedHidden,
    /// A later stage received no hidden states.
    #[error("stage {start}..{end} needs hidden states but the request has none")]
    MissingHidden {
        /// First layer.
        start: usize,
        /// One past the last layer.
        end: usize,
    },
    /// A stage that is not the last was loaded without a next stage to send to.
    #[error("stage {start}..{end} is not the last stage but no next stage was given")]
    MissingNextStage {
        /// First layer.
        start: usize,
        /// One past the last layer.
        end: usize,
    },
    /// Hidden states travel in another dtype than the plan's.
    #[error("hidden states are {got} but this pipeline's wire dtype is {expected}")]
    HiddenDtype {
        /// The dtype received.
        got: &'static str,
        /// The dtype loaded with the plan.
        expected: &'static str,
    },
    /// Hidden states have the wrong shape.
    #[error("hidden states are {rows}×{dim} but the batch has {expected_rows} rows of width {expected_dim}")]
    HiddenShape {
        /// Rows received.
        rows: usize,
        /// Width received.
        dim: usize,
        /// Rows in the batch.
        expected_rows: usize,
        /// The model's hidden size.
        expected_dim: usize,
    },
    /// Hidden-state bytes are inconsistent with their shape or not finite.
    #[error("{0}")]
    HiddenData(EngineError),
    /// Sampling settings are out of range.
    #[error("session {session}: {source}")]
    Sampling {
        /// The session the settings belong to.
        session: u64,
        /// What is wrong with them.
        source: EngineError,
    },
}

/// Ways the coordinator's shard manifest or chunks can be malformed.
#[derive(Debug, thiserror::Error)]
pub enum InvalidManifest {
    /// Chunk size is zero or larger than a gRPC message may be.
    #[error("chunk size {0} is out of range")]
    ChunkBytes(u64),
    /// The number of checksums does not match the size.
    #[error("{hashes} chunk checksums for {total} bytes in chunks of {chunk}")]
    ChunkCount {
        /// Checksums listed.
        hashes: usize,
        /// Total bytes.
        total: u64,
        /// Bytes per chunk.
        chunk: u64,
    },
    /// A checksum is not 64 hex digits.
    #[error("chunk {0} checksum is not 64 hex digits")]
    Checksum(usize),
    /// A chunk arrived with the wrong length.
    #[error("chunk {index} is {got} bytes, expected {expected}")]
    ChunkLength {
        /// The chunk index.
        index: u32,
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: u64,
    },
}
