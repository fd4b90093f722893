//! The HTTP API: OpenAI-compatible completions (streaming and not), plus
//! `/ready`, `/health` and `/v1/cluster`. The full API surface and
//! continuous batching belong to the serving work; here requests take turns.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use potluck_engine::{ChatMessage, SamplingParams};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::cluster::Cluster;
use crate::error::CoordinatorError;
use crate::pipeline::{Finish, Generation};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Default `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 128;

/// The API router.
pub fn router(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/v1/cluster", get(cluster_info))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(cluster)
}

/// An error in OpenAI's JSON shape.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.0.is_client_error() { "invalid_request_error" } else { "server_error" };
        (self.0, Json(json!({"error": {"message": self.1, "type": kind, "param": null, "code": null}}))).into_response()
    }
}

impl From<CoordinatorError> for ApiError {
    fn from(e: CoordinatorError) -> Self {
        let code = match &e {
            CoordinatorError::BadRequest(_) | CoordinatorError::Engine(_) => StatusCode::BAD_REQUEST,
            CoordinatorError::NotReady(_) | CoordinatorError::Plan(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self(code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self(r.status(), r.body_text())
    }
}

async fn ready(State(c): State<Arc<Cluster>>) -> impl IntoResponse {
    if c.plan_state().await.ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no plan loaded")
    }
}

async fn cluster_info(State(c): State<Arc<Cluster>>) -> Json<Value> {
    let s = c.plan_state().await;
    // Asked of every stage at once, only here: the forward path never waits on it.
    let asks: Vec<_> =
        s.stages.iter().map(|st| tokio::spawn(crate::traffic::stage_hidden_bytes(st.address.clone()))).collect();
    let mut stages = Vec::with_capacity(asks.len());
    for (st, ask) in s.stages.iter().zip(asks) {
        let hidden = ask.await.ok().flatten();
        stages.push(json!({"worker": st.worker, "address": st.address, "layers": [st.start, st.end],
            "hidden_bytes_sent": hidden.map(|h| h.0), "hidden_bytes_received": hidden.map(|h| h.1)}));
    }
    Json(json!({
        "cluster": c.name(),
        "epoch": s.epoch,
        "leader": c.leader(),
        "ready": s.ready,
        "error": s.error,
        "wire_dtype": c.config().wire_dtype.name(),
        "workers": c.membership().workers(),
        "stages": stages,
        "weight_bytes_shipped": c.weight_bytes_shipped(),
        "traffic": c.traffic().to_json(),
    }))
}

/// Fields shared by both endpoints.
#[derive(Debug, Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    #[serde(default)]
    stream: bool,
}

impl Common {
    fn max_tokens(&self) -> Result<usize, ApiError> {
        match self.max_completion_tokens.or(self.max_tokens) {
            None => Ok(DEFAULT_MAX_TOKENS),
            Some(n) if n >= 1 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            Some(n) => Err(ApiError(StatusCode::BAD_REQUEST, format!("max_tokens must be ≥ 1, got {n}"))),
        }
    }

    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            seed: self.seed.unwrap_or(0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            ..SamplingParams::default()
        }
    }
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: String,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

fn model_name(c: &Cluster) -> String {
    c.config().model.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn completions(
    State(c): State<Arc<Cluster>>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let prompt = c.tokenizer().encode(&req.prompt, true).map_err(CoordinatorError::from)?;
    respond(c, prompt, &req.common, false).await
}

async fn chat_completions(
    State(c): State<Arc<Cluster>>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let template = c
        .tokenizer()
        .chat_template()
        .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "this model has no chat template".into()))?;
    let text = template.render(&req.messages, true).map_err(CoordinatorError::from)?;
    let prompt = c.tokenizer().encode(&text, true).map_err(CoordinatorError::from)?;
    respond(c, prompt, &req.common, true).await
}

async fn respond(c: Arc<Cluster>, prompt: Vec<u32>, common: &Common, chat: bool) -> Result<Response, ApiError> {
    let name = model_name(&c);
    if let Some(m) = &common.model {
        if m != &name && m != "default" {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("model `{m}` is not served here (try `{name}`)")));
        }
    }
    let generation = Generation { prompt, max_tokens: common.max_tokens()?, sampling: common.sampling() };
    generation.sampling.validate().map_err(CoordinatorError::from)?;
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, c.new_session());
    let prompt_tokens = generation.prompt.len();
    if common.stream {
        return Ok(stream(c, generation, id, name, chat).into_response());
    }
    let (tokens, finish) = c.generate(generation, |_| true).await?;
    let visible: Vec<u32> = tokens.iter().copied().filter(|&t| !c.tokenizer().is_stop(t)).collect();
    let text = c.tokenizer().decode(&visible).map_err(CoordinatorError::from)?;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": tokens.len(), "total_tokens": prompt_tokens + tokens.len()});
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.reason(), "logprobs": null})
    } else {
        json!({"index": 0, "text": text, "finish_reason": finish.reason(), "logprobs": null})
    };
    let object = if chat { "chat.completion" } else { "text_completion" };
    Ok(Json(json!({"id": id, "object": object, "created": now(), "model": name, "choices": [choice], "usage": usage}))
        .into_response())
}

fn stream(
    c: Arc<Cluster>,
    generation: Generation,
    id: String,
    name: String,
    chat: bool,
) -> Sse<UnboundedReceiverStream<Result<Event, Infallible>>> {
    // Unbounded: tokens are tiny, and `on_token` must not block the pipeline.
    let (tx, rx) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        let created = now();
        let chunk = |delta: &str, finish: Option<&str>| {
            let choice = if chat {
                json!({"index": 0, "delta": {"content": delta}, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": delta, "finish_reason": finish})
            };
            Event::default().data(
                json!({"id": id, "object": object, "created": created, "model": name, "choices": [choice]}).to_string(),
            )
        };
        if chat {
            let first = json!({"id": id, "object": object, "created": created, "model": name,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
            let _ = tx.send(Ok(Event::default().data(first.to_string())));
        }
        let mut decoder = c.tokenizer().stream_decoder();
        let tx2 = tx.clone();
        let result = c
            .generate(generation, |t| {
                let piece = decoder.push(t.id).unwrap_or_default();
                // A closed channel means the client went away: stop and free the session.
                if piece.is_empty() {
                    !tx2.is_closed()
                } else {
                    tx2.send(Ok(chunk(&piece, None))).is_ok()
                }
            })
            .await;
        match result {
            Ok((_, Finish::Cancelled)) => {}
            Ok((_, finish)) => {
                let rest = decoder.finish().unwrap_or_default();
                if !rest.is_empty() {
                    let _ = tx.send(Ok(chunk(&rest, None)));
                }
                let _ = tx.send(Ok(chunk("", Some(finish.reason()))));
                let _ = tx.send(Ok(Event::default().data("[DONE]")));
            }
            Err(e) => {
                let err = json!({"error": {"message": e.to_string(), "type": "server_error"}});
                let _ = tx.send(Ok(Event::default().data(err.to_string())));
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(rx))
}
