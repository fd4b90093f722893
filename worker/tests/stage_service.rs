//! The worker over real gRPC on loopback: a two-stage chain of workers fed
//! by an in-test coordinator, compared bit for bit with the in-process pipeline.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use potluck_engine::fixture::TinyModel;
use potluck_engine::kv_cache::DEFAULT_KV_BUDGET_BYTES;
use potluck_engine::{LocalPipeline, ModelFile, Sampled, Sampler, SamplingParams, SessionId, WireDtype};
use potluck_proto::v1 as pb;
use potluck_proto::v1::stage_client::StageClient;
use potluck_worker::{run, WorkerConfig, WorkerError};
use support::{load_request, start_coordinator, TestCoordinator, TestWorker, CHUNK};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Two workers running layers [0, 2) and [2, 4) of the tiny model, loaded for epoch 1.
struct Chain {
    dir: tempfile::TempDir,
    model: PathBuf,
    coordinator: Arc<TestCoordinator>,
    coordinator_url: String,
    first: TestWorker,
    last: TestWorker,
    /// `transferred_bytes` of the two loads (last stage first).
    transferred: [u64; 2],
}

impl Chain {
    async fn start(corrupt: Option<u32>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = TinyModel::default().write_gguf(dir.path()).expect("write model");
        let (coordinator, coordinator_url) = start_coordinator(&model, corrupt).await;
        let first = TestWorker::start(&coordinator_url, &dir.path().join("cache-first")).await;
        let last = TestWorker::start(&coordinator_url, &dir.path().join("cache-last")).await;
        let digest = coordinator.digest.clone();
        let b = last.client().await.load(load_request(1, (2, 4), &digest, "")).await.expect("load last").into_inner();
        let a = first.client().await.load(load_request(1, (0, 2), &digest, &last.url)).await.expect("load first");
        let a = a.into_inner();
        assert_eq!((a.epoch, b.epoch), (1, 1));
        assert!(a.weight_bytes > 0 && b.weight_bytes > 0);
        Self {
            dir,
            model,
            coordinator,
            coordinator_url,
            first,
            last,
            transferred: [b.transferred_bytes, a.transferred_bytes],
        }
    }
}

/// A client's end of a `Forward` stream.
struct Stream {
    tx: mpsc::Sender<pb::ForwardRequest>,
    rx: Streaming<pb::ForwardReply>,
}

impl Stream {
    async fn open(client: &mut StageClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = client.forward(ReceiverStream::new(rx)).await.expect("open stream").into_inner();
        Self { tx, rx }
    }

    async fn send(&self, r: pb::ForwardRequest) {
        self.tx.send(r).await.expect("send");
    }

    async fn recv(&mut self) -> Result<pb::ForwardReply, Status> {
        match tokio::time::timeout(TIMEOUT, self.rx.message()).await.expect("reply in time") {
            Ok(Some(r)) => Ok(r),
            Ok(None) => panic!("stream ended without a reply"),
            Err(s) => Err(s),
        }
    }

    /// Sends one request on a fresh stream and returns the outcome.
    async fn once(client: &mut StageClient<Channel>, r: pb::ForwardRequest) -> Result<pb::ForwardReply, Status> {
        let mut s = Self::open(client).await;
        s.send(r).await;
        s.recv().await
    }
}

/// One session's rows at `start..start + tokens.len()`, sampling the last.
fn batch(
    epoch: u64,
    id: u64,
    session: u64,
    start: u32,
    tokens: &[u32],
    sampling: Option<pb::Sampling>,
) -> pb::ForwardRequest {
    let n = tokens.len();
    pb::ForwardRequest {
        epoch,
        batch_id: id,
        rows: (0..n)
            .map(|i| pb::Row {
                session,
                position: start + i as u32,
                sample: i + 1 == n,
                sampling: if i == 0 { sampling } else { None },
            })
            .collect(),
        tokens: tokens.to_vec(),
        hidden: None,
        traceparent: String::new(),
        tracestate: String::new(),
    }
}

fn prompt() -> Vec<u32> {
    "Hello, potluck".bytes().map(u32::from).collect()
}

fn assert_same(got: &pb::SampledToken, want: &Sampled) {
    assert_eq!(got.token, want.token);
    assert_eq!(got.logprob.to_bits(), want.logprob.to_bits(), "logprob {} vs {}", got.logprob, want.logprob);
    let top: Vec<(u32, u32)> = got.top.iter().map(|t| (t.token, t.logprob.to_bits())).collect();
    let want_top: Vec<(u32, u32)> = want.top.iter().map(|t| (t.0, t.1.to_bits())).collect();
    assert_eq!(top, want_top);
}

async fn kv_bytes(w: &TestWorker) -> u64 {
    w.client().await.info(pb::InfoRequest {}).await.expect("info").into_inner().kv_bytes_in_use
}

fn dead_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", l.local_addr().expect("addr"))
}

#[tokio::test]
async fn chain_matches_the_local_pipeline_bit_for_bit() {
    let c = Chain::start(None).await;
    let steps = 6;
    let file = ModelFile::open(&c.model).expect("open");
    let mut local = LocalPipeline::load(&file, &[0, 2, 4], WireDtype::F32, DEFAULT_KV_BUDGET_BYTES, 1).expect("local");
    let mut sampler = Sampler::new(SamplingParams { top_logprobs: 3, ..Default::default() }).expect("sampler");
    let mut expected = Vec::new();
    local.generate(SessionId(7), &prompt(), steps, &mut sampler, |_| false, |s| expected.push(s.clone())).expect("gen");

    let mut client = c.first.client().await;
    let mut stream = Stream::open(&mut client).await;
    let sampling = Some(pb::Sampling { top_logprobs: 3, ..Default::default() });
    // Two sessions' prefills in flight at once: replies come back in order and agree.
    stream.send(batch(1, 0, 7, 0, &prompt(), sampling)).await;
    stream.send(batch(1, 1, 8, 0, &prompt(), sampling)).await;
    let (r0, r1) = (stream.recv().await.expect("reply 0"), stream.recv().await.expect("reply 1"));
    assert_eq!((r0.batch_id, r1.batch_id), (0, 1));
    assert_eq!((r0.tokens[0].session, r1.tokens[0].session), (7, 8));
    assert_same(&r0.tokens[0], &expected[0]);
    assert_same(&r1.tokens[0], &expected[0]);
    let mut token = r0.tokens[0].token;
    for (step, want) in expected.iter().enumerate().skip(1) {
        let position = (prompt().len() + step - 1) as u32;
        stream.send(batch(1, 10 + step as u64, 7, position, &[token], None)).await;
        let reply = stream.recv().await.expect("decode reply");
        assert_eq!(reply.batch_id, 10 + step as u64);
        assert_eq!(reply.tokens.len(), 1);
        assert_same(&reply.tokens[0], want);
        token = reply.tokens[0].token;
    }
    let joins = c.coordinator.joins.lock().expect("lock").clone();
    assert_eq!(joins.len(), 2);
    assert!(joins.iter().any(|j| j.address == c.first.url && j.device == "cpu" && j.threads == 1));
}

#[tokio::test]
async fn bad_requests_get_clear_statuses_and_the_worker_keeps_serving() {
    let c = Chain::start(None).await;
    let mut first = c.first.client().await;
    let stale = Stream::once(&mut first, batch(0, 0, 1, 0, &prompt(), None)).await.expect_err("stale");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert!(stale.message().contains("stale epoch 0, current 1"), "{}", stale.message());
    let ok = Stream::once(&mut first, batch(1, 1, 1, 0, &prompt(), None)).await.expect("a new stream works");
    assert_eq!(ok.tokens.len(), 1);

    let mut short = batch(1, 2, 2, 0, &prompt(), None);
    short.tokens.pop();
    let err = Stream::once(&mut first, short).await.expect_err("token count");
    assert_eq!(err.code(), Code::InvalidArgument);

    let hidden = |dtype: &str, dim: u32, data: Vec<u8>| {
        let mut r = batch(1, 3, 3, 0, &[65], None);
        r.hidden = Some(pb::Hidden { dtype: dtype.into(), rows: 1, dim, data });
        r
    };
    let mut last = c.last.client().await;
    let ok = Stream::once(&mut last, hidden("f32", 256, vec![0; 1024])).await.expect("valid hidden");
    assert_eq!(ok.tokens.len(), 1);
    let cases = [
        (hidden("f16", 256, vec![0; 512]), "wire dtype is f32"),
        (hidden("f32", 128, vec![0; 512]), "width 256"),
        (hidden("f32", 256, vec![0; 1000]), "1000 bytes"),
        (hidden("f32", 256, f32::NAN.to_le_bytes().repeat(256)), "not finite"),
        (hidden("f99", 256, vec![0; 1024]), "unknown dtype"),
        (batch(1, 4, 4, 0, &[65], None), "needs hidden states"),
    ];
    for (request, needle) in cases {
        let err = Stream::once(&mut last, request).await.expect_err(needle);
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    let wrong = load_request(2, (0, 2), &"0".repeat(64), &c.last.url);
    let err = first.load(wrong).await.expect_err("digest mismatch");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = first.load(load_request(2, (0, 2), "../x", &c.last.url)).await.expect_err("bad digest");
    assert_eq!(err.code(), Code::InvalidArgument);
    let info = first.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!((info.epoch, info.layer_start, info.layer_end), (1, 0, 2));
}

#[tokio::test]
async fn a_cached_shard_loads_without_transfer() {
    let c = Chain::start(None).await;
    let size = c.coordinator.shard.len() as u64;
    assert_eq!(c.transferred, [size, size]);
    let info = c.first.client().await.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.weight_bytes_transferred, size);
    assert_eq!((info.device.as_str(), info.threads), ("cpu", 1));
    assert!(!info.version.is_empty());

    let again = TestWorker::start(&c.coordinator_url, &c.first.cache_dir).await;
    let mut client = again.client().await;
    let reply = client.load(load_request(1, (0, 2), &c.coordinator.digest, &c.last.url)).await.expect("load");
    assert_eq!(reply.into_inner().transferred_bytes, 0);
    let info = client.info(pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.weight_bytes_transferred, 0);
    // It serves, and shuts down cleanly with a stream still open.
    let mut stream = Stream::open(&mut client).await;
    stream.send(batch(1, 0, 9, 0, &prompt(), None)).await;
    assert_eq!(stream.recv().await.expect("reply").tokens.len(), 1);
    again.stop().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_corrupted_chunk_is_fetched_again() {
    let c = Chain::start(Some(3)).await;
    let requests = c.coordinator.chunk_requests.lock().expect("lock").clone();
    assert_eq!(requests.get(&3), Some(&3), "twice for the first load, once for the second");
    assert_eq!(requests.get(&2), Some(&2));
    let size = c.coordinator.shard.len() as u64;
    assert_eq!(c.transferred, [size + CHUNK as u64, size]);
    for w in [&c.first, &c.last] {
        let cached = std::fs::read(w.cache_dir.join(format!("{}.gguf", c.coordinator.digest))).expect("cached");
        assert_eq!(support::sha256_hex(&cached), c.coordinator.digest);
        assert!(!w.cache_dir.join(format!("{}.gguf.part", c.coordinator.digest)).exists());
    }
    assert!(c.dir.path().exists());
}

#[tokio::test]
async fn release_frees_the_kv_cache_on_every_stage() {
    let c = Chain::start(None).await;
    let mut first = c.first.client().await;
    let before = Stream::once(&mut first, batch(1, 0, 5, 0, &prompt(), None)).await.expect("prefill");
    assert!(kv_bytes(&c.first).await > 0 && kv_bytes(&c.last).await > 0);
    let reply = first.release(pb::ReleaseRequest { sessions: vec![5, 999] }).await.expect("release").into_inner();
    assert_eq!(reply.released, 1);
    assert_eq!((kv_bytes(&c.first).await, kv_bytes(&c.last).await), (0, 0));
    // The session starts over from position 0 and gives the same token.
    let after = Stream::once(&mut first, batch(1, 1, 5, 0, &prompt(), None)).await.expect("prefill again");
    assert_eq!(after.tokens[0].token, before.tokens[0].token);
}

#[tokio::test]
async fn an_unreachable_next_stage_is_named() {
    let c = Chain::start(None).await;
    let dead = dead_address();
    let lonely = TestWorker::start(&c.coordinator_url, &c.first.cache_dir).await;
    let mut client = lonely.client().await;
    client.load(load_request(1, (0, 2), &c.coordinator.digest, &dead)).await.expect("load");
    let err = Stream::once(&mut client, batch(1, 0, 1, 0, &prompt(), None)).await.expect_err("unreachable");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains(&dead), "{}", err.message());
    assert!(client.info(pb::InfoRequest {}).await.is_ok(), "the worker still serves");
}

#[tokio::test]
async fn an_unreachable_coordinator_fails_the_start_by_name() {
    let dead = dead_address();
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let config = WorkerConfig {
        coordinator: Some(dead.clone()),
        cache_dir: dir.path().to_path_buf(),
        join_timeout: Duration::from_millis(300),
        ..WorkerConfig::default()
    };
    let err = run(listener, config, std::future::pending()).await.expect_err("no coordinator");
    assert!(matches!(err, WorkerError::CoordinatorUnreachable { .. }), "{err}");
    assert!(err.to_string().contains(&dead), "{err}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    // A name this build lacks is refused at parse, naming the feature; a device
    // built in but absent (here: no CUDA in this build at all) is refused at start.
    if let Err(e) = "cuda:0".parse::<potluck_worker::Device>() {
        assert!(e.to_string().contains("`cuda` feature"), "{e}");
    }
    let config = WorkerConfig { device: potluck_worker::Device::Cuda(7), ..WorkerConfig::default() };
    let err = run(listener, config, std::future::pending()).await.expect_err("no cuda:7");
    assert!(matches!(err, WorkerError::Device(_)) && err.to_string().contains("cuda:7"), "{err}");
}

#[tokio::test]
async fn a_new_epoch_on_the_shard_held_keeps_the_layers_and_starts_the_cache_afresh() {
    use std::sync::atomic::Ordering;
    let c = Chain::start(None).await;
    let mut first = c.first.client().await;
    let before = Stream::once(&mut first, batch(1, 0, 5, 0, &prompt(), None)).await.expect("epoch 1");
    assert!(kv_bytes(&c.first).await > 0);
    let manifests = c.coordinator.manifests.load(Ordering::SeqCst);
    let digest = &c.coordinator.digest;
    let b = c.last.client().await.load(load_request(2, (2, 4), digest, "")).await.expect("renew last").into_inner();
    let a = first.load(load_request(2, (0, 2), digest, &c.last.url)).await.expect("renew first").into_inner();
    assert_eq!((a.epoch, b.epoch, a.transferred_bytes, b.transferred_bytes), (2, 2, 0, 0));
    assert!(a.weight_bytes > 0 && b.weight_bytes > 0, "the weights are still held");
    assert_eq!(c.coordinator.manifests.load(Ordering::SeqCst), manifests, "kept layers fetch nothing");
    assert_eq!(kv_bytes(&c.first).await, 0, "the cache starts afresh");
    let stale = Stream::once(&mut first, batch(1, 1, 6, 0, &prompt(), None)).await.expect_err("stale");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let after = Stream::once(&mut first, batch(2, 2, 5, 0, &prompt(), None)).await.expect("epoch 2");
    let ids = |r: &pb::ForwardReply| r.tokens.iter().map(|t| (t.session, t.token)).collect::<Vec<_>>();
    assert_eq!(ids(&after), ids(&before), "the same session replayed gives the same token");
    // Another range of the same file is another stage: loaded, not kept.
    let other = first.load(load_request(3, (0, 1), digest, &c.last.url)).await.expect("load").into_inner();
    assert!(other.weight_bytes < a.weight_bytes);
    assert_eq!(c.coordinator.manifests.load(Ordering::SeqCst), manifests + 1);
}

#[tokio::test]
async fn a_spare_takes_a_warm_shard_without_fetching_it_again() {
    use std::sync::atomic::Ordering;
    let c = Chain::start(None).await;
    let spare = TestWorker::start(&c.coordinator_url, &c.dir.path().join("cache-spare")).await;
    let mut client = spare.client().await;
    let shard =
        |start, end| pb::WarmShard { layer_start: start, layer_end: end, shard_digest: c.coordinator.digest.clone() };
    let warm = pb::WarmRequest { shards: vec![shard(0, 2), shard(2, 4)], shard_source: String::new() };
    let reply = client.warm(warm.clone()).await.expect("warm").into_inner();
    assert_eq!(reply.held, 2);
    assert_eq!(reply.transferred_bytes, c.coordinator.shard.len() as u64, "fetched once for both ranges");
    let manifests = c.coordinator.manifests.load(Ordering::SeqCst);
    let again = client.warm(warm).await.expect("warm again").into_inner();
    assert_eq!((again.held, again.transferred_bytes), (2, 0));
    assert_eq!(c.coordinator.manifests.load(Ordering::SeqCst), manifests, "what is held is not asked again");
    // It replaces the first stage: the warm layers serve at once, with no fetch.
    let loaded = client.load(load_request(2, (0, 2), &c.coordinator.digest, &c.last.url)).await.expect("load");
    assert_eq!(loaded.into_inner().transferred_bytes, 0);
    assert_eq!(c.coordinator.manifests.load(Ordering::SeqCst), manifests);
    c.last.client().await.load(load_request(2, (2, 4), &c.coordinator.digest, "")).await.expect("renew last");
    let reply = Stream::once(&mut client, batch(2, 0, 5, 0, &prompt(), None)).await.expect("serves");
    assert_eq!(reply.tokens.len(), 1);
    let bad = pb::WarmRequest { shards: vec![shard(3, 3)], shard_source: String::new() };
    assert_eq!(client.warm(bad).await.expect_err("empty range").code(), Code::InvalidArgument);
}
