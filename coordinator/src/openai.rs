//! OpenAI's request shapes for `/v1/completions` and `/v1/chat/completions`,
//! checked and turned into [`Generation`]s.
//!
//! Parsing is done by hand from the body bytes, so every malformed body
//! (bad JSON, invalid UTF-8, a wrong type, a missing field) gets the same
//! OpenAI-shaped 400 naming the problem. Fields the API defines but Potluck
//! does not act on (`user`, `logit_bias` empty, …) are accepted and ignored.

use potluck_engine::{ChatMessage, SamplingParams};
use serde::Deserialize;

use crate::pipeline::Generation;
use crate::stop::MAX_STOP_SEQUENCES;

/// Default `max_tokens` when a request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// Most choices (`n`) one request may ask for.
pub const MAX_CHOICES: usize = 16;
/// Most alternatives `top_logprobs` may ask for (OpenAI's limit for chat).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// A string or a list of them (`stop`, `prompt`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share.
#[derive(Debug, Deserialize)]
pub struct Common {
    /// The model asked for.
    pub model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    /// Extensions many servers accept (vLLM, llama.cpp).
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    n: Option<i64>,
    stop: Option<OneOrMany<String>>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

/// A `/v1/completions` request.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: Prompt,
    /// `logprobs`: how many alternatives per token (0–5), or none.
    logprobs: Option<i64>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: Common,
}

/// A prompt as text, one text in a list, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(OneOrMany<String>),
    Tokens(Vec<u32>),
}

/// A chat message's content: text, or a list of parts of which the text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A `/v1/chat/completions` request.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    messages: Vec<Message>,
    /// Whether to report log-probabilities.
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
    /// Shared fields.
    #[serde(flatten)]
    pub common: Common,
}

/// What the client asked for, in the coordinator's terms.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Limits and sampling (the prompt is filled in by the caller for chat).
    pub generation: Generation,
    /// Choices to generate.
    pub n: usize,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Whether to report log-probabilities, and how many alternatives.
    pub logprobs: Option<usize>,
}

/// Parses a JSON body into `T`, with a message fit for a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if body.is_empty() {
        return Err("the request body is empty; send a JSON object".into());
    }
    if let Err(e) = std::str::from_utf8(body) {
        return Err(format!("the request body is not valid UTF-8 (at byte {})", e.valid_up_to()));
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

impl CompletionRequest {
    /// The prompt: text to tokenize, or ids given directly.
    pub fn prompt(&self) -> Result<Result<&str, &[u32]>, String> {
        match &self.prompt {
            Prompt::Text(OneOrMany::One(t)) => Ok(Ok(t)),
            Prompt::Text(OneOrMany::Many(v)) if v.len() == 1 => Ok(Ok(&v[0])),
            Prompt::Text(OneOrMany::Many(_)) => {
                Err("`prompt` must be one string (batches of prompts are not supported; send one request each)".into())
            }
            Prompt::Tokens(ids) => Ok(Err(ids)),
        }
    }

    /// Limits, sampling, `n`, `stop` and `logprobs`, checked.
    pub fn plan(&self) -> Result<Plan, String> {
        let logprobs = match self.logprobs {
            None => None,
            Some(n @ 0..=5) => Some(usize::try_from(n).unwrap_or(0)),
            Some(n) => return Err(format!("`logprobs` must be between 0 and 5, got {n}")),
        };
        self.common.plan(logprobs)
    }
}

impl ChatRequest {
    /// The conversation, with list contents joined.
    pub fn messages(&self) -> Result<Vec<ChatMessage>, String> {
        if self.messages.is_empty() {
            return Err("`messages` must hold at least one message".into());
        }
        self.messages
            .iter()
            .map(|m| {
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                            return Err(format!("message content of type `{}` is not supported (text only)", p.kind));
                        }
                        parts.iter().map(|p| p.text.as_str()).collect()
                    }
                };
                Ok(ChatMessage { role: m.role.clone(), content })
            })
            .collect()
    }

    /// Limits, sampling, `n`, `stop` and `logprobs`, checked.
    pub fn plan(&self) -> Result<Plan, String> {
        let top = match self.top_logprobs {
            None => 0,
            Some(n) if (0..=MAX_TOP_LOGPROBS as i64).contains(&n) => usize::try_from(n).unwrap_or(0),
            Some(n) => return Err(format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {n}")),
        };
        if self.top_logprobs.is_some() && !self.logprobs {
            return Err("`top_logprobs` needs `logprobs: true`".into());
        }
        self.common.plan(self.logprobs.then_some(top))
    }
}

impl Common {
    fn plan(&self, logprobs: Option<usize>) -> Result<Plan, String> {
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => DEFAULT_MAX_TOKENS,
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(n) => return Err(format!("`max_tokens` must be at least 1, got {n}")),
        };
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => usize::try_from(n).unwrap_or(1),
            Some(n) => return Err(format!("`n` must be between 1 and {MAX_CHOICES}, got {n}")),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) if v.len() <= MAX_STOP_SEQUENCES => v.clone(),
            Some(OneOrMany::Many(v)) => {
                return Err(format!("`stop` takes at most {MAX_STOP_SEQUENCES} sequences, got {}", v.len()))
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(format!("`temperature` must be between 0 and 2, got {temperature}"));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if let Some(v) = v.filter(|v| !(-2.0..=2.0).contains(v)) {
                return Err(format!("`{name}` must be between -2 and 2, got {v}"));
            }
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => return Err(format!("`top_k` must be ≥ 0 (or -1 for off), got {k}")),
        };
        let sampling = SamplingParams {
            temperature,
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed.unwrap_or(0),
            top_logprobs: logprobs.unwrap_or(0),
            logprobs: logprobs.is_some(),
        };
        sampling.validate().map_err(|e| e.to_string())?;
        Ok(Plan { generation: Generation { prompt: Vec::new(), max_tokens, sampling }, n, stop, logprobs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_requests_parse() {
        let r: CompletionRequest =
            parse(br#"{"prompt": "hi", "max_tokens": 5, "stop": "\n", "n": 2, "logprobs": 2, "user": "x"}"#)
                .expect("valid");
        assert_eq!(r.prompt(), Ok(Ok("hi")));
        let p = r.plan().expect("valid");
        assert_eq!((p.generation.max_tokens, p.n, p.stop.clone(), p.logprobs), (5, 2, vec!["\n".to_string()], Some(2)));
        let r: CompletionRequest = parse(br#"{"prompt": [1, 2, 3]}"#).expect("ids");
        assert_eq!(r.prompt(), Ok(Err(&[1u32, 2, 3][..])));
        let r: ChatRequest = parse(
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                 "logprobs": true, "top_logprobs": 3, "max_completion_tokens": 7, "stream": true,
                 "stream_options": {"include_usage": true}}"#,
        )
        .expect("valid chat");
        assert_eq!(r.messages().expect("text")[0].content, "ab");
        let p = r.plan().expect("valid");
        assert_eq!((p.generation.max_tokens, p.logprobs, p.generation.sampling.top_logprobs), (7, Some(3), 3));
        assert!(r.common.stream_options.as_ref().is_some_and(|o| o.include_usage));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (b"", "empty"),
            (b"{\"prompt\": \"a\xff\"}", "UTF-8"),
            (b"{\"prompt\": ", "invalid request body"),
            (b"{\"max_tokens\": 3}", "invalid request body"),
            (b"{\"prompt\": 3}", "invalid request body"),
            (b"{\"prompt\": \"a\", \"max_tokens\": \"many\"}", "invalid request body"),
        ];
        for (body, want) in cases {
            let e = parse::<CompletionRequest>(body).expect_err("bad");
            assert!(e.contains(want), "{e}");
        }
        let plan = |body: &[u8]| parse::<CompletionRequest>(body).expect("parses").plan().expect_err("refused");
        assert!(plan(br#"{"prompt": "a", "max_tokens": -1}"#).contains("at least 1"));
        assert!(plan(br#"{"prompt": "a", "temperature": 7}"#).contains("temperature"));
        assert!(plan(br#"{"prompt": "a", "stop": ["a","b","c","d","e"]}"#).contains("at most 4"));
        assert!(plan(br#"{"prompt": "a", "n": 0}"#).contains("`n`"));
        assert!(plan(br#"{"prompt": "a", "logprobs": 9}"#).contains("logprobs"));
        let chat: ChatRequest = parse(br#"{"messages": []}"#).expect("parses");
        assert!(chat.messages().is_err());
        let chat: ChatRequest =
            parse(br#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#).expect("parses");
        assert!(chat.plan().is_err());
    }
}
