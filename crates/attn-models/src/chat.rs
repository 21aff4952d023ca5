//! Chat templates: the Jinja template a model's metadata carries (or a
//! built-in default) rendered with minijinja.

use attn_nn::{Error, Result};
use serde::Serialize;

/// The Gemma 3 turn format, for GGUF files that carry no template (the
/// base 270M model does not). A system message is prepended to the first
/// user turn, as Gemma's own template does.
pub const GEMMA3_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
  {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = "" -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if message['role'] == 'assistant' -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
  {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") + (message['content'] | trim) + '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"#;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// Checks that the template compiles.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let t = ChatTemplate { source: source.to_string(), bos: bos.into(), eos: eos.into() };
        t.env()?;
        Ok(t)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    fn env(&self) -> Result<minijinja::Environment<'_>> {
        let mut env = minijinja::Environment::new();
        // HF transformers renders chat templates with jinja2's `trim_blocks`
        // and `lstrip_blocks`: a block tag's own line leaves no whitespace.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", &self.source)
            .map_err(|e| Error::config("chat_template", format!("does not compile: {e}")))?;
        Ok(env)
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ends
    /// with the header of the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::input("chat template", "no messages"));
        }
        let env = self.env()?;
        let tmpl = env.get_template("chat").map_err(|e| Error::config("chat_template", e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::input("chat template", format!("rendering failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_tags_leave_no_whitespace_as_in_hf() {
        // Expected output from jinja2 3.1.6 with trim_blocks and lstrip_blocks (HF's settings).
        let src = "{% for m in messages %}\n    {% if m.role == \"user\" %}\n<user>{{ m.content }}</user>\n    {% else %}\n<bot>{{ m.content }}</bot>\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n<bot>\n{% endif %}\n";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let got = t.render(&[Message::new("user", "hi"), Message::new("assistant", "yo")], true).unwrap();
        assert_eq!(got, "<user>hi</user>\n<bot>yo</bot>\n<bot>\n");
    }

    #[test]
    fn gemma_default_template_is_unchanged() {
        let t = ChatTemplate::new(GEMMA3_TEMPLATE, "<bos>", "<eos>").unwrap();
        let got = t.render(&[Message::new("system", "Be brief."), Message::new("user", " Hi ")], true).unwrap();
        assert_eq!(got, "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n");
    }
}
