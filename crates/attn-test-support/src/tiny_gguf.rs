//! A tiny Gemma 3 GGUF written from scratch (f32 tensors, two layers, no
//! tokenizer): a file the decoder loads in milliseconds, for tests that
//! rewrite its metadata or tensors into hostile variants.

use std::collections::BTreeMap;

use attn_models::gguf::{write_gguf, TensorToWrite, TensorType, Value};

pub const TINY_LAYERS: usize = 2;
pub const TINY_HIDDEN: usize = 64;
pub const TINY_FFN: usize = 64;
pub const TINY_VOCAB: usize = 32;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 32;

/// The metadata of the tiny Gemma 3.
pub fn tiny_gemma3_metadata() -> BTreeMap<String, Value> {
    let u = |v: usize| Value::U32(v as u32);
    let mut m = BTreeMap::new();
    m.insert("general.architecture".into(), Value::String("gemma3".into()));
    m.insert("general.name".into(), Value::String("tiny-gemma3".into()));
    m.insert("gemma3.block_count".into(), u(TINY_LAYERS));
    m.insert("gemma3.embedding_length".into(), u(TINY_HIDDEN));
    m.insert("gemma3.feed_forward_length".into(), u(TINY_FFN));
    m.insert("gemma3.attention.head_count".into(), u(HEADS));
    m.insert("gemma3.attention.head_count_kv".into(), u(KV_HEADS));
    m.insert("gemma3.attention.key_length".into(), u(HEAD_DIM));
    m.insert("gemma3.attention.value_length".into(), u(HEAD_DIM));
    m.insert("gemma3.attention.sliding_window".into(), u(16));
    m.insert("gemma3.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-6));
    m.insert("gemma3.rope.freq_base".into(), Value::F32(1e6));
    m.insert("gemma3.context_length".into(), u(128));
    m
}

/// Names and row-major shapes of the tiny Gemma 3's tensors.
pub fn tiny_gemma3_tensors() -> Vec<(String, Vec<usize>)> {
    let (d, ff, nq, nkv) = (TINY_HIDDEN, TINY_FFN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut t = vec![("token_embd.weight".to_string(), vec![TINY_VOCAB, d]), ("output_norm.weight".into(), vec![d])];
    for i in 0..TINY_LAYERS {
        for (n, s) in [
            ("attn_q.weight", vec![nq, d]),
            ("attn_k.weight", vec![nkv, d]),
            ("attn_v.weight", vec![nkv, d]),
            ("attn_output.weight", vec![d, nq]),
            ("ffn_gate.weight", vec![ff, d]),
            ("ffn_up.weight", vec![ff, d]),
            ("ffn_down.weight", vec![d, ff]),
            ("attn_norm.weight", vec![d]),
            ("ffn_norm.weight", vec![d]),
            ("post_attention_norm.weight", vec![d]),
            ("post_ffw_norm.weight", vec![d]),
            ("attn_q_norm.weight", vec![HEAD_DIM]),
            ("attn_k_norm.weight", vec![HEAD_DIM]),
        ] {
            t.push((format!("blk.{i}.{n}"), s));
        }
    }
    t
}

/// A GGUF of `metadata` and f32 `tensors` (row-major shapes), every value
/// small and deterministic.
pub fn gguf_bytes(metadata: &BTreeMap<String, Value>, tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, shape)| {
            let n: usize = shape.iter().product();
            (0..n).flat_map(|i| (((i % 7) as f32 - 3.0) * 0.01).to_le_bytes()).collect()
        })
        .collect();
    let to_write: Vec<TensorToWrite<'_>> = tensors
        .iter()
        .zip(&data)
        .map(|((name, shape), bytes)| TensorToWrite {
            name,
            ty: TensorType(0),
            dims: shape.iter().rev().map(|&d| d as u64).collect(),
            data: bytes,
        })
        .collect();
    write_gguf(metadata, &to_write).expect("valid tiny GGUF")
}

/// The tiny Gemma 3 with `overrides` replacing metadata values.
pub fn tiny_gemma3_gguf(overrides: &[(&str, Value)]) -> Vec<u8> {
    let mut m = tiny_gemma3_metadata();
    for (k, v) in overrides {
        m.insert(k.to_string(), v.clone());
    }
    gguf_bytes(&m, &tiny_gemma3_tensors())
}
