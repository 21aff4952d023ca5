//! The tiny random GPT of attn-test-support over its byte tokenizer behind
//! the HTTP router (optionally wrapped in the doubles that poison a
//! sequence, stall a step or block tokenization).
#![allow(dead_code)]

use std::sync::Arc;

use attn_engine::{EngineConfig, SchedulerConfig};
use attn_models::chat::{ChatTemplate, GEMMA3_TEMPLATE};
use attn_serve::api::Caps;
use attn_serve::metrics::Metrics;
use attn_serve::worker::GenWorker;
use attn_serve::{router, AppState, GenModel, HttpOptions, ServerLimits};
use attn_test_support::doubles::{Gate, GatedTokenizer, Poisoned};
use attn_test_support::tiny_gpt;
use attn_test_support::toy::ByteTokenizer;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

pub struct Opts {
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_queue: usize,
    pub max_body: usize,
    /// A sequence whose new tokens hold this id gets NaN logits.
    pub poison: Option<u32>,
    /// A step whose new tokens hold this id waits for the gate.
    pub stall: Option<(u32, Arc<Gate>)>,
    /// Encoding a text that contains `SLOW` waits for this gate.
    pub slow_tokenizer: Option<Arc<Gate>>,
    pub http: HttpOptions,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            num_blocks: 256,
            max_num_seqs: 16,
            max_queue: 64,
            max_body: 64 << 10,
            poison: None,
            stall: None,
            slow_tokenizer: None,
            http: HttpOptions::default(),
        }
    }
}

pub fn state(o: Opts) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::default());
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: o.num_blocks,
        scheduler: SchedulerConfig { max_num_seqs: o.max_num_seqs, max_batched_tokens: 32, max_logits_chunk: 8 },
    };
    let tok = Arc::new(GatedTokenizer {
        inner: ByteTokenizer::lenient(),
        marker: "SLOW".into(),
        gate: o.slow_tokenizer.unwrap_or_else(|| {
            let g = Gate::new();
            g.open();
            g
        }),
    });
    let model = Poisoned { inner: tiny_gpt(11, 128), poison: o.poison, stall: o.stall };
    let worker = GenWorker::spawn("toy".into(), model, tok.clone(), cfg, metrics.clone()).unwrap();
    let template = ChatTemplate::new(GEMMA3_TEMPLATE, "<bos>", "<eos>").unwrap();
    let g = GenModel { name: "toy".into(), worker, tokenizer: tok, chat_template: Some(template) };
    let limits = ServerLimits {
        caps: Caps { max_tokens: 64, ..Caps::default() },
        max_queue: o.max_queue,
        max_body_bytes: o.max_body,
        ..ServerLimits::default()
    };
    Arc::new(AppState::new(vec![g], vec![], metrics, limits).with_http(o.http))
}

pub async fn call(s: &Arc<AppState>, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    call_with(s, method, path, body, &[("content-type", "application/json")]).await
}

/// `call` with the given headers only.
pub async fn call_with(
    s: &Arc<AppState>,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Body::from(body.to_string())).unwrap();
    let resp = router(s.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

pub async fn post(s: &Arc<AppState>, path: &str, body: Value) -> (StatusCode, Value) {
    let (st, text) = call(s, "POST", path, &body.to_string()).await;
    (st, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of an SSE body.
pub fn sse(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}
