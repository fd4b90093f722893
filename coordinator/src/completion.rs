//! Turning sessions into OpenAI responses: text decoded incrementally (never
//! splitting a UTF-8 character), stop sequences held back and cut, log
//! probabilities, `usage`, and both the one-shot JSON and the SSE stream.
//!
//! One task serves a request: it reads every choice's session channel
//! (bounded, so a slow client holds back only its own sessions) and writes
//! the response; an SSE body is fed through a bounded channel too. A client
//! that goes away drops the receivers, and the scheduler frees the KV cache.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{StreamExt as _, StreamMap};

use crate::cluster::Cluster;
use crate::pipeline::{Finish, Token};
use crate::scheduler::{SessionEvent, SessionFailure, SessionStream};
use crate::stop::StopMatcher;

/// SSE frames buffered toward the client socket.
pub const SSE_BUFFER: usize = 32;

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
    Failed(SessionFailure),
}

/// Seconds since the epoch, for `created`.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One choice's text so far: its decoder and stop matcher.
struct Choice<'a> {
    decoder: potluck_engine::tokenizer::StreamDecoder<'a>,
    stops: StopMatcher,
    count: usize,
    /// Tokens whose text is not released yet.
    tokens: Vec<Token>,
}

impl Choice<'_> {
    /// What `event` releases; the last entry is `Done` or `Failed` when the choice ends.
    fn on(&mut self, event: SessionEvent) -> Vec<ChoiceEvent> {
        match event {
            SessionEvent::Token(t) => {
                self.count += 1;
                let piece = match self.decoder.push(t.id) {
                    Ok(p) => p,
                    Err(e) => return vec![ChoiceEvent::Failed(SessionFailure::Pipeline(e.to_string()))],
                };
                self.tokens.push(t);
                let released = self.stops.push(&piece);
                if released.stopped {
                    let tokens = std::mem::take(&mut self.tokens);
                    return vec![
                        ChoiceEvent::Delta { text: released.text, tokens },
                        ChoiceEvent::Done { finish: Finish::Stop, completion_tokens: self.count },
                    ];
                }
                if released.text.is_empty() {
                    return Vec::new();
                }
                vec![ChoiceEvent::Delta { text: released.text, tokens: std::mem::take(&mut self.tokens) }]
            }
            SessionEvent::Finished(finish) => {
                let rest = self.decoder.finish().unwrap_or_default();
                let released = self.stops.push(&rest);
                let mut text = released.text;
                let finish = if released.stopped {
                    Finish::Stop
                } else {
                    text.push_str(&self.stops.finish());
                    finish
                };
                let tokens = std::mem::take(&mut self.tokens);
                vec![ChoiceEvent::Delta { text, tokens }, ChoiceEvent::Done { finish, completion_tokens: self.count }]
            }
            SessionEvent::Failed(f) => vec![ChoiceEvent::Failed(f)],
        }
    }
}

/// Every choice of one request, read in one task.
struct Choices<'a> {
    sessions: StreamMap<usize, ReceiverStream<SessionEvent>>,
    choices: Vec<Choice<'a>>,
    /// Events read ahead (see [`Choices::first_failure`]).
    ahead: VecDeque<(usize, SessionEvent)>,
    ready: VecDeque<(usize, ChoiceEvent)>,
}

impl<'a> Choices<'a> {
    fn new(c: &'a Cluster, sessions: Vec<SessionStream>, stop: &[String]) -> Self {
        let choices = sessions
            .iter()
            .map(|_| Choice {
                decoder: c.tokenizer().stream_decoder(),
                stops: StopMatcher::new(stop.to_vec()),
                count: 0,
                tokens: Vec::new(),
            })
            .collect();
        let sessions = sessions.into_iter().map(|s| ReceiverStream::new(s.events)).enumerate().collect();
        Self { sessions, choices, ahead: VecDeque::new(), ready: VecDeque::new() }
    }

    /// Waits for each choice's first event and returns a failure among them:
    /// so a request that waited out a failover is answered with a status, not a stream.
    async fn first_failure(&mut self) -> Option<SessionFailure> {
        let mut seen = vec![false; self.choices.len()];
        while seen.iter().any(|s| !s) {
            let (i, event) = self.sessions.next().await?;
            seen[i] = true;
            if let SessionEvent::Failed(f) = &event {
                return Some(f.clone());
            }
            self.ahead.push_back((i, event));
        }
        None
    }

    /// The next event of any choice; `None` once every session has ended.
    async fn next(&mut self) -> Option<(usize, ChoiceEvent)> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            let (i, event) = match self.ahead.pop_front() {
                Some(e) => e,
                None => match self.sessions.next().await {
                    Some(e) => e,
                    None => {
                        return Some((0, ChoiceEvent::Failed(SessionFailure::Pipeline("the scheduler stopped".into()))))
                    }
                },
            };
            let Some(choice) = self.choices.get_mut(i) else { continue };
            let events = choice.on(event);
            if events.iter().any(|e| matches!(e, ChoiceEvent::Done { .. } | ChoiceEvent::Failed(_))) {
                // Dropping the session's receiver ends it (a stop sequence cancels it in the scheduler).
                self.sessions.remove(&i);
            }
            self.ready.extend(events.into_iter().map(|e| (i, e)));
        }
    }
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
pub async fn collect(c: Arc<Cluster>, sessions: Vec<SessionStream>, r: &Response) -> Result<Value, SessionFailure> {
    let n = sessions.len();
    let mut rx = Choices::new(&c, sessions, &r.stop);
    let mut texts = vec![String::new(); n];
    let mut tokens: Vec<Vec<Token>> = vec![Vec::new(); n];
    let mut finishes: Vec<Option<Finish>> = vec![None; n];
    let mut completion = 0;
    while let Some((i, event)) = rx.next().await {
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

/// Streams every choice as server-sent events, ending with `data: [DONE]`;
/// or, if the sessions failed before their first token (they waited out a
/// failover), that failure, so it can be answered with a status.
pub async fn stream(
    c: Arc<Cluster>,
    sessions: Vec<SessionStream>,
    r: Response,
) -> Result<Sse<ReceiverStream<Result<Event, Infallible>>>, SessionFailure> {
    let n = sessions.len();
    // Choices borrow the cluster's tokenizer: the task owns the cluster and builds them there.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(SSE_BUFFER);
    tokio::spawn(async move {
        let mut events = Choices::new(&c, sessions, &r.stop);
        let failure = events.first_failure().await;
        let failed = failure.is_some();
        if first_tx.send(failure).is_err() || failed {
            return;
        }
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
                if tx.send(frame(first, None)).await.is_err() {
                    return;
                }
            }
        }
        let mut offsets = vec![0; n];
        let mut done = 0;
        let mut completion = 0;
        while let Some((i, event)) = events.next().await {
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
                ChoiceEvent::Failed(failure) => {
                    let err = json!({"error": {"message": failure.to_string(), "type": "server_error", "param": null, "code": null}});
                    let _ = tx.send(Ok(Event::default().data(err.to_string()))).await;
                    return;
                }
            };
            if tx.send(frame(json!([choice]), None)).await.is_err() {
                return; // The client went away; dropping `events` cancels every choice.
            }
            if done == n {
                break;
            }
        }
        if r.include_usage {
            let _ = tx.send(frame(json!([]), Some(usage(r.prompt_tokens, completion)))).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    match first_rx.await {
        Ok(Some(failure)) => Err(failure),
        Ok(None) => Ok(Sse::new(ReceiverStream::new(rx))),
        Err(_) => Err(SessionFailure::Pipeline("the response task stopped".into())),
    }
}
