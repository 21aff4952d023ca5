//! attn-serve: an OpenAI-compatible HTTP server.
//!
//! The parts follow vLLM's separation: this crate is the API server (HTTP,
//! validation, streaming, metrics); each generation model runs in its own
//! engine thread ([`worker`]) around an [`attn_engine::LlmEngine`], whose
//! scheduler does continuous batching over a paged KV cache with prefix
//! caching. Encoder models answer `/v1/embeddings` from their own thread.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both
//! with `stream` as server-sent events ending in `[DONE]`),
//! `POST /v1/embeddings`, `GET /v1/models`, `GET /health`, `GET /metrics`.

pub mod api;
pub mod metrics;
pub mod worker;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attn_engine::{Constraint, ConstraintFactory, EngineLimits, EngineRequest, GrammarSpec, SeqOutput, TokenLogprob};
use attn_models::chat::ChatTemplate;
use attn_models::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{
    check_logprobs, engine_error, parse, response_format, ApiError, Caps, ChatRequest, Checked, CompletionRequest,
    EmbeddingInput, EmbeddingRequest, Prompt, Sampling,
};
use crate::metrics::Metrics;
use crate::worker::{EmbedJob, EmbedWorker, Event, GenWorker, Submission};

/// A text-generation model being served.
pub struct GenModel {
    pub name: String,
    pub worker: GenWorker,
    pub tokenizer: Arc<dyn Tokenizer + Send + Sync>,
    pub chat_template: Option<ChatTemplate>,
}

/// An encoder model being served for embeddings.
pub struct EmbedModel {
    pub name: String,
    pub worker: EmbedWorker,
}

/// Limits of the server as a whole.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub caps: Caps,
    /// Requests per generation model that may wait for a place in the
    /// running batch; beyond it, 429.
    pub max_queue: usize,
    pub max_body_bytes: usize,
    /// Texts per embeddings request.
    pub max_embedding_inputs: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits { caps: Caps::default(), max_queue: 256, max_body_bytes: 4 << 20, max_embedding_inputs: 256 }
    }
}

pub struct AppState {
    pub generators: Vec<GenModel>,
    pub encoders: Vec<EmbedModel>,
    pub metrics: Arc<Metrics>,
    pub limits: ServerLimits,
    draining: AtomicBool,
    next_id: AtomicU64,
    started: u64,
    /// Per generation model: its grammar factory, built on the first
    /// structured-output request and shared by every later one.
    grammars: Vec<OnceLock<Result<Arc<ConstraintFactory>, String>>>,
}

impl AppState {
    pub fn new(
        generators: Vec<GenModel>,
        encoders: Vec<EmbedModel>,
        metrics: Arc<Metrics>,
        limits: ServerLimits,
    ) -> Self {
        AppState {
            grammars: generators.iter().map(|_| OnceLock::new()).collect(),
            generators,
            encoders,
            metrics,
            limits,
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            started: unix_now(),
        }
    }

    /// Stops accepting new work (SIGTERM): new requests get 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Requests still queued or running, over all generation models.
    pub fn outstanding(&self) -> usize {
        self.generators.iter().map(|g| g.worker.outstanding.load(Ordering::SeqCst)).sum()
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:06x}", self.started, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn generator(&self, model: Option<&str>) -> Result<&GenModel, ApiError> {
        match model {
            None => self.generators.first().ok_or_else(|| {
                ApiError::bad_request(Some("model"), "this server has no text-generation model")
                    .with_code("model_not_found")
            }),
            Some(m) => self.generators.iter().find(|g| g.name == m).ok_or_else(|| {
                let kind = if self.encoders.iter().any(|e| e.name == m) { " (it is an embedding model)" } else { "" };
                ApiError::bad_request(
                    Some("model"),
                    format!("model `{m}` is not served here{kind}; GET /v1/models lists the models"),
                )
                .with_code("model_not_found")
            }),
        }
    }

    fn encoder(&self, model: Option<&str>) -> Result<&EmbedModel, ApiError> {
        match model {
            None => self.encoders.first().ok_or_else(|| {
                ApiError::bad_request(Some("model"), "this server has no embedding model").with_code("model_not_found")
            }),
            Some(m) => self.encoders.iter().find(|e| e.name == m).ok_or_else(|| {
                let kind =
                    if self.generators.iter().any(|g| g.name == m) { " (it is a text-generation model)" } else { "" };
                ApiError::bad_request(
                    Some("model"),
                    format!("model `{m}` is not an embedding model served here{kind}; GET /v1/models lists the models"),
                )
                .with_code("model_not_found")
            }),
        }
    }

    fn check_accepting(&self) -> Result<(), ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            ));
        }
        Ok(())
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, "invalid_request_error", "no such endpoint; see GET /v1/models")
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"}))).into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let mut data = Vec::new();
    for g in &s.generators {
        let l = g.worker.limits();
        data.push(json!({"id": g.name, "object": "model", "created": s.started, "owned_by": "attn",
            "max_model_len": l.context_length, "kind": "text-generation"}));
    }
    for e in &s.encoders {
        data.push(json!({"id": e.name, "object": "model", "created": s.started, "owned_by": "attn",
            "max_model_len": e.worker.max_seq_length, "kind": "embedding"}));
    }
    Json(json!({"object": "list", "data": data}))
}

/// The body, or the reason it could not be read (too large: 413).
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| {
        let status = r.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than this server accepts".to_string()
        } else {
            format!("cannot read the request body: {r}")
        };
        ApiError { status, ..ApiError::bad_request(None, msg) }
    })
}

fn finish_reason(o: &SeqOutput) -> Option<&'static str> {
    o.finish.map(|f| match f {
        attn_engine::FinishReason::Length => "length",
        _ => "stop",
    })
}

/// Everything one choice produced, for non-streaming responses.
#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    completion_tokens: usize,
}

/// A request submitted to an engine, ready to be answered.
struct Pending {
    id: String,
    model: String,
    events: mpsc::UnboundedReceiver<Event>,
    n: usize,
    prompt_tokens: usize,
    checked: Checked,
    tokenizer: Arc<dyn Tokenizer + Send + Sync>,
}

/// Compiles a `response_format` grammar for model `g` on a blocking thread
/// (building the model's grammar factory first, once: both walk the
/// vocabulary, and a schema may take a while to compile). A schema the
/// grammar engine refuses is a 400 naming `response_format`.
async fn compile_constraint(
    s: &Arc<AppState>,
    g: &GenModel,
    spec: Option<GrammarSpec>,
) -> Result<Option<Constraint>, ApiError> {
    let Some(spec) = spec else { return Ok(None) };
    let internal = |m: String| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m);
    let i = s.generators.iter().position(|x| std::ptr::eq(x, g)).ok_or_else(|| internal("unknown model".into()))?;
    let (state, tokenizer) = (s.clone(), g.tokenizer.clone());
    let bad = |m: String| ApiError::bad_request(Some("response_format"), format!("response_format: {m}"));
    tokio::task::spawn_blocking(move || {
        let factory = state.grammars[i]
            .get_or_init(|| ConstraintFactory::new(&*tokenizer).map(Arc::new).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| bad(format!("this model cannot do structured output: {e}")))?;
        factory.compile(&spec).map(Some).map_err(|e| bad(e.to_string()))
    })
    .await
    .map_err(|e| internal(format!("compiling the grammar: {e}")))?
}

#[allow(clippy::too_many_arguments)]
fn submit(
    s: &AppState,
    g: &GenModel,
    prompt: Vec<u32>,
    checked: Checked,
    logprobs: Option<usize>,
    prompt_logprobs: bool,
    constraint: Option<Constraint>,
    prefix: &str,
) -> Result<Pending, ApiError> {
    let request =
        EngineRequest { prompt, params: checked.params.clone(), n: checked.n, logprobs, prompt_logprobs, constraint };
    let limits: EngineLimits = g.worker.limits();
    limits.validate(&request).map_err(engine_error)?;
    let queued = g.worker.outstanding.load(Ordering::SeqCst);
    if queued >= limits.max_num_seqs + s.limits.max_queue {
        return Err(ApiError {
            retry_after_s: Some(1),
            ..ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("{queued} requests are queued or running for `{}`; retry shortly", g.name),
            )
        });
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let prompt_tokens = request.prompt.len();
    let n = request.n;
    g.worker
        .submit(Submission { request, events: tx, received: Instant::now() })
        .map_err(|e| ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "server_error", e))?;
    Ok(Pending {
        id: s.id(prefix),
        model: g.name.clone(),
        events: rx,
        n,
        prompt_tokens,
        checked,
        tokenizer: g.tokenizer.clone(),
    })
}

impl Pending {
    /// Waits for every choice to finish.
    /// Returns the choices and, when asked for, the prompt's logprobs.
    async fn collect(&mut self) -> Result<(Vec<Choice>, Option<Vec<TokenLogprob>>), ApiError> {
        let mut choices: Vec<Choice> = (0..self.n).map(|_| Choice::default()).collect();
        let mut open = self.n;
        let mut prompt_lps = None;
        while open > 0 {
            match self.events.recv().await {
                Some(Event::Output(o)) => {
                    let Some(c) = choices.get_mut(o.index) else { continue };
                    if o.prompt_logprobs.is_some() {
                        prompt_lps = o.prompt_logprobs.clone();
                    }
                    c.text.push_str(&o.text);
                    if let (Some(t), Some(lp)) = (o.token, o.logprob.clone()) {
                        c.tokens.push(t);
                        c.logprobs.push(lp);
                    } else if let Some(t) = o.token {
                        c.tokens.push(t);
                    }
                    c.completion_tokens = o.completion_tokens;
                    if let Some(f) = finish_reason(&o) {
                        c.finish = Some(f);
                        open -= 1;
                    }
                }
                Some(Event::Error(e)) => {
                    return Err(ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e))
                }
                None => {
                    return Err(ApiError::status(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "the engine stopped",
                    ))
                }
            }
        }
        Ok((choices, prompt_lps))
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens})
    }

    fn piece(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

/// OpenAI's completions `logprobs` object for `tokens`, optionally preceded
/// by the prompt (`echo`), whose first token has no log-probability.
fn completion_logprobs(
    p: &Pending,
    prompt: Option<(&[u32], &[TokenLogprob])>,
    lps: &[TokenLogprob],
    start_offset: usize,
) -> Value {
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top = Vec::new();
    let mut offsets = Vec::new();
    let mut offset = start_offset;
    let mut push = |tok: u32, lp: Option<&TokenLogprob>| {
        let piece = p.piece(tok);
        offsets.push(offset);
        offset += piece.len();
        tokens.push(Value::String(piece));
        token_logprobs.push(lp.map_or(Value::Null, |l| json!(l.logprob)));
        top.push(lp.map_or(Value::Null, |l| {
            let m: serde_json::Map<String, Value> = l.top.iter().map(|&(t, v)| (p.piece(t), json!(v))).collect();
            Value::Object(m)
        }));
    };
    if let Some((ids, plps)) = prompt {
        for (i, &t) in ids.iter().enumerate() {
            push(t, if i == 0 { None } else { plps.get(i - 1) });
        }
    }
    for lp in lps {
        push(lp.token, Some(lp));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// The chat API's `logprobs.content` entries.
fn chat_logprobs(p: &Pending, lps: &[TokenLogprob]) -> Value {
    let entry = |t: u32, v: f32| {
        let piece = p.piece(t);
        json!({"token": piece, "logprob": v, "bytes": piece.as_bytes()})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(l.token, l.logprob);
            e["top_logprobs"] = Value::Array(l.top.iter().map(|&(t, v)| entry(t, v)).collect());
            e
        })
        .collect();
    json!({"content": content})
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = completions_inner(&s, body).await;
    respond(&s, "completions", r)
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = chat_inner(&s, body).await;
    respond(&s, "chat_completions", r)
}

async fn embeddings(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let r = embeddings_inner(&s, body).await;
    respond(&s, "embeddings", r)
}

fn respond(s: &AppState, endpoint: &str, r: Result<Response, ApiError>) -> Response {
    let resp = r.unwrap_or_else(|e| e.into_response());
    s.metrics.count_request(endpoint, resp.status().as_u16());
    resp
}

async fn completions_inner(s: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    s.check_accepting()?;
    let body = body_bytes(body)?;
    let req: CompletionRequest = parse(&body)?;
    let sampling: Sampling = parse(&body)?;
    let g = s.generator(req.model.as_deref())?;
    let checked = sampling.check(&s.limits.caps, req.echo)?;
    let logprobs = check_logprobs("logprobs", req.logprobs, &s.limits.caps)?;
    let grammar = response_format(req.response_format.as_ref())?;
    if grammar.is_some() && checked.score_only {
        return Err(ApiError::bad_request(Some("response_format"), "response_format needs max_tokens of at least 1"));
    }
    if checked.score_only && checked.stream {
        return Err(ApiError::bad_request(Some("max_tokens"), "max_tokens 0 (scoring with echo) cannot be streamed"));
    }
    let tok_err = |e: attn_nn::Error| ApiError::bad_request(Some("prompt"), format!("prompt: {e}"));
    let (prompt_ids, prompt_text) = match req.prompt {
        Prompt::Text(t) => (g.tokenizer.encode(&t, true).map_err(tok_err)?, t),
        Prompt::Texts(v) if v.len() == 1 => (g.tokenizer.encode(&v[0], true).map_err(tok_err)?, v[0].clone()),
        Prompt::Tokens(ids) => {
            let text = g.tokenizer.decode(&ids, false).map_err(tok_err)?;
            (ids, text)
        }
        Prompt::TokenLists(v) if v.len() == 1 => {
            let text = g.tokenizer.decode(&v[0], false).map_err(tok_err)?;
            (v[0].clone(), text)
        }
        _ => {
            return Err(ApiError::bad_request(
                Some("prompt"),
                "one prompt per request: send a string or a list of token ids",
            ))
        }
    };
    let want_prompt_lps = req.echo && logprobs.is_some();
    let constraint = compile_constraint(s, g, grammar).await?;
    let mut p = submit(s, g, prompt_ids.clone(), checked, logprobs, want_prompt_lps, constraint, "cmpl")?;
    let created = unix_now();
    if p.checked.stream {
        return Ok(stream_completions(p, created, req.echo.then_some(prompt_text)));
    }
    let (choices, prompt_lps) = p.collect().await?;
    let score_only = p.checked.score_only;
    let mut total_completion = 0;
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (gen_text, gen_lps, n_tokens) =
                if score_only { ("", &[][..], 0) } else { (c.text.as_str(), &c.logprobs[..], c.completion_tokens) };
            total_completion += n_tokens;
            let text = if req.echo { format!("{prompt_text}{gen_text}") } else { gen_text.to_string() };
            let lp = logprobs.map(|_| {
                let prompt = if req.echo { Some((&prompt_ids[..], prompt_lps.as_deref().unwrap_or(&[]))) } else { None };
                completion_logprobs(&p, prompt, gen_lps, 0)
            });
            json!({"index": i, "text": text, "logprobs": lp, "finish_reason": if score_only { "length" } else { c.finish.unwrap_or("stop") }})
        })
        .collect();
    Ok(Json(json!({"id": p.id, "object": "text_completion", "created": created, "model": p.model,
        "choices": out, "usage": p.usage(total_completion)}))
    .into_response())
}

async fn chat_inner(s: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    s.check_accepting()?;
    let body = body_bytes(body)?;
    let req: ChatRequest = parse(&body)?;
    let sampling: Sampling = parse(&body)?;
    let g = s.generator(req.model.as_deref())?;
    let checked = sampling.check(&s.limits.caps, false)?;
    let top = check_logprobs("top_logprobs", req.top_logprobs, &s.limits.caps)?;
    if top.is_some() && !req.logprobs {
        return Err(ApiError::bad_request(Some("top_logprobs"), "top_logprobs needs logprobs: true"));
    }
    let logprobs = req.logprobs.then(|| top.unwrap_or(0));
    let messages = req.template_messages()?;
    let grammar = response_format(req.response_format.as_ref())?;
    let Some(template) = &g.chat_template else {
        return Err(ApiError::bad_request(Some("model"), format!("model `{}` has no chat template", g.name)));
    };
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad_request(Some("messages"), format!("messages: {e}")))?;
    // The template writes the BOS itself.
    let ids = g.tokenizer.encode(&text, false).map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
    let constraint = compile_constraint(s, g, grammar).await?;
    let mut p = submit(s, g, ids, checked, logprobs, false, constraint, "chatcmpl")?;
    let created = unix_now();
    if p.checked.stream {
        return Ok(stream_chat(p, created, logprobs.is_some()));
    }
    let (choices, _) = p.collect().await?;
    let total: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs.map(|_| chat_logprobs(&p, &c.logprobs)),
                "finish_reason": c.finish.unwrap_or("stop")})
        })
        .collect();
    Ok(Json(json!({"id": p.id, "object": "chat.completion", "created": created, "model": p.model,
        "choices": out, "usage": p.usage(total)}))
    .into_response())
}

type SseSender = mpsc::Sender<Result<SseEvent, Infallible>>;

/// Streams `chunk(output)` for every engine output as server-sent events,
/// then the usage and `[DONE]`. When the client disconnects the response
/// body is dropped, the task below stops, and with it the engine's channel:
/// the engine aborts the request and frees its blocks.
fn sse_response(
    mut p: Pending,
    first: Vec<Value>,
    mut chunk: impl FnMut(&Pending, &SeqOutput) -> Option<Value> + Send + 'static,
    usage_chunk: impl Fn(&Pending, Value) -> Value + Send + 'static,
) -> Response {
    let (tx, rx): (SseSender, _) = mpsc::channel(64);
    tokio::spawn(async move {
        let send = |tx: &SseSender, v: String| {
            let tx = tx.clone();
            async move { tx.send(Ok(SseEvent::default().data(v))).await.is_ok() }
        };
        for v in first {
            if !send(&tx, v.to_string()).await {
                return;
            }
        }
        let mut open = p.n;
        let mut completion = vec![0usize; p.n];
        while open > 0 {
            let ev = tokio::select! {
                ev = p.events.recv() => ev,
                _ = tx.closed() => return,
            };
            match ev {
                Some(Event::Output(o)) => {
                    if let Some(c) = completion.get_mut(o.index) {
                        *c = o.completion_tokens;
                    }
                    if o.finish.is_some() {
                        open -= 1;
                    }
                    if let Some(mut v) = chunk(&p, &o) {
                        // Without include_usage the counts ride on the last
                        // choice's final chunk (OpenAI sends an extra
                        // chunk with no choices only when asked to).
                        if open == 0 && !p.checked.include_usage {
                            v["usage"] = p.usage(completion.iter().sum());
                        }
                        if !send(&tx, v.to_string()).await {
                            return;
                        }
                    }
                }
                Some(Event::Error(e)) => {
                    let err = ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e);
                    let _ = send(&tx, err.body().to_string()).await;
                    break;
                }
                None => break,
            }
        }
        if p.checked.include_usage {
            let usage = p.usage(completion.iter().sum());
            if !send(&tx, usage_chunk(&p, usage).to_string()).await {
                return;
            }
        }
        let _ = send(&tx, "[DONE]".to_string()).await;
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// A chunk: the response's common fields plus `choices` and `usage`.
fn with(base: &Value, choices: Value, usage: Value) -> Value {
    let mut v = base.clone();
    v["choices"] = choices;
    v["usage"] = usage;
    v
}

fn stream_completions(p: Pending, created: u64, echo: Option<String>) -> Response {
    let base = json!({"id": p.id, "object": "text_completion", "created": created, "model": p.model});
    let first: Vec<Value> = match &echo {
        Some(t) => (0..p.n)
            .map(|i| {
                with(&base, json!([{"index": i, "text": t, "logprobs": null, "finish_reason": null}]), Value::Null)
            })
            .collect(),
        None => Vec::new(),
    };
    let b2 = base.clone();
    let chunk = move |p: &Pending, o: &SeqOutput| {
        let lp = o.logprob.as_ref().map(|l| completion_logprobs(p, None, std::slice::from_ref(l), 0));
        if o.text.is_empty() && lp.is_none() && o.finish.is_none() {
            return None;
        }
        Some(with(
            &b2,
            json!([{"index": o.index, "text": o.text, "logprobs": lp, "finish_reason": finish_reason(o)}]),
            Value::Null,
        ))
    };
    let usage_chunk = move |_: &Pending, usage: Value| with(&base, json!([]), usage);
    sse_response(p, first, chunk, usage_chunk)
}

fn stream_chat(p: Pending, created: u64, logprobs: bool) -> Response {
    let base = json!({"id": p.id, "object": "chat.completion.chunk", "created": created, "model": p.model});
    let first: Vec<Value> = (0..p.n)
        .map(|i| {
            with(&base, json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), Value::Null)
        })
        .collect();
    let b2 = base.clone();
    let chunk = move |p: &Pending, o: &SeqOutput| {
        let lp = if logprobs { o.logprob.as_ref().map(|l| chat_logprobs(p, std::slice::from_ref(l))) } else { None };
        if o.text.is_empty() && lp.is_none() && o.finish.is_none() {
            return None;
        }
        let delta = if o.text.is_empty() { json!({}) } else { json!({"content": o.text}) };
        Some(with(
            &b2,
            json!([{"index": o.index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason(o)}]),
            Value::Null,
        ))
    };
    let usage_chunk = move |_: &Pending, usage: Value| with(&base, json!([]), usage);
    sse_response(p, first, chunk, usage_chunk)
}

async fn embeddings_inner(s: &Arc<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    s.check_accepting()?;
    let req: EmbeddingRequest = parse(&body_bytes(body)?)?;
    let e = s.encoder(req.model.as_deref())?;
    let texts = match req.input {
        EmbeddingInput::Text(t) => vec![t],
        EmbeddingInput::Texts(v) => v,
        EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => {
            return Err(ApiError::bad_request(
                Some("input"),
                "token-id input is not supported for embeddings; send text",
            ))
        }
    };
    if texts.is_empty() {
        return Err(ApiError::bad_request(Some("input"), "input must not be empty"));
    }
    if texts.len() > s.limits.max_embedding_inputs {
        return Err(ApiError::bad_request(
            Some("input"),
            format!("{} inputs; at most {} per request", texts.len(), s.limits.max_embedding_inputs),
        ));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                Some("encoding_format"),
                format!("encoding_format must be `float` or `base64`, got `{other}`"),
            ))
        }
    };
    if req.dimensions.is_some() {
        return Err(ApiError::bad_request(
            Some("dimensions"),
            "this model's embeddings have a fixed size; omit dimensions",
        ));
    }
    let (tx, rx) = oneshot::channel();
    e.worker
        .submit(EmbedJob { texts, reply: tx })
        .map_err(|m| ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "server_error", m))?;
    let (vectors, tokens) = rx
        .await
        .map_err(|_| {
            ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the embedding worker stopped")
        })?
        .map_err(|m| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m))?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let emb = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": emb})
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data, "model": e.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
    .into_response())
}

/// Runs the server on `listener` until `shutdown` resolves, then drains:
/// new requests get 503 while the running ones finish, for at most `drain`.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let st = state.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        st.start_draining();
        let _ = stop_tx.send(());
    });
    let st = state.clone();
    let deadline = async move {
        if stop_rx.await.is_err() {
            return std::future::pending::<()>().await;
        }
        let start = Instant::now();
        // Let the in-flight requests finish, up to the deadline.
        while st.outstanding() > 0 && start.elapsed() < drain {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Streams still open after the work is done close by themselves;
        // give them a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::select! {
        r = server => r,
        _ = deadline => {
            let left = state.outstanding();
            if left > 0 {
                tracing::warn!("drain deadline passed with {left} requests unfinished");
            }
            Ok(())
        }
    }
}

/// Model names as `/v1/models` lists them, for logs.
pub fn model_names(state: &AppState) -> BTreeMap<String, &'static str> {
    let mut m = BTreeMap::new();
    for g in &state.generators {
        m.insert(g.name.clone(), "text-generation");
    }
    for e in &state.encoders {
        m.insert(e.name.clone(), "embedding");
    }
    m
}
