//! A small random GPT over a byte tokenizer behind the HTTP router.
#![allow(dead_code)]

use std::sync::Arc;

use attn_engine::{EngineConfig, SchedulerConfig};
use attn_models::chat::{ChatTemplate, GEMMA3_TEMPLATE};
use attn_models::gpt::{Gpt, GptConfig};
use attn_models::Tokenizer;
use attn_nn::{ParamStore, Result, Weights};
use attn_serve::api::Caps;
use attn_serve::metrics::Metrics;
use attn_serve::worker::GenWorker;
use attn_serve::{router, AppState, GenModel, ServerLimits};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

const BOS: u32 = 256;
const EOS: u32 = 257;

/// Bytes are tokens; 256 is BOS, 257 EOS.
pub struct Bytes;

impl Tokenizer for Bytes {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut v: Vec<u32> = if add_special { vec![BOS] } else { vec![] };
        v.extend(text.bytes().map(u32::from));
        Ok(v)
    }
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut b = Vec::new();
        for &i in ids {
            match i {
                0..=255 => b.push(i as u8),
                _ if skip_special => {}
                BOS => b.extend(b"<bos>"),
                _ => b.extend(b"<eos>"),
            }
        }
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn piece(&self, id: u32) -> Option<String> {
        self.decode(&[id], false).ok()
    }
    fn vocab_size(&self) -> usize {
        258
    }
    fn bos_id(&self) -> Option<u32> {
        Some(BOS)
    }
    fn eos_ids(&self) -> Vec<u32> {
        vec![EOS]
    }
}

pub fn gpt() -> Gpt {
    let cfg: GptConfig = serde_json::from_value(json!({
        "vocab_size": 258, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "d_ff": 64, "max_len": 128, "eos_id": EOS
    }))
    .unwrap();
    attn_nn::rng::seed(11);
    let w = Weights::new(Arc::new(ParamStore::new()), DType::F32, &Device::Cpu);
    Gpt::load(&w, &cfg).unwrap()
}

pub struct Opts {
    pub num_blocks: usize,
    pub max_num_seqs: usize,
    pub max_queue: usize,
    pub max_body: usize,
}

impl Default for Opts {
    fn default() -> Self {
        Opts { num_blocks: 256, max_num_seqs: 16, max_queue: 64, max_body: 64 << 10 }
    }
}

pub fn state(o: Opts) -> Arc<AppState> {
    let metrics = Arc::new(Metrics::default());
    let cfg = EngineConfig {
        block_size: 4,
        num_blocks: o.num_blocks,
        scheduler: SchedulerConfig { max_num_seqs: o.max_num_seqs, max_batched_tokens: 32, max_logits_chunk: 8 },
    };
    let tok = Arc::new(Bytes);
    let worker = GenWorker::spawn("toy".into(), gpt(), tok.clone(), cfg, metrics.clone()).unwrap();
    let template = ChatTemplate::new(GEMMA3_TEMPLATE, "<bos>", "<eos>").unwrap();
    let g = GenModel { name: "toy".into(), worker, tokenizer: tok, chat_template: Some(template) };
    let limits = ServerLimits {
        caps: Caps { max_tokens: 64, ..Caps::default() },
        max_queue: o.max_queue,
        max_body_bytes: o.max_body,
        ..ServerLimits::default()
    };
    Arc::new(AppState::new(vec![g], vec![], metrics, limits))
}

pub async fn call(s: &Arc<AppState>, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
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
