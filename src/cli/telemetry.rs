//! Logs to stderr, and with `--otlp-endpoint` spans exported over OTLP/gRPC.
//!
//! Export is off by default. When on, the exporter runs on a small Tokio
//! runtime of its own (commands build and drop their runtimes freely), and
//! [`Telemetry`]'s drop flushes the spans still queued: it outlives the
//! command, so a worker stopped by SIGTERM still delivers its last spans.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// Service name of the coordinator's spans (also `potluck up`, which runs it in-process).
pub const COORDINATOR_SERVICE: &str = "potluck-coordinator";
/// Service name of a worker's spans.
pub const WORKER_SERVICE: &str = "potluck-worker";

/// The Rust crates whose spans are exported: Potluck's own, never the exporter's transport.
const EXPORTED_TARGETS: [&str; 5] =
    ["potluck", "potluck_coordinator", "potluck_worker", "potluck_proto", "potluck_engine"];

/// Where to export spans; shared by `up`, `worker` and `coordinator`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OtlpArgs {
    /// Export spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317). Off when unset.
    #[arg(long = "otlp-endpoint", env = "POTLUCK_OTLP_ENDPOINT")]
    pub endpoint: Option<String>,
}

/// What this process reports itself as, and where.
#[derive(Debug, Clone)]
pub struct Export {
    /// The collector URL.
    pub endpoint: String,
    /// `service.name`: which kind of node sent a span.
    pub service: &'static str,
    /// `service.instance.id`: which node of that kind (a worker's id).
    pub instance: String,
}

/// Keeps span export alive; dropping it flushes and stops the exporter.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("[potluck] flushing spans: {e}");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Installs the global subscriber: stderr logs filtered by `RUST_LOG` (default: warnings, and a worker's
/// shard download progress, which an operator waiting for a cold start needs to see), plus OTLP span
/// export at info level for Potluck's crates when `export` is set.
pub fn init(export: Option<Export>) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("warn,{}=info", potluck_worker::PROGRESS_TARGET))
    });
    // Colour codes only for a terminal: in a log file or journald they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter);
    let Some(export) = export else {
        tracing_subscriber::registry().with(logs).try_init()?;
        return Ok(Telemetry::default());
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .context("starting the OTLP export runtime")?;
    // tonic's channel spawns its connection task on the current runtime.
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(export.endpoint.clone())
            .build()
            .with_context(|| format!("OTLP exporter for {}", export.endpoint))?
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(export.service)
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", export.instance))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let targets = EXPORTED_TARGETS
        .iter()
        .fold(tracing_subscriber::filter::Targets::new(), |t, name| t.with_target(*name, tracing::Level::INFO));
    let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer("potluck")).with_filter(targets);
    tracing_subscriber::registry().with(logs).with(spans).try_init()?;
    Ok(Telemetry { provider: Some(provider), runtime: Some(runtime) })
}
