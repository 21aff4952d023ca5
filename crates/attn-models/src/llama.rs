//! Llama-family decoders (Llama 2/3, SmolLM2, Mistral without a window),
//! from a GGUF file: their [`DecoderSpec`].
//!
//! Pre-norm RMSNorm blocks, GQA attention with RoPE, SwiGLU FFN, final
//! RMSNorm, and an output head that is tied to the embedding when the file
//! has no `output.weight` (SmolLM2). llama.cpp's converter permutes the q/k
//! rows of `llama` models so that RoPE rotates adjacent pairs (its "norm"
//! rope type): the interleaved layout computes HF's rotation on them.

use attn_nn::{Result, RopeLayout};

use crate::decoder::{layer_count, meta_count, vocab_size, DecoderSpec, GatedActivation, LayerSpec, NormPlacement};
use crate::gguf::GgufFile;
use crate::sizes;

/// The spec of a `{arch}` GGUF built like Llama; `layout` is how its q/k
/// rows are stored, `qkv_bias` whether q/k/v carry biases (Qwen2).
pub(crate) fn llama_like(f: &GgufFile, a: &str, layout: RopeLayout, qkv_bias: bool) -> Result<DecoderSpec> {
    let opt_f = |k: &str| f.meta_opt(&format!("{a}.{k}")).and_then(|v| v.as_f64());
    let hidden_size = meta_count(f, a, "embedding_length", sizes::MAX_HIDDEN)?;
    let n_heads = meta_count(f, a, "attention.head_count", sizes::MAX_HEADS)?;
    let head_dim = match f.meta_opt(&format!("{a}.attention.key_length")) {
        Some(_) => meta_count(f, a, "attention.key_length", sizes::MAX_HEAD_DIM)?,
        None => hidden_size / n_heads,
    };
    let rope_base = opt_f("rope.freq_base").unwrap_or(10_000.0);
    // Only linear scaling is computed; other kinds are refused rather than ignored.
    let rope_scale = match f.meta_opt(&format!("{a}.rope.scaling.type")).and_then(|v| v.as_str()) {
        None | Some("none") => 1.0,
        Some("linear") => opt_f("rope.scaling.factor").unwrap_or(1.0),
        Some(other) => {
            return Err(attn_nn::Error::Unsupported(format!("{a}: RoPE scaling `{other}` (supported: none, linear)")))
        }
    };
    let layers = (0..layer_count(f, a)?).map(|_| LayerSpec { rope_base, rope_scale, window: None }).collect();
    let spec = DecoderSpec {
        arch: a.into(),
        vocab_size: vocab_size(f)?,
        hidden_size,
        intermediate_size: meta_count(f, a, "feed_forward_length", sizes::MAX_FFN)?,
        n_heads,
        n_kv_heads: match f.meta_opt(&format!("{a}.attention.head_count_kv")) {
            Some(_) => meta_count(f, a, "attention.head_count_kv", sizes::MAX_HEADS)?,
            None => n_heads,
        },
        head_dim,
        norm_eps: f.meta_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
        norm: NormPlacement::Pre,
        qk_norm: false,
        qkv_bias,
        rope_layout: layout,
        layers,
        activation: GatedActivation::Silu,
        embed_scale: None,
        attn_scale: (head_dim as f64).powf(-0.5),
        attn_softcap: None,
        final_softcap: None,
        context_length: meta_count(f, a, "context_length", sizes::MAX_CONTEXT)?,
    };
    spec.validate()?;
    Ok(spec)
}

/// Reads the `llama.*` metadata of a GGUF file.
pub fn spec(f: &GgufFile) -> Result<DecoderSpec> {
    llama_like(f, "llama", RopeLayout::Interleaved, false)
}
