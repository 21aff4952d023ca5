//! The encoder-decoder Transformer of "Attention Is All You Need" (2017).
//!
//! Parameter names are PyTorch's (`torch.nn.Transformer` inside a module
//! with `src_embed`, `tgt_embed` and `generator`), so a state_dict saved as
//! safetensors loads directly:
//!
//! ```text
//! src_embed.weight  tgt_embed.weight  generator.{weight,bias}
//! transformer.encoder.layers.{i}.self_attn.{in_proj_weight,in_proj_bias,out_proj.*}
//! transformer.encoder.layers.{i}.{linear1,linear2,norm1,norm2}.*   transformer.encoder.norm.*
//! transformer.decoder.layers.{i}.{self_attn,multihead_attn}.*
//! transformer.decoder.layers.{i}.{linear1,linear2,norm1,norm2,norm3}.*   transformer.decoder.norm.*
//! ```
//!
//! The encoder runs once per source ([`Transformer::encode`]); decoding
//! either scores a whole target at once ([`Transformer::decode`], teacher
//! forcing) or goes token by token ([`Transformer::decode_step`]) with
//! self-attention keys/values cached and cross-attention keys/values
//! projected once per source.

use attn_nn::{
    causal_mask, combine_masks, padding_mask, positions, Activation, AttentionConfig, ContiguousKvCache, CrossKv,
    Dropout, Error, FeedForward, FfnKind, FfnNames, Init, KvCache, LayerNorm, Linear, MultiHeadAttention, Norm,
    OutputHead, Residual, Result, SinusoidalPositionalEncoding, TokenEmbedding, Weights,
};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

fn default_dropout() -> f32 {
    0.1
}
fn default_activation() -> String {
    "relu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_max_len() -> usize {
    1024
}
fn default_true() -> bool {
    true
}

/// Hyper-parameters of the encoder-decoder Transformer. The defaults of the
/// optional fields are the 2017 paper's (post-norm, ReLU, dropout 0.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    pub src_vocab_size: usize,
    pub tgt_vocab_size: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_encoder_layers: usize,
    pub n_decoder_layers: usize,
    pub d_ff: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f32,
    /// One embedding table for source and target (needs equal vocabularies).
    #[serde(default)]
    pub share_embeddings: bool,
    /// The generator reuses the target embedding as its weight.
    #[serde(default)]
    pub tie_output: bool,
    /// LayerNorm after the last encoder and decoder layer (as `nn.Transformer`).
    #[serde(default = "default_true")]
    pub final_norms: bool,
    /// Pre-norm residuals instead of the paper's post-norm "Add & Norm".
    #[serde(default)]
    pub norm_first: bool,
    /// FFN activation: relu, gelu, gelu_tanh or silu.
    #[serde(default = "default_activation")]
    pub activation: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Longest source or target the positional table covers.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub pad_id: u32,
    #[serde(default = "bos_default")]
    pub bos_id: u32,
    #[serde(default = "eos_default")]
    pub eos_id: u32,
}

fn bos_default() -> u32 {
    1
}
fn eos_default() -> u32 {
    2
}

impl TransformerConfig {
    /// The base model of the paper for the given vocabularies.
    pub fn base(src_vocab_size: usize, tgt_vocab_size: usize) -> Self {
        TransformerConfig {
            src_vocab_size,
            tgt_vocab_size,
            d_model: 512,
            n_heads: 8,
            n_encoder_layers: 6,
            n_decoder_layers: 6,
            d_ff: 2048,
            dropout: 0.1,
            share_embeddings: false,
            tie_output: false,
            final_norms: true,
            norm_first: false,
            activation: default_activation(),
            layer_norm_eps: 1e-5,
            max_len: 1024,
            pad_id: 0,
            bos_id: 1,
            eos_id: 2,
        }
    }

    /// Checks every field and their consistency; errors name the field.
    pub fn validate(&self) -> Result<()> {
        use crate::sizes::{
            bounded_field, MAX_CONTEXT, MAX_FFN, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_TABLE, MAX_VOCAB,
        };
        let bounded = [
            ("src_vocab_size", self.src_vocab_size, MAX_VOCAB),
            ("tgt_vocab_size", self.tgt_vocab_size, MAX_VOCAB),
            ("d_model", self.d_model, MAX_HIDDEN),
            ("n_heads", self.n_heads, MAX_HEADS),
            ("n_encoder_layers", self.n_encoder_layers, MAX_LAYERS),
            ("n_decoder_layers", self.n_decoder_layers, MAX_LAYERS),
            ("d_ff", self.d_ff, MAX_FFN),
            ("max_len", self.max_len, MAX_CONTEXT),
        ];
        for (field, v, max) in bounded {
            bounded_field(field, v, max)?;
        }
        // The sinusoidal table holds max_len x d_model values.
        if self.max_len.saturating_mul(self.d_model) > MAX_TABLE {
            return Err(Error::config(
                "max_len",
                format!(
                    "= {} needs a position table of more than {MAX_TABLE} values at d_model {}",
                    self.max_len, self.d_model
                ),
            ));
        }
        if self.d_model % self.n_heads != 0 {
            return Err(Error::config(
                "d_model",
                format!("({}) must be divisible by n_heads ({})", self.d_model, self.n_heads),
            ));
        }
        if self.d_model % 2 != 0 {
            return Err(Error::config(
                "d_model",
                format!("must be even for sinusoidal positions, got {}", self.d_model),
            ));
        }
        if self.share_embeddings && self.src_vocab_size != self.tgt_vocab_size {
            return Err(Error::config(
                "share_embeddings",
                format!("needs equal vocabularies, got {} and {}", self.src_vocab_size, self.tgt_vocab_size),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config("dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        if !(self.layer_norm_eps > 0.0) {
            return Err(Error::config("layer_norm_eps", "must be positive"));
        }
        Activation::from_name(&self.activation)?;
        for (field, id) in [("pad_id", self.pad_id), ("bos_id", self.bos_id), ("eos_id", self.eos_id)] {
            if id as usize >= self.tgt_vocab_size {
                return Err(Error::config(field, format!("{id} is outside the target vocabulary")));
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// `nn.MultiheadAttention` weights: q, k, v packed in `in_proj_weight`.
fn load_torch_mha(w: &Weights, d: usize, n_heads: usize, dropout: f32) -> Result<MultiHeadAttention> {
    let in_w = w.get_with_init(&[3 * d, d], "in_proj_weight", Init::xavier_uniform(d, d))?;
    let in_b = w.get_with_init(&[3 * d], "in_proj_bias", Init::Zeros)?;
    let part = |i: usize| -> Result<Linear> { Linear::new(in_w.narrow(0, i * d, d)?, Some(in_b.narrow(0, i * d, d)?)) };
    let out = Linear::load(&w.pp("out_proj"), d, d, true)?;
    let cfg = AttentionConfig { dropout, ..AttentionConfig::mha(d, n_heads) };
    MultiHeadAttention::new(cfg, part(0)?, part(1)?, part(2)?, out)
}

fn residual(norm: LayerNorm, norm_first: bool) -> Residual {
    if norm_first {
        Residual::Pre(Norm::Layer(norm))
    } else {
        Residual::Post(Norm::Layer(norm))
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: MultiHeadAttention,
    ffn: FeedForward,
    res_attn: Residual,
    res_ffn: Residual,
    dropout: Dropout,
}

impl EncoderLayer {
    fn load(w: &Weights, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.d_model;
        let act = Activation::from_name(&cfg.activation)?;
        let ln = |name: &str| LayerNorm::load(&w.pp(name), d, cfg.layer_norm_eps, true);
        Ok(EncoderLayer {
            self_attn: load_torch_mha(&w.pp("self_attn"), d, cfg.n_heads, cfg.dropout)?,
            ffn: FeedForward::load(w, d, cfg.d_ff, FfnKind::Plain(act), FfnNames::TORCH, true, cfg.dropout)?,
            res_attn: residual(ln("norm1")?, cfg.norm_first),
            res_ffn: residual(ln("norm2")?, cfg.norm_first),
            dropout: Dropout::new(cfg.dropout)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let x = self
            .res_attn
            .forward(x, |h| self.dropout.forward(&self.self_attn.forward(h, mask, None, None, train)?, train))?;
        self.res_ffn.forward(&x, |h| self.dropout.forward(&self.ffn.forward(h, train)?, train))
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: MultiHeadAttention,
    cross_attn: MultiHeadAttention,
    ffn: FeedForward,
    res_self: Residual,
    res_cross: Residual,
    res_ffn: Residual,
    dropout: Dropout,
}

impl DecoderLayer {
    fn load(w: &Weights, cfg: &TransformerConfig) -> Result<Self> {
        let d = cfg.d_model;
        let act = Activation::from_name(&cfg.activation)?;
        let ln = |name: &str| LayerNorm::load(&w.pp(name), d, cfg.layer_norm_eps, true);
        Ok(DecoderLayer {
            self_attn: load_torch_mha(&w.pp("self_attn"), d, cfg.n_heads, cfg.dropout)?,
            cross_attn: load_torch_mha(&w.pp("multihead_attn"), d, cfg.n_heads, cfg.dropout)?,
            ffn: FeedForward::load(w, d, cfg.d_ff, FfnKind::Plain(act), FfnNames::TORCH, true, cfg.dropout)?,
            res_self: residual(ln("norm1")?, cfg.norm_first),
            res_cross: residual(ln("norm2")?, cfg.norm_first),
            res_ffn: residual(ln("norm3")?, cfg.norm_first),
            dropout: Dropout::new(cfg.dropout)?,
        })
    }

    fn forward(
        &self,
        y: &Tensor,
        self_mask: Option<&Tensor>,
        cache: Option<&mut ContiguousKvCache>,
        cross: &CrossKv,
        cross_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let cache = cache.map(|c| c as &mut dyn KvCache);
        let y = self
            .res_self
            .forward(y, |h| self.dropout.forward(&self.self_attn.forward(h, self_mask, None, cache, train)?, train))?;
        let y = self.res_cross.forward(&y, |h| {
            self.dropout.forward(&self.cross_attn.forward_cross(h, cross, cross_mask, train)?, train)
        })?;
        self.res_ffn.forward(&y, |h| self.dropout.forward(&self.ffn.forward(h, train)?, train))
    }
}

/// The encoder's output for a batch of sources: computed once, reused by
/// every decoding step.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// `[batch, src_len, d_model]`.
    pub memory: Tensor,
    /// Additive key-padding mask `[batch, 1, 1, src_len]` of the source.
    pub mask: Option<Tensor>,
}

/// Incremental decoding state of a batch: per-layer self-attention caches
/// and the cross-attention keys/values of the source.
#[derive(Debug, Clone)]
pub struct DecoderState {
    self_caches: Vec<ContiguousKvCache>,
    cross: Vec<CrossKv>,
    memory_mask: Option<Tensor>,
}

impl DecoderState {
    /// Number of target tokens decoded so far.
    pub fn len(&self) -> usize {
        self.self_caches.first().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reorders the batch (beam search): row `i` becomes old row `indices[i]`.
    pub fn reorder(&mut self, indices: &Tensor) -> Result<()> {
        for c in &mut self.self_caches {
            c.reorder(indices)?;
        }
        for kv in &mut self.cross {
            kv.k = kv.k.index_select(indices, 0)?;
            kv.v = kv.v.index_select(indices, 0)?;
        }
        if let Some(m) = &self.memory_mask {
            self.memory_mask = Some(m.index_select(indices, 0)?);
        }
        Ok(())
    }

    /// Drops decoded positions from `len` on.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        for c in &mut self.self_caches {
            c.truncate(len)?;
        }
        Ok(())
    }
}

/// The encoder-decoder Transformer.
#[derive(Debug, Clone)]
pub struct Transformer {
    cfg: TransformerConfig,
    src_embed: TokenEmbedding,
    tgt_embed: TokenEmbedding,
    positions: SinusoidalPositionalEncoding,
    encoder: Vec<EncoderLayer>,
    encoder_norm: Option<LayerNorm>,
    decoder: Vec<DecoderLayer>,
    decoder_norm: Option<LayerNorm>,
    generator: OutputHead,
    dropout: Dropout,
}

impl Transformer {
    /// Builds the model from `w` (a file's weights, or a trainable store
    /// that initialises what it does not have).
    pub fn load(w: &Weights, cfg: &TransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.d_model;
        let src_embed = TokenEmbedding::load(&w.pp("src_embed"), cfg.src_vocab_size, d, true)?;
        let tgt_embed = if cfg.share_embeddings {
            src_embed.clone()
        } else {
            TokenEmbedding::load(&w.pp("tgt_embed"), cfg.tgt_vocab_size, d, true)?
        };
        let t = w.pp("transformer");
        let encoder = (0..cfg.n_encoder_layers)
            .map(|i| EncoderLayer::load(&t.pp("encoder.layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..cfg.n_decoder_layers)
            .map(|i| DecoderLayer::load(&t.pp("decoder.layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let (encoder_norm, decoder_norm) = if cfg.final_norms {
            (
                Some(LayerNorm::load(&t.pp("encoder.norm"), d, cfg.layer_norm_eps, true)?),
                Some(LayerNorm::load(&t.pp("decoder.norm"), d, cfg.layer_norm_eps, true)?),
            )
        } else {
            (None, None)
        };
        let g = w.pp("generator");
        let gen_bias = g.get_with_init(&[cfg.tgt_vocab_size], "bias", Init::Zeros)?;
        let gen_weight = if cfg.tie_output {
            tgt_embed.table().clone()
        } else {
            g.get_with_init(&[cfg.tgt_vocab_size, d], "weight", Init::xavier_uniform(cfg.tgt_vocab_size, d))?
        };
        Ok(Transformer {
            cfg: cfg.clone(),
            src_embed,
            tgt_embed,
            positions: SinusoidalPositionalEncoding::new(cfg.max_len, d, w.dtype(), w.device())?,
            encoder,
            encoder_norm,
            decoder,
            decoder_norm,
            generator: OutputHead::new(Linear::new(gen_weight, Some(gen_bias))?),
            dropout: Dropout::new(cfg.dropout)?,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Token embedding scaled by sqrt(d_model) plus sinusoidal positions
    /// starting at `offset`, then dropout.
    fn embed(&self, table: &TokenEmbedding, ids: &Tensor, offset: usize, train: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2().map_err(|_| {
            Error::input("transformer", format!("token ids must be [batch, seq], got {:?}", ids.dims()))
        })?;
        if offset + t > self.cfg.max_len {
            return Err(Error::input(
                "transformer",
                format!("sequence of {} tokens exceeds max_len {}", offset + t, self.cfg.max_len),
            ));
        }
        let pos = positions(b, t, offset, ids.device())?;
        let x = table.forward(ids)?.broadcast_add(&self.positions.forward(&pos)?)?;
        self.dropout.forward(&x, train)
    }

    /// Runs the encoder over `src` `[batch, src_len]` (u32 ids). `src_valid`
    /// `[batch, src_len]` is nonzero at real tokens; padded keys are masked.
    pub fn encode(&self, src: &Tensor, src_valid: Option<&Tensor>, train: bool) -> Result<EncoderOutput> {
        let mask = src_valid.map(padding_mask).transpose()?;
        let mut x = self.embed(&self.src_embed, src, 0, train)?;
        for layer in &self.encoder {
            x = layer.forward(&x, mask.as_ref(), train)?;
        }
        if let Some(n) = &self.encoder_norm {
            x = n.forward(&x)?;
        }
        Ok(EncoderOutput { memory: x, mask })
    }

    /// Decoder hidden states for a whole target `[batch, tgt_len]` at once
    /// (teacher forcing), with causal and optional target padding masks.
    pub fn decode_hidden(
        &self,
        tgt: &Tensor,
        enc: &EncoderOutput,
        tgt_valid: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let (_, t) = tgt.dims2()?;
        let causal = causal_mask(t, t, None, tgt.device())?;
        let pad = tgt_valid.map(padding_mask).transpose()?;
        let self_mask = combine_masks(Some(&causal), pad.as_ref())?;
        let mut y = self.embed(&self.tgt_embed, tgt, 0, train)?;
        for layer in &self.decoder {
            let cross = layer.cross_attn.cross_kv(&enc.memory)?;
            y = layer.forward(&y, self_mask.as_ref(), None, &cross, enc.mask.as_ref(), train)?;
        }
        match &self.decoder_norm {
            Some(n) => n.forward(&y),
            None => Ok(y),
        }
    }

    /// Logits `[batch, tgt_len, tgt_vocab]` for a whole target.
    pub fn decode(&self, tgt: &Tensor, enc: &EncoderOutput, tgt_valid: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.generator.logits(&self.decode_hidden(tgt, enc, tgt_valid, train)?)
    }

    /// Logits for source/target pairs in one call (training, scoring).
    pub fn forward(
        &self,
        src: &Tensor,
        tgt: &Tensor,
        src_valid: Option<&Tensor>,
        tgt_valid: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let enc = self.encode(src, src_valid, train)?;
        self.decode(tgt, &enc, tgt_valid, train)
    }

    /// Prepares incremental decoding: projects the cross-attention keys and
    /// values of every decoder layer once.
    pub fn start_decoding(&self, enc: &EncoderOutput) -> Result<DecoderState> {
        Ok(DecoderState {
            self_caches: vec![ContiguousKvCache::new(); self.decoder.len()],
            cross: self.decoder.iter().map(|l| l.cross_attn.cross_kv(&enc.memory)).collect::<Result<_>>()?,
            memory_mask: enc.mask.clone(),
        })
    }

    /// Feeds the next `tokens` `[batch, t]` (usually t = 1) of every target
    /// and returns their logits `[batch, t, tgt_vocab]`.
    pub fn decode_step(&self, tokens: &Tensor, state: &mut DecoderState) -> Result<Tensor> {
        let (_, t) = tokens.dims2()?;
        let past = state.len();
        let mask = causal_mask(t, past + t, None, tokens.device())?;
        let mut y = self.embed(&self.tgt_embed, tokens, past, false)?;
        for (i, layer) in self.decoder.iter().enumerate() {
            let cache = &mut state.self_caches[i];
            y = layer.forward(&y, Some(&mask), Some(cache), &state.cross[i], state.memory_mask.as_ref(), false)?;
        }
        if let Some(n) = &self.decoder_norm {
            y = n.forward(&y)?;
        }
        self.generator.logits(&y)
    }

    /// Log-probabilities (f32) from logits.
    pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, candle_core::D::Minus1)?)
    }
}

impl crate::lm::SequenceCache for DecoderState {
    fn len(&self) -> usize {
        DecoderState::len(self)
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        DecoderState::truncate(self, len)
    }
}

/// The decoder of a [`Transformer`] conditioned on one encoded source: a
/// causal language model over target tokens, so the engine's greedy,
/// sampling and beam search drive the 2017 model like any other.
pub struct ConditionedDecoder<'a> {
    model: &'a Transformer,
    enc: EncoderOutput,
}

impl<'a> ConditionedDecoder<'a> {
    /// `enc` must hold a single source (batch 1); each hypothesis gets its
    /// own cache from [`crate::LanguageModel::new_cache`].
    pub fn new(model: &'a Transformer, enc: EncoderOutput) -> Result<Self> {
        let b = enc.memory.dim(0)?;
        if b != 1 {
            return Err(Error::input("conditioned decoder", format!("expects one encoded source, got {b}")));
        }
        Ok(ConditionedDecoder { model, enc })
    }
}

impl crate::lm::LanguageModel for ConditionedDecoder<'_> {
    type Cache = DecoderState;

    fn new_cache(&self) -> Result<DecoderState> {
        self.model.start_decoding(&self.enc)
    }

    fn vocab_size(&self) -> usize {
        self.model.cfg.tgt_vocab_size
    }

    fn context_length(&self) -> usize {
        self.model.cfg.max_len
    }

    fn forward(
        &self,
        batch: &mut [crate::lm::SeqStep<'_, DecoderState>],
        logits: crate::lm::Logits,
    ) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            if s.tokens.is_empty() {
                return Err(Error::input("conditioned decoder", "a sequence in the batch has no new tokens"));
            }
            let ids = Tensor::new(s.tokens, self.enc.memory.device())?.unsqueeze(0)?;
            let l = self.model.decode_step(&ids, s.cache)?.squeeze(0)?.to_dtype(DType::F32)?;
            out.push(match logits {
                crate::lm::Logits::Last => l.get(s.tokens.len() - 1)?,
                crate::lm::Logits::All => l,
            });
        }
        Ok(out)
    }
}
