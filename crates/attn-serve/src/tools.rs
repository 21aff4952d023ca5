//! Tool calls: OpenAI's `tools` / `tool_choice` / `tool_calls` on the
//! chat endpoint. Tools reach the model through its own chat template;
//! the calls it writes come back in the format Qwen2.5 and other Hermes-style
//! templates ask for (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`)
//! and are returned as `tool_calls`, whole or as streaming deltas.

use serde_json::{json, Map, Value};

use crate::api::ApiError;

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// What the request asks of tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Tools are not shown to the model.
    None,
    /// The model decides.
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this tool.
    Function(String),
}

/// The request's checked tools: their definitions as the template takes
/// them, and the choice.
#[derive(Debug, Clone)]
pub struct Tools {
    pub defs: Vec<Value>,
    pub choice: ToolChoice,
}

impl Tools {
    /// Whether the model sees the tools and calls in its output are parsed.
    pub fn active(&self) -> bool {
        !self.defs.is_empty() && self.choice != ToolChoice::None
    }

    /// The JSON schema of a function's arguments (an empty object schema
    /// when the definition has none).
    pub fn parameters(&self, name: &str) -> Option<Value> {
        self.defs.iter().find(|d| d["function"]["name"] == name).map(|d| {
            let p = &d["function"]["parameters"];
            if p.is_object() {
                p.clone()
            } else {
                json!({"type": "object"})
            }
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.defs.iter().filter_map(|d| d["function"]["name"].as_str().map(String::from)).collect()
    }
}

/// OpenAI's rule for function names: letters, digits, `_`, `-`, up to 64.
/// It also keeps names safe to write into a template unescaped.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks `tools` and `tool_choice` as OpenAI does.
pub fn check(tools: Option<&Value>, choice: Option<&Value>) -> Result<Tools, ApiError> {
    let bad = |param: &str, msg: String| ApiError::bad_request(Some(param), msg);
    let mut defs = Vec::new();
    match tools {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, t) in list.iter().enumerate() {
                let p = format!("tools[{i}]");
                if t.get("type").and_then(Value::as_str) != Some("function") {
                    return Err(bad(&format!("{p}.type"), format!("{p}.type must be \"function\"")));
                }
                let Some(f) = t.get("function").and_then(Value::as_object) else {
                    return Err(bad(&format!("{p}.function"), format!("{p}.function must be an object")));
                };
                let name = f.get("name").and_then(Value::as_str).unwrap_or("");
                if !valid_name(name) {
                    return Err(bad(
                        &format!("{p}.function.name"),
                        format!("{p}.function.name must be 1 to 64 letters, digits, `_` or `-`, got {name:?}"),
                    ));
                }
                if defs.iter().any(|d: &Value| d["function"]["name"] == name) {
                    return Err(bad(&format!("{p}.function.name"), format!("{p}: a second tool named `{name}`")));
                }
                if let Some(d) = f.get("description") {
                    if !d.is_string() {
                        return Err(bad(
                            &format!("{p}.function.description"),
                            format!("{p}.function.description must be a string"),
                        ));
                    }
                }
                if let Some(params) = f.get("parameters") {
                    if !params.is_object() {
                        return Err(bad(
                            &format!("{p}.function.parameters"),
                            format!("{p}.function.parameters must be a JSON schema object"),
                        ));
                    }
                }
                defs.push(t.clone());
            }
        }
        Some(_) => return Err(bad("tools", "tools must be a list of function definitions".into())),
    }
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice must be none, auto, required or a function, got `{other}`"),
                ))
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v.get("type").and_then(Value::as_str) == Some("function") => {
                ToolChoice::Function(name.to_string())
            }
            _ => {
                return Err(bad(
                    "tool_choice",
                    "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                ))
            }
        },
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Function(_) if defs.is_empty() => {
            return Err(bad("tool_choice", "tool_choice asks for a tool call but no tools are given".into()));
        }
        ToolChoice::Function(name) if !defs.iter().any(|d| d["function"]["name"] == name.as_str()) => {
            return Err(bad("tool_choice", format!("tool_choice names `{name}`, which is not among the tools")));
        }
        _ => {}
    }
    Ok(Tools { defs, choice })
}

/// A call the model wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    /// The arguments as compact JSON text (OpenAI sends a string).
    pub arguments: String,
}

impl Call {
    pub fn json(&self, id: &str) -> Value {
        json!({"id": id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// The blocks a call may come in: Qwen2.5's `<tool_call>` tags, and the
/// fenced JSON that Qwen2.5-Coder writes instead (llama.cpp's Hermes parser
/// accepts both).
const BLOCKS: [(&str, &str); 2] = [(OPEN, CLOSE), ("```json", "```")];

/// How a reply that is a bare JSON call starts (whitespace removed).
const BARE: &str = "{\"name\"";

/// The call in one block body, if it is a JSON object naming one of the
/// request's tools with object arguments.
fn parse_call(body: &str, names: &[String]) -> Option<Call> {
    let v: Map<String, Value> = serde_json::from_str(body.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    if !names.contains(&name) {
        return None;
    }
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_string(),
        Some(a @ Value::Object(_)) => a.to_string(),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) if serde_json::from_str::<Map<String, Value>>(s).is_ok() => s.clone(),
        Some(_) => return None,
    };
    Some(Call { name, arguments })
}

/// Splits a finished reply into its text and its tool calls. A block that
/// is not a call of one of `names`, or is left open, stays in the text.
pub fn parse(text: &str, names: &[String]) -> (String, Vec<Call>) {
    let mut p = StreamParser::new(names.to_vec());
    let mut d = p.push(text);
    let mut content = d.content;
    content.push_str(&p.finish());
    d.calls.extend(p.bare.take());
    let content = if d.calls.is_empty() { content } else { content.trim().to_string() };
    (content, d.calls)
}

/// Finds calls in one choice's text as it streams: text is passed on as
/// soon as it cannot be the start of a call; a call is sent whole once its
/// block closes.
#[derive(Debug, Default)]
pub struct StreamParser {
    names: Vec<String>,
    buf: String,
    /// The block being read (an index into BLOCKS).
    inside: Option<usize>,
    /// Whitespace not sent yet.
    ws: String,
    /// Nothing has been sent yet (a bare JSON call may be coming).
    at_start: bool,
    /// A bare call found by `finish`.
    pub bare: Option<Call>,
    pub calls: usize,
}

/// What one piece of streamed text gives.
#[derive(Debug, Default, PartialEq)]
pub struct Delta {
    pub content: String,
    pub calls: Vec<Call>,
}

impl StreamParser {
    pub fn new(names: Vec<String>) -> Self {
        StreamParser { names, at_start: true, ..Default::default() }
    }

    pub fn push(&mut self, text: &str) -> Delta {
        self.buf.push_str(text);
        let mut out = Delta::default();
        if self.at_start {
            // A reply that is one bare JSON call (as Qwen2.5-Coder often
            // writes) is held until it ends.
            let compact: String = self.buf.chars().filter(|c| !c.is_whitespace()).collect();
            if BARE.starts_with(&compact) || compact.starts_with(BARE) {
                return out;
            }
            self.at_start = false;
        }
        loop {
            if let Some(b) = self.inside {
                let (open, close) = BLOCKS[b];
                let Some(end) = self.buf.find(close) else { break };
                let body = self.buf[..end].to_string();
                self.buf.drain(..end + close.len());
                self.inside = None;
                match parse_call(&body, &self.names) {
                    Some(c) => {
                        self.calls += 1;
                        out.calls.push(c);
                    }
                    None => out.content.push_str(&format!("{open}{body}{close}")),
                }
            } else if let Some((b, start)) = BLOCKS
                .iter()
                .enumerate()
                .filter_map(|(b, (open, _))| Some((b, self.buf.find(open)?)))
                .min_by_key(|x| x.1)
            {
                out.content.push_str(&self.buf[..start]);
                self.buf.drain(..start + BLOCKS[b].0.len());
                self.inside = Some(b);
            } else {
                // Hold back a tail that could still open a block.
                let keep = BLOCKS
                    .iter()
                    .filter_map(|(open, _)| (1..open.len()).rev().find(|&k| self.buf.ends_with(&open[..k])))
                    .max()
                    .unwrap_or(0);
                let cut = self.buf.len() - keep;
                out.content.push_str(&self.buf[..cut]);
                self.buf.drain(..cut);
                break;
            }
        }
        // Whitespace waits for the next text: after the last call it is
        // dropped, as `parse` trims it.
        if out.content.trim().is_empty() {
            self.ws.push_str(&std::mem::take(&mut out.content));
        } else {
            out.content.insert_str(0, &std::mem::take(&mut self.ws));
        }
        out
    }

    /// The text still held back when the choice ends (an unfinished block
    /// is returned as text, as `parse` does).
    pub fn finish(&mut self) -> String {
        let held = std::mem::take(&mut self.buf);
        if std::mem::take(&mut self.at_start) {
            if let Some(c) = parse_call(&held, &self.names) {
                self.calls += 1;
                self.bare = Some(c);
                return String::new();
            }
        }
        let text = match self.inside.take() {
            Some(b) => format!("{}{held}", BLOCKS[b].0),
            None => held,
        };
        let ws = std::mem::take(&mut self.ws);
        if self.calls > 0 && text.trim().is_empty() {
            String::new()
        } else {
            ws + &text
        }
    }
}

/// The grammar (llguidance's Lark) that makes the model call a tool: one
/// `<tool_call>` block naming one of `names` with arguments that follow
/// that tool's schema.
pub fn call_grammar(tools: &Tools) -> String {
    let names: Vec<String> = match &tools.choice {
        ToolChoice::Function(n) => vec![n.clone()],
        _ => tools.names(),
    };
    let mut rules = Vec::new();
    let mut alts = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut schema = tools.parameters(name).unwrap_or_else(|| json!({"type": "object"}));
        // Python's json.dumps layout, as structured output uses: no free
        // whitespace for a small model to loop on.
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert_with(
                || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        alts.push(format!("call_{i}"));
        rules.push(format!(
            "call_{i}: \"{{\\\"name\\\": \\\"{name}\\\", \\\"arguments\\\": \" args_{i} \"}}\"\nargs_{i}: %json {schema}"
        ));
    }
    format!("start: \"{OPEN}\\n\" ({}) \"\\n{CLOSE}\"\n{}\n", alts.join(" | "), rules.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "f".into(), "g".into(), "t".into()]
    }

    #[test]
    fn parses_calls_and_keeps_the_rest() {
        let text = "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse(text, &names());
        assert_eq!(content, "Sure.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0], Call { name: "get_weather".into(), arguments: "{\"city\":\"Oslo\"}".into() });
        // Qwen2.5-Coder's fenced JSON.
        let fenced = "```json\n{\n  \"name\": \"get_weather\",\n  \"arguments\": {\"city\": \"Paris\"}\n}\n```";
        assert_eq!(
            parse(fenced, &names()).1,
            vec![Call { name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() }]
        );
        // Malformed, unknown or unfinished blocks, and code, stay text.
        for text in [
            "<tool_call>not json</tool_call>",
            "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>",
            "a <tool_call>{\"name\": \"f\"",
            "```json\n{\"a\": 1}\n```",
            "```python\nprint(1)\n```",
            "{\"name\": \"get_weather\", \"arguments\": {}} and more",
            "{\"name\": 1}",
            "plain  ",
        ] {
            assert_eq!(parse(text, &names()), (text.to_string(), vec![]), "{text}");
        }
    }

    #[test]
    fn streaming_gives_what_parse_gives_for_any_cut() {
        for (text, n) in [
            ("Let me look.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}\n</tool_call>\n```json\n{\"name\": \"g\"}\n```\n```json\n[1]\n```  <tool_ca", 2),
            (" {\n \"name\": \"f\", \"arguments\": {\"a\": \"<tool_call>\"}}\n", 1),
            ("{\"name\": \"nope\"}", 0),
            ("{\"na", 0),
        ] {
            streams_like_parse(text, n);
        }
    }

    fn streams_like_parse(text: &str, n: usize) {
        let (want_content, want_calls) = parse(text, &names());
        assert_eq!(want_calls.len(), n, "{text}");
        for step in 1..9 {
            let mut p = StreamParser::new(names());
            let (mut content, mut calls) = (String::new(), Vec::new());
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(step) {
                let d = p.push(&piece.iter().collect::<String>());
                content.push_str(&d.content);
                calls.extend(d.calls);
            }
            content.push_str(&p.finish());
            calls.extend(p.bare.take());
            assert_eq!(calls, want_calls, "step {step}");
            assert_eq!(content.trim(), want_content, "step {step}");
        }
    }

    #[test]
    fn checks_tools_and_choice() {
        let tool =
            |name: &str| json!({"type": "function", "function": {"name": name, "parameters": {"type": "object"}}});
        assert!(check(Some(&json!([tool("ok_name-1")])), None).unwrap().active());
        for (tools, choice, param) in [
            (json!([tool("bad name")]), Value::Null, "tools[0].function.name"),
            (json!([tool("x\"}<|im_end|>")]), Value::Null, "tools[0].function.name"),
            (json!([{"type": "retrieval"}]), Value::Null, "tools[0].type"),
            (json!([tool("a"), tool("a")]), Value::Null, "tools[1].function.name"),
            (json!({"a": 1}), Value::Null, "tools"),
            (json!([tool("a")]), json!("sometimes"), "tool_choice"),
            (json!([tool("a")]), json!({"type": "function", "function": {"name": "b"}}), "tool_choice"),
            (Value::Null, json!("required"), "tool_choice"),
        ] {
            let e = check(Some(&tools), Some(&choice)).unwrap_err();
            assert_eq!(e.body()["error"]["param"], param, "{tools} {choice}");
        }
        let t = check(Some(&json!([tool("a")])), Some(&json!("none"))).unwrap();
        assert!(!t.active());
    }
}
