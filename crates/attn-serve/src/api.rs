//! The OpenAI request bodies, their validation, and error bodies.
//!
//! Parsing goes through `serde_path_to_error`, so a wrong type names the
//! field (`temperature: invalid type: string "hot", expected f32`). Every
//! check returns an [`ApiError`] that becomes an HTTP status with OpenAI's
//! error body; nothing a client sends can panic the server.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use attn_engine::{GrammarSpec, SamplingParams};

/// An error as OpenAI reports it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn bad_request(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after_s: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code: None, retry_after_s: None }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// Maps an engine error (a bad field, a prompt too long) to a 400.
pub fn engine_error(e: attn_nn::Error) -> ApiError {
    match &e {
        attn_nn::Error::Config { field, reason } => ApiError::bad_request(Some(field), format!("{field}: {reason}")),
        _ => ApiError::bad_request(None, e.to_string()),
    }
}

/// Parses a JSON body into `T`; the error names the offending field.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(None, "the request body is empty; send a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(None, format!("malformed JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request(None, format!("invalid request: {inner}"))
        } else {
            ApiError::bad_request(Some(&path), format!("{path}: {inner}"))
        }
    })
}

/// `stop` as OpenAI accepts it: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// A completions prompt or an embeddings input: text, a list of texts,
/// token ids, or lists of token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields both endpoints share, parsed from the same body as the
/// endpoint's own fields (not flattened into them: flattening would lose
/// the field name in type errors).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Sampling {
    pub max_tokens: Option<u64>,
    /// The chat API's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub stop: Option<StringOrList>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Not supported: refused when non-empty.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Log-probabilities of the chosen token and this many alternatives.
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: bool,
    /// Structured output, as for chat (see [`response_format`]).
    pub response_format: Option<serde_json::Value>,
}

/// Message content: a string or a list of parts (only text parts).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    /// An assistant message's calls: `{"id", "type": "function",
    /// "function": {"name", "arguments": JSON text}}`.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool message's answer to this call.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
    /// OpenAI's function definitions, checked by `tools::check`.
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub response_format: Option<serde_json::Value>,
}

/// Embeddings input: the same forms as a completions prompt.
pub type EmbeddingInput = Prompt;

#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub input: EmbeddingInput,
    pub encoding_format: Option<String>,
    pub dimensions: Option<u64>,
}

/// Server-side caps on what one request may ask for.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub max_tokens: usize,
    pub max_n: usize,
    pub max_stop: usize,
    pub max_logprobs: usize,
    pub default_max_tokens: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps { max_tokens: 4096, max_n: 8, max_stop: 4, max_logprobs: 20, default_max_tokens: 256 }
    }
}

fn range(param: &str, v: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if v.is_finite() && (lo..=hi).contains(&v) {
        Ok(v)
    } else {
        Err(ApiError::bad_request(Some(param), format!("{param} must be in [{lo}, {hi}], got {v}")))
    }
}

/// Validated sampling: the engine's params, the number of choices, and
/// whether the client asked for no generated tokens at all (`max_tokens: 0`
/// with `echo`, to score a text).
#[derive(Debug, Clone)]
pub struct Checked {
    pub params: SamplingParams,
    pub n: usize,
    pub score_only: bool,
    pub stream: bool,
    pub include_usage: bool,
}

impl Sampling {
    /// Checks every field against OpenAI's ranges and the server's caps.
    pub fn check(&self, caps: &Caps, allow_zero_tokens: bool) -> Result<Checked, ApiError> {
        let mut p = SamplingParams::default();
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(caps.default_max_tokens.min(caps.max_tokens) as u64);
        if max_tokens > caps.max_tokens as u64 {
            return Err(ApiError::bad_request(
                Some("max_tokens"),
                format!("max_tokens is {max_tokens}; this server allows at most {}", caps.max_tokens),
            ));
        }
        let score_only = max_tokens == 0;
        if score_only && !allow_zero_tokens {
            return Err(ApiError::bad_request(Some("max_tokens"), "max_tokens must be at least 1 (0 only with echo)"));
        }
        p.max_tokens = max_tokens.max(1) as usize;
        if let Some(t) = self.temperature {
            // As vLLM: a positive temperature below 0.01 is raised to 0.01
            // (1 / 1e-45 overflows every logit to inf); 0 is greedy.
            p.temperature = range("temperature", t, 0.0, 2.0)?;
            if p.temperature > 0.0 {
                p.temperature = p.temperature.max(attn_engine::processors::MIN_TEMPERATURE);
            }
        }
        if let Some(v) = self.top_p {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ApiError::bad_request(Some("top_p"), format!("top_p must be in (0, 1], got {v}")));
            }
            p.top_p = v;
        }
        if let Some(k) = self.top_k {
            // -1 and 0 both mean "no top-k filter" (vLLM uses -1).
            if k < -1 {
                return Err(ApiError::bad_request(Some("top_k"), format!("top_k must be -1, 0 or positive, got {k}")));
            }
            p.top_k = k.max(0) as usize;
        }
        if let Some(v) = self.min_p {
            p.min_p = range("min_p", v, 0.0, 1.0)?;
        }
        if let Some(v) = self.presence_penalty {
            p.presence_penalty = range("presence_penalty", v, -2.0, 2.0)?;
        }
        if let Some(v) = self.frequency_penalty {
            p.frequency_penalty = range("frequency_penalty", v, -2.0, 2.0)?;
        }
        if let Some(v) = self.repetition_penalty {
            // Dividing a logit by a tiny penalty overflows it: 0.01 at least.
            p.repetition_penalty = range("repetition_penalty", v, 0.01, 10.0)?;
        }
        p.seed = self.seed.map(|s| s as u64);
        if let Some(stop) = self.stop.clone() {
            let stop = stop.into_vec();
            if stop.len() > caps.max_stop {
                return Err(ApiError::bad_request(Some("stop"), format!("at most {} stop sequences", caps.max_stop)));
            }
            if stop.iter().any(|s| s.is_empty()) {
                return Err(ApiError::bad_request(Some("stop"), "stop sequences must not be empty"));
            }
            if stop.iter().any(|s| s.len() > 256) {
                return Err(ApiError::bad_request(Some("stop"), "stop sequences must be at most 256 bytes"));
            }
            p.stop = stop;
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::bad_request(Some("logit_bias"), "logit_bias is not supported by this server"));
        }
        let n = self.n.unwrap_or(1);
        if n == 0 || n > caps.max_n as u64 {
            return Err(ApiError::bad_request(Some("n"), format!("n must be in 1..={}, got {n}", caps.max_n)));
        }
        p.validate().map_err(engine_error)?;
        Ok(Checked {
            params: p,
            n: n as usize,
            score_only,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }
}

impl ChatRequest {
    /// The messages as the chat template takes them; text parts are joined.
    pub fn template_messages(&self) -> Result<Vec<attn_models::chat::Message>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(Some("messages"), "messages must not be empty"));
        }
        let mut out = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.iter().enumerate() {
            let param = format!("messages[{i}]");
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::bad_request(
                    Some(&format!("{param}.role")),
                    format!("{param}.role: unknown role `{}`", m.role),
                ));
            }
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad_request(
                                    Some(&format!("{param}.content[{j}]")),
                                    format!("{param}.content[{j}]: only text parts are supported, got `{}`", p.kind),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            let role = if m.role == "developer" { "system" } else { m.role.as_str() };
            let mut msg = attn_models::chat::Message::new(role, &text);
            if let Some(calls) = &m.tool_calls {
                if role != "assistant" {
                    return Err(ApiError::bad_request(
                        Some(&format!("{param}.tool_calls")),
                        format!("{param}.tool_calls: only assistant messages carry tool calls"),
                    ));
                }
                for (j, c) in calls.iter().enumerate() {
                    msg.tool_calls.push(tool_call(c, &format!("{param}.tool_calls[{j}]"))?);
                }
            }
            if role == "tool" {
                msg.tool_call_id = m.tool_call_id.clone();
                msg.name = m.name.clone();
            }
            out.push(msg);
        }
        Ok(out)
    }
}

/// An assistant's earlier tool call as templates take it: the arguments
/// (JSON text in OpenAI's API) parsed into a value, as HF templates expect.
fn tool_call(c: &serde_json::Value, param: &str) -> Result<attn_models::chat::ToolCall, ApiError> {
    let bad = |field: &str, msg: &str| {
        ApiError::bad_request(Some(&format!("{param}{field}")), format!("{param}{field}: {msg}"))
    };
    let name = c.pointer("/function/name").and_then(serde_json::Value::as_str).unwrap_or("");
    if !crate::tools::valid_name(name) {
        return Err(bad(".function.name", "must be 1 to 64 letters, digits, `_` or `-`"));
    }
    let arguments = match c.pointer("/function/arguments") {
        None | Some(serde_json::Value::Null) => serde_json::json!({}),
        Some(serde_json::Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| bad(".function.arguments", &format!("is not valid JSON ({e})")))?
        }
        Some(v @ serde_json::Value::Object(_)) => v.clone(),
        Some(_) => return Err(bad(".function.arguments", "must be a JSON string")),
    };
    Ok(attn_models::chat::ToolCall {
        id: c.get("id").and_then(serde_json::Value::as_str).unwrap_or("").to_string(),
        kind: "function".into(),
        function: attn_models::chat::FunctionCall { name: name.into(), arguments },
    })
}

/// The grammar `response_format` asks for: none for `{"type": "text"}`,
/// any JSON object for `{"type": "json_object"}`, and for
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`
/// a value valid under `schema`. Whether the schema compiles is checked
/// when it is compiled (off the async runtime).
pub fn response_format(v: Option<&Value>) -> Result<Option<GrammarSpec>, ApiError> {
    const P: &str = "response_format";
    let bad = |m: String| ApiError::bad_request(Some(P), format!("{P}: {m}"));
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let Some(kind) = v.get("type").and_then(Value::as_str) else {
        return Err(bad("must be an object with a string `type` (text, json_object or json_schema)".into()));
    };
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let Some(js) = v.get("json_schema").filter(|j| j.is_object()) else {
                return Err(bad("type json_schema needs a `json_schema` object with `name` and `schema`".into()));
            };
            if let Some(name) = js.get("name") {
                let ok = name.as_str().is_some_and(|n| {
                    (1..=64).contains(&n.len())
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                });
                if !ok {
                    return Err(bad("json_schema.name must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -".into()));
                }
            }
            if js.get("strict").is_some_and(|s| !s.is_boolean() && !s.is_null()) {
                return Err(bad("json_schema.strict must be a boolean".into()));
            }
            match js.get("schema") {
                Some(schema) if schema.is_object() || schema.is_boolean() => {
                    Ok(Some(GrammarSpec::JsonSchema(schema.clone())))
                }
                Some(_) => Err(bad("json_schema.schema must be a JSON schema object".into())),
                None => Err(bad("json_schema.schema is missing".into())),
            }
        }
        other => Err(bad(format!("unknown type `{other}` (supported: text, json_object, json_schema)"))),
    }
}

pub fn check_logprobs(param: &str, v: Option<u64>, caps: &Caps) -> Result<Option<usize>, ApiError> {
    match v {
        Some(k) if k > caps.max_logprobs as u64 => {
            Err(ApiError::bad_request(Some(param), format!("{param} must be at most {}, got {k}", caps.max_logprobs)))
        }
        Some(k) => Ok(Some(k as usize)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_and_ranges_name_the_field() {
        let e = parse::<Sampling>(br#"{"prompt": "hi", "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"), "{e:?}");
        let e = parse::<Sampling>(br#"{"prompt": "hi", "max_tokens": -3}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "{e:?}");
        let e = parse::<CompletionRequest>(br#"{"prompt": "hi""#).unwrap_err();
        assert!(e.message.contains("malformed JSON"), "{e:?}");
        let e = parse::<CompletionRequest>(br#"{"temperature": 1}"#).unwrap_err();
        assert!(e.message.contains("prompt"), "{e:?}");
        let e = parse::<ChatRequest>(br#"{"messages": [{"role": "user", "content": 5}]}"#).unwrap_err();
        assert!(e.message.contains("messages[0]"), "{e:?}");
        let caps = Caps::default();
        let sampling = |body: &str| parse::<Sampling>(body.as_bytes()).unwrap().check(&caps, false);
        assert_eq!(sampling(r#"{"prompt":"x","temperature":3}"#).unwrap_err().param.as_deref(), Some("temperature"));
        assert_eq!(sampling(r#"{"prompt":"x","top_p":0}"#).unwrap_err().param.as_deref(), Some("top_p"));
        assert_eq!(sampling(r#"{"prompt":"x","n":0}"#).unwrap_err().param.as_deref(), Some("n"));
        assert_eq!(sampling(r#"{"prompt":"x","max_tokens":100000}"#).unwrap_err().param.as_deref(), Some("max_tokens"));
        assert_eq!(sampling(r#"{"prompt":"x","max_tokens":0}"#).unwrap_err().param.as_deref(), Some("max_tokens"));
        assert_eq!(
            sampling(r#"{"prompt":"x","stop":["a","b","c","d","e"]}"#).unwrap_err().param.as_deref(),
            Some("stop")
        );
        assert_eq!(
            sampling(r#"{"prompt":"x","presence_penalty":2.5}"#).unwrap_err().param.as_deref(),
            Some("presence_penalty")
        );
        let ok = sampling(r#"{"prompt":"x","temperature":0,"top_k":-1,"stop":"\n","seed":-5,"n":2}"#).unwrap();
        assert_eq!((ok.params.top_k, ok.n, ok.params.stop.len()), (0, 2, 1));
        assert!(ok.params.is_greedy());
    }
}
