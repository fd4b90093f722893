//! Turning sessions into OpenAI responses: text decoded incrementally (never
//! splitting a UTF-8 character), stop sequences held back and cut, log
//! probabilities, `usage`, and both the one-shot JSON and the SSE stream.
//!
//! Each choice runs in its own task and reports [`ChoiceEvent`]s; a client
//! that goes away drops the receiver, the choice tasks notice on their next
//! token and drop their sessions, and the scheduler frees the KV cache.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::cluster::Cluster;
use crate::pipeline::{Finish, Token};
use crate::scheduler::{SessionEvent, SessionStream};
use crate::stop::StopMatcher;

/// Which endpoint is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// What one request's response needs besides its sessions.
#[derive(Debug, Clone)]
pub struct Response {
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// The model name reported.
    pub model: String,
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Whether to report log-probabilities.
    pub logprobs: bool,
    /// Send a last chunk with `usage` (streaming).
    pub include_usage: bool,
    /// Prompt tokens, for `usage`.
    pub prompt_tokens: usize,
}

/// Text released for one choice, and the tokens behind it.
#[derive(Debug)]
enum ChoiceEvent {
    Delta { text: String, tokens: Vec<Token> },
    Done { finish: Finish, completion_tokens: usize },
    Failed(String),
}

/// Seconds since the epoch, for `created`.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Follows one session to its end, sending text as it becomes final.
async fn run_choice(
    c: Arc<Cluster>,
    index: usize,
    mut stream: SessionStream,
    stop: Vec<String>,
    out: mpsc::UnboundedSender<(usize, ChoiceEvent)>,
) {
    let mut decoder = c.tokenizer().stream_decoder();
    let mut stops = StopMatcher::new(stop);
    let mut tokens = Vec::new();
    let mut count = 0;
    let send = |e: ChoiceEvent| out.send((index, e)).is_ok();
    loop {
        let Some(event) = stream.next().await else {
            let _ = send(ChoiceEvent::Failed("the scheduler stopped".into()));
            return;
        };
        match event {
            SessionEvent::Token(t) => {
                count += 1;
                let piece = match decoder.push(t.id) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = send(ChoiceEvent::Failed(e.to_string()));
                        return;
                    }
                };
                tokens.push(t);
                let released = stops.push(&piece);
                if released.stopped {
                    // Dropping `stream` on return cancels the session.
                    let _ = send(ChoiceEvent::Delta { text: released.text, tokens: std::mem::take(&mut tokens) })
                        && send(ChoiceEvent::Done { finish: Finish::Stop, completion_tokens: count });
                    return;
                }
                if !released.text.is_empty()
                    && !send(ChoiceEvent::Delta { text: released.text, tokens: std::mem::take(&mut tokens) })
                {
                    return;
                }
                if out.is_closed() {
                    return;
                }
            }
            SessionEvent::Finished(finish) => {
                let rest = decoder.finish().unwrap_or_default();
                let released = stops.push(&rest);
                let mut text = released.text;
                let finish = if released.stopped {
                    Finish::Stop
                } else {
                    text.push_str(&stops.finish());
                    finish
                };
                let _ = send(ChoiceEvent::Delta { text, tokens: std::mem::take(&mut tokens) })
                    && send(ChoiceEvent::Done { finish, completion_tokens: count });
                return;
            }
            SessionEvent::Failed(message) => {
                let _ = send(ChoiceEvent::Failed(message));
                return;
            }
        }
    }
}

/// Starts a task per session; their events arrive, tagged by choice index, on the returned receiver.
fn start(
    c: &Arc<Cluster>,
    sessions: Vec<SessionStream>,
    stop: &[String],
) -> mpsc::UnboundedReceiver<(usize, ChoiceEvent)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (index, s) in sessions.into_iter().enumerate() {
        tokio::spawn(run_choice(Arc::clone(c), index, s, stop.to_vec(), tx.clone()));
    }
    rx
}

/// Log-probabilities of `tokens` in the endpoint's shape (`None` if not asked for).
fn logprobs_json(c: &Cluster, endpoint: Endpoint, tokens: &[Token], offset: usize) -> Value {
    let text = |id: u32| c.tokenizer().decode(&[id]).unwrap_or_default();
    match endpoint {
        Endpoint::Chat => {
            let entry = |id: u32, lp: f32| {
                let t = text(id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.id, t.logprob);
                    e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Endpoint::Completions => {
            let mut at = offset;
            let mut offsets = Vec::with_capacity(tokens.len());
            for t in tokens {
                offsets.push(at);
                at += text(t.id).len();
            }
            json!({
                "tokens": tokens.iter().map(|t| text(t.id)).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|&(id, lp)| (text(id), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Waits for every choice and builds the one-shot response; `Err` carries the first failure.
pub async fn collect(c: Arc<Cluster>, sessions: Vec<SessionStream>, r: &Response) -> Result<Value, String> {
    let n = sessions.len();
    let mut rx = start(&c, sessions, &r.stop);
    let mut texts = vec![String::new(); n];
    let mut tokens: Vec<Vec<Token>> = vec![Vec::new(); n];
    let mut finishes: Vec<Option<Finish>> = vec![None; n];
    let mut completion = 0;
    while let Some((i, event)) = rx.recv().await {
        match event {
            ChoiceEvent::Delta { text, tokens: t } => {
                texts[i].push_str(&text);
                tokens[i].extend(t);
            }
            ChoiceEvent::Done { finish, completion_tokens } => {
                finishes[i] = Some(finish);
                completion += completion_tokens;
                if finishes.iter().all(Option::is_some) {
                    break;
                }
            }
            ChoiceEvent::Failed(m) => return Err(m),
        }
    }
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let reason = finishes[i].map_or("stop", Finish::reason);
            let logprobs = if r.logprobs { logprobs_json(&c, r.endpoint, &tokens[i], 0) } else { Value::Null };
            match r.endpoint {
                Endpoint::Chat => json!({"index": i, "message": {"role": "assistant", "content": texts[i]},
                    "finish_reason": reason, "logprobs": logprobs}),
                Endpoint::Completions => {
                    json!({"index": i, "text": texts[i], "finish_reason": reason, "logprobs": logprobs})
                }
            }
        })
        .collect();
    let object = match r.endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completions => "text_completion",
    };
    Ok(json!({"id": r.id, "object": object, "created": now(), "model": r.model, "choices": choices,
        "usage": usage(r.prompt_tokens, completion), "system_fingerprint": null}))
}

/// Streams every choice as server-sent events, ending with `data: [DONE]`.
pub fn stream(
    c: Arc<Cluster>,
    sessions: Vec<SessionStream>,
    r: Response,
) -> Sse<UnboundedReceiverStream<Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::unbounded_channel::<Result<Event, Infallible>>();
    tokio::spawn(async move {
        let n = sessions.len();
        let mut events = start(&c, sessions, &r.stop);
        let created = now();
        let object = match r.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let frame = |choices: Value, usage: Option<Value>| {
            let mut v = json!({"id": r.id, "object": object, "created": created, "model": r.model, "choices": choices,
                "system_fingerprint": null});
            if let Some(u) = usage {
                v["usage"] = u;
            } else if r.include_usage {
                v["usage"] = Value::Null;
            }
            Ok(Event::default().data(v.to_string()))
        };
        if r.endpoint == Endpoint::Chat {
            for i in 0..n {
                let first = json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]);
                if tx.send(frame(first, None)).is_err() {
                    return;
                }
            }
        }
        let mut offsets = vec![0; n];
        let mut done = 0;
        let mut completion = 0;
        while let Some((i, event)) = events.recv().await {
            let choice = match event {
                ChoiceEvent::Delta { text, tokens } => {
                    if text.is_empty() && tokens.is_empty() {
                        continue;
                    }
                    let logprobs =
                        if r.logprobs { logprobs_json(&c, r.endpoint, &tokens, offsets[i]) } else { Value::Null };
                    offsets[i] += text.len();
                    match r.endpoint {
                        Endpoint::Chat => {
                            json!({"index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
                        }
                        Endpoint::Completions => {
                            json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": null})
                        }
                    }
                }
                ChoiceEvent::Done { finish, completion_tokens } => {
                    done += 1;
                    completion += completion_tokens;
                    match r.endpoint {
                        Endpoint::Chat => {
                            json!({"index": i, "delta": {}, "logprobs": null, "finish_reason": finish.reason()})
                        }
                        Endpoint::Completions => {
                            json!({"index": i, "text": "", "logprobs": null, "finish_reason": finish.reason()})
                        }
                    }
                }
                ChoiceEvent::Failed(message) => {
                    let err =
                        json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                    let _ = tx.send(Ok(Event::default().data(err.to_string())));
                    return;
                }
            };
            if tx.send(frame(json!([choice]), None)).is_err() {
                return; // The client went away; dropping `events` cancels every choice.
            }
            if done == n {
                break;
            }
        }
        if r.include_usage {
            let _ = tx.send(frame(json!([]), Some(usage(r.prompt_tokens, completion))));
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    Sse::new(UnboundedReceiverStream::new(rx))
}
