//! The HTTP API: OpenAI-compatible `/v1/completions`, `/v1/chat/completions`
//! and `/v1/models` (streaming and not), plus `/health`, `/ready`,
//! `/v1/cluster` and `/metrics`.
//!
//! Every error is in OpenAI's JSON shape; bodies are size-limited; API keys,
//! when configured, guard everything under `/v1`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::cluster::Cluster;
use crate::completion::{self, Endpoint};
use crate::error::CoordinatorError;
use crate::openai::{self, ChatRequest, CompletionRequest};
use crate::scheduler::{Serving, SessionFailure, SessionStream};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// What a 429 tells the client to wait, in seconds.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The API router.
pub fn router(cluster: Arc<Cluster>) -> Router {
    let api = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster_info))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&cluster), authorize))
        .layer(axum::middleware::from_fn_with_state(Arc::clone(&cluster), count))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(cluster)
}

/// An error in OpenAI's JSON shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (kind, code) = match self.status {
            StatusCode::UNAUTHORIZED => ("authentication_error", Value::from("invalid_api_key")),
            StatusCode::NOT_FOUND => ("invalid_request_error", Value::from("not_found")),
            StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", Value::from("rate_limit_exceeded")),
            s if s.is_client_error() => ("invalid_request_error", Value::Null),
            _ => ("server_error", Value::Null),
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": null, "code": code}});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> Self {
        let status = match &e {
            CoordinatorError::BadRequest(_) | CoordinatorError::Engine(_) => StatusCode::BAD_REQUEST,
            CoordinatorError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            CoordinatorError::NotReady(_) | CoordinatorError::Plan(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self::new(status, e.to_string())
    }
}

/// Counts every API response by status, for `/metrics`.
async fn count(State(c): State<Arc<Cluster>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    c.metrics().request(response.status().as_u16());
    response
}

/// Requires `Authorization: Bearer <key>` when API keys are configured.
async fn authorize(State(c): State<Arc<Cluster>>, request: Request, next: Next) -> Response {
    let keys = &c.config().api_keys;
    if keys.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(k) if keys.iter().any(|key| key == k) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "invalid API key").into_response(),
        None => ApiError::new(StatusCode::UNAUTHORIZED, "missing API key: send `Authorization: Bearer <key>`")
            .into_response(),
    }
}

async fn ready(State(c): State<Arc<Cluster>>) -> impl IntoResponse {
    let state = c.plan_state().await;
    match c.scheduler().serving() {
        Serving::Ready { .. } if state.ready => (StatusCode::OK, "ready".to_string()),
        // Requests are taken during a failover and wait for the next plan, up to the failover timeout.
        Serving::Failover { reason, since } => {
            let plan = state.error.map(|e| format!("; {e}")).unwrap_or_default();
            if since.elapsed() < c.config().failover_timeout {
                (StatusCode::OK, format!("ready, failing over: {reason}{plan}"))
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no capacity: failing over since {:?}: {reason}{plan}", since.elapsed()),
                )
            }
        }
        _ => (StatusCode::SERVICE_UNAVAILABLE, state.error.unwrap_or_else(|| "no plan loaded".into())),
    }
}

/// `Info` of every stage of the plan in force, asked at once.
async fn stage_infos(c: &Cluster) -> (crate::cluster::PlanState, Vec<Option<potluck_proto::v1::InfoReply>>) {
    let s = c.plan_state().await;
    let asks: Vec<_> = s
        .stages
        .iter()
        .map(|st| {
            let (rpc, address) = (Arc::clone(c.stage_rpc()), st.address.clone());
            tokio::spawn(async move { crate::traffic::stage_info(&rpc, &address).await })
        })
        .collect();
    let mut infos = Vec::with_capacity(asks.len());
    for ask in asks {
        infos.push(ask.await.ok().flatten());
    }
    (s, infos)
}

async fn cluster_info(State(c): State<Arc<Cluster>>) -> Json<Value> {
    let (s, infos) = stage_infos(&c).await;
    let workers = c.membership().workers();
    let stages: Vec<Value> = s
        .stages
        .iter()
        .zip(&infos)
        .map(|(st, info)| {
            json!({"worker": st.worker, "address": st.address, "layers": [st.start, st.end],
                "hidden_bytes_sent": info.as_ref().map(|i| i.hidden_bytes_sent),
                "hidden_bytes_received": info.as_ref().map(|i| i.hidden_bytes_received),
                "kv_bytes_in_use": info.as_ref().map(|i| i.kv_bytes_in_use)})
        })
        .collect();
    let (predicted, left_out) = crate::planner::in_force(c.cost(), &s.stages, &workers);
    Json(json!({
        "cluster": c.name(),
        "model": model_name(&c),
        "epoch": s.epoch,
        "leader": c.leader(),
        "ready": s.ready,
        "error": s.error,
        "wire_dtype": c.config().wire_dtype.name(),
        "workers": workers,
        "left_out": left_out,
        "predicted": predicted.map(|p| json!({
            "tok_s_one_stream": p.tokens_per_sec_one_stream(),
            "tok_s_saturated": p.tokens_per_sec_saturated(crate::planner::DEFAULT_EXPECTED_BATCH),
            "stage_ms": p.stage_secs.iter().map(|t| t * 1e3).collect::<Vec<_>>(),
            "in_seconds": workers.iter().all(|w| w.layer_micros.is_some()),
        })),
        "stages": stages,
        "weight_bytes_shipped": c.weight_bytes_shipped(),
        "traffic": c.traffic().to_json(),
        "events": c.metrics().events(),
    }))
}

async fn metrics(State(c): State<Arc<Cluster>>) -> impl IntoResponse {
    use std::fmt::Write as _;
    let mut out = c.metrics().render();
    let (s, infos) = stage_infos(&c).await;
    out.push_str("# HELP potluck_worker_kv_bytes KV cache bytes in use on each stage's worker.\n");
    out.push_str("# TYPE potluck_worker_kv_bytes gauge\n");
    for (i, (st, info)) in s.stages.iter().zip(&infos).enumerate() {
        if let Some(info) = info {
            let _ = writeln!(
                out,
                "potluck_worker_kv_bytes{{stage=\"{i}\",worker=\"{}\"}} {}",
                st.worker, info.kv_bytes_in_use
            );
        }
    }
    out.push_str("# HELP potluck_stage_busy_seconds_total Time each stage's worker spent computing micro-batches.\n");
    out.push_str("# TYPE potluck_stage_busy_seconds_total counter\n");
    for (i, (st, info)) in s.stages.iter().zip(&infos).enumerate() {
        if let Some(info) = info {
            #[allow(clippy::cast_precision_loss)]
            let secs = info.busy_micros as f64 / 1e6;
            let _ = writeln!(out, "potluck_stage_busy_seconds_total{{stage=\"{i}\",worker=\"{}\"}} {secs}", st.worker);
        }
    }
    let _ = writeln!(
        out,
        "# HELP potluck_plan_epoch The plan epoch in force.\n# TYPE potluck_plan_epoch gauge\npotluck_plan_epoch {}",
        s.epoch
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The name the API reports for the model: its file name.
pub fn model_name(c: &Cluster) -> String {
    c.config().model.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

async fn models(State(c): State<Arc<Cluster>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": model_name(&c), "object": "model", "created": 0, "owned_by": "potluck"}
    ]}))
}

fn check_model(c: &Cluster, asked: Option<&String>) -> Result<(), ApiError> {
    let name = model_name(c);
    match asked {
        Some(m) if m != &name && m != "default" => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model `{m}` does not exist here; this server serves `{name}`"),
        )),
        _ => Ok(()),
    }
}

async fn completions(
    State(c): State<Arc<Cluster>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let req: CompletionRequest = openai::parse(&body).map_err(ApiError::bad)?;
    check_model(&c, req.common.model.as_ref())?;
    let mut plan = req.plan().map_err(ApiError::bad)?;
    plan.generation.prompt = match req.prompt().map_err(ApiError::bad)? {
        Ok(text) => c.tokenizer().encode(text, true).map_err(CoordinatorError::from)?,
        Err(ids) => {
            let vocab = c.model().vocab;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ApiError::bad(format!("token id {bad} is outside the vocabulary of {vocab}")));
            }
            ids.to_vec()
        }
    };
    let stream = req.common.stream;
    let usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    respond(c, plan, Endpoint::Completions, stream, usage).await
}

async fn chat_completions(
    State(c): State<Arc<Cluster>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let req: ChatRequest = openai::parse(&body).map_err(ApiError::bad)?;
    check_model(&c, req.common.model.as_ref())?;
    let mut plan = req.plan().map_err(ApiError::bad)?;
    let messages = req.messages().map_err(ApiError::bad)?;
    let template = c.tokenizer().chat_template().ok_or_else(|| ApiError::bad("this model has no chat template"))?;
    let text = template.render(&messages, true).map_err(CoordinatorError::from)?;
    plan.generation.prompt = c.tokenizer().encode(&text, true).map_err(CoordinatorError::from)?;
    let stream = req.common.stream;
    let usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    respond(c, plan, Endpoint::Chat, stream, usage).await
}

async fn respond(
    c: Arc<Cluster>,
    plan: openai::Plan,
    endpoint: Endpoint,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    // During a failover requests are taken and wait for the next plan (up to the failover timeout).
    if c.scheduler().serving() == Serving::NoPlan {
        let why = c.plan_state().await.error.unwrap_or_else(|| "no plan is loaded yet".into());
        return Err(CoordinatorError::NotReady(why).into());
    }
    let mut sessions: Vec<SessionStream> = Vec::with_capacity(plan.n);
    for i in 0..plan.n {
        let mut g = plan.generation.clone();
        // Each extra choice draws from its own seed, so sampled choices differ but stay reproducible.
        g.sampling.seed = g.sampling.seed.wrapping_add(i as u64);
        // On failure the sessions already admitted are dropped, which cancels them.
        sessions.push(c.scheduler().submit(g).await?);
    }
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completions => "cmpl",
    };
    let r = completion::Response {
        id: format!("{prefix}-{}", c.new_session()),
        model: model_name(&c),
        endpoint,
        stop: plan.stop,
        logprobs: plan.logprobs.is_some(),
        include_usage,
        prompt_tokens: plan.generation.prompt.len(),
    };
    if stream {
        return Ok(completion::stream(c, sessions, r).await.map_err(failure_status)?.into_response());
    }
    let body = completion::collect(c, sessions, &r).await.map_err(failure_status)?;
    Ok(Json(body).into_response())
}

/// A session's failure as the status it answers with: 503 when there was no pipeline to serve it.
fn failure_status(f: SessionFailure) -> ApiError {
    match f {
        SessionFailure::NoCapacity(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, f.to_string()),
        SessionFailure::Pipeline(_) => ApiError::new(StatusCode::BAD_GATEWAY, f.to_string()),
    }
}
