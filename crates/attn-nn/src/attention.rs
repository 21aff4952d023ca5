//! Scaled dot-product attention, masks, multi-head attention (MHA/MQA/GQA)
//! and the KV cache interface.

use candle_core::{DType, Device, Tensor, D};

use crate::dropout::Dropout;
use crate::error::{Error, Result};
use crate::kernels::flash::{flash_applies, flash_attention, FlashMask, FLASH_MIN_LEN, FLASH_MIN_LEN_ENCODER};
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::rope::RotaryEmbedding;
use crate::weights::Weights;

/// The additive value of a masked-out score. Finite, so a row whose keys are
/// all masked gives a uniform distribution instead of NaN.
pub const MASK_VALUE: f32 = -1e30;

/// Additive causal mask `[q_len, kv_len]` for queries that are the last
/// `q_len` of `kv_len` positions (so `kv_len - q_len` are already cached).
/// With `window = Some(w)` a query at position `i` sees only keys `j` with
/// `i - w < j <= i` (sliding-window attention).
pub fn causal_mask(q_len: usize, kv_len: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    if q_len > kv_len {
        return Err(Error::input("causal mask", format!("q_len {q_len} > kv_len {kv_len}")));
    }
    if window == Some(0) {
        // Every key would be masked, and a fully masked row attends
        // uniformly to all keys, future ones included.
        return Err(Error::input("causal mask", "sliding window must be at least 1"));
    }
    let offset = kv_len - q_len;
    let mut m = vec![0f32; q_len * kv_len];
    for i in 0..q_len {
        let pos = offset + i;
        for j in 0..kv_len {
            let future = j > pos;
            let outside = window.is_some_and(|w| pos >= j + w);
            if future || outside {
                m[i * kv_len + j] = MASK_VALUE;
            }
        }
    }
    Ok(Tensor::from_vec(m, (q_len, kv_len), device)?)
}

/// Additive key-padding mask `[batch, 1, 1, kv_len]` from a `[batch, kv_len]`
/// tensor that is nonzero where a key is a real token.
pub fn padding_mask(key_valid: &Tensor) -> Result<Tensor> {
    let (b, n) = key_valid.dims2()?;
    let valid = key_valid.to_dtype(DType::U8)?;
    let zeros = Tensor::zeros((b, n), DType::F32, key_valid.device())?;
    let masked = Tensor::full(MASK_VALUE, (b, n), key_valid.device())?;
    Ok(valid.where_cond(&zeros, &masked)?.reshape((b, 1, 1, n))?)
}

/// `[batch, max_len]` u8 validity from sequence lengths (right padding).
pub fn lengths_to_valid(lengths: &[usize], max_len: usize, device: &Device) -> Result<Tensor> {
    let mut v = vec![0u8; lengths.len() * max_len];
    for (b, &len) in lengths.iter().enumerate() {
        if len > max_len {
            return Err(Error::input("padding", format!("length {len} > max length {max_len}")));
        }
        for j in 0..len {
            v[b * max_len + j] = 1;
        }
    }
    Ok(Tensor::from_vec(v, (lengths.len(), max_len), device)?)
}

/// Sums two optional additive masks (broadcasting).
pub fn combine_masks(a: Option<&Tensor>, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(a.broadcast_add(b)?),
        (Some(a), None) => Some(a.clone()),
        (None, Some(b)) => Some(b.clone()),
        (None, None) => None,
    })
}

/// Softmax over the last dimension: the fused kernel when no gradient is
/// being tracked, the differentiable composition otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() && crate::grad_ops::fusable(x) {
        crate::grad_ops::softmax_last_dim(x)
    } else if x.track_op() {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    } else {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    }
}

/// Options of scaled dot-product attention beyond the mask.
#[derive(Debug, Clone, Copy)]
pub struct SdpaOptions {
    /// Multiplier of `q k^T`, usually `1/sqrt(head_dim)`.
    pub scale: f64,
    /// `tanh` soft-capping of the scores (Gemma 2).
    pub softcap: Option<f64>,
}

/// `softmax(q k^T * scale + mask) v`.
///
/// `q`: `[b, n_heads, q_len, d]`; `k`, `v`: `[b, n_kv_heads, kv_len, d]` with
/// `n_kv_heads` dividing `n_heads` (GQA; MQA when it is 1). Query head `h`
/// reads kv head `h / (n_heads / n_kv_heads)`. The grouped heads are folded
/// into the query length instead of copying K and V. `mask` is additive and
/// broadcasts to `[b, n_heads, q_len, kv_len]`. Scores and softmax are in f32.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    opts: SdpaOptions,
    dropout: Option<(&Dropout, bool)>,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if v.dims() != k.dims() || bk != b || dk != d {
        return Err(Error::input(
            "attention",
            format!("q {:?}, k {:?}, v {:?} do not match", q.dims(), k.dims(), v.dims()),
        ));
    }
    if hkv == 0 || h % hkv != 0 {
        return Err(Error::input("attention", format!("{hkv} kv heads do not divide {h} query heads")));
    }
    let g = h / hkv;
    let dtype = q.dtype();
    let qg = q.contiguous()?.reshape((b, hkv, g * tq, d))?;
    let mut scores = (qg.matmul(&k.t()?)? * opts.scale)?.to_dtype(DType::F32)?;
    if let Some(cap) = opts.softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    let mut scores = scores.reshape((b, h, tq, tk))?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(DType::F32)?)?;
    }
    let mut probs = softmax_last_dim(&scores)?;
    if let Some((drop, train)) = dropout {
        probs = drop.forward(&probs, train)?;
    }
    let probs = probs.to_dtype(dtype)?.reshape((b, hkv, g * tq, tk))?;
    let out = probs.matmul(&v.contiguous()?)?;
    Ok(out.reshape((b, h, tq, d))?)
}

/// Storage of past keys and values for incremental decoding. Attention
/// appends the new step's keys/values and reads back everything so far.
/// Implemented by a contiguous per-sequence cache here and by the paged
/// cache of the engine.
pub trait KvCache {
    /// Appends `k`, `v` (`[b, n_kv_heads, t_new, d]`) and returns all cached
    /// keys and values including the new ones.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)>;
    /// Number of cached positions.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops positions from `len` on (speculative decoding rollback).
    fn truncate(&mut self, len: usize) -> Result<()>;
}

/// A KV cache holding one tensor per K and V, grown along the sequence axis.
#[derive(Debug, Clone, Default)]
pub struct ContiguousKvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
}

impl ContiguousKvCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn keys(&self) -> Option<&Tensor> {
        self.k.as_ref()
    }

    pub fn values(&self) -> Option<&Tensor> {
        self.v.as_ref()
    }

    /// Reorders the batch rows (beam search): row `i` becomes old row `indices[i]`.
    pub fn reorder(&mut self, indices: &Tensor) -> Result<()> {
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            self.k = Some(k.index_select(indices, 0)?);
            self.v = Some(v.index_select(indices, 0)?);
        }
        Ok(())
    }
}

impl KvCache for ContiguousKvCache {
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match (&self.k, &self.v) {
            (Some(pk), Some(pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            _ => (k.clone(), v.clone()),
        };
        self.k = Some(k.clone());
        self.v = Some(v.clone());
        Ok((k, v))
    }

    fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        if len == 0 {
            self.k = None;
            self.v = None;
            return Ok(());
        }
        if let (Some(k), Some(v)) = (&self.k, &self.v) {
            self.k = Some(k.narrow(2, 0, len)?);
            self.v = Some(v.narrow(2, 0, len)?);
        }
        Ok(())
    }
}

impl ContiguousKvCache {
    /// Appends the new keys/values and attends `q` (the queries of the new
    /// positions) to everything cached, causally and within `spec.window`.
    pub fn attend(&mut self, q: &Tensor, k: &Tensor, v: &Tensor, spec: &crate::paged::AttendSpec) -> Result<Tensor> {
        let t = q.dim(2)?;
        let (k, v) = self.append(k, v)?;
        let kv = k.dim(2)?;
        // A single new token sees every cached key unless the window cuts
        // some off: no mask needed then.
        // Long prefills go through the tiled kernel (no [t, kv] score
        // matrix); it has no backward, so only when no gradient is tracked.
        if t >= FLASH_MIN_LEN && flash_applies(q, &k, &v) {
            let mask = FlashMask { causal: true, window: spec.window, key_lengths: None };
            return flash_attention(q, &k, &v, &mask, spec.sdpa);
        }
        let mask = if t == 1 && spec.window.is_none_or(|w| kv <= w) {
            None
        } else {
            Some(causal_mask(t, kv, spec.window, q.device())?)
        };
        scaled_dot_product_attention(q, &k, &v, mask.as_ref(), spec.sdpa, None)
    }
}

/// Shape of a multi-head attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// `n_heads` for MHA, 1 for MQA, a divisor of `n_heads` for GQA.
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub out_bias: bool,
    /// Score multiplier; `1/sqrt(head_dim)` when `None`.
    pub scale: Option<f64>,
    pub softcap: Option<f64>,
    /// Dropout on the attention probabilities (training only).
    pub dropout: f32,
}

impl AttentionConfig {
    /// Standard MHA: `head_dim = d_model / n_heads`, biases everywhere.
    pub fn mha(d_model: usize, n_heads: usize) -> Self {
        AttentionConfig {
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            head_dim: if n_heads == 0 { 0 } else { d_model / n_heads },
            qkv_bias: true,
            out_bias: true,
            scale: None,
            softcap: None,
            dropout: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.n_heads == 0 {
            return Err(Error::config("n_heads", "must be at least 1"));
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::config(
                "n_kv_heads",
                format!("must divide n_heads ({}), got {}", self.n_heads, self.n_kv_heads),
            ));
        }
        if self.head_dim == 0 {
            return Err(Error::config(
                "head_dim",
                format!("must be at least 1 (d_model {} / n_heads {})", self.d_model, self.n_heads),
            ));
        }
        Dropout::new(self.dropout)?;
        Ok(())
    }

    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Keys and values of a cross-attention source, projected once per source
/// and reused at every decoding step.
#[derive(Debug, Clone)]
pub struct CrossKv {
    pub k: Tensor,
    pub v: Tensor,
}

/// Multi-head attention with separate q/k/v/o projections, optional RoPE and
/// optional per-head RMSNorm of queries and keys (Gemma 3).
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    cfg: AttentionConfig,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    rope: Option<RotaryEmbedding>,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    dropout: Dropout,
}

impl MultiHeadAttention {
    pub fn new(cfg: AttentionConfig, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear) -> Result<Self> {
        cfg.validate()?;
        let check = |name: &str, l: &Linear, i: usize, o: usize| {
            if l.in_features() != i || l.out_features() != o {
                return Err(Error::config(
                    name,
                    format!("projection is {}->{}, expected {i}->{o}", l.in_features(), l.out_features()),
                ));
            }
            Ok(())
        };
        check("q_proj", &q_proj, cfg.d_model, cfg.q_dim())?;
        check("k_proj", &k_proj, cfg.d_model, cfg.kv_dim())?;
        check("v_proj", &v_proj, cfg.d_model, cfg.kv_dim())?;
        check("o_proj", &o_proj, cfg.q_dim(), cfg.d_model)?;
        Ok(MultiHeadAttention {
            cfg,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            rope: None,
            q_norm: None,
            k_norm: None,
            dropout: Dropout::new(cfg.dropout)?,
        })
    }

    /// Loads `q_proj`, `k_proj`, `v_proj`, `o_proj` under `w`.
    pub fn load(w: &Weights, cfg: AttentionConfig) -> Result<Self> {
        cfg.validate()?;
        let q = Linear::load(&w.pp("q_proj"), cfg.d_model, cfg.q_dim(), cfg.qkv_bias)?;
        let k = Linear::load(&w.pp("k_proj"), cfg.d_model, cfg.kv_dim(), cfg.qkv_bias)?;
        let v = Linear::load(&w.pp("v_proj"), cfg.d_model, cfg.kv_dim(), cfg.qkv_bias)?;
        let o = Linear::load(&w.pp("o_proj"), cfg.q_dim(), cfg.d_model, cfg.out_bias)?;
        Self::new(cfg, q, k, v, o)
    }

    /// The same layer with every projection replaced by `f(projection)`.
    pub fn map_linears(&self, f: &impl Fn(&Linear) -> Result<Linear>) -> Result<Self> {
        Ok(MultiHeadAttention {
            q_proj: f(&self.q_proj)?,
            k_proj: f(&self.k_proj)?,
            v_proj: f(&self.v_proj)?,
            o_proj: f(&self.o_proj)?,
            ..self.clone()
        })
    }

    pub fn with_rope(mut self, rope: RotaryEmbedding) -> Self {
        self.rope = Some(rope);
        self
    }

    pub fn with_qk_norm(mut self, q_norm: RmsNorm, k_norm: RmsNorm) -> Self {
        self.q_norm = Some(q_norm);
        self.k_norm = Some(k_norm);
        self
    }

    pub fn config(&self) -> &AttentionConfig {
        &self.cfg
    }

    /// `[b, t, n * head_dim]` -> `[b, n, t, head_dim]`.
    fn split_heads(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        Ok(x.reshape((b, t, n, self.cfg.head_dim))?.transpose(1, 2)?)
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, t, d) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((b, t, n * d))?)
    }

    fn check_input(&self, x: &Tensor, what: &'static str) -> Result<(usize, usize)> {
        let (b, t, d) =
            x.dims3().map_err(|_| Error::input(what, format!("expected [batch, seq, d_model], got {:?}", x.dims())))?;
        if d != self.cfg.d_model {
            return Err(Error::input(what, format!("d_model {d} != {}", self.cfg.d_model)));
        }
        Ok((b, t))
    }

    fn project_q(&self, x: &Tensor, positions: Option<&Tensor>) -> Result<Tensor> {
        let mut q = self.split_heads(&self.q_proj.forward(x)?, self.cfg.n_heads)?;
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?;
        }
        if let (Some(rope), Some(pos)) = (&self.rope, positions) {
            q = rope.forward(&q.contiguous()?, pos)?;
        }
        Ok(q)
    }

    fn project_kv(&self, x: &Tensor, positions: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let mut k = self.split_heads(&self.k_proj.forward(x)?, self.cfg.n_kv_heads)?;
        let v = self.split_heads(&self.v_proj.forward(x)?, self.cfg.n_kv_heads)?;
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?;
        }
        if let (Some(rope), Some(pos)) = (&self.rope, positions) {
            k = rope.forward(&k.contiguous()?, pos)?;
        }
        Ok((k.contiguous()?, v.contiguous()?))
    }

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let opts = self.sdpa_options();
        if q.track_op() && opts.softcap.is_none() && [q, k, v].iter().all(|t| crate::grad_ops::fusable(t)) {
            // Training: one fused node with its own backward.
            let p = if train { self.dropout.p() } else { 0.0 };
            return self.o_proj.forward(&crate::grad_ops::attention(q, k, v, mask, opts.scale, p)?);
        }
        let out = scaled_dot_product_attention(q, k, v, mask, self.sdpa_options(), Some((&self.dropout, train)))?;
        self.o_proj.forward(&self.merge_heads(&out)?)
    }

    /// Self-attention over `x` `[b, t, d_model]`.
    ///
    /// `positions` `[b, t]` (u32) are required when the layer has RoPE.
    /// With a `cache`, the new keys/values are appended and the queries
    /// attend to everything cached; `mask` must then cover `cache.len() + t`
    /// keys.
    pub fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        positions: Option<&Tensor>,
        cache: Option<&mut dyn KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        self.check_input(x, "self-attention")?;
        if self.rope.is_some() && positions.is_none() {
            return Err(Error::input("self-attention", "positions are required with rotary embeddings"));
        }
        let q = self.project_q(x, positions)?;
        let (k, v) = self.project_kv(x, positions)?;
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        self.attend(&q, &k, &v, mask, train)
    }

    /// Self-attention without a causal mask over `x` `[b, t, d_model]`, a
    /// right-padded batch whose row `i` holds `lengths[i]` real tokens (the
    /// encoder's attention; no rotary embeddings). Long inputs run the tiled
    /// kernel when no gradient is tracked and `train` is off (it has neither
    /// a backward nor dropout); otherwise the standard path with the
    /// additive padding mask.
    pub fn forward_padded(&self, x: &Tensor, lengths: &[usize], train: bool) -> Result<Tensor> {
        let (b, t) = self.check_input(x, "self-attention")?;
        if lengths.len() != b {
            return Err(Error::input("self-attention", format!("{} lengths for a batch of {b}", lengths.len())));
        }
        let q = self.project_q(x, None)?;
        let (k, v) = self.project_kv(x, None)?;
        if t >= FLASH_MIN_LEN_ENCODER && !train && flash_applies(&q, &k, &v) {
            if let Some(l) = lengths.iter().find(|&&l| l > t) {
                return Err(Error::input("padding", format!("length {l} > max length {t}")));
            }
            let mask = FlashMask { causal: false, window: None, key_lengths: Some(lengths) };
            let out = flash_attention(&q, &k, &v, &mask, self.sdpa_options())?;
            return self.o_proj.forward(&self.merge_heads(&out)?);
        }
        let mask = padding_mask(&lengths_to_valid(lengths, t, x.device())?)?;
        self.attend(&q, &k, &v, Some(&mask), train)
    }

    /// Inference on packed rows: bidirectional self-attention of each
    /// sequence of `x` (`[total, d_model]`, sequence `s` in rows
    /// `offsets[s] .. offsets[s + 1]`) over its own rows, no mask and no
    /// padding (the encoder's attention). q, k and v are projected side by
    /// side into one `[total, 3 * d_model]` buffer; the projections pick
    /// their kernels ([`Linear::forward_rows`]). Writes `[total, d_model]`
    /// to `out`. Plain multi-head attention only (no RoPE, q/k norm,
    /// grouped heads or soft-cap). No dropout, no autograd.
    pub fn forward_packed(&self, x: &[f32], offsets: &[usize], out: &mut [f32]) -> Result<()> {
        let c = &self.cfg;
        if self.rope.is_some() || self.q_norm.is_some() || c.n_kv_heads != c.n_heads || c.softcap.is_some() {
            return Err(Error::Unsupported(
                "packed attention runs plain multi-head self-attention (no RoPE, q/k norm, GQA or soft-cap)".into(),
            ));
        }
        let total = offsets.last().copied().unwrap_or(0);
        let (dm, hidden) = (c.d_model, c.q_dim());
        if x.len() != total * dm || out.len() != total * dm {
            return Err(Error::input(
                "self-attention",
                format!("{} input and {} output values for {total} rows of {dm}", x.len(), out.len()),
            ));
        }
        let mut qkv = vec![0f32; total * 3 * hidden];
        for (i, p) in [&self.q_proj, &self.k_proj, &self.v_proj].into_iter().enumerate() {
            p.forward_rows(x, total, &mut qkv[i * hidden..], 3 * hidden)?;
        }
        let mut ctx = vec![0f32; total * hidden];
        let scale = self.sdpa_options().scale as f32;
        crate::kernels::fast::attend_packed(&qkv, offsets, (c.n_heads, c.head_dim), scale, &mut ctx)?;
        self.o_proj.forward_rows(&ctx, total, out, dm)
    }

    /// Self-attention over `x` `[1, t, d_model]` whose keys and values are
    /// kept by the caller: `attend(q, k, v, spec)` receives the projected
    /// (normed, rotated) heads of the new positions and returns the attended
    /// heads `[1, n_heads, t, head_dim]`, for example from a paged cache.
    pub fn forward_with(
        &self,
        x: &Tensor,
        positions: &Tensor,
        window: Option<usize>,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor, &crate::paged::AttendSpec) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.check_input(x, "self-attention")?;
        let q = self.project_q(x, Some(positions))?;
        let (k, v) = self.project_kv(x, Some(positions))?;
        let spec = crate::paged::AttendSpec { sdpa: self.sdpa_options(), window };
        let out = attend(&q, &k, &v, &spec)?;
        self.o_proj.forward(&self.merge_heads(&out)?)
    }

    /// Self-attention for a batch of sequences laid end to end in `x`
    /// (`[1, n, d_model]`; sequence `i` holds tokens `spans[i]` =
    /// `(start, len)`): the projections, norms and RoPE run once over all
    /// `n` tokens (`positions` `[1, n]`, each token's own position), then
    /// `attend(i, q, k, v, spec)` attends sequence `i`'s heads to its own
    /// cache, and the output projection runs once again over everything.
    pub fn forward_spans(
        &self,
        x: &Tensor,
        positions: &Tensor,
        spans: &[(usize, usize)],
        window: Option<usize>,
        mut attend: impl FnMut(usize, &Tensor, &Tensor, &Tensor, &crate::paged::AttendSpec) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.check_input(x, "self-attention")?;
        let q = self.project_q(x, Some(positions))?;
        let (k, v) = self.project_kv(x, Some(positions))?;
        let spec = crate::paged::AttendSpec { sdpa: self.sdpa_options(), window };
        let mut outs = Vec::with_capacity(spans.len());
        for (i, &(start, len)) in spans.iter().enumerate() {
            let qi = q.narrow(2, start, len)?.contiguous()?;
            let ki = k.narrow(2, start, len)?.contiguous()?;
            let vi = v.narrow(2, start, len)?.contiguous()?;
            outs.push(attend(i, &qi, &ki, &vi, &spec)?);
        }
        let out = if outs.len() == 1 { outs.pop().expect("one") } else { Tensor::cat(&outs, 2)? };
        self.o_proj.forward(&self.merge_heads(&out)?)
    }

    fn sdpa_options(&self) -> SdpaOptions {
        SdpaOptions {
            scale: self.cfg.scale.unwrap_or(1.0 / (self.cfg.head_dim as f64).sqrt()),
            softcap: self.cfg.softcap,
        }
    }

    /// Projects a cross-attention source (the encoder output) once.
    pub fn cross_kv(&self, memory: &Tensor) -> Result<CrossKv> {
        self.check_input(memory, "cross-attention memory")?;
        let (k, v) = self.project_kv(memory, None)?;
        Ok(CrossKv { k, v })
    }

    /// Cross-attention of `x` `[b, t, d_model]` over projected `memory`.
    pub fn forward_cross(&self, x: &Tensor, memory: &CrossKv, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        self.check_input(x, "cross-attention")?;
        let q = self.project_q(x, None)?;
        self.attend(&q, &memory.k, &memory.v, mask, train)
    }
}
