//! Tokenizer tests: hand-made vocabularies, and SmolLM2 when `POTLUCK_MODEL` is set.
use super::*;
use crate::gguf::{GgufFile, MetaValue};

fn strings(items: &[String]) -> MetaValue {
    MetaValue::Array(items.iter().map(|s| MetaValue::String(s.clone())).collect())
}

fn ints(items: &[i32]) -> MetaValue {
    MetaValue::Array(items.iter().map(|&i| MetaValue::I32(i)).collect())
}

/// GPT-2's reversible byte to printable-character mapping.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

fn byte_level(s: &str) -> String {
    s.bytes().map(byte_char).collect()
}

/// A tiny gpt2-style vocabulary: three control tokens, all 256 bytes, a
/// few merges.
fn tiny_gpt2(pre: &str) -> Metadata {
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    let mut types = vec![3, 3, 3];
    for b in 0..=255u8 {
        tokens.push(byte_char(b).to_string());
        types.push(1);
    }
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor ld", "l d", "1 2"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    let mut meta = Metadata::default();
    let mut set = |k: &str, v: MetaValue| {
        meta.0.insert(k.to_string(), v);
    };
    set("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    set("tokenizer.ggml.pre", MetaValue::String(pre.into()));
    set("tokenizer.ggml.tokens", strings(&tokens));
    set("tokenizer.ggml.token_type", ints(&types));
    set("tokenizer.ggml.merges", strings(&merges.map(String::from)));
    set("tokenizer.ggml.bos_token_id", MetaValue::U32(1));
    set("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    set(
        "tokenizer.chat_template",
        MetaValue::String(
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}".into(),
        ),
    );
    meta
}

fn tiny_spm() -> Metadata {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    // Pieces with SentencePiece-like scores (higher merges first).
    let pieces = [
        ("▁", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("w", -2.0),
        ("r", -2.0),
        ("d", -2.0),
        ("ll", -3.0),
        ("he", -4.0),
        ("hell", -5.0),
        ("hello", -6.0),
        ("▁hello", -7.0),
        ("or", -8.0),
        ("▁w", -9.0),
        ("▁wor", -10.0),
        ("ld", -11.0),
        ("▁world", -12.0),
    ];
    for (p, s) in pieces {
        tokens.push(p.to_string());
        types.push(1);
        scores.push(s);
    }
    let mut meta = Metadata::default();
    let mut set = |k: &str, v: MetaValue| {
        meta.0.insert(k.to_string(), v);
    };
    set("tokenizer.ggml.model", MetaValue::String("llama".into()));
    set("tokenizer.ggml.tokens", strings(&tokens));
    set("tokenizer.ggml.token_type", ints(&types));
    set("tokenizer.ggml.scores", MetaValue::Array(scores.into_iter().map(MetaValue::F32).collect()));
    set("tokenizer.ggml.bos_token_id", MetaValue::U32(1));
    set("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    set("tokenizer.ggml.unknown_token_id", MetaValue::U32(0));
    meta
}

#[test]
fn tiny_gpt2_encodes_and_decodes() {
    let tok = Tokenizer::from_gguf(&tiny_gpt2("gpt2")).unwrap();
    let id = |s: &str| tok.token_id(&byte_level(s)).unwrap();
    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![id("hello"), id(" world")]);
    assert_eq!(tok.decode(&ids).unwrap(), "hello world");
    // add_bos_token absent: gpt2 vocabularies get no BOS.
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.encode("hello", true).unwrap(), vec![id("hello")]);
    // Special tokens are matched whole in raw text.
    let ids = tok.encode("<|im_start|>hello<|im_end|>", false).unwrap();
    assert_eq!(ids, vec![1, id("hello"), 2]);
    assert_eq!(tok.decode(&ids).unwrap(), "<|im_start|>hello<|im_end|>");
    // Stops: EOS plus the turn terminators by text, deduplicated.
    assert_eq!(tok.stop_ids(), &[2, 0]);
    assert!(tok.is_stop(0) && tok.is_stop(2) && !tok.is_stop(1));
    assert_eq!(tok.vocab_size(), 3 + 256 + 10);
    // Non-ASCII text round-trips through byte tokens.
    let text = "héllo 🦀 日本";
    assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text);
    assert!(tok.chat_template().is_some());
}

#[test]
fn gpt2_add_bos_token_is_honoured() {
    let mut meta = tiny_gpt2("gpt2");
    meta.0.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(true));
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    let hello = tok.token_id("hello").unwrap();
    assert_eq!(tok.encode("hello", true).unwrap(), vec![1, hello]);
    assert_eq!(tok.encode("hello", false).unwrap(), vec![hello]);
    // No doubled BOS when the text already carries it.
    assert_eq!(tok.encode("<|im_start|>hello", true).unwrap(), vec![1, hello]);
}

#[test]
fn pre_tokenizer_variants() {
    let digits = |pre: &str| {
        let tok = Tokenizer::from_gguf(&tiny_gpt2(pre)).unwrap();
        tok.encode("12", false).unwrap().len()
    };
    // "1 2" is a merge: only digit-splitting pre-tokenizers keep the digits apart.
    assert_eq!(digits("gpt2"), 1);
    assert_eq!(digits("unknown-thing"), 1);
    assert_eq!(digits("smollm"), 2);
    assert_eq!(digits("qwen2"), 2);
    assert_eq!(digits("llama-bpe"), 1);
    for pre in ["llama-bpe", "qwen2", "smollm", "default"] {
        let tok = Tokenizer::from_gguf(&tiny_gpt2(pre)).unwrap();
        let text = "hello world\n\n  12 it's";
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap()).unwrap(), text, "{pre}");
    }
}

#[test]
fn tiny_spm_encodes_and_decodes() {
    let tok = Tokenizer::from_gguf(&tiny_spm()).unwrap();
    let id = |s: &str| tok.token_id(s).unwrap();
    let ids = tok.encode("hello world", true).unwrap();
    assert_eq!(ids, vec![1, id("▁hello"), id("▁world")]);
    assert_eq!(tok.decode(&ids[1..]).unwrap(), "hello world");
    assert_eq!(tok.decode(&ids).unwrap(), "<s> hello world");
    // Unknown characters fall back to byte tokens and decode back.
    let ids = tok.encode("hé", false).unwrap();
    assert_eq!(ids, vec![id("▁"), id("h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids).unwrap(), "hé");
    assert_eq!(tok.stop_ids(), &[2]);
    assert!(tok.chat_template().is_none());
}

#[test]
fn spm_without_space_prefix() {
    let mut meta = tiny_spm();
    meta.0.insert("tokenizer.ggml.add_space_prefix".into(), MetaValue::Bool(false));
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    let ids = tok.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![tok.token_id("hello").unwrap(), tok.token_id("▁world").unwrap()]);
    assert_eq!(tok.decode(&ids).unwrap(), "hello world");
}

#[test]
fn bad_metadata_is_an_error() {
    let mut meta = tiny_gpt2("gpt2");
    meta.0.insert("tokenizer.ggml.model".into(), MetaValue::String("bert".into()));
    let err = Tokenizer::from_gguf(&meta).unwrap_err();
    assert!(matches!(&err, EngineError::Tokenizer(m) if m.contains("bert")), "{err}");

    let mut meta = tiny_gpt2("gpt2");
    meta.0.remove("tokenizer.ggml.merges");
    assert!(matches!(Tokenizer::from_gguf(&meta), Err(EngineError::MissingMetadata { .. })));

    let mut meta = tiny_gpt2("gpt2");
    meta.0.remove("tokenizer.ggml.tokens");
    assert!(matches!(Tokenizer::from_gguf(&meta), Err(EngineError::MissingMetadata { .. })));

    let mut meta = tiny_gpt2("gpt2");
    meta.0.insert("tokenizer.ggml.token_type".into(), ints(&[1, 1]));
    assert!(matches!(Tokenizer::from_gguf(&meta), Err(EngineError::Tokenizer(_))));

    let mut meta = tiny_gpt2("gpt2");
    meta.0.insert("tokenizer.ggml.eos_token_id".into(), MetaValue::U32(1_000_000));
    assert!(matches!(Tokenizer::from_gguf(&meta), Err(EngineError::Tokenizer(_))));

    let mut meta = tiny_spm();
    meta.0.remove("tokenizer.ggml.scores");
    assert!(matches!(Tokenizer::from_gguf(&meta), Err(EngineError::MissingMetadata { .. })));

    assert!(matches!(Tokenizer::from_gguf(&Metadata::default()), Err(EngineError::MissingMetadata { .. })));

    let tok = Tokenizer::from_gguf(&tiny_gpt2("gpt2")).unwrap();
    assert!(matches!(tok.decode(&[5, 100_000]), Err(EngineError::Tokenizer(_))));
}

#[test]
fn stream_decoder_holds_back_partial_characters() {
    let tok = Tokenizer::from_gguf(&tiny_gpt2("gpt2")).unwrap();
    // The tiny vocabulary spells multi-byte characters one byte per token.
    let text = "hello 🦀 wörld 日本";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > text.chars().count());
    let mut dec = tok.stream_decoder();
    let mut out = String::new();
    for &id in &ids {
        let piece = dec.push(id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "partial character in {piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, text);

    // An incomplete character at the end is flushed by finish().
    let crab = tok.encode("🦀", false).unwrap();
    let mut dec = StreamDecoder::new(&tok);
    for &id in &crab[..2] {
        assert_eq!(dec.push(id).unwrap(), "");
    }
    assert!(dec.finish().unwrap().contains('\u{FFFD}'));
    assert!(dec.push(100_000).is_err());
}

#[test]
fn stream_decoder_keeps_spm_spaces() {
    let tok = Tokenizer::from_gguf(&tiny_spm()).unwrap();
    let ids = tok.encode("hello world hé", false).unwrap();
    let mut dec = tok.stream_decoder();
    let mut out = String::new();
    for &id in &ids {
        out.push_str(&dec.push(id).unwrap());
    }
    out.push_str(&dec.finish().unwrap());
    assert_eq!(out, "hello world hé");

    // With prompt context the first generated word keeps its space.
    let world = tok.token_id("▁world").unwrap();
    let hello = tok.token_id("▁hello").unwrap();
    let mut dec = StreamDecoder::with_context(&tok, &[hello]);
    assert_eq!(dec.push(world).unwrap(), " world");
}

#[test]
fn from_files_reads_config() {
    let dir = tempfile::tempdir().unwrap();
    // A tokenizer.json built by the GGUF path, saved as Hugging Face would.
    let tok = Tokenizer::from_gguf(&tiny_gpt2("smollm")).unwrap();
    let json = dir.path().join("tokenizer.json");
    tok.inner.save(&json, false).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config,
        r#"{"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": true,
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"}"#,
    )
    .unwrap();
    let loaded = Tokenizer::from_files(&json, Some(&config)).unwrap();
    assert_eq!(loaded.bos_id(), Some(1));
    assert_eq!(loaded.stop_ids(), &[2, 0]);
    assert_eq!(loaded.vocab_size(), tok.vocab_size());
    let hello = loaded.token_id("hello").unwrap();
    assert_eq!(loaded.encode("hello", true).unwrap(), vec![1, hello]);
    let msgs = [crate::chat::ChatMessage { role: "user".into(), content: "hi".into() }];
    let rendered = loaded.chat_template().unwrap().render(&msgs, false).unwrap();
    assert_eq!(rendered, "<|im_start|>hi<|im_end|>");

    let only_json = Tokenizer::from_files(&json, None).unwrap();
    assert_eq!(only_json.bos_id(), None);
    assert!(only_json.chat_template().is_none());
    assert!(Tokenizer::from_files(&dir.path().join("missing.json"), None).is_err());
}

fn real_model() -> Option<Tokenizer> {
    let Ok(path) = std::env::var("POTLUCK_MODEL") else {
        eprintln!("POTLUCK_MODEL not set; skipping real-model tokenizer test");
        return None;
    };
    let file = GgufFile::open(Path::new(&path)).unwrap();
    Some(Tokenizer::from_gguf(&file.metadata).unwrap())
}

#[test]
fn real_model_tokenizer() {
    let Some(tok) = real_model() else { return };
    assert_eq!(tok.encode("The capital of France is", true).unwrap(), vec![504, 3575, 282, 4649, 314]);
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(tok.encode("<|im_start|>user", false).unwrap()[0], im_start);
    assert_eq!(tok.encode("2024", false).unwrap().len(), 4);
    for text in ["Hello, world! 123 café 🦀 日本語\n\n  indented", "<|im_start|>user\nhi<|im_end|>\n"] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
        let mut dec = tok.stream_decoder();
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        out.push_str(&dec.finish().unwrap());
        assert_eq!(out, text);
    }
    assert!(tok.is_stop(2) && tok.is_stop(0));
    assert_eq!(tok.vocab_size(), 49152);
    let msgs = [crate::chat::ChatMessage { role: "user".into(), content: "Hi".into() }];
    let prompt = tok.chat_template().unwrap().render(&msgs, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(tok.encode(&prompt, true).unwrap()[0], im_start);
}
