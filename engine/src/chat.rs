//! Chat messages to a prompt string, the way the model was trained to see them.
//!
//! Models ship a Jinja chat template (in GGUF metadata or
//! `tokenizer_config.json`). Rendering it with the same conventions as
//! Hugging Face's `apply_chat_template` (blocks trimmed, Python string methods
//! available, `raise_exception` turning into an error) is what makes a chat
//! request produce the exact prompt format the model expects.

use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::error::{EngineError, Result};

/// The name the owned template is stored under in its environment.
const TEMPLATE_NAME: &str = "chat";

/// One turn of a conversation, as the OpenAI-style API and chat templates
/// both describe it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    /// Who speaks: `system`, `user`, `assistant`, ...
    pub role: String,
    /// What they say.
    pub content: String,
}

/// A parsed chat template, ready to render any number of conversations.
///
/// It owns its source and environment so one instance can be shared across
/// request handlers (it is `Send + Sync`) and parsing happens once per model.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn template_err(e: &Error) -> EngineError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    EngineError::ChatTemplate(msg)
}

/// The template-callable `raise_exception(msg)`: templates use it to reject
/// conversations they cannot format (e.g. roles not alternating).
fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Parses `source` with the BOS/EOS token texts the template may refer to
    /// as `bos_token` and `eos_token`. A syntax error is
    /// [`EngineError::ChatTemplate`].
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // Hugging Face renders chat templates with trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string()).map_err(|e| template_err(&e))?;
        Ok(Self { env, bos_token: bos_token.to_string(), eos_token: eos_token.to_string() })
    }

    /// Renders `messages` into the prompt text; with `add_generation_prompt`
    /// the prompt ends with the header that opens the assistant's reply.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(|e| template_err(&e))?;
        template
            .render(context! {
                messages => Value::from_serialize(messages),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| template_err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_default_system() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&[msg("system", "Be brief."), msg("user", "Hi")], false).unwrap();
        assert_eq!(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn python_methods_and_tokens() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('x') %}[{{ m.content.strip().upper() }}]{% endif %}\n{% endfor %}{{ eos_token }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[msg("user", "x y  "), msg("user", "z")], false).unwrap(), "<s>[X Y]</s>");
    }

    #[test]
    fn trims_blocks_like_hugging_face() {
        let src =
            "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "a"), msg("user", "b")], false).unwrap(), "U:a\nU:b\n");
    }

    #[test]
    fn raise_exception_is_an_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[msg("user", "a")], false).unwrap(), "ok");
        let err = t.render(&[msg("assistant", "a")], false).unwrap_err();
        assert!(
            matches!(&err, EngineError::ChatTemplate(m) if m.contains("Conversation must start with user")),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
        assert!(matches!(err, EngineError::ChatTemplate(_)));
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn real_model_template() {
        let Ok(path) = std::env::var("POTLUCK_MODEL") else {
            eprintln!("POTLUCK_MODEL not set; skipping real-model chat template test");
            return;
        };
        let file = crate::gguf::GgufFile::open(std::path::Path::new(&path)).unwrap();
        let Some(source) = file.metadata.str("tokenizer.chat_template") else {
            eprintln!("model has no chat template; skipping");
            return;
        };
        let t = ChatTemplate::new(source, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[msg("user", "What is 2+2?")], true).unwrap();
        assert!(out.starts_with("<|im_start|>system\n"), "{out}");
        assert!(out.contains("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"), "{out}");
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
    }
}
