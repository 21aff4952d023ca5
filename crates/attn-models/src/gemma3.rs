//! Gemma 3 (decoder-only), from a GGUF file: its [`DecoderSpec`].
//!
//! Follows the Hugging Face transformers semantics of `Gemma3ForCausalLM`:
//! embeddings scaled by sqrt(hidden), GQA attention with per-head RMSNorm of
//! queries and keys, RoPE with a local base for sliding-window layers and a
//! global base for full-attention layers (every sixth layer), sandwich norms
//! around attention and the GeGLU FFN, final RMSNorm, output projection tied
//! to the embedding, optional final logit soft-capping.
//!
//! llama.cpp's converter stores Gemma's RMSNorm scales with the `+1`
//! already added, so norms from a GGUF use the plain `x * w` form.

use attn_nn::{Error, Result, RopeLayout};

use crate::decoder::{layer_count, meta_count, vocab_size, DecoderSpec, GatedActivation, LayerSpec, NormPlacement};
use crate::gguf::GgufFile;
use crate::sizes;

/// HF transformers' Gemma 3 default for the sliding-window layers' RoPE
/// base (the GGUF stores only the global one).
const LOCAL_ROPE_BASE: f64 = 10_000.0;
/// llama.cpp and HF both use five local layers then one global.
const SLIDING_WINDOW_PATTERN: usize = 6;

/// Whether layer `i` attends globally (otherwise within the sliding window).
pub fn is_global(layer: usize) -> bool {
    (layer + 1) % SLIDING_WINDOW_PATTERN == 0
}

/// Reads the `gemma3.*` metadata of a GGUF file.
pub fn spec(f: &GgufFile) -> Result<DecoderSpec> {
    let a = "gemma3";
    let arch = f.meta_str("general.architecture")?;
    if arch != a {
        return Err(Error::Unsupported(format!("architecture `{arch}` is not gemma3")));
    }
    let opt_f = |k: &str| f.meta_opt(&format!("{a}.{k}")).and_then(|v| v.as_f64());
    let head_dim = meta_count(f, a, "attention.key_length", sizes::MAX_HEAD_DIM)?;
    let window = meta_count(f, a, "attention.sliding_window", sizes::MAX_CONTEXT)?;
    let global_base = f.meta_f64("gemma3.rope.freq_base")?;
    let global_scale = opt_f("rope.scaling.factor").unwrap_or(1.0);
    let layers = (0..layer_count(f, a)?)
        .map(|i| {
            if is_global(i) {
                LayerSpec { rope_base: global_base, rope_scale: global_scale, window: None }
            } else {
                LayerSpec { rope_base: LOCAL_ROPE_BASE, rope_scale: 1.0, window: Some(window) }
            }
        })
        .collect();
    let hidden_size = meta_count(f, a, "embedding_length", sizes::MAX_HIDDEN)?;
    let spec = DecoderSpec {
        arch: a.into(),
        vocab_size: vocab_size(f)?,
        hidden_size,
        intermediate_size: meta_count(f, a, "feed_forward_length", sizes::MAX_FFN)?,
        n_heads: meta_count(f, a, "attention.head_count", sizes::MAX_HEADS)?,
        n_kv_heads: meta_count(f, a, "attention.head_count_kv", sizes::MAX_HEADS)?,
        head_dim,
        norm_eps: f.meta_f64("gemma3.attention.layer_norm_rms_epsilon")?,
        norm: NormPlacement::Sandwich,
        qk_norm: true,
        qkv_bias: false,
        rope_layout: RopeLayout::Halves,
        layers,
        activation: GatedActivation::GeluTanh,
        embed_scale: Some((hidden_size as f32).sqrt()),
        // query_pre_attn_scalar = head_dim for every released Gemma 3.
        attn_scale: (head_dim as f64).powf(-0.5),
        attn_softcap: opt_f("attn_logit_softcapping").filter(|&c| c > 0.0),
        final_softcap: opt_f("final_logit_softcapping").filter(|&c| c > 0.0),
        context_length: meta_count(f, a, "context_length", sizes::MAX_CONTEXT)?,
    };
    spec.validate()?;
    Ok(spec)
}
