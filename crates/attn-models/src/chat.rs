//! Chat templates: the Jinja template a model's metadata carries (or a
//! built-in default) rendered with minijinja.

use attn_nn::{Error, Result};
use serde::Serialize;
use std::ops::Range;

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

/// One chat message as the template sees it (OpenAI's fields, HF's shapes:
/// a tool call's `arguments` is a JSON value, not a string).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The tool's name, on `tool` messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into(), tool_calls: Vec::new(), name: None, tool_call_id: None }
    }
}

/// A function call the assistant made, as chat templates read it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON value (an object for every template seen).
    pub arguments: serde_json::Value,
}

/// A rendered prompt and where the messages' own text lies in it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatPrompt {
    pub text: String,
    /// Byte ranges of `text` that came from message content: tokenize them
    /// as plain text, so that a message cannot write control tokens.
    pub plain: Vec<Range<usize>>,
}

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
    /// The tokenizer's control-token strings (`<|im_end|>`, ...).
    controls: Vec<String>,
}

// Private-use code points that stand for a message's content in the
// rendering that finds where each content lands.
const SLOT_OPEN: char = '\u{10FFF0}';
const SLOT_CLOSE: char = '\u{10FFF1}';

impl ChatTemplate {
    /// Checks that the template compiles.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let t = ChatTemplate { source: source.to_string(), bos: bos.into(), eos: eos.into(), controls: Vec::new() };
        t.env()?;
        Ok(t)
    }

    /// The tokenizer's control-token strings: `tojson` escapes them inside
    /// JSON strings, and `prompt` refuses message text it cannot keep
    /// apart from them.
    pub fn with_control_tokens(mut self, controls: Vec<String>) -> Self {
        self.controls = controls.into_iter().filter(|c| !c.is_empty()).collect();
        self
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders a `tools` list (Qwen2.5's does; Gemma
    /// 3's and SmolLM2's do not).
    pub fn supports_tools(&self) -> bool {
        self.source.contains("tools")
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
        // HF's `tojson`: Python's json.dumps with ensure_ascii=False and
        // the default separators, keys in the order given.
        let controls = self.controls.clone();
        env.add_filter(
            "tojson",
            move |v: minijinja::Value,
                  indent: Option<minijinja::Value>|
                  -> std::result::Result<String, minijinja::Error> {
                let json = serde_json::to_value(&v)
                    .map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, e.to_string()))?;
                let indent = indent.and_then(|i| i.as_usize());
                let mut out = String::new();
                py_json(&json, indent, 0, &controls, &mut out);
                Ok(out)
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| Error::config("chat_template", format!("does not compile: {e}")))?;
        Ok(env)
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ends
    /// with the header of the assistant's turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_tools(messages, None, add_generation_prompt)
    }

    /// As `render`, with the request's `tools` (OpenAI's function
    /// definitions) given to the template.
    pub fn render_tools(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(Error::input("chat template", "no messages"));
        }
        let env = self.env()?;
        let tmpl = env.get_template("chat").map_err(|e| Error::config("chat_template", e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::input("chat template", format!("rendering failed: {e}")))
    }

    /// The rendered prompt with the byte ranges of every message's content,
    /// so that a tokenizer reads control tokens only where the template
    /// itself wrote them. The template is rendered a second time with each
    /// content replaced by a marker; the text between markers is the
    /// template's own, and each content (as given or trimmed, as templates
    /// do) must sit between them in the real rendering. Where a template
    /// uses content in other ways, the prompt is still accepted when no
    /// message text contains a control-token string, and refused otherwise.
    pub fn prompt(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<ChatPrompt> {
        let text = self.render_tools(messages, tools, add_generation_prompt)?;
        let marked: Vec<Message> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut m = m.clone();
                if !m.content.is_empty() {
                    m.content = format!("{SLOT_OPEN}{i}{SLOT_CLOSE}");
                }
                m
            })
            .collect();
        let skeleton = self.render_tools(&marked, tools, add_generation_prompt)?;
        if let Some(plain) = locate_contents(&text, &skeleton, messages) {
            return Ok(ChatPrompt { text, plain });
        }
        let injected = messages.iter().find_map(|m| self.controls.iter().find(|c| m.content.contains(c.as_str())));
        match injected {
            None => Ok(ChatPrompt { text, plain: Vec::new() }),
            Some(c) => Err(Error::input(
                "chat template",
                format!(
                    "a message contains the control token `{c}`, and this template uses message text in a way \
                     that cannot keep it literal"
                ),
            )),
        }
    }
}

enum Part<'a> {
    Text(&'a str),
    Slot(usize),
}

/// Cuts the marked rendering into the template's text and content slots.
fn skeleton_parts(skeleton: &str) -> Option<Vec<Part<'_>>> {
    let mut parts = Vec::new();
    let mut rest = skeleton;
    while let Some(open) = rest.find(SLOT_OPEN) {
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        let after = &rest[open + SLOT_OPEN.len_utf8()..];
        let close = after.find(SLOT_CLOSE)?;
        parts.push(Part::Slot(after[..close].parse().ok()?));
        rest = &after[close + SLOT_CLOSE.len_utf8()..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Some(parts)
}

/// Where each content slot of `skeleton` lies in `text`, or None when the
/// two renderings do not line up.
fn locate_contents(text: &str, skeleton: &str, messages: &[Message]) -> Option<Vec<Range<usize>>> {
    if text.contains(SLOT_OPEN) || text.contains(SLOT_CLOSE) {
        return None;
    }
    let parts = skeleton_parts(skeleton)?;
    let mut pos = 0;
    let mut plain = Vec::new();
    for (k, part) in parts.iter().enumerate() {
        match part {
            Part::Text(t) => {
                if !text[pos..].starts_with(t) {
                    return None;
                }
                pos += t.len();
            }
            Part::Slot(i) => {
                let c = messages.get(*i)?.content.as_str();
                let next = match parts.get(k + 1) {
                    Some(Part::Text(t)) => Some(*t),
                    Some(Part::Slot(_)) => Some(""),
                    None => None,
                };
                let fits = |cand: &str| {
                    let rest = &text[pos..];
                    rest.starts_with(cand)
                        && match next {
                            Some(n) => rest[cand.len()..].starts_with(n),
                            None => rest.len() == cand.len(),
                        }
                };
                let cand = [c, c.trim(), c.trim_start(), c.trim_end()].into_iter().find(|cand| fits(cand))?;
                if !cand.is_empty() {
                    plain.push(pos..pos + cand.len());
                }
                pos += cand.len();
            }
        }
    }
    (pos == text.len()).then_some(plain)
}

/// Python's `json.dumps(v, ensure_ascii=False, indent=indent)`, as HF's
/// chat templates call it; a control-token string inside a JSON string has
/// its first character written as a `\u` escape, so that tool definitions
/// or arguments cannot write control tokens either.
fn py_json(v: &serde_json::Value, indent: Option<usize>, depth: usize, controls: &[String], out: &mut String) {
    use serde_json::Value as V;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        V::Null => out.push_str("null"),
        V::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        V::Number(n) => out.push_str(&py_number(n)),
        V::String(s) => py_string(s, controls, out),
        V::Array(a) if a.is_empty() => out.push_str("[]"),
        V::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_json(x, indent, depth + 1, controls, out);
            }
            newline(out, depth);
            out.push(']');
        }
        V::Object(o) if o.is_empty() => out.push_str("{}"),
        V::Object(o) => {
            out.push('{');
            for (i, (k, x)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_string(k, controls, out);
                out.push_str(": ");
                py_json(x, indent, depth + 1, controls, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn py_number(n: &serde_json::Number) -> String {
    if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
        if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
            return format!("{f:.1}");
        }
        // Python's repr: shortest round-trip digits, exponent as e+XX.
        let s = format!("{f:?}");
        return match s.split_once('e') {
            Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e:0>2}"),
            Some((m, e)) => format!("{m}e-{:0>2}", &e[1..]),
            None => s,
        };
    }
    n.to_string()
}

fn py_string(s: &str, controls: &[String], out: &mut String) {
    // Start offsets of control-token strings, whose first character is escaped.
    let mut escape_at: Vec<usize> = Vec::new();
    for c in controls {
        escape_at.extend(s.match_indices(c.as_str()).map(|(i, _)| i));
    }
    out.push('"');
    for (i, ch) in s.char_indices() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || escape_at.contains(&i) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
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
