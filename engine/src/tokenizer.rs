//! Text to token ids and back.
//!
//! The engine speaks token ids; users speak text. This module builds a
//! [`tokenizers`] tokenizer either from the vocabulary embedded in a GGUF file
//! (gpt2-style byte-level BPE or llama/SentencePiece-style BPE with byte
//! fallback) or from a Hugging Face `tokenizer.json`, and adds what the
//! serving loop needs on top: whether to prepend BOS, which ids end a turn,
//! the model's chat template, and an incremental decoder that never emits half
//! a UTF-8 character.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::chat::ChatTemplate;
use crate::error::{EngineError, Result};
use crate::gguf::Metadata;

/// Token texts that end a turn in the common chat formats; any of them found
/// in the vocabulary is a stop id even if the metadata names only one EOS.
const STOP_TEXTS: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>", "<end_of_turn>", "</s>"];

/// The split regex of Llama 3 style byte-level BPE (numbers in runs of up to three digits).
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of Qwen2 style byte-level BPE (every digit on its own).
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The word-boundary marker SentencePiece uses in place of a space.
const SPM_SPACE: &str = "\u{2581}";

// GGUF `tokenizer.ggml.token_type` values.
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// A model's tokenizer plus the serving facts that go with it.
///
/// It exists so the rest of the engine never has to know whether the
/// vocabulary came from a GGUF file or a `tokenizer.json`, which ids stop
/// generation, or whether the model wants a BOS token.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos: bool,
    stop_ids: Vec<u32>,
    vocab_size: usize,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("add_bos", &self.add_bos)
            .field("stop_ids", &self.stop_ids)
            .field("chat_template", &self.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

fn missing(key: &str, expected: &'static str) -> EngineError {
    EngineError::MissingMetadata { key: key.to_string(), expected }
}

/// An optional token id from metadata: absent is `None`, present but not a
/// valid id for this vocabulary is an error.
fn optional_id(meta: &Metadata, key: &str, n_vocab: usize) -> Result<Option<u32>> {
    if meta.get(key).is_none() {
        return Ok(None);
    }
    let id = meta.usize(key).ok_or_else(|| missing(key, "a token id"))?;
    if id >= n_vocab {
        return Err(EngineError::Tokenizer(format!("`{key}` is {id} but the vocabulary has {n_vocab} tokens")));
    }
    u32::try_from(id).map(Some).map_err(tok_err)
}

/// Builds the token-string to id map, keeping the first id of any duplicate
/// string (later duplicates are unreachable by encoding anyway).
fn vocab_map(tokens: &[&str]) -> Result<Vocab> {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        let id = u32::try_from(i).map_err(tok_err)?;
        vocab.entry((*t).to_string()).or_insert(id);
    }
    Ok(vocab)
}

/// The pre-tokenizer (and normalizer, if any) a gpt2-style vocabulary uses,
/// chosen by `tokenizer.ggml.pre`. Returns whether BPE should ignore merges
/// for whole-word vocabulary hits (Llama 3 does).
fn gpt2_pipeline(pre: &str) -> Result<(PreTokenizerWrapper, Option<NormalizerWrapper>, bool)> {
    let split = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(regex.to_string()), SplitDelimiterBehavior::Isolated, false)
            .map_err(tok_err)?;
        Ok(PreSequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into())
    };
    Ok(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => (
            PreSequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, false, true).into()]).into(),
            None,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => (split(LLAMA3_REGEX)?, None, true),
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" | "megrez" => (split(QWEN2_REGEX)?, Some(NFC.into()), false),
        other => {
            if !matches!(other, "" | "default" | "gpt2" | "gpt-2") {
                tracing::warn!(pre = other, "unknown tokenizer.ggml.pre; using the GPT-2 split regex");
            }
            (ByteLevel::new(false, false, true).into(), None, false)
        }
    })
}

/// A gpt2-style byte-level BPE from the GGUF vocabulary and merges.
fn build_gpt2(meta: &Metadata, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
    let key = "tokenizer.ggml.merges";
    let raw_merges = meta.str_array(key).ok_or_else(|| missing(key, "an array of strings"))?;
    let vocab = vocab_map(tokens)?;
    let mut merges = Vec::with_capacity(raw_merges.len());
    let mut seen = HashSet::with_capacity(raw_merges.len());
    let mut skipped = 0usize;
    for m in raw_merges {
        let Some((a, b)) = m.split_once(' ') else {
            return Err(EngineError::Tokenizer(format!("merge `{m}` is not two space-separated tokens")));
        };
        let usable = vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"));
        if !usable || !seen.insert((a, b)) {
            skipped += 1;
            continue;
        }
        merges.push((a.to_string(), b.to_string()));
    }
    if skipped > 0 {
        tracing::warn!(skipped, "ignored GGUF merges that are duplicated or name tokens not in the vocabulary");
    }
    let pre = meta.str("tokenizer.ggml.pre").unwrap_or("default");
    let (pre_tokenizer, normalizer, ignore_merges) = gpt2_pipeline(pre)?;
    let model = BPE::builder().vocab_and_merges(vocab, merges).ignore_merges(ignore_merges).build().map_err(tok_err)?;
    let mut tk = tokenizers::Tokenizer::new(model);
    if let Some(n) = normalizer {
        tk.with_normalizer(Some(n));
    }
    tk.with_pre_tokenizer(Some(pre_tokenizer));
    tk.with_decoder(Some(ByteLevel::new(false, false, true)));
    Ok(tk)
}

/// A llama/SentencePiece-style BPE: merges derived from the scored vocabulary,
/// unknown characters spelled as `<0xNN>` byte tokens.
fn build_spm(meta: &Metadata, tokens: &[&str], types: &[i64]) -> Result<tokenizers::Tokenizer> {
    let key = "tokenizer.ggml.scores";
    let scores = meta.f32_array(key).ok_or_else(|| missing(key, "an array of floats"))?;
    if scores.len() != tokens.len() {
        return Err(EngineError::Tokenizer(format!("{} scores for {} tokens", scores.len(), tokens.len())));
    }
    let vocab = vocab_map(tokens)?;
    let is_normal = |id: u32| types.get(id as usize).is_some_and(|&t| t == TYPE_NORMAL);

    // Every way to split a normal token into two normal, in-vocabulary pieces
    // is a merge; SentencePiece merges the highest-scoring result first.
    let mut candidates: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (i, tok) in tokens.iter().enumerate() {
        let id = u32::try_from(i).map_err(tok_err)?;
        if !is_normal(id) || vocab.get(*tok) != Some(&id) {
            continue;
        }
        for (pos, _) in tok.char_indices().skip(1) {
            let (a, b) = tok.split_at(pos);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                if is_normal(ia) && is_normal(ib) {
                    candidates.push((scores[i], id, ia, ib));
                }
            }
        }
    }
    candidates.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges = candidates
        .into_iter()
        .map(|(_, _, a, b)| (tokens[a as usize].to_string(), tokens[b as usize].to_string()))
        .collect();

    let n_vocab = tokens.len();
    let unk = match optional_id(meta, "tokenizer.ggml.unknown_token_id", n_vocab)? {
        Some(id) => Some(id as usize),
        None => types.iter().position(|&t| t == TYPE_UNKNOWN),
    };
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(tokens[unk].to_string());
    }
    let model = builder.build().map_err(tok_err)?;

    let add_space_prefix = meta.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new(SPM_SPACE.to_string()).into());
    }
    normalizers.push(Replace::new(" ", SPM_SPACE).map_err(tok_err)?.into());
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new(SPM_SPACE, " ").map_err(tok_err)?.into(), ByteFallback::new().into(), Fuse::new().into()];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tk = tokenizers::Tokenizer::new(model);
    tk.with_normalizer(Some(NormSequence::new(normalizers)));
    tk.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tk)
}

/// Reads a `tokenizer_config.json` token field, which is either a string or
/// an object with a `content` string.
fn config_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The chat template from a `tokenizer_config.json`: a string, or a list of
/// named templates of which the `default` one (else the first) is used.
fn config_chat_template(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(items) => {
            let named = |item: &serde_json::Value| -> Option<(String, String)> {
                Some((item.get("name")?.as_str()?.to_string(), item.get("template")?.as_str()?.to_string()))
            };
            let all: Vec<(String, String)> = items.iter().filter_map(named).collect();
            all.iter().find(|(name, _)| name == "default").or_else(|| all.first()).map(|(_, t)| t.clone())
        }
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
}

/// Parses a chat template, logging (not failing) when the model ships one the
/// template engine cannot parse: the model stays usable for raw completion.
fn parse_template(source: Option<String>, bos: &str, eos: &str) -> Option<ChatTemplate> {
    let source = source?;
    match ChatTemplate::new(&source, bos, eos) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the model's chat template");
            None
        }
    }
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata, so
    /// a GGUF model needs no side files.
    pub fn from_gguf(meta: &Metadata) -> Result<Self> {
        let key = "tokenizer.ggml.model";
        let model = meta.str(key).ok_or_else(|| missing(key, "a string"))?;
        let key = "tokenizer.ggml.tokens";
        let tokens = meta.str_array(key).ok_or_else(|| missing(key, "an array of strings"))?;
        if tokens.is_empty() {
            return Err(EngineError::Tokenizer("the vocabulary is empty".into()));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(EngineError::Tokenizer(format!("vocabulary of {} tokens is too large", tokens.len())));
        }
        let n_vocab = tokens.len();
        let key = "tokenizer.ggml.token_type";
        let types = match meta.get(key) {
            None => vec![TYPE_NORMAL; n_vocab],
            Some(_) => meta.i64_array(key).ok_or_else(|| missing(key, "an array of integers"))?,
        };
        if types.len() != n_vocab {
            return Err(EngineError::Tokenizer(format!("{} token types for {n_vocab} tokens", types.len())));
        }

        let (mut inner, default_add_bos) = match model {
            "gpt2" => (build_gpt2(meta, &tokens)?, false),
            "llama" => (build_spm(meta, &tokens, &types)?, true),
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };

        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(text, &t)| !text.is_empty() && matches!(t, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED))
            .map(|(text, _)| AddedToken::from((*text).to_string(), true))
            .collect();
        inner.add_special_tokens(&special);

        let bos = optional_id(meta, "tokenizer.ggml.bos_token_id", n_vocab)?;
        let eos = optional_id(meta, "tokenizer.ggml.eos_token_id", n_vocab)?;
        let mut stops = Vec::new();
        stops.extend(eos);
        stops.extend(optional_id(meta, "tokenizer.ggml.eot_token_id", n_vocab)?);
        stops.extend(optional_id(meta, "tokenizer.ggml.eom_token_id", n_vocab)?);
        for (i, text) in tokens.iter().enumerate() {
            if STOP_TEXTS.contains(text) {
                stops.push(u32::try_from(i).map_err(tok_err)?);
            }
        }

        let text_of = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).copied().unwrap_or("");
        let chat_template =
            parse_template(meta.str("tokenizer.chat_template").map(str::to_string), text_of(bos), text_of(eos));
        Ok(Self {
            inner,
            bos,
            add_bos: meta.bool("tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos),
            stop_ids: dedup(stops),
            vocab_size: n_vocab,
            chat_template,
        })
    }

    /// Loads a Hugging Face `tokenizer.json` (for safetensors models), with the
    /// optional `tokenizer_config.json` supplying BOS/EOS, `add_bos_token` and
    /// the chat template. A `chat_template.jinja` or `generation_config.json`
    /// next to the config is used too when present.
    pub fn from_files(tokenizer_json: &Path, tokenizer_config_json: Option<&Path>) -> Result<Self> {
        if !tokenizer_json.exists() {
            return Err(EngineError::Io {
                path: tokenizer_json.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let config = match tokenizer_config_json {
            Some(p) => read_json(p)?,
            None => serde_json::Value::Null,
        };
        let vocab_size =
            inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1).max(inner.get_vocab_size(false));

        let bos_text = config_token(&config, "bos_token");
        let eos_text = config_token(&config, "eos_token");
        let lookup = |text: &Option<String>| -> Result<Option<u32>> {
            match text {
                None => Ok(None),
                Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                    EngineError::Tokenizer(format!("token `{t}` from the config is not in the vocabulary"))
                }),
            }
        };
        let bos = lookup(&bos_text)?;
        let eos = lookup(&eos_text)?;

        // Without an explicit flag, the model wants BOS if its own
        // post-processor would have added it.
        let add_bos = match config.get("add_bos_token").and_then(serde_json::Value::as_bool) {
            Some(b) => b,
            None => match bos {
                Some(b) => inner.encode("", true).map_err(tok_err)?.get_ids().first() == Some(&b),
                None => false,
            },
        };

        let mut stops: Vec<u32> = eos.into_iter().collect();
        let sibling = |name: &str| tokenizer_config_json.and_then(Path::parent).map(|d| d.join(name));
        if let Some(gen) = sibling("generation_config.json").filter(|p| p.exists()) {
            let gen = read_json(&gen)?;
            match gen.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => stops.extend(ids.iter().filter_map(json_id)),
                Some(v) => stops.extend(json_id(v)),
                None => {}
            }
        }
        stops.extend(STOP_TEXTS.iter().filter_map(|t| inner.token_to_id(t)));
        stops.retain(|&id| (id as usize) < vocab_size);

        let mut template_source = config_chat_template(&config);
        if template_source.is_none() {
            if let Some(p) = sibling("chat_template.jinja").filter(|p| p.exists()) {
                template_source =
                    Some(std::fs::read_to_string(&p).map_err(|source| EngineError::Io { path: p, source })?);
            }
        }
        let chat_template =
            parse_template(template_source, bos_text.as_deref().unwrap_or(""), eos_text.as_deref().unwrap_or(""));
        Ok(Self { inner, bos, add_bos, stop_ids: dedup(stops), vocab_size, chat_template })
    }

    /// Turns text into token ids. Special-token texts in `text` (such as
    /// `<|im_start|>`) become their single ids, so rendered chat prompts work.
    /// BOS is prepended only if `add_bos` is set, the model wants BOS, and the
    /// text does not already start with it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let ids = enc.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 1);
        if let Some(bos) = self.bos.filter(|_| add_bos && self.add_bos) {
            if ids.first() != Some(&bos) {
                out.push(bos);
            }
        }
        out.extend_from_slice(ids);
        Ok(out)
    }

    /// Turns token ids back into text, special tokens included, so callers
    /// see exactly what the model produced. Ids outside the vocabulary are an
    /// error rather than silently dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is out of range for a vocabulary of {}",
                self.vocab_size
            )));
        }
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Whether generating `id` ends the turn.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    /// Every id that ends a turn (EOS, end-of-turn and the usual turn
    /// terminators found in the vocabulary), without duplicates.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The number of token ids (one past the largest valid id), which the
    /// output layer's width must match.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The model's chat template, if it ships one the engine could parse.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The id of a token given its exact vocabulary text (e.g. `<|im_end|>`),
    /// for callers that need a specific marker.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// Starts an incremental decoder for streaming generated tokens.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

fn json_id(v: &serde_json::Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

fn dedup(ids: Vec<u32>) -> Vec<u32> {
    let mut seen = BTreeSet::new();
    ids.into_iter().filter(|id| seen.insert(*id)).collect()
}

/// Turns a stream of generated ids into text pieces as they complete.
///
/// Decoding one token at a time is wrong for byte-level and byte-fallback
/// vocabularies (a character may span tokens) and for SentencePiece (spaces
/// depend on the previous token). This decoder re-decodes a short window of
/// recent ids and returns only the new text, holding back output while it
/// ends in an incomplete character (decoded as U+FFFD).
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the window re-decoded as context.
    prefix: usize,
    /// End of the ids whose text has been returned.
    read: usize,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder with no context: the first token is decoded as the start of a text.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// A decoder that treats `context` (e.g. the last few prompt ids) as
    /// already shown, so the first generated token gets the spacing it would
    /// have mid-text. The context itself is never returned.
    pub fn with_context(tokenizer: &'a Tokenizer, context: &[u32]) -> Self {
        Self { tokenizer, ids: context.to_vec(), prefix: 0, read: context.len() }
    }

    /// Adds one generated id and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = match self.tokenizer.decode(&self.ids[self.prefix..]) {
            Ok(t) => t,
            Err(e) => {
                self.ids.pop();
                return Err(e);
            }
        };
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = new_suffix(&before, &after);
        self.ids.drain(..self.read);
        self.prefix = 0;
        self.read = self.ids.len();
        Ok(new)
    }

    /// Returns whatever text is still held back (an incomplete character
    /// becomes U+FFFD) and resets the decoder.
    pub fn finish(&mut self) -> Result<String> {
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        let new = new_suffix(&before, &after);
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(new)
    }
}

/// The part of `after` that follows what `before` already showed.
fn new_suffix(before: &str, after: &str) -> String {
    if let Some(rest) = after.strip_prefix(before) {
        return rest.to_string();
    }
    // A decoder rewrote earlier text: return everything past the common prefix.
    let common = before
        .char_indices()
        .zip(after.chars())
        .find(|((_, a), b)| a != b)
        .map_or(before.len().min(after.len()), |((i, _), _)| i);
    after.get(common..).unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests;
