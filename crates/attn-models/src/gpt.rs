//! A GPT-style decoder-only language model that attn trains from scratch:
//! token embedding, N pre-norm blocks (RMSNorm -> causal self-attention with
//! RoPE -> residual, RMSNorm -> FFN or MoE -> residual), final RMSNorm and
//! an LM head tied to the embedding. MHA, GQA and MQA by `n_kv_heads`; a
//! Mixture-of-Experts FFN on every `moe.every`-th layer.
//!
//! Parameter names: `embed.weight`, `layers.{i}.attn_norm.weight`,
//! `layers.{i}.attn.{q,k,v,o}_proj.weight`, `layers.{i}.ffn_norm.weight`,
//! `layers.{i}.ffn.{gate,up,down}_proj.weight` (or
//! `layers.{i}.moe.gate.weight` + `layers.{i}.moe.experts.{e}.{w1,w2,w3}.weight`),
//! `norm.weight`, and `lm_head.weight` when the head is untied.

use attn_nn::{
    causal_mask, positions, Activation, AttentionConfig, Dropout, Error, FeedForward, FfnKind, FfnNames, Init, KvShape,
    Linear, MoeFeedForward, MultiHeadAttention, PagedCache, Result, RmsNorm, RopeLayout, RotaryEmbedding,
    TokenEmbedding, Weights,
};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::lm::{KvStore, LanguageModel, LayerCaches, Logits, PagedLanguageModel, SeqStep, SequenceCache};

fn default_rope_base() -> f64 {
    10_000.0
}
fn default_activation() -> String {
    "gelu".into()
}
fn default_true() -> bool {
    true
}
fn default_eps() -> f64 {
    1e-5
}
fn default_every() -> usize {
    1
}
fn default_aux() -> f64 {
    0.01
}

/// Mixture-of-Experts FFN layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    pub n_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Every `every`-th layer (counting from the first) gets the MoE FFN.
    #[serde(default = "default_every")]
    pub every: usize,
    /// Weight of the load-balancing loss added to the training loss.
    #[serde(default = "default_aux")]
    pub aux_loss_coef: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GptConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Key/value heads (GQA/MQA); `n_heads` when absent.
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    pub d_ff: usize,
    /// Longest sequence (context length).
    pub max_len: usize,
    #[serde(default)]
    pub dropout: f32,
    #[serde(default = "default_rope_base")]
    pub rope_base: f64,
    /// FFN activation: gelu, gelu_tanh, relu or silu.
    #[serde(default = "default_activation")]
    pub activation: String,
    /// Gated FFN (`down(act(gate x) * up x)`, SwiGLU with silu).
    #[serde(default)]
    pub gated: bool,
    #[serde(default = "default_true")]
    pub tie_embeddings: bool,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub moe: Option<MoeConfig>,
    /// Token that starts every sequence, if the tokenizer has one.
    #[serde(default)]
    pub bos_id: Option<u32>,
    /// Token that ends generation, if any.
    #[serde(default)]
    pub eos_id: Option<u32>,
}

impl GptConfig {
    /// Checks every field and their consistency; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let pos = |field: &str, v: usize| -> Result<()> {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
            Ok(())
        };
        use crate::sizes::{
            bounded_field, MAX_CONTEXT, MAX_EXPERTS, MAX_FFN, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_TABLE, MAX_VOCAB,
        };
        bounded_field("vocab_size", self.vocab_size, MAX_VOCAB)?;
        bounded_field("d_model", self.d_model, MAX_HIDDEN)?;
        bounded_field("n_layers", self.n_layers, MAX_LAYERS)?;
        bounded_field("n_heads", self.n_heads, MAX_HEADS)?;
        bounded_field("d_ff", self.d_ff, MAX_FFN)?;
        bounded_field("max_len", self.max_len, MAX_CONTEXT)?;
        if let Some(kv) = self.n_kv_heads {
            bounded_field("n_kv_heads", kv, MAX_HEADS)?;
        }
        if let Some(m) = &self.moe {
            bounded_field("moe.n_experts", m.n_experts, MAX_EXPERTS)?;
        }
        // The RoPE tables hold max_len x head size values.
        if self.max_len.saturating_mul(self.d_model / self.n_heads) > MAX_TABLE {
            return Err(Error::config(
                "max_len",
                format!(
                    "= {} needs RoPE tables of more than {MAX_TABLE} values at d_model {}",
                    self.max_len, self.d_model
                ),
            ));
        }
        if self.d_model % self.n_heads != 0 {
            return Err(Error::config(
                "n_heads",
                format!("must divide d_model ({}), got {}", self.d_model, self.n_heads),
            ));
        }
        if (self.d_model / self.n_heads) % 2 != 0 {
            return Err(Error::config("n_heads", "d_model / n_heads must be even for rotary embeddings"));
        }
        let kv = self.kv_heads();
        if kv == 0 || self.n_heads % kv != 0 {
            return Err(Error::config("n_kv_heads", format!("must divide n_heads ({}), got {kv}", self.n_heads)));
        }
        Dropout::new(self.dropout)?;
        Activation::from_name(&self.activation)?;
        if !(self.norm_eps > 0.0) {
            return Err(Error::config("norm_eps", "must be positive"));
        }
        if let Some(m) = &self.moe {
            if m.n_experts < 2 {
                return Err(Error::config("moe.n_experts", format!("must be at least 2, got {}", m.n_experts)));
            }
            if m.top_k == 0 || m.top_k > m.n_experts {
                return Err(Error::config("moe.top_k", format!("must be in 1..={}, got {}", m.n_experts, m.top_k)));
            }
            pos("moe.every", m.every)?;
            if !(m.aux_loss_coef >= 0.0) {
                return Err(Error::config("moe.aux_loss_coef", "must be >= 0"));
            }
        }
        for (field, id) in [("bos_id", self.bos_id), ("eos_id", self.eos_id)] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Err(Error::config(field, format!("{id} is outside the vocabulary of {}", self.vocab_size)));
                }
            }
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Whether layer `i` uses the MoE FFN.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| i % m.every == 0)
    }
}

#[derive(Debug, Clone)]
enum Ffn {
    Dense(FeedForward),
    Moe(MoeFeedForward),
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: MultiHeadAttention,
    ffn_norm: RmsNorm,
    ffn: Ffn,
}

/// Output of a training forward pass.
pub struct GptOutput {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor,
    /// Router logits `[batch * seq, n_experts]` of every MoE layer.
    pub router_logits: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct Gpt {
    cfg: GptConfig,
    embed: TokenEmbedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
    dropout: Dropout,
}

/// The per-sequence KV cache of every layer.
pub type GptCache = LayerCaches;

impl Gpt {
    /// Builds the model from `w`: a file's weights, or a trainable store
    /// that initialises what it does not have (GPT-2's N(0, 0.02)).
    pub fn load(w: &Weights, cfg: &GptConfig) -> Result<Self> {
        cfg.validate()?;
        let (d, hd) = (cfg.d_model, cfg.head_dim());
        let init = Init::Normal { std: 0.02 };
        let table = w.pp("embed").get_with_init(&[cfg.vocab_size, d], "weight", init)?;
        let embed = TokenEmbedding::new(table.clone(), false)?;
        let rope = RotaryEmbedding::new(cfg.rope_base, hd, cfg.max_len, RopeLayout::Halves, DType::F32, w.device())?;
        let act = Activation::from_name(&cfg.activation)?;
        let kind = if cfg.gated { FfnKind::Gated(act) } else { FfnKind::Plain(act) };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let l = w.pp("layers").pp(i);
            let acfg = AttentionConfig {
                d_model: d,
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.kv_heads(),
                head_dim: hd,
                qkv_bias: false,
                out_bias: false,
                scale: None,
                softcap: None,
                dropout: cfg.dropout,
            };
            let attn = MultiHeadAttention::load(&l.pp("attn"), acfg)?.with_rope(rope.clone());
            let ffn = match &cfg.moe {
                Some(m) if cfg.is_moe_layer(i) => {
                    Ffn::Moe(MoeFeedForward::load(&l.pp("moe"), d, cfg.d_ff, m.n_experts, m.top_k, kind)?)
                }
                _ => Ffn::Dense(FeedForward::load(&l.pp("ffn"), d, cfg.d_ff, kind, FfnNames::HF, false, cfg.dropout)?),
            };
            layers.push(Block {
                attn_norm: RmsNorm::load(&l.pp("attn_norm"), d, cfg.norm_eps, false)?,
                attn,
                ffn_norm: RmsNorm::load(&l.pp("ffn_norm"), d, cfg.norm_eps, false)?,
                ffn,
            });
        }
        let head = if cfg.tie_embeddings {
            Linear::new(table, None)?
        } else {
            Linear::new(w.pp("lm_head").get_with_init(&[cfg.vocab_size, d], "weight", init)?, None)?
        };
        Ok(Gpt {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: RmsNorm::load(&w.pp("norm"), d, cfg.norm_eps, false)?,
            head,
            dropout: Dropout::new(cfg.dropout)?,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    fn check_ids(&self, ids: &Tensor) -> Result<(usize, usize)> {
        let (b, t) = ids
            .dims2()
            .map_err(|_| Error::input("gpt", format!("token ids must be [batch, seq], got {:?}", ids.dims())))?;
        Ok((b, t))
    }

    /// Runs blocks over embedded `x` `[b, t, d]` at `offset` (same for the
    /// whole batch), with optional per-sequence caches (batch 1 each).
    fn blocks(
        &self,
        mut x: Tensor,
        offset: usize,
        mut cache: Option<&mut dyn KvStore>,
        train: bool,
        router_logits: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let mask = if cache.is_none() { Some(causal_mask(t, offset + t, None, x.device())?) } else { None };
        let pos = positions(b, t, offset, x.device())?;
        for (i, l) in self.layers.iter().enumerate() {
            let h = l.attn_norm.forward(&x)?;
            let a = match cache.as_deref_mut() {
                Some(c) => l.attn.forward_with(&h, &pos, None, |q, k, v, spec| c.attend(i, q, k, v, spec))?,
                None => l.attn.forward(&h, mask.as_ref(), Some(&pos), None, train)?,
            };
            x = (x + self.dropout.forward(&a, train)?)?;
            let h = l.ffn_norm.forward(&x)?;
            let f = match &l.ffn {
                Ffn::Dense(f) => f.forward(&h, train)?,
                Ffn::Moe(m) => {
                    let out = m.forward(&h, train)?;
                    router_logits.push(out.router_logits);
                    out.hidden
                }
            };
            x = (x + self.dropout.forward(&f, train)?)?;
        }
        self.norm.forward(&x)
    }

    /// Logits for whole sequences `ids` `[batch, seq]` (training, scoring).
    pub fn forward(&self, ids: &Tensor, train: bool) -> Result<GptOutput> {
        let (_, t) = self.check_ids(ids)?;
        if t > self.cfg.max_len {
            return Err(Error::input("gpt", format!("{t} tokens exceed max_len {}", self.cfg.max_len)));
        }
        let x = self.dropout.forward(&self.embed.forward(ids)?, train)?;
        let mut router_logits = Vec::new();
        let h = self.blocks(x, 0, None, train, &mut router_logits)?;
        Ok(GptOutput { logits: self.head.forward(&h)?, router_logits })
    }
}

impl LanguageModel for Gpt {
    type Cache = GptCache;

    fn new_cache(&self) -> Result<GptCache> {
        Ok(LayerCaches::new(self.layers.len()))
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn context_length(&self) -> usize {
        self.cfg.max_len
    }

    fn forward(&self, batch: &mut [SeqStep<'_, GptCache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.forward_kv(batch, logits)
    }
}

impl PagedLanguageModel for Gpt {
    fn kv_shape(&self) -> KvShape {
        // f32, as its contiguous (tensor) cache: the paged and contiguous
        // paths of attn's own small models agree exactly.
        KvShape {
            dtype: attn_nn::KvDtype::F32,
            ..KvShape::new(self.cfg.n_layers, self.cfg.kv_heads(), self.cfg.head_dim())
        }
    }

    fn forward_paged(&self, batch: &mut [SeqStep<'_, PagedCache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.forward_kv(batch, logits)
    }
}

impl Gpt {
    /// Cached forward over any KV store, one sequence at a time.
    fn forward_kv<C: SequenceCache + KvStore>(
        &self,
        batch: &mut [SeqStep<'_, C>],
        logits: Logits,
    ) -> Result<Vec<Tensor>> {
        let device = self.embed.table().device().clone();
        let mut out = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            if s.tokens.is_empty() {
                return Err(Error::input("gpt", "a sequence in the batch has no new tokens"));
            }
            let offset = s.cache.len();
            if offset + s.tokens.len() > self.cfg.max_len {
                return Err(Error::input(
                    "gpt",
                    format!("{} tokens exceed the context of {}", offset + s.tokens.len(), self.cfg.max_len),
                ));
            }
            let ids = Tensor::new(s.tokens, &device)?.unsqueeze(0)?;
            let x = self.embed.forward(&ids)?;
            let mut router = Vec::new();
            let h = self.blocks(x, offset, Some(&mut *s.cache as &mut dyn KvStore), false, &mut router)?.squeeze(0)?;
            s.cache.commit(s.tokens.len())?;
            let h = match logits {
                Logits::Last => h.get(s.tokens.len() - 1)?.unsqueeze(0)?,
                Logits::All => h,
            };
            let l = self.head.forward(&h)?.to_dtype(DType::F32)?;
            out.push(match logits {
                Logits::Last => l.squeeze(0)?,
                Logits::All => l,
            });
        }
        Ok(out)
    }
}
