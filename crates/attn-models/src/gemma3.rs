//! Gemma 3 (decoder-only), from a GGUF file.
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

use std::sync::Arc;

use attn_nn::{
    Activation, AttentionConfig, Dropout, Error, FeedForward, KvShape, Linear, MultiHeadAttention, Norm, PagedCache,
    Residual, Result, RmsNorm, RopeLayout, RotaryEmbedding,
};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::gemma3_fast::FastGemma3;
use crate::gguf::GgufFile;
use crate::lm::{
    KvStore, LanguageModel, LayerCaches, Logits, PagedLanguageModel, SeqStep, SequenceCache, SliceKvStore,
};

/// Hyper-parameters of a Gemma 3 model.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE base of the full-attention layers.
    pub rope_global_base: f64,
    /// RoPE base of the sliding-window layers.
    pub rope_local_base: f64,
    /// Linear RoPE scaling factor of the global layers (1 = none).
    pub rope_global_scale: f64,
    pub sliding_window: usize,
    /// Every `sliding_window_pattern`-th layer is a full-attention layer.
    pub sliding_window_pattern: usize,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5`.
    pub query_pre_attn_scalar: f64,
    pub final_logit_softcap: Option<f64>,
    pub attn_logit_softcap: Option<f64>,
    pub context_length: usize,
}

impl Gemma3Config {
    /// Reads the `gemma3.*` metadata of a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.meta_str("general.architecture")?;
        if arch != "gemma3" {
            return Err(Error::Unsupported(format!("architecture `{arch}` is not gemma3")));
        }
        let u = |k: &str| f.meta_u64(&format!("gemma3.{k}")).map(|v| v as usize);
        let opt_f = |k: &str| f.meta_opt(&format!("gemma3.{k}")).and_then(|v| v.as_f64());
        let n_heads = u("attention.head_count")?;
        let head_dim = u("attention.key_length")?;
        let vocab_size = match f.meta_opt("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            Some(tokens) => tokens.len(),
            None => f
                .tensor_info("token_embd.weight")
                .map(|t| t.shape()[0])
                .ok_or_else(|| Error::MissingTensor { name: "token_embd.weight".into() })?,
        };
        let cfg = Gemma3Config {
            vocab_size,
            hidden_size: u("embedding_length")?,
            intermediate_size: u("feed_forward_length")?,
            n_layers: u("block_count")?,
            n_heads,
            n_kv_heads: u("attention.head_count_kv")?,
            head_dim,
            rms_norm_eps: f.meta_f64("gemma3.attention.layer_norm_rms_epsilon")?,
            rope_global_base: f.meta_f64("gemma3.rope.freq_base")?,
            // Not stored in the GGUF; HF transformers' Gemma 3 default.
            rope_local_base: 10_000.0,
            rope_global_scale: opt_f("rope.scaling.factor").unwrap_or(1.0),
            sliding_window: u("attention.sliding_window")?,
            // llama.cpp and HF both use five local layers then one global.
            sliding_window_pattern: 6,
            query_pre_attn_scalar: head_dim as f64,
            final_logit_softcap: opt_f("final_logit_softcapping").filter(|&c| c > 0.0),
            attn_logit_softcap: opt_f("attn_logit_softcapping").filter(|&c| c > 0.0),
            context_length: u("context_length")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        AttentionConfig { ..self.attention(false) }.validate()?;
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layers", self.n_layers),
            ("sliding_window", self.sliding_window),
            ("sliding_window_pattern", self.sliding_window_pattern),
            ("context_length", self.context_length),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        if !(self.rope_global_scale >= 1.0) {
            return Err(Error::config("rope_global_scale", format!("must be >= 1, got {}", self.rope_global_scale)));
        }
        Ok(())
    }

    /// Whether layer `i` attends globally (otherwise within the sliding window).
    pub fn is_global(&self, layer: usize) -> bool {
        (layer + 1) % self.sliding_window_pattern == 0
    }

    fn attention(&self, _global: bool) -> AttentionConfig {
        AttentionConfig {
            d_model: self.hidden_size,
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            qkv_bias: false,
            out_bias: false,
            scale: Some(self.query_pre_attn_scalar.powf(-0.5)),
            softcap: self.attn_logit_softcap,
            dropout: 0.0,
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn: MultiHeadAttention,
    ffn: FeedForward,
    res_attn: Residual,
    res_ffn: Residual,
    window: Option<usize>,
}

/// Gemma 3 with quantized weights, computed by one of two paths.
#[derive(Debug, Clone)]
pub struct Gemma3 {
    cfg: Gemma3Config,
    body: Body,
    device: Device,
}

#[derive(Debug, Clone)]
enum Body {
    /// candle tensors and ops: the reference path (and the only one for
    /// dequantized f32 weights).
    Candle(CandleGemma3),
    /// Plain buffers, fused kernels, 8-bit block matmuls
    /// ([`crate::gemma3_fast`]): the default for inference.
    Fused(Arc<FastGemma3>),
}

#[derive(Debug, Clone)]
struct CandleGemma3 {
    embed: Arc<QTensor>,
    embed_scale: f64,
    layers: Vec<Layer>,
    final_norm: RmsNorm,
    lm_head: Linear,
}

/// The per-sequence KV cache of every layer.
pub type Gemma3Cache = LayerCaches;

impl Gemma3 {
    /// Loads a Gemma 3 GGUF for inference: the fused path, unless the file
    /// is opened with `dequantize` or `candle_kernels` (then candle's).
    pub fn from_gguf(f: &GgufFile, device: &Device) -> Result<Self> {
        if f.dequantize || f.candle_kernels || !device.is_cpu() {
            return Self::from_gguf_candle(f, device);
        }
        let cfg = Gemma3Config::from_gguf(f)?;
        let fused = FastGemma3::from_gguf(f, &cfg)?;
        Ok(Gemma3 { cfg, body: Body::Fused(Arc::new(fused)), device: device.clone() })
    }

    /// Loads a Gemma 3 GGUF onto candle tensors, keeping matrices in their
    /// quantized types (or f32 when the file is opened with `dequantize`).
    pub fn from_gguf_candle(f: &GgufFile, device: &Device) -> Result<Self> {
        let cfg = Gemma3Config::from_gguf(f)?;
        let (d, h) = (cfg.hidden_size, cfg.head_dim);
        let rms = |name: &str, dim: usize| -> Result<RmsNorm> {
            Ok(RmsNorm::new(f.dense(name, &[dim], device)?, cfg.rms_norm_eps, false))
        };
        // One table per base covers the whole context.
        let max_pos = cfg.context_length;
        let rope_local = RotaryEmbedding::new(cfg.rope_local_base, h, max_pos, RopeLayout::Halves, DType::F32, device)?;
        let rope_global = RotaryEmbedding::new_scaled(
            cfg.rope_global_base,
            cfg.rope_global_scale,
            h,
            max_pos,
            RopeLayout::Halves,
            DType::F32,
            device,
        )?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let global = cfg.is_global(i);
            let attn = MultiHeadAttention::new(
                cfg.attention(global),
                f.linear(&p("attn_q.weight"), cfg.n_heads * h, d, device)?,
                f.linear(&p("attn_k.weight"), cfg.n_kv_heads * h, d, device)?,
                f.linear(&p("attn_v.weight"), cfg.n_kv_heads * h, d, device)?,
                f.linear(&p("attn_output.weight"), d, cfg.n_heads * h, device)?,
            )?
            .with_rope(if global { rope_global.clone() } else { rope_local.clone() })
            .with_qk_norm(rms(&p("attn_q_norm.weight"), h)?, rms(&p("attn_k_norm.weight"), h)?);
            let ffn = FeedForward::new(
                Some(f.linear(&p("ffn_gate.weight"), cfg.intermediate_size, d, device)?),
                f.linear(&p("ffn_up.weight"), cfg.intermediate_size, d, device)?,
                f.linear(&p("ffn_down.weight"), d, cfg.intermediate_size, device)?,
                Activation::GeluTanh,
                Dropout::new(0.0)?,
            )?;
            layers.push(Layer {
                attn,
                ffn,
                res_attn: Residual::Sandwich {
                    pre: Norm::Rms(rms(&p("attn_norm.weight"), d)?),
                    post: Norm::Rms(rms(&p("post_attention_norm.weight"), d)?),
                },
                res_ffn: Residual::Sandwich {
                    pre: Norm::Rms(rms(&p("ffn_norm.weight"), d)?),
                    post: Norm::Rms(rms(&p("post_ffw_norm.weight"), d)?),
                },
                window: (!global).then_some(cfg.sliding_window),
            });
        }
        let embed = f.qtensor_checked("token_embd.weight", &[cfg.vocab_size, d], device)?;
        // The output projection is tied to the embedding unless the file has its own.
        let lm_head = if f.tensor_info("output.weight").is_some() {
            f.linear("output.weight", cfg.vocab_size, d, device)?
        } else if f.dequantize {
            Linear::new(embed.dequantize(device)?, None)?
        } else {
            Linear::from_qtensor(embed.clone(), None)?
        };
        let body = CandleGemma3 {
            embed_scale: (d as f32).sqrt() as f64,
            final_norm: rms("output_norm.weight", d)?,
            embed,
            layers,
            lm_head,
        };
        Ok(Gemma3 { cfg, body: Body::Candle(body), device: device.clone() })
    }

    /// Whether this model runs on the fused path.
    pub fn is_fused(&self) -> bool {
        matches!(self.body, Body::Fused(_))
    }

    /// Bytes of weights a decode step reads, when known (fused path).
    pub fn decode_weight_bytes(&self) -> Option<usize> {
        match &self.body {
            Body::Fused(f) => Some(f.weight_bytes()),
            Body::Candle(_) => None,
        }
    }

    /// The same model with every matrix in 8-bit blocks and the batched
    /// kernel of `attn_nn::q8`, whose cost per step barely grows with the
    /// number of sequences (serving). Logits move by the 8-bit rounding of
    /// weights and activations; a sequence's logits do not depend on the rest
    /// of the batch.
    ///
    /// The fused path already works this way and is returned as is.
    pub fn for_batched_serving(&self) -> Result<Self> {
        let c = match &self.body {
            Body::Fused(_) => return Ok(self.clone()),
            Body::Candle(c) => c,
        };
        let f = |l: &Linear| l.to_q8();
        let layers = c
            .layers
            .iter()
            .map(|l| Ok(Layer { attn: l.attn.map_linears(&f)?, ffn: l.ffn.map_linears(&f)?, ..l.clone() }))
            .collect::<Result<Vec<_>>>()?;
        let body = CandleGemma3 { layers, lm_head: c.lm_head.to_q8()?, ..c.clone() };
        Ok(Gemma3 { body: Body::Candle(body), ..self.clone() })
    }

    /// The output projection alone (for profiling the candle path).
    #[doc(hidden)]
    pub fn lm_head_for_bench(&self, x: &Tensor) -> Result<Tensor> {
        match &self.body {
            Body::Candle(c) => c.lm_head.forward(x),
            Body::Fused(_) => Err(Error::Unsupported("lm_head_for_bench profiles the candle path".into())),
        }
    }

    pub fn config(&self) -> &Gemma3Config {
        &self.cfg
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::input(
                "gemma3",
                format!("token id {bad} outside the vocabulary of {}", self.cfg.vocab_size),
            ));
        }
        Ok(())
    }
}

impl LanguageModel for Gemma3 {
    type Cache = Gemma3Cache;

    fn new_cache(&self) -> Result<Gemma3Cache> {
        Ok(LayerCaches::new(self.cfg.n_layers))
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn context_length(&self) -> usize {
        self.cfg.context_length
    }

    fn forward(&self, batch: &mut [SeqStep<'_, Gemma3Cache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.forward_kv(batch, logits)
    }
}

impl PagedLanguageModel for Gemma3 {
    fn kv_shape(&self) -> KvShape {
        KvShape { n_layers: self.cfg.n_layers, n_kv_heads: self.cfg.n_kv_heads, head_dim: self.cfg.head_dim }
    }

    fn forward_paged(&self, batch: &mut [SeqStep<'_, PagedCache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.forward_kv(batch, logits)
    }
}

impl Gemma3 {
    /// The forward pass over any KV store (contiguous or paged).
    fn forward_kv<C: SequenceCache + KvStore + SliceKvStore>(
        &self,
        batch: &mut [SeqStep<'_, C>],
        logits: Logits,
    ) -> Result<Vec<Tensor>> {
        // All new tokens of all sequences go through the norms, projections
        // and FFNs as one matrix; attention runs per sequence on its cache.
        let mut spans = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        for s in batch.iter() {
            if s.tokens.is_empty() {
                return Err(Error::input("gemma3", "a sequence in the batch has no new tokens"));
            }
            let past = s.cache.len();
            if past + s.tokens.len() > self.cfg.context_length {
                return Err(Error::input(
                    "gemma3",
                    format!("{} tokens exceed the context length {}", past + s.tokens.len(), self.cfg.context_length),
                ));
            }
            spans.push((ids.len(), s.tokens.len(), past));
            ids.extend_from_slice(s.tokens);
        }
        self.check_ids(&ids)?;
        // Rows whose logits are wanted.
        let rows: Vec<usize> = match logits {
            Logits::Last => spans.iter().map(|&(s, l, _)| s + l - 1).collect(),
            Logits::All => (0..ids.len()).collect(),
        };
        let c = match &self.body {
            Body::Candle(c) => c,
            Body::Fused(f) => {
                let mut caches: Vec<&mut C> = batch.iter_mut().map(|s| &mut *s.cache).collect();
                let out = f.forward(&self.cfg, &ids, &spans, &mut caches, &rows)?;
                for (s, &(_, len, _)) in batch.iter_mut().zip(&spans) {
                    s.cache.commit(len)?;
                }
                let vocab = self.cfg.vocab_size;
                let out = Tensor::from_vec(out, (rows.len(), vocab), &self.device)?;
                return match logits {
                    Logits::Last => (0..batch.len()).map(|i| Ok(out.get(i)?)).collect(),
                    Logits::All => spans.iter().map(|&(s, l, _)| Ok(out.narrow(0, s, l)?)).collect(),
                };
            }
        };
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x = (c.embed.embedding(&ids_t)? * c.embed_scale)?.unsqueeze(0)?;
        let positions: Vec<u32> =
            spans.iter().flat_map(|&(_, len, past)| (past as u32)..((past + len) as u32)).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?.unsqueeze(0)?;
        let token_spans: Vec<(usize, usize)> = spans.iter().map(|&(start, len, _)| (start, len)).collect();
        for (li, layer) in c.layers.iter().enumerate() {
            x = layer.res_attn.forward(&x, |h| {
                layer.attn.forward_spans(h, &positions, &token_spans, layer.window, |i, q, k, v, spec| {
                    batch[i].cache.attend(li, q, k, v, spec)
                })
            })?;
            x = layer.res_ffn.forward(&x, |h| layer.ffn.forward(h, false))?;
        }
        for (s, &(_, len, _)) in batch.iter_mut().zip(&spans) {
            s.cache.commit(len)?;
        }
        // Only the rows whose logits are wanted go through the norm and the
        // (large) output projection.
        let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let rows_t = Tensor::new(rows.as_slice(), &self.device)?;
        let h = c.final_norm.forward(&x.squeeze(0)?.index_select(&rows_t, 0)?)?;
        let mut out = c.lm_head.forward(&h)?.to_dtype(DType::F32)?;
        if let Some(cap) = self.cfg.final_logit_softcap {
            out = ((out / cap)?.tanh()? * cap)?;
        }
        match logits {
            Logits::Last => (0..batch.len()).map(|i| Ok(out.get(i)?)).collect(),
            Logits::All => spans.iter().map(|&(s, l, _)| Ok(out.narrow(0, s, l)?)).collect(),
        }
    }
}
