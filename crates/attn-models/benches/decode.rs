//! One decode step of a small GPT-style decoder (Gemma-like attention:
//! 4 query heads sharing 1 kv head, gated FFN) with random weights, after a
//! 64-token prompt: the per-token cost of the model code around the kernels.
//!
//! `cargo bench -p attn-models --bench decode` measures; `cargo test -p
//! attn-models --benches` (and so `cargo test --workspace`) runs it once in
//! criterion's test mode. Numbers go to BENCHMARKS.md, never into assertions.

use std::sync::Arc;

use attn_models::gpt::{Gpt, GptConfig};
use attn_models::{LanguageModel, Logits, SeqStep, SequenceCache};
use attn_nn::{Init, WeightSource, Weights};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};

/// Random inference weights: plain tensors, not trainable variables, so
/// no gradient bookkeeping runs (as with weights loaded from a file).
struct RandomWeights;

impl WeightSource for RandomWeights {
    fn load(&self, _name: &str, shape: &[usize], init: Init, dtype: DType, device: &Device) -> attn_nn::Result<Tensor> {
        init.create(shape, dtype, device)
    }

    fn contains(&self, _name: &str) -> bool {
        false
    }
}

fn decode_step(c: &mut Criterion) {
    let cfg: GptConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 8192, "d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 1,
        "d_ff": 1024, "max_len": 512, "gated": true, "activation": "gelu_tanh"
    }))
    .expect("config");
    attn_nn::rng::seed(1);
    let w = Weights::new(Arc::new(RandomWeights), DType::F32, &Device::Cpu);
    let model = Gpt::load(&w, &cfg).expect("model");
    let prompt: Vec<u32> = (0..64).map(|i| (i * 37 % 8192) as u32).collect();
    let mut cache = model.new_cache().expect("cache");
    LanguageModel::forward(&model, &mut [SeqStep { tokens: &prompt, cache: &mut cache }], Logits::Last)
        .expect("prefill");
    let next = [42u32];
    c.bench_function("decode_step_gpt_4x256_gqa", |b| {
        b.iter(|| {
            LanguageModel::forward(&model, &mut [SeqStep { tokens: &next, cache: &mut cache }], Logits::Last)
                .expect("step");
            // Back to the prompt, so every step sees the same context.
            cache.truncate(prompt.len()).expect("truncate");
        })
    });
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
