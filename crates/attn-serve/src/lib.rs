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
//!
//! The async runtime only moves bytes: tokenization and template rendering
//! run on blocking threads, at most [`HttpOptions::cpu_jobs`] at once, and
//! models run in their own threads, so `/health` answers while the CPUs are
//! busy. Connections are capped ([`HttpOptions::max_connections`]; those
//! beyond it are closed at once), request heads and bodies have timeouts,
//! `/v1/*` can require an API key (`/health` and `/metrics` stay open, as
//! in vLLM), POST bodies must be `application/json` (so a web page cannot
//! send one without a CORS preflight), and CORS is off unless origins are
//! named.

pub mod api;
pub mod dist;
pub mod metrics;
pub mod tools;
pub mod worker;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use attn_engine::{Constraint, ConstraintFactory, EngineLimits, EngineRequest, GrammarSpec, SeqOutput, TokenLogprob};
use attn_models::chat::ChatTemplate;
use attn_models::Tokenizer;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;

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
    /// Embeddings requests per encoder model queued or running; beyond
    /// it, 429.
    pub max_embedding_queue: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            caps: Caps::default(),
            max_queue: 256,
            max_body_bytes: 4 << 20,
            max_embedding_inputs: 256,
            max_embedding_queue: 64,
        }
    }
}

/// The HTTP side: access control and what a connection may take.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// When set, `/v1/*` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Origins that browsers may call from (CORS); empty: CORS is off.
    /// `*` allows any origin.
    pub allowed_origins: Vec<String>,
    /// Open connections at once; a connection beyond it is closed at once.
    pub max_connections: usize,
    /// A connection must send a complete request head within this long of
    /// the server waiting for one. The same clock closes idle keep-alive
    /// connections (hyper starts it as soon as it waits for the next head).
    pub header_timeout: Duration,
    /// The longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// Tokenizations and template renderings running at once (on blocking
    /// threads, off the async runtime); more wait their turn.
    pub cpu_jobs: usize,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            api_key: None,
            allowed_origins: Vec::new(),
            max_connections: 512,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            cpu_jobs: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// The warning to print when the server listens beyond loopback without an
/// API key, or `None`.
pub fn exposure_warning(ip: IpAddr, http: &HttpOptions) -> Option<String> {
    if ip.is_loopback() || http.api_key.is_some() {
        return None;
    }
    Some(format!(
        "WARNING: listening on {ip} without an API key: anyone who can reach this port can use the models. \
         Set --api-key (or ATTN_API_KEY), or listen on 127.0.0.1."
    ))
}

pub struct AppState {
    pub generators: Vec<GenModel>,
    pub encoders: Vec<EmbedModel>,
    pub metrics: Arc<Metrics>,
    pub limits: ServerLimits,
    pub http: HttpOptions,
    /// Permits for CPU work done for the HTTP side (tokenization, templates).
    cpu: Arc<Semaphore>,
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
            cpu: Arc::new(Semaphore::new(HttpOptions::default().cpu_jobs.max(1))),
            http: HttpOptions::default(),
            draining: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            started: unix_now(),
        }
    }

    /// Sets the HTTP options (the defaults otherwise).
    pub fn with_http(mut self, http: HttpOptions) -> Self {
        self.cpu = Arc::new(Semaphore::new(http.cpu_jobs.max(1)));
        self.http = http;
        self
    }

    /// Stops accepting new work (SIGTERM): new requests get 503.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Requests still queued or running, over all generation models.
    pub fn outstanding(&self) -> usize {
        self.generators.iter().map(|g| g.worker.outstanding.load(Ordering::SeqCst)).sum()
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}-{:x}{:06x}", self.started, self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The generation model a request names (the first one without a name),
    /// with its index; 404 `model_not_found` as OpenAI answers.
    fn generator(&self, model: Option<&str>) -> Result<(usize, &GenModel), ApiError> {
        match model {
            None => self
                .generators
                .first()
                .map(|g| (0, g))
                .ok_or_else(|| model_not_found("this server has no text-generation model".into())),
            Some(m) => self.generators.iter().enumerate().find(|(_, g)| g.name == m).ok_or_else(|| {
                let kind = if self.encoders.iter().any(|e| e.name == m) { " (it is an embedding model)" } else { "" };
                model_not_found(format!("model `{m}` is not served here{kind}; GET /v1/models lists the models"))
            }),
        }
    }

    fn encoder(&self, model: Option<&str>) -> Result<&EmbedModel, ApiError> {
        match model {
            None => self.encoders.first().ok_or_else(|| model_not_found("this server has no embedding model".into())),
            Some(m) => self.encoders.iter().find(|e| e.name == m).ok_or_else(|| {
                let kind =
                    if self.generators.iter().any(|g| g.name == m) { " (it is a text-generation model)" } else { "" };
                model_not_found(format!(
                    "model `{m}` is not an embedding model served here{kind}; GET /v1/models lists the models"
                ))
            }),
        }
    }

    /// Runs CPU work (tokenization, template rendering) on a blocking
    /// thread, at most `cpu_jobs` at once: the async runtime stays free to
    /// answer `/health` and move other requests' bytes. The permit goes with
    /// the work, so a client that hangs up does not free a slot early.
    async fn cpu<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Result<R, ApiError> {
        let permit = self.cpu.clone().acquire_owned().await.map_err(|_| {
            ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")
        })?;
        tokio::task::spawn_blocking(move || {
            let r = f();
            drop(permit);
            r
        })
        .await
        .map_err(|e| ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", format!("worker failed: {e}")))
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

fn model_not_found(message: String) -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, ..ApiError::bad_request(Some("model"), message) }
        .with_code("model_not_found")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .merge(api)
        .fallback(not_found)
        .layer(middleware::from_fn(require_json))
        .layer(DefaultBodyLimit::max(limit))
        .layer(RequestBodyTimeoutLayer::new(state.http.body_timeout));
    // CORS outermost: a preflight is answered before the key is asked for.
    let app = match cors(&state.http.allowed_origins) {
        Some(c) => app.layer(c),
        None => app,
    };
    app.with_state(state)
}

/// CORS for the named origins; `None` (no CORS headers at all, so browsers
/// refuse cross-origin reads) when none are named.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(Duration::from_secs(600)),
    )
}

/// `Authorization: Bearer <key>` on `/v1/*` when the server has a key,
/// compared in constant time; 401 in OpenAI's shape otherwise.
async fn require_api_key(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(key) = &s.http.api_key else { return next.run(req).await };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let ok = given.is_some_and(|g| bool::from(subtle::ConstantTimeEq::ct_eq(g.as_bytes(), key.as_bytes())));
    if ok {
        return next.run(req).await;
    }
    let message = if given.is_some() {
        "incorrect API key provided"
    } else {
        "this server requires an API key: send `Authorization: Bearer <key>`"
    };
    let mut r = ApiError::status(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
        .with_code("invalid_api_key")
        .into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    s.metrics.count_request(endpoint_of(req.uri().path()), 401);
    r
}

fn endpoint_of(path: &str) -> &'static str {
    match path {
        "/v1/completions" => "completions",
        "/v1/chat/completions" => "chat_completions",
        "/v1/embeddings" => "embeddings",
        _ => "other",
    }
}

/// Whether a Content-Type names JSON: `application/json`, optionally with
/// `charset=utf-8`.
pub fn is_json_content_type(v: &str) -> bool {
    let mut parts = v.split(';').map(str::trim);
    if !parts.next().is_some_and(|m| m.eq_ignore_ascii_case("application/json")) {
        return false;
    }
    parts.filter(|p| !p.is_empty()).all(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.trim().eq_ignore_ascii_case("charset") && v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
    })
}

/// POST bodies must be JSON (415 otherwise). A browser can send a "simple"
/// cross-origin POST (text/plain, form data) without a preflight; a JSON
/// body needs one, which CORS then refuses unless the origin is allowed.
async fn require_json(req: Request, next: Next) -> Response {
    if req.method() == Method::POST {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        if !ct.is_some_and(is_json_content_type) {
            let got = ct.map_or("none".to_string(), |c| format!("`{c}`"));
            return ApiError::status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                format!("the request body must be JSON with Content-Type: application/json (got {got})"),
            )
            .into_response();
        }
    }
    next.run(req).await
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
        let text = r.body_text();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            let msg = "the request body is larger than this server accepts";
            ApiError { status, ..ApiError::bad_request(None, msg) }
        } else if text.contains("designated timeout") {
            let msg = "the request body did not arrive in time";
            ApiError { status: StatusCode::REQUEST_TIMEOUT, ..ApiError::bad_request(None, msg) }
        } else {
            ApiError { status, ..ApiError::bad_request(None, format!("cannot read the request body: {text}")) }
        }
    })
}

fn finish_reason(o: &SeqOutput) -> Option<&'static str> {
    o.finish.map(|f| match f {
        attn_engine::FinishReason::Length => "length",
        attn_engine::FinishReason::Error => "error",
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
    let (gi, g) = s.generator(req.model.as_deref())?;
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
    enum One {
        Text(String),
        Ids(Vec<u32>),
    }
    let one = match req.prompt {
        Prompt::Text(t) => One::Text(t),
        Prompt::Texts(mut v) if v.len() == 1 => One::Text(v.remove(0)),
        Prompt::Tokens(ids) => One::Ids(ids),
        Prompt::TokenLists(mut v) if v.len() == 1 => One::Ids(v.remove(0)),
        _ => {
            return Err(ApiError::bad_request(
                Some("prompt"),
                "one prompt per request: send a string or a list of token ids",
            ))
        }
    };
    let tokenizer = g.tokenizer.clone();
    let (prompt_ids, prompt_text) = s
        .cpu(move || match one {
            One::Text(t) => tokenizer.encode(&t, true).map(|ids| (ids, t)),
            One::Ids(ids) => tokenizer.decode(&ids, false).map(|t| (ids, t)),
        })
        .await?
        .map_err(tok_err)?;
    let g = &s.generators[gi];
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
    let (gi, g) = s.generator(req.model.as_deref())?;
    let checked = sampling.check(&s.limits.caps, false)?;
    let top = check_logprobs("top_logprobs", req.top_logprobs, &s.limits.caps)?;
    if top.is_some() && !req.logprobs {
        return Err(ApiError::bad_request(Some("top_logprobs"), "top_logprobs needs logprobs: true"));
    }
    let logprobs = req.logprobs.then(|| top.unwrap_or(0));
    let messages = req.template_messages()?;
    if g.chat_template.is_none() {
        return Err(ApiError::bad_request(Some("model"), format!("model `{}` has no chat template", g.name)));
    }
    let template = g.chat_template.as_ref().expect("checked above");
    let tools = tools::check(req.tools.as_ref(), req.tool_choice.as_ref())?;
    if tools.active() && !template.supports_tools() {
        return Err(ApiError::bad_request(
            Some("tools"),
            format!("model `{}` has a chat template that does not render tools", g.name),
        ));
    }
    let mut grammar = response_format(req.response_format.as_ref())?;
    if matches!(tools.choice, tools::ToolChoice::Required | tools::ToolChoice::Function(_)) {
        // The model must call a tool: its output is held to one call
        // block naming an allowed tool, arguments valid under its schema.
        if grammar.is_some() {
            return Err(ApiError::bad_request(
                Some("response_format"),
                "response_format cannot be combined with a tool_choice that forces a tool call",
            ));
        }
        grammar = Some(GrammarSpec::Lark(tools::call_grammar(&tools)));
    }
    let s2 = s.clone();
    let defs = tools.active().then(|| tools.defs.clone());
    let ids = s
        .cpu(move || {
            let g = &s2.generators[gi];
            let template = g.chat_template.as_ref().expect("checked above");
            let prompt = template
                .prompt(&messages, defs.as_deref(), true)
                .map_err(|e| ApiError::bad_request(Some("messages"), format!("messages: {e}")))?;
            // The template writes the BOS itself; message text is read as
            // plain text, so a message cannot close its turn or write another's.
            g.tokenizer
                .encode_chat(&prompt.text, &prompt.plain)
                .map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))
        })
        .await??;
    let g = &s.generators[gi];
    let constraint = compile_constraint(s, g, grammar).await?;
    let mut p = submit(s, g, ids, checked, logprobs, false, constraint, "chatcmpl")?;
    let created = unix_now();
    if p.checked.stream {
        let names = if tools.active() { Some(tools.names()) } else { None };
        return Ok(stream_chat(p, created, logprobs.is_some(), names));
    }
    let (choices, _) = p.collect().await?;
    let total: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let out: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (mut message, mut finish) =
                (json!({"role": "assistant", "content": c.text}), c.finish.unwrap_or("stop"));
            if tools.active() {
                let (content, calls) = tools::parse(&c.text, &tools.names());
                if !calls.is_empty() {
                    let calls: Vec<Value> =
                        calls.iter().enumerate().map(|(k, call)| call.json(&call_id(&p.id, i, k))).collect();
                    let content = if content.is_empty() { Value::Null } else { Value::String(content) };
                    message = json!({"role": "assistant", "content": content, "tool_calls": calls});
                    finish = "tool_calls";
                }
            }
            json!({"index": i, "message": message,
                "logprobs": logprobs.map(|_| chat_logprobs(&p, &c.logprobs)),
                "finish_reason": finish})
        })
        .collect();
    Ok(Json(json!({"id": p.id, "object": "chat.completion", "created": created, "model": p.model,
        "choices": out, "usage": p.usage(total)}))
    .into_response())
}

/// The id of a response's `k`-th tool call in choice `choice`.
fn call_id(response: &str, choice: usize, k: usize) -> String {
    let tail = response.rsplit('-').next().unwrap_or(response);
    format!("call_{tail}_{choice}_{k}")
}

type SseSender = mpsc::Sender<Result<SseEvent, Infallible>>;

/// Streams `chunk(output)` for every engine output as server-sent events,
/// then the usage and `[DONE]`. When the client disconnects the response
/// body is dropped, the task below stops, and with it the engine's channel:
/// the engine aborts the request and frees its blocks.
///
/// A stream that ends early (its generation failed, the drain deadline cut
/// it) still ends well-formed: an error event, a final chunk with
/// `finish_reason: "error"` for every choice not yet finished, then the
/// usage (when asked for) and `[DONE]`.
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
        let mut finished = vec![false; p.n];
        let mut failure = None;
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
                        if let Some(f) = finished.get_mut(o.index) {
                            *f = true;
                        }
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
                    failure = Some(e);
                    break;
                }
                None => {
                    failure = Some("the engine stopped".to_string());
                    break;
                }
            }
        }
        if let Some(e) = failure {
            let err = ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e);
            if !send(&tx, err.body().to_string()).await {
                return;
            }
            for (index, _) in finished.iter().enumerate().filter(|(_, f)| !**f) {
                let end = SeqOutput {
                    request: 0,
                    index,
                    token: None,
                    text: String::new(),
                    logprob: None,
                    prompt_logprobs: None,
                    finish: Some(attn_engine::FinishReason::Error),
                    error: None,
                    prompt_tokens: p.prompt_tokens,
                    completion_tokens: completion[index],
                };
                if let Some(v) = chunk(&p, &end) {
                    if !send(&tx, v.to_string()).await {
                        return;
                    }
                }
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

/// `tool_names`: the request's tools when calls are parsed from the text.
fn stream_chat(p: Pending, created: u64, logprobs: bool, tool_names: Option<Vec<String>>) -> Response {
    let base = json!({"id": p.id, "object": "chat.completion.chunk", "created": created, "model": p.model});
    let first: Vec<Value> = (0..p.n)
        .map(|i| {
            with(&base, json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), Value::Null)
        })
        .collect();
    let b2 = base.clone();
    // With tools, each choice's text goes through a parser that holds back
    // what may be a tool call and sends each call whole.
    let tools_active = tool_names.is_some();
    let mut parsers: Vec<tools::StreamParser> =
        (0..p.n).map(|_| tools::StreamParser::new(tool_names.clone().unwrap_or_default())).collect();
    let chunk = move |p: &Pending, o: &SeqOutput| {
        let lp = if logprobs { o.logprob.as_ref().map(|l| chat_logprobs(p, std::slice::from_ref(l))) } else { None };
        let mut finish = finish_reason(o);
        let mut delta = json!({});
        match parsers.get_mut(o.index).filter(|_| tools_active) {
            Some(parser) => {
                let before = parser.calls;
                let mut d = parser.push(&o.text);
                if o.finish.is_some() {
                    d.content.push_str(&parser.finish());
                    d.calls.extend(parser.bare.take());
                    if parser.calls > 0 {
                        finish = Some("tool_calls");
                    }
                }
                if !d.content.is_empty() {
                    delta["content"] = Value::String(d.content);
                }
                if !d.calls.is_empty() {
                    let calls: Vec<Value> = d
                        .calls
                        .iter()
                        .enumerate()
                        .map(|(j, c)| {
                            let mut v = c.json(&call_id(&p.id, o.index, before + j));
                            v["index"] = json!(before + j);
                            v
                        })
                        .collect();
                    delta["tool_calls"] = Value::Array(calls);
                }
            }
            None if !o.text.is_empty() => delta["content"] = Value::String(o.text.clone()),
            None => {}
        }
        if delta.as_object().is_some_and(|d| d.is_empty()) && lp.is_none() && o.finish.is_none() {
            return None;
        }
        Some(with(
            &b2,
            json!([{"index": o.index, "delta": delta, "logprobs": lp, "finish_reason": finish}]),
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
    let queued = e.worker.outstanding.load(Ordering::SeqCst);
    if queued >= s.limits.max_embedding_queue {
        return Err(ApiError {
            retry_after_s: Some(1),
            ..ApiError::status(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!("{queued} embeddings requests are queued or running for `{}`; retry shortly", e.name),
            )
        });
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
/// Requests still running at the deadline are ended with an error event
/// (streams still get their `finish_reason` and `[DONE]`).
///
/// Each connection is served by hyper's HTTP/1 server with a header-read
/// timeout; at most `max_connections` are open at once, and a connection
/// beyond that is closed as soon as it is accepted.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let app = router(state.clone());
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(state.http.max_connections.max(1)));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("{peer}: closed, {} connections are open already", state.http.max_connections);
            state.metrics.count_request("connection_refused", 503);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(state.http.header_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    state.start_draining();
    let start = Instant::now();
    // Let the in-flight requests finish, up to the deadline.
    while state.outstanding() > 0 && start.elapsed() < drain {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = state.outstanding();
    if left > 0 {
        tracing::warn!("drain deadline passed with {left} requests unfinished; ending them");
        for g in &state.generators {
            g.worker.abort_all("the server is shutting down: the drain deadline passed");
        }
    }
    // Idle connections close now; open responses (the streams just ended)
    // get a moment to flush their last events.
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
    }
    Ok(())
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
