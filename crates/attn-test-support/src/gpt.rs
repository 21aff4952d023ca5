//! A tiny random GPT over the byte vocabulary of [`crate::toy::ByteTokenizer`].

use std::sync::Arc;

use attn_models::gpt::{Gpt, GptConfig};
use attn_nn::{ParamStore, Weights};
use candle_core::{DType, Device};

use crate::toy::EOS;

/// A random GPT (vocabulary 258: the bytes, BOS and EOS; d 32, 2 layers,
/// 4 query heads over 2 KV heads, FFN 64) with `max_len` positions, its
/// weights drawn after seeding attn's generator with `seed`.
pub fn tiny_gpt(seed: u64, max_len: usize) -> Gpt {
    let cfg: GptConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 258, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
        "d_ff": 64, "max_len": max_len, "eos_id": EOS
    }))
    .unwrap();
    attn_nn::rng::seed(seed);
    let w = Weights::new(Arc::new(ParamStore::new()), DType::F32, &Device::Cpu);
    Gpt::load(&w, &cfg).unwrap()
}
