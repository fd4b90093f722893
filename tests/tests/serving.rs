//! Serving end to end: continuous batching through a real 2-worker pipeline
//! (`potluck up`, real gRPC on loopback, the real model), the OpenAI request
//! surface, cancellation, overload and bad input.
//!
//! One cluster serves every check in turn: they are steps of one test, so
//! they never compete for the machine's two cores.

use std::sync::Arc;

use anyhow::{ensure, Context as _};
use potluck_tests::{http_exchange, metric, SseStream, UpCluster};
use serde_json::{json, Value};

fn post_json(c: &UpCluster, path: &str, body: &Value) -> anyhow::Result<Value> {
    let (status, text) = c.post(path, body)?;
    ensure!(status == 200, "{path} {body}: status {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

fn completion_text(c: &UpCluster, prompt: &str, max_tokens: usize) -> anyhow::Result<String> {
    let v = post_json(c, "/v1/completions", &json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}))?;
    Ok(v["choices"][0]["text"].as_str().context("text")?.to_string())
}

fn metrics(c: &UpCluster) -> anyhow::Result<String> {
    let (status, text) = c.get("/metrics")?;
    ensure!(status == 200, "/metrics: {status}");
    Ok(text)
}

fn total(text: &str, name: &str) -> f64 {
    metric(text, name).iter().map(|(_, v)| v).sum()
}

#[test]
fn serving_through_the_pipeline() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let dir = cache.path().to_str().context("path")?;
    let c = Arc::new(UpCluster::start(&["--workers", "2", "--threads", "2", "--cache-dir", dir, "--queue", "64"])?);
    concurrent_greedy_requests_equal_lone_ones(&c).context("concurrency")?;
    stop_sequences_usage_logprobs_and_choices(&c).context("request surface")?;
    cancelled_streams_free_every_workers_kv(&c).context("cancellation")?;
    bad_input_gets_openai_errors(&c).context("bad input")?;
    overload_gets_429_and_never_5xx(&c).context("overload")?;
    Ok(())
}

/// 32 greedy requests with different prompts and lengths, all at once, each
/// return exactly what they return alone; and they really were batched.
fn concurrent_greedy_requests_equal_lone_ones(c: &Arc<UpCluster>) -> anyhow::Result<()> {
    let subjects = ["France", "the ocean", "a robot", "Rust", "bread", "the moon", "music", "winter"];
    let requests: Vec<(String, usize)> = (0..32)
        .map(|i| {
            let prompt = match i % 4 {
                0 => format!("The most important fact about {} is", subjects[i % 8]),
                1 => format!("Write a short poem about {}:\n", subjects[(i + 3) % 8]),
                2 => format!("Q: What is {}?\nA:", subjects[(i + 5) % 8]),
                _ => format!("Once upon a time, {} and {} met. Then", subjects[i % 8], subjects[(i + 1) % 8]),
            };
            (prompt, 6 + (i * 7) % 37)
        })
        .collect();
    let alone: Vec<String> = requests.iter().map(|(p, n)| completion_text(c, p, *n)).collect::<anyhow::Result<_>>()?;
    let before = metrics(c)?;
    let handles: Vec<_> = requests
        .iter()
        .cloned()
        .map(|(p, n)| {
            let c = Arc::clone(c);
            std::thread::spawn(move || completion_text(&c, &p, n))
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let together = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        assert_eq!(together, alone[i], "request {i} {:?} differs when batched", requests[i]);
    }
    let after = metrics(c)?;
    let batches = total(&after, "potluck_batches_total") - total(&before, "potluck_batches_total");
    let rows = total(&after, "potluck_batch_rows_total") - total(&before, "potluck_batch_rows_total");
    let generated: usize = requests.iter().map(|(_, n)| n).sum();
    // Alone, every decode step is its own micro-batch of one row; batched, steps share micro-batches.
    assert!(batches < generated as f64 * 0.6, "{batches} micro-batches for {generated} tokens: not batched");
    assert!(rows / batches > 1.5, "{rows} rows in {batches} micro-batches");
    Ok(())
}

fn stop_sequences_usage_logprobs_and_choices(c: &UpCluster) -> anyhow::Result<()> {
    let prompt = "The capital of France is";
    // The greedy text and its tokens; a stop sequence is cut from across a token boundary.
    let v =
        post_json(c, "/v1/completions", &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 0}))?;
    let tokens: Vec<String> = v["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .filter_map(|t| t.as_str().map(String::from))
        .collect();
    let full: String = tokens.concat();
    assert_eq!(v["choices"][0]["text"].as_str(), Some(full.as_str()));
    let k = (1..tokens.len() - 1)
        .find(|&k| tokens[k].is_ascii() && tokens[k + 1].is_ascii() && tokens[k].len() >= 2 && tokens[k + 1].len() >= 2)
        .with_context(|| format!("no two ASCII tokens in a row in {tokens:?}"))?;
    let split = format!("{}{}", &tokens[k][tokens[k].len() - 2..], &tokens[k + 1][..2]);
    let cut = |stop: &str| full[..full.find(stop).unwrap_or(full.len())].to_string();
    let whole = tokens[k + 1].clone();
    let cases = [(json!(split), cut(&split)), (json!(["zzz-never", whole.clone()]), cut(&whole))];
    for (stop, want) in cases {
        let body = json!({"prompt": prompt, "max_tokens": 24, "temperature": 0, "stop": stop});
        let v = post_json(c, "/v1/completions", &body)?;
        let text = v["choices"][0]["text"].as_str().context("text")?;
        assert_eq!(text, want, "stop {stop}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let mut body = body.clone();
        body["stream"] = json!(true);
        let mut s = SseStream::open(&c.http, "/v1/completions", &body)?;
        ensure!(s.status == 200, "stream status {}", s.status);
        let events = s.rest()?;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let mut streamed = String::new();
        for e in &events[..events.len() - 1] {
            let v: Value = serde_json::from_str(e)?;
            streamed.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        }
        assert_eq!(streamed, want, "streamed with stop {stop}");
    }
    // usage, finish_reason "length", n, logprobs.
    let v = post_json(
        c,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 4, "temperature": 0, "n": 2, "logprobs": 2}),
    )?;
    assert_eq!(v["usage"], json!({"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}));
    let choices = v["choices"].as_array().context("choices")?;
    assert_eq!(choices.len(), 2);
    assert_eq!(choices[0]["text"], choices[1]["text"], "greedy choices agree");
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(choices[0]["finish_reason"], "length");
    let lp = &choices[0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(4));
    assert_eq!(
        lp["tokens"].as_array().context("tokens")?.iter().filter_map(Value::as_str).collect::<String>(),
        choices[0]["text"].as_str().context("text")?
    );
    assert!(lp["token_logprobs"].as_array().context("lp")?.iter().all(|x| x.as_f64().is_some_and(|x| x <= 0.0)));
    assert!(lp["top_logprobs"].as_array().context("top")?.iter().all(|t| t.as_object().is_some_and(|o| o.len() == 2)));
    // Chat, with max_completion_tokens and logprobs in the chat shape.
    let v = post_json(
        c,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Say hello."}], "max_completion_tokens": 5,
                "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    )?;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let content = v["choices"][0]["logprobs"]["content"].as_array().context("chat logprobs")?;
    assert!(!content.is_empty() && content.len() <= 5);
    assert!(content.iter().all(|t| t["top_logprobs"].as_array().is_some_and(|a| a.len() == 3)));
    // Streaming with include_usage: the last chunk before [DONE] carries usage and no choices; text never
    // splits a character (the streamed text equals the one-shot text and holds no replacement character).
    let body = json!({"prompt": "Le café de la gare est", "max_tokens": 40, "temperature": 0});
    let once = post_json(c, "/v1/completions", &body)?;
    let mut body = body.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = SseStream::open(&c.http, "/v1/completions", &body)?.rest()?;
    ensure!(events.len() >= 3, "too few events: {events:?}");
    let usage: Value = serde_json::from_str(&events[events.len() - 2])?;
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], once["usage"]);
    let mut text = String::new();
    for e in &events[..events.len() - 2] {
        let v: Value = serde_json::from_str(e)?;
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
    }
    assert_eq!(text, once["choices"][0]["text"].as_str().context("text")?);
    assert!(!text.contains('\u{FFFD}'), "a streamed piece split a character: {text:?}");
    // /v1/models names the served model.
    let (status, models) = c.get("/v1/models")?;
    assert_eq!(status, 200);
    assert!(models.contains("SmolLM2-135M-Instruct.Q4_1.gguf"), "{models}");
    Ok(())
}

/// 100 streams dropped after 3 tokens: afterwards every worker holds 0 KV bytes.
fn cancelled_streams_free_every_workers_kv(c: &Arc<UpCluster>) -> anyhow::Result<()> {
    let handles: Vec<_> = (0..100)
        .map(|i| {
            let c = Arc::clone(c);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let body = json!({"prompt": format!("Story number {i}: once upon a time"), "max_tokens": 400,
                    "temperature": 0.8, "seed": i, "stream": true});
                let mut s = SseStream::open(&c.http, "/v1/completions", &body)?;
                ensure!(s.status == 200, "status {}", s.status);
                for _ in 0..3 {
                    let e = s.next_data()?.context("stream ended early")?;
                    ensure!(!e.contains("\"error\""), "{e}");
                }
                Ok(()) // Dropping the stream hangs up mid-generation.
            })
        })
        .collect();
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m = metrics(c)?;
        let kv = metric(&m, "potluck_worker_kv_bytes");
        let active = total(&m, "potluck_active_sessions") + total(&m, "potluck_queue_depth");
        if kv.len() == 2 && kv.iter().all(|(_, v)| *v == 0.0) && active == 0.0 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "KV still held 60 s after every client left: {kv:?}, {active} sessions"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    Ok(())
}

fn bad_input_gets_openai_errors(c: &UpCluster) -> anyhow::Result<()> {
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(10 << 20));
    let cases: [(&str, &[u8], u16); 9] = [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b"{\"prompt\": 5}", 400),
        ("/v1/completions", b"{\"max_tokens\": 4}", 400),
        ("/v1/chat/completions", b"{\"messages\": \"hi\"}", 400),
        ("/v1/completions", b"{\"prompt\": \"x\", \"max_tokens\": -3}", 400),
        ("/v1/completions", b"{\"prompt\": \"caf\xe9\"}", 400),
        ("/v1/completions", big.as_bytes(), 413),
        ("/v1/completions", b"{\"prompt\": \"x\", \"model\": \"gpt-17\"}", 404),
        ("/v1/completions", b"{\"prompt\": \"x\", \"max_tokens\": 100000000}", 400),
    ];
    for (path, body, want) in cases {
        let (status, _, text) = http_exchange(&c.http, "POST", path, body, "")?;
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
        assert_eq!(status, want, "{path} {shown}: {text}");
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{shown}: not JSON: {text}"))?;
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{shown}: not OpenAI-shaped: {text}");
    }
    // And the server keeps serving.
    assert_eq!(completion_text(c, "The capital of France is", 2)?, " Paris.");
    Ok(())
}

/// 500 requests at once against a queue of 64: only 200s and 429s (with
/// Retry-After), no 5xx, no hang; afterwards the server serves normally.
fn overload_gets_429_and_never_5xx(c: &Arc<UpCluster>) -> anyhow::Result<()> {
    let barrier = Arc::new(std::sync::Barrier::new(500));
    let handles: Vec<_> = (0..500)
        .map(|i| {
            let (c, barrier) = (Arc::clone(c), Arc::clone(&barrier));
            std::thread::spawn(move || -> anyhow::Result<(u16, String)> {
                let body = json!({"prompt": format!("Request {i} says"), "max_tokens": 12, "temperature": 0});
                barrier.wait();
                let (status, head, _) =
                    http_exchange(&c.http, "POST", "/v1/completions", body.to_string().as_bytes(), "")?;
                Ok((status, head))
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        let (status, head) = h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??;
        match status {
            200 => ok += 1,
            429 => {
                assert!(head.to_ascii_lowercase().contains("retry-after:"), "429 without Retry-After: {head}");
                refused += 1;
            }
            s => anyhow::bail!("status {s} under overload: {head}"),
        }
    }
    assert!(refused > 0 && ok >= 64, "{ok} served, {refused} refused");
    assert_eq!(completion_text(c, "The capital of France is", 2)?, " Paris.");
    let m = metrics(c)?;
    assert_eq!(metric(&m, "potluck_requests_total").iter().filter(|(l, _)| l.contains("\"5")).count(), 0, "{m}");
    Ok(())
}
