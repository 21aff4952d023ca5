//! The decoder-only Transformer, written once for every architecture.
//!
//! Gemma 3, Llama and Qwen2 (and whatever joins them) differ by a small
//! [`DecoderSpec`] each fills in from its GGUF metadata (`gemma3.rs`,
//! `llama.rs`, `qwen2.rs`): norm placement, q/k norm, biases, RoPE layout
//! and base per layer, sliding window per layer, gated activation,
//! embedding scale, soft-caps. The block loop below is the whole network:
//!
//! ```text
//! x = embed(ids) * embed_scale
//! for each layer:
//!     h = norm(x);  q, k, v = h·Wq (+b), h·Wk (+b), h·Wv (+b)
//!     q, k = qk_norm(q, k);  q, k = rope(q, k, positions, layer base)
//!     a = attention(q, the sequence's cache + k, v; causal, layer window)
//!     x += post_norm?(a·Wo)
//!     h = norm(x);  x += post_norm?(down(act(h·Wgate) * h·Wup))
//! logits = softcap?(final_norm(x) · head)
//! ```
//!
//! It says *what* is computed; the kernels are chosen by the nn blocks
//! ([`attn_nn::infer::Linear`] picks the block-quantized, `gemm` or candle
//! matmul from the weights; [`attn_nn::kernels::fast`] holds the norm, RoPE,
//! activation and attention loops). Tensor names are llama.cpp's GGUF names,
//! the same for every architecture.
//!
//! All new tokens of all sequences of a call go through the norms,
//! projections and FFNs as one matrix; attention runs per sequence on its
//! own cache (contiguous or paged, through [`KvStore`]).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use attn_dist::Comm;

use attn_nn::infer::{forward_many, Input, Linear, Table, Weight};
use attn_nn::kernels::fast::{self, AttnCall};
use attn_nn::kernels::q8::{Q8Acts, Q8Matrix};
use attn_nn::{Error, KvDtype, KvShape, PagedCache, Result, RopeLayout, SdpaOptions};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType};
use candle_core::{Device, Tensor};

use crate::gguf::GgufFile;
use crate::lm::{KvStore, LanguageModel, LayerCaches, Logits, PagedLanguageModel, SeqStep, SequenceCache};
use crate::sizes::{self, TensorShapes};

/// Where the norms sit around each sub-layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x + f(norm(x))` (Llama, Qwen2).
    Pre,
    /// `x + post_norm(f(norm(x)))` (Gemma 2/3).
    Sandwich,
}

/// The activation of the gated FFN: `down(act(gate·x) * up·x)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatedActivation {
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
    /// SwiGLU (Llama, Qwen2).
    Silu,
}

/// What differs from layer to layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerSpec {
    pub rope_base: f64,
    /// Linear RoPE scaling factor (1 = none).
    pub rope_scale: f64,
    /// Sliding window (a query sees the last `window` positions), or global.
    pub window: Option<usize>,
}

/// Everything that tells one decoder architecture from another.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderSpec {
    /// `general.architecture` of the file.
    pub arch: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f64,
    pub norm: NormPlacement,
    /// Per-head RMSNorm of queries and keys (Gemma 3).
    pub qk_norm: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    pub rope_layout: RopeLayout,
    /// One entry per layer.
    pub layers: Vec<LayerSpec>,
    pub activation: GatedActivation,
    /// Embeddings are multiplied by this (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// Attention scores are `q·k * attn_scale`.
    pub attn_scale: f64,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    pub context_length: usize,
}

impl DecoderSpec {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("n_layers", self.layers.len()),
            ("context_length", self.context_length),
        ] {
            if v == 0 {
                return Err(Error::config(field, "must be at least 1"));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return Err(Error::config(
                "n_kv_heads",
                format!("{} kv heads do not divide {} heads", self.n_kv_heads, self.n_heads),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(Error::config("head_dim", format!("RoPE needs an even head size, got {}", self.head_dim)));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if !(l.rope_base > 1.0) || !(l.rope_scale >= 1.0) {
                return Err(Error::config(
                    "rope",
                    format!("layer {i}: base {} (must be > 1), scale {} (must be >= 1)", l.rope_base, l.rope_scale),
                ));
            }
            if l.window == Some(0) {
                return Err(Error::config("sliding_window", "must be at least 1"));
            }
        }
        if !(self.norm_eps > 0.0) || !(self.attn_scale > 0.0) {
            return Err(Error::config("norm_eps / attn_scale", "must be positive"));
        }
        Ok(())
    }

    /// What K and V of one position take (f16, every layer), and the
    /// window every layer attends within, if all of them slide.
    pub fn kv_shape(&self) -> KvShape {
        let window = self.layers.iter().map(|l| l.window).try_fold(0, |m, w| w.map(|w| m.max(w)));
        KvShape { window, ..KvShape::new(self.layers.len(), self.n_kv_heads, self.head_dim) }
    }
}

/// Reads `{arch}.{key}` as a count, refusing sizes no real model has, so a
/// hostile header cannot make the loader allocate for them.
pub(crate) fn meta_count(f: &GgufFile, arch: &str, key: &str, max: usize) -> Result<usize> {
    let k = format!("{arch}.{key}");
    sizes::bounded(&k, f.meta_u64(&k)?, max).map_err(sizes::in_file(f.path()))
}

/// The layer count from metadata, checked against the blocks the file
/// holds: `blk.0` to `blk.{n-1}`, none missing and none beyond.
pub(crate) fn layer_count(f: &GgufFile, arch: &str) -> Result<usize> {
    let n = meta_count(f, arch, "block_count", sizes::MAX_LAYERS)?;
    TensorShapes::from_gguf(&f.header)
        .check_layers(&format!("{arch}.block_count"), n, "blk.")
        .map_err(sizes::in_file(f.path()))?;
    Ok(n)
}

/// Checks every size of `spec` (read from the metadata of `f`) against the
/// tensors the file holds, before anything is allocated from them: the
/// sizes that shape a tensor first, each error naming its metadata key and
/// value, then the shape of every tensor the decoder will load.
pub fn check_tensors(f: &GgufFile, spec: &DecoderSpec) -> Result<()> {
    let shapes = TensorShapes::from_gguf(&f.header);
    let a = &spec.arch;
    let (d, hd, ff) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let (nq, nkv) = (spec.n_heads * hd, spec.n_kv_heads * hd);
    let key = |k: &str| format!("{a}.{k}");
    let check = || -> std::result::Result<(), String> {
        shapes.check_layers(&key("block_count"), spec.n_layers(), "blk.")?;
        shapes.check_dim(&key("embedding_length"), d, "token_embd.weight", 1)?;
        let vocab = format!("the vocabulary size {} (tokenizer.ggml.tokens)", spec.vocab_size);
        shapes.check_dim_as(&vocab, spec.vocab_size, "token_embd.weight", 0)?;
        shapes.check_dim(&key("feed_forward_length"), ff, "blk.0.ffn_up.weight", 0)?;
        if spec.qk_norm {
            shapes.check_dim(&key("attention.key_length"), hd, "blk.0.attn_q_norm.weight", 0)?;
        }
        let heads = format!("`{}` = {} (x head size {hd})", key("attention.head_count"), spec.n_heads);
        shapes.check_dim_as(&heads, nq, "blk.0.attn_q.weight", 0)?;
        let kv_heads = format!("`{}` = {} (x head size {hd})", key("attention.head_count_kv"), spec.n_kv_heads);
        shapes.check_dim_as(&kv_heads, nkv, "blk.0.attn_k.weight", 0)?;
        for (name, shape) in expected_tensors(spec) {
            shapes.check_shape(&name, &shape)?;
        }
        Ok(())
    };
    check().map_err(sizes::in_file(f.path()))
}

/// Every tensor the decoder loads (`output.weight` where the file has one)
/// and its row-major shape.
fn expected_tensors(spec: &DecoderSpec) -> Vec<(String, Vec<usize>)> {
    let (d, hd, ff) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let (nq, nkv) = (spec.n_heads * hd, spec.n_kv_heads * hd);
    let mut out = vec![
        ("token_embd.weight".to_string(), vec![spec.vocab_size, d]),
        ("output.weight".to_string(), vec![spec.vocab_size, d]),
        ("output_norm.weight".to_string(), vec![d]),
    ];
    for i in 0..spec.n_layers() {
        let mut t = |s: &str, shape: Vec<usize>| out.push((format!("blk.{i}.{s}"), shape));
        t("attn_q.weight", vec![nq, d]);
        t("attn_k.weight", vec![nkv, d]);
        t("attn_v.weight", vec![nkv, d]);
        if spec.qkv_bias {
            t("attn_q.bias", vec![nq]);
            t("attn_k.bias", vec![nkv]);
            t("attn_v.bias", vec![nkv]);
        }
        t("attn_output.weight", vec![d, nq]);
        t("ffn_gate.weight", vec![ff, d]);
        t("ffn_up.weight", vec![ff, d]);
        t("ffn_down.weight", vec![d, ff]);
        t("attn_norm.weight", vec![d]);
        t("ffn_norm.weight", vec![d]);
        if spec.norm == NormPlacement::Sandwich {
            t("post_attention_norm.weight", vec![d]);
            t("post_ffw_norm.weight", vec![d]);
        }
        if spec.qk_norm {
            t("attn_q_norm.weight", vec![hd]);
            t("attn_k_norm.weight", vec![hd]);
        }
    }
    out
}

/// The vocabulary size: the tokenizer's, else the embedding's rows.
pub(crate) fn vocab_size(f: &GgufFile) -> Result<usize> {
    let rows = f
        .tensor_info("token_embd.weight")
        .map(|t| t.shape().first().copied().unwrap_or(0))
        .ok_or_else(|| Error::MissingTensor { name: "token_embd.weight".into() })?;
    let n = f.meta_opt("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map_or(rows, |t| t.len());
    sizes::bounded("vocabulary size (token_embd.weight rows, tokenizer.ggml.tokens)", n as u64, sizes::MAX_VOCAB)
        .map_err(sizes::in_file(f.path()))
}

#[derive(Debug)]
struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    wg: Linear,
    wu: Linear,
    wd: Linear,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// Sandwich norms.
    post_attn_norm: Option<Vec<f32>>,
    post_ffn_norm: Option<Vec<f32>>,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    /// Index of this layer's RoPE tables in a call's set.
    rope: usize,
    window: Option<usize>,
    /// The layer's number in the whole model (its KV cache slot).
    index: usize,
}

/// Which kernels the weights are loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// attn's block-quantized matmul on the stored widths (the default).
    Blocks,
    /// Every matrix dequantized to f32, `gemm` (reference comparisons).
    Dense,
    /// candle's quantized matmul (`ATTN_KERNELS=candle`).
    Candle,
}

/// How a decoder is split over the ranks of a process group.
#[derive(Clone, Default)]
pub enum Parallel {
    /// The whole model in this process.
    #[default]
    None,
    /// Tensor parallelism: every matrix is split by its output rows. Each
    /// rank holds a contiguous range of the attention heads (q, k, v rows,
    /// and those heads' KV cache, a KV head replicated where there are
    /// fewer KV heads than ranks), of the FFN's hidden units (gate/up
    /// rows), of the model width (the output and down projections' rows)
    /// and of the vocabulary (the head's rows). Between them the ranks
    /// all-gather the attention output, the projections' outputs, the FFN
    /// activations and the logits, so every rank ends a call with the same
    /// logits, and these are the single process's bits exactly: no sum is
    /// ever split (Megatron's split of the output and down projections by
    /// their inputs adds partial sums, which rounds differently from one
    /// process and flips greedy near-ties; this split moves about as many
    /// bytes in as many MPI calls as attn's rank-ordered all-reduce).
    Tensor(Comm),
    /// Pipeline parallelism: the layers split into contiguous stages, one
    /// per rank (the embedding on the first, the final norm and the head on
    /// the last). A call's sequences, and the long prompts among them in
    /// chunks, go through the stages one micro-batch after another, so
    /// that stage `s` works on micro-batch `m` while stage `s + 1` works on
    /// `m - 1`; the last stage's logits go to every rank. Each rank holds
    /// its layers' weights and KV cache only.
    Pipeline(Comm),
}

impl std::fmt::Debug for Parallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Parallel::None => write!(f, "None"),
            Parallel::Tensor(c) => write!(f, "Tensor(rank {} of {})", c.rank(), c.size()),
            Parallel::Pipeline(c) => write!(f, "Pipeline(rank {} of {})", c.rank(), c.size()),
        }
    }
}

/// This rank's stage of a pipeline-parallel decoder, and the time it spent
/// waiting for its neighbours (the pipeline's bubble, as this rank saw it).
struct PpPart {
    comm: Comm,
    layers: Range<usize>,
    /// Nanoseconds in pipeline calls, and waiting in them for activations
    /// or logits.
    busy_ns: std::sync::atomic::AtomicU64,
    wait_ns: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for PpPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PpPart").field("rank", &self.comm.rank()).field("layers", &self.layers).finish()
    }
}

impl PpPart {
    fn plan(spec: &DecoderSpec, comm: Comm) -> Result<Self> {
        let (rank, n) = (comm.rank(), comm.size());
        if spec.n_layers() < n {
            return Err(Error::Unsupported(format!(
                "pipeline parallelism over {n} ranks for a model of {} layers (at most one stage per layer)",
                spec.n_layers()
            )));
        }
        let layers = stage_layers(spec, n)[rank].clone();
        Ok(PpPart { comm, layers, busy_ns: Default::default(), wait_ns: Default::default() })
    }
    fn first(&self) -> bool {
        self.comm.rank() == 0
    }
    fn last(&self) -> bool {
        self.comm.rank() + 1 == self.comm.size()
    }
}

/// The layers of each of `n` pipeline stages: contiguous, each stage at
/// least one layer, balanced on the weights a decode step reads (the last
/// stage also holds the head, which for a large vocabulary weighs as much
/// as a few layers).
fn stage_layers(spec: &DecoderSpec, n: usize) -> Vec<Range<usize>> {
    let (d, ff) = (spec.hidden_size as f64, spec.intermediate_size as f64);
    let (nq, nkv) = ((spec.n_heads * spec.head_dim) as f64, (spec.n_kv_heads * spec.head_dim) as f64);
    let layer = d * (2.0 * nq + 2.0 * nkv) + 3.0 * d * ff;
    // Measured on Qwen2.5-Coder-0.5B (one thread per stage): counting the
    // head at its full size put 17 of 24 layers on stage 0 and made it the
    // bottleneck (stage 1 waited 64-70% of the time); a decode step through
    // the head costs about a quarter of what its size suggests against the
    // layers' dequantizing matmuls.
    let head = spec.vocab_size as f64 * d / 4.0;
    let layers = spec.n_layers();
    let total = layer * layers as f64 + head;
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for stage in 0..n {
        let end = if stage + 1 == n {
            layers
        } else {
            // As many layers as bring this stage's end nearest its share,
            // leaving at least one layer for each later stage.
            let target = total * (stage + 1) as f64 / n as f64;
            let ideal = (target / layer).round() as usize;
            ideal.clamp(start + 1, layers - (n - stage - 1))
        };
        out.push(start..end);
        start = end;
    }
    out
}

/// Time a pipeline stage spent in forward calls and, of that, waiting.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PipelineTimes {
    pub stage: usize,
    pub layers: (usize, usize),
    pub busy_s: f64,
    pub wait_s: f64,
}

/// Every rank's range of one split dimension, and this rank's.
#[derive(Debug, Clone)]
struct Split {
    parts: Vec<Range<usize>>,
    rank: usize,
}

impl Split {
    fn new(parts: Vec<Range<usize>>, rank: usize) -> Self {
        Split { parts, rank }
    }
    fn mine(&self) -> Range<usize> {
        self.parts[self.rank].clone()
    }
    fn max(&self) -> usize {
        self.parts.iter().map(|r| r.len()).max().unwrap_or(0)
    }
    fn total(&self) -> usize {
        self.parts.last().map_or(0, |r| r.end)
    }
    /// Every rank's columns of `[t, total]` (`mine`: `[t, this rank's
    /// part]`) gathered into `out` on every rank.
    fn gather(&self, comm: &dyn attn_dist::Collective, mine: &[f32], t: usize, out: &mut [f32]) {
        let (part, max, total) = (self.mine().len(), self.max(), self.total());
        let mut padded = vec![0f32; t * max];
        for r in 0..t {
            padded[r * max..r * max + part].copy_from_slice(&mine[r * part..(r + 1) * part]);
        }
        let all = comm.all_gather(&padded);
        for (rank, range) in self.parts.iter().enumerate() {
            let base = rank * t * max;
            for r in 0..t {
                out[r * total + range.start..r * total + range.end]
                    .copy_from_slice(&all[base + r * max..base + r * max + range.len()]);
            }
        }
    }
}

/// This rank's part of a tensor-parallel decoder.
#[derive(Clone)]
struct TpPart {
    comm: Comm,
    /// Query heads (and their columns, `head_dim` per head) and the KV
    /// heads they read.
    heads: Split,
    head_cols: Split,
    kv_heads: Range<usize>,
    /// The FFN's hidden units, the model width, the vocabulary.
    ff: Split,
    width: Split,
    vocab: Split,
}

impl std::fmt::Debug for TpPart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpPart")
            .field("rank", &self.comm.rank())
            .field("heads", &self.heads.mine())
            .field("kv_heads", &self.kv_heads)
            .field("ff", &self.ff.mine())
            .field("width", &self.width.mine())
            .field("vocab", &self.vocab.mine())
            .finish()
    }
}

impl TpPart {
    /// Rank `comm.rank()`'s part of `spec` over `comm.size()` ranks.
    fn plan(spec: &DecoderSpec, comm: Comm) -> Result<Self> {
        let (rank, n) = (comm.rank(), comm.size());
        let (nh, nkv) = (spec.n_heads, spec.n_kv_heads);
        let group = nh / nkv;
        let cannot = |why: String| {
            Error::Unsupported(format!(
                "tensor parallelism over {n} ranks for {} ({nh} query heads, {nkv} KV heads): {why}",
                spec.arch
            ))
        };
        let (heads, kv_heads) = if nkv >= n {
            let kv = attn_dist::split_even(nkv, n, 1);
            (kv.iter().map(|r| r.start * group..r.end * group).collect::<Vec<_>>(), kv[rank].clone())
        } else {
            // Fewer KV heads than ranks: each rank takes part of one KV
            // head's query group and a copy of that KV head.
            if n % nkv != 0 || group % (n / nkv) != 0 {
                return Err(cannot(format!("{n} ranks do not split the {nkv} KV heads' groups of {group} evenly")));
            }
            let per = group / (n / nkv);
            let h: Vec<Range<usize>> = (0..n).map(|r| r * per..(r + 1) * per).collect();
            let kv = h[rank].start / group;
            (h, kv..kv + 1)
        };
        if heads[rank].is_empty() {
            return Err(cannot(format!("rank {rank} would get no heads")));
        }
        let split = |len: usize| Split::new(attn_dist::split_even(len, n, 1), rank);
        let (ff, width, vocab) = (split(spec.intermediate_size), split(spec.hidden_size), split(spec.vocab_size));
        if ff.mine().is_empty() || width.mine().is_empty() {
            return Err(cannot(format!("rank {rank} would get no rows of the FFN or the model width")));
        }
        let hd = spec.head_dim;
        let head_cols = Split::new(heads.iter().map(|r| r.start * hd..r.end * hd).collect(), rank);
        Ok(TpPart { comm, heads: Split::new(heads, rank), head_cols, kv_heads, ff, width, vocab })
    }
}

/// A decoder-only language model: one type for every architecture.
#[derive(Debug, Clone)]
pub struct Decoder {
    inner: Arc<Inner>,
    /// How the caches it makes store keys and values.
    kv_dtype: KvDtype,
}

#[derive(Debug)]
struct Inner {
    spec: DecoderSpec,
    /// This rank's part under tensor parallelism.
    tp: Option<TpPart>,
    /// This rank's stage under pipeline parallelism.
    pp: Option<Arc<PpPart>>,
    kernels: Kernels,
    layers: Vec<Layer>,
    /// The embedding (on the first pipeline stage) and the head (on the
    /// last).
    embed: Option<Table>,
    head: Option<Linear>,
    final_norm: Vec<f32>,
    /// Distinct (base, scale) pairs of the layers' RoPE.
    ropes: Vec<(f64, f64)>,
    /// Activation buffers of finished calls, reused by the next ones, so a
    /// decode step allocates nothing but the logits it returns (one set per
    /// concurrent caller).
    scratch: Mutex<Vec<Scratch>>,
}

/// The buffers of one forward pass; grown as needed, never shrunk.
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    hr: Vec<f32>,
    wide: Vec<f32>,
    positions: Vec<u32>,
    /// Tensor parallelism: a gathered input, this rank's output rows.
    full: Vec<f32>,
    part: Vec<f32>,
    /// `(cos, sin)` per distinct RoPE.
    tables: Vec<(Vec<f32>, Vec<f32>)>,
    acts: Q8Acts,
}

/// `v` holding exactly `n` elements, reusing its allocation.
fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..n]
}

/// The most new tokens one pass of the network takes; longer calls run in
/// pieces (see [`Decoder`]'s `forward_kv`).
pub const UBATCH: usize = 512;

/// The GGUF architectures this decoder runs.
pub const ARCHITECTURES: &[&str] = &["gemma3", "llama", "qwen2"];

impl Decoder {
    /// Loads any supported decoder GGUF, kernels as the file was opened
    /// (`dequantize`: f32 weights; `candle_kernels`: candle's matmul).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        Self::from_gguf_parallel(f, Parallel::None)
    }

    /// [`Decoder::from_gguf`], this rank's part of the model under `parallel`.
    pub fn from_gguf_parallel(f: &GgufFile, parallel: Parallel) -> Result<Self> {
        let spec = Self::checked_spec(f)?;
        let kernels = if f.dequantize {
            Kernels::Dense
        } else if f.candle_kernels {
            Kernels::Candle
        } else {
            Kernels::Blocks
        };
        Self::load_parallel(f, spec, kernels, parallel)
    }

    /// The [`DecoderSpec`] of a decoder GGUF with every size checked
    /// against the file's tensors ([`check_tensors`]); reads headers only.
    pub fn checked_spec(f: &GgufFile) -> Result<DecoderSpec> {
        let spec = match f.header.architecture() {
            Some("gemma3") => crate::gemma3::spec(f)?,
            Some("llama") => crate::llama::spec(f)?,
            Some("qwen2") => crate::qwen2::spec(f)?,
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "decoder architecture `{other}` (supported: {})",
                    ARCHITECTURES.join(", ")
                )))
            }
            None => return Err(Error::format(f.path(), "GGUF has no general.architecture")),
        };
        spec.validate()?;
        check_tensors(f, &spec)?;
        Ok(spec)
    }

    /// Loads the tensors `spec` calls for, for `kernels`.
    pub fn load(f: &GgufFile, spec: DecoderSpec, kernels: Kernels) -> Result<Self> {
        Self::load_parallel(f, spec, kernels, Parallel::None)
    }

    /// [`Decoder::load`], this rank's part under `parallel`.
    pub fn load_parallel(f: &GgufFile, spec: DecoderSpec, kernels: Kernels, parallel: Parallel) -> Result<Self> {
        spec.validate()?;
        check_tensors(f, &spec)?;
        let (d, hd, ff) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
        let (nq, nkv) = (spec.n_heads * hd, spec.n_kv_heads * hd);
        let tp = match &parallel {
            Parallel::Tensor(comm) if comm.size() > 1 => {
                let comm = comm.clone();
                if kernels == Kernels::Candle {
                    return Err(Error::Unsupported(
                        "tensor parallelism with candle's kernels (ATTN_KERNELS=candle): use the default kernels"
                            .into(),
                    ));
                }
                Some(TpPart::plan(&spec, comm)?)
            }
            _ => None,
        };
        let pp = match &parallel {
            Parallel::Pipeline(comm) if comm.size() > 1 => Some(Arc::new(PpPart::plan(&spec, comm.clone())?)),
            _ => None,
        };
        let (first, last) = pp.as_ref().map_or((true, true), |p| (p.first(), p.last()));
        // This rank's rows and columns of each kind of matrix (all of them
        // without tensor parallelism).
        let scaled = |r: &Range<usize>, by: usize| r.start * by..r.end * by;
        let q_rows = tp.as_ref().map_or(0..nq, |p| scaled(&p.heads.mine(), hd));
        let kv_rows = tp.as_ref().map_or(0..nkv, |p| scaled(&p.kv_heads, hd));
        let ff_rows = tp.as_ref().map_or(0..ff, |p| p.ff.mine());
        let d_rows = tp.as_ref().map_or(0..d, |p| p.width.mine());
        let part = |name: &str, rows: usize, cols: usize, r: Range<usize>, c: Range<usize>| -> Result<Linear> {
            Linear::new(weight_part(f, name, rows, cols, r, c, kernels)?, None)
        };
        let linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
            let w = weight(f, name, rows, cols, kernels)?;
            Linear::new(w, None)
        };
        let biased = |name: &str, rows: usize, cols: usize, r: Range<usize>| -> Result<Linear> {
            let w = weight_part(f, &format!("{name}.weight"), rows, cols, r.clone(), 0..cols, kernels)?;
            let b = f.vector(&format!("{name}.bias"), rows)?;
            Linear::new(w, Some(b[r].to_vec()))
        };
        // The embedding and the head first: they are the largest tensors,
        // and while one is converted its file pages are resident too (they
        // are released after), so converting them before anything else is
        // loaded keeps the peak near the loaded model's size (Gemma 3 270M:
        // 543 -> about 380 MB).
        let tied = f.tensor_info("output.weight").is_none();
        let table = if first || (last && tied && tp.is_none() && kernels != Kernels::Candle) {
            Some(match weight(f, "token_embd.weight", spec.vocab_size, d, Kernels::Blocks)? {
                Weight::Blocks(m) if kernels != Kernels::Dense => Table::Blocks(m),
                _ => match weight(f, "token_embd.weight", spec.vocab_size, d, Kernels::Dense)? {
                    Weight::Dense { w, rows, cols } => Table::Dense { w, rows, cols },
                    _ => unreachable!("dense weights load as Weight::Dense"),
                },
            })
        } else {
            None
        };
        // The output projection is tied to the embedding unless the file has its own.
        let head = if !last {
            None
        } else if let Some(p) = &tp {
            let name = if f.tensor_info("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
            Some(part(name, spec.vocab_size, d, p.vocab.mine(), 0..d)?)
        } else if !tied {
            Some(linear("output.weight", spec.vocab_size, d)?)
        } else if kernels == Kernels::Candle {
            Some(linear("token_embd.weight", spec.vocab_size, d)?)
        } else {
            Some(table.as_ref().ok_or_else(|| Error::MissingTensor { name: "token_embd.weight".into() })?.as_linear()?)
        };
        let embed = if first { table } else { None };
        let mut ropes: Vec<(f64, f64)> = Vec::new();
        let mut layers = Vec::new();
        for (i, ls) in spec.layers.iter().enumerate() {
            if pp.as_ref().is_some_and(|p| !p.layers.contains(&i)) {
                continue;
            }
            let p = |s: &str| format!("blk.{i}.{s}");
            let rope = match ropes.iter().position(|&r| r == (ls.rope_base, ls.rope_scale)) {
                Some(r) => r,
                None => {
                    ropes.push((ls.rope_base, ls.rope_scale));
                    ropes.len() - 1
                }
            };
            let sandwich = spec.norm == NormPlacement::Sandwich;
            let (wq, wk, wv) = if spec.qkv_bias {
                (
                    biased(&p("attn_q"), nq, d, q_rows.clone())?,
                    biased(&p("attn_k"), nkv, d, kv_rows.clone())?,
                    biased(&p("attn_v"), nkv, d, kv_rows.clone())?,
                )
            } else {
                (
                    part(&p("attn_q.weight"), nq, d, q_rows.clone(), 0..d)?,
                    part(&p("attn_k.weight"), nkv, d, kv_rows.clone(), 0..d)?,
                    part(&p("attn_v.weight"), nkv, d, kv_rows.clone(), 0..d)?,
                )
            };
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo: part(&p("attn_output.weight"), d, nq, d_rows.clone(), 0..nq)?,
                wg: part(&p("ffn_gate.weight"), ff, d, ff_rows.clone(), 0..d)?,
                wu: part(&p("ffn_up.weight"), ff, d, ff_rows.clone(), 0..d)?,
                wd: part(&p("ffn_down.weight"), d, ff, d_rows.clone(), 0..ff)?,
                attn_norm: f.vector(&p("attn_norm.weight"), d)?,
                ffn_norm: f.vector(&p("ffn_norm.weight"), d)?,
                post_attn_norm: sandwich.then(|| f.vector(&p("post_attention_norm.weight"), d)).transpose()?,
                post_ffn_norm: sandwich.then(|| f.vector(&p("post_ffw_norm.weight"), d)).transpose()?,
                q_norm: spec.qk_norm.then(|| f.vector(&p("attn_q_norm.weight"), hd)).transpose()?,
                k_norm: spec.qk_norm.then(|| f.vector(&p("attn_k_norm.weight"), hd)).transpose()?,
                rope,
                window: ls.window,
                index: i,
            });
        }
        let final_norm = f.vector("output_norm.weight", d)?;
        Ok(Decoder {
            inner: Arc::new(Inner {
                spec,
                tp,
                pp,
                kernels,
                layers,
                embed,
                head,
                final_norm,
                ropes,
                scratch: Mutex::default(),
            }),
            kv_dtype: KvDtype::from_env()?,
        })
    }

    /// The same model with caches (contiguous and paged) storing keys and
    /// values as `dtype` (f16 unless `ATTN_KV_TYPE` says otherwise).
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    pub fn spec(&self) -> &DecoderSpec {
        &self.inner.spec
    }

    pub fn kernels(&self) -> Kernels {
        self.inner.kernels
    }

    /// Bytes of weights one decode step reads (every matrix once, the
    /// embedding rows aside).
    pub fn decode_weight_bytes(&self) -> usize {
        let l: usize = self
            .inner
            .layers
            .iter()
            .map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.wg, &l.wu, &l.wd].iter().map(|m| m.bytes()).sum::<usize>())
            .sum();
        l + self.inner.head.as_ref().map_or(0, |h| h.bytes())
    }

    /// The same model with every matrix in attn's 8-bit blocks (the batched
    /// kernel whose cost per step barely grows with the number of
    /// sequences). Block weights are returned as they are.
    pub fn for_batched_serving(&self) -> Result<Self> {
        if self.inner.kernels == Kernels::Blocks {
            return Ok(self.clone());
        }
        let to_blocks = |l: &Linear| -> Result<Linear> {
            let m = match l.weight() {
                Weight::Blocks(_) => return Ok(l.clone()),
                Weight::Dense { w, rows, cols } => Q8Matrix::from_f32(w, *rows, *cols)?,
                Weight::Candle(q) => Q8Matrix::from_tensor(&q.dequantize(&Device::Cpu)?)?,
            };
            Ok(Linear::new(Weight::Blocks(Arc::new(m)), None)?.with_bias_of(l))
        };
        let i = &self.inner;
        let layers = i
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    wq: to_blocks(&l.wq)?,
                    wk: to_blocks(&l.wk)?,
                    wv: to_blocks(&l.wv)?,
                    wo: to_blocks(&l.wo)?,
                    wg: to_blocks(&l.wg)?,
                    wu: to_blocks(&l.wu)?,
                    wd: to_blocks(&l.wd)?,
                    attn_norm: l.attn_norm.clone(),
                    ffn_norm: l.ffn_norm.clone(),
                    post_attn_norm: l.post_attn_norm.clone(),
                    post_ffn_norm: l.post_ffn_norm.clone(),
                    q_norm: l.q_norm.clone(),
                    k_norm: l.k_norm.clone(),
                    rope: l.rope,
                    window: l.window,
                    index: l.index,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Decoder {
            inner: Arc::new(Inner {
                spec: i.spec.clone(),
                tp: i.tp.clone(),
                pp: i.pp.clone(),
                kernels: Kernels::Blocks,
                layers,
                embed: i.embed.clone(),
                head: i.head.as_ref().map(to_blocks).transpose()?,
                final_norm: i.final_norm.clone(),
                ropes: i.ropes.clone(),
                scratch: Mutex::default(),
            }),
            kv_dtype: self.kv_dtype,
        })
    }

    fn check_batch<C: SequenceCache>(&self, batch: &[SeqStep<'_, C>]) -> Result<Vec<(usize, usize, usize)>> {
        let spec = &self.inner.spec;
        let mut spans = Vec::with_capacity(batch.len());
        let mut start = 0;
        for s in batch {
            if s.tokens.is_empty() {
                return Err(Error::input("decoder", "a sequence in the batch has no new tokens"));
            }
            if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= spec.vocab_size) {
                return Err(Error::input(
                    "decoder",
                    format!("token id {bad} outside the vocabulary of {}", spec.vocab_size),
                ));
            }
            let past = s.cache.len();
            if past + s.tokens.len() > spec.context_length {
                return Err(Error::input(
                    "decoder",
                    format!("{} tokens exceed the context length {}", past + s.tokens.len(), spec.context_length),
                ));
            }
            spans.push((start, s.tokens.len(), past));
            start += s.tokens.len();
        }
        Ok(spans)
    }

    /// The forward pass over any KV store (contiguous or paged). A call of
    /// more than [`UBATCH`] new tokens runs one sequence at a time in pieces
    /// of at most that many (llama.cpp's `n_ubatch`): the activations of a
    /// piece are what a call holds, not those of a whole 8k-token prompt.
    fn forward_kv<C: SequenceCache + KvStore>(
        &self,
        batch: &mut [SeqStep<'_, C>],
        logits: Logits,
    ) -> Result<Vec<Tensor>> {
        if let Some(pp) = &self.inner.pp {
            return self.forward_pipeline(pp, batch, logits);
        }
        if batch.iter().map(|s| s.tokens.len()).sum::<usize>() <= UBATCH {
            return self.forward_kv_once(batch, logits);
        }
        self.check_batch(batch)?;
        let mut out = Vec::with_capacity(batch.len());
        for s in batch.iter_mut() {
            let mut parts = Vec::new();
            for piece in s.tokens.chunks(UBATCH) {
                let mut one = [SeqStep { tokens: piece, cache: &mut *s.cache }];
                let l = self.forward_kv_once(&mut one, logits)?.remove(0);
                if logits == Logits::Last {
                    parts.clear(); // only the last piece's last row is wanted
                }
                parts.push(l);
            }
            out.push(match logits {
                Logits::Last => parts.pop().expect("at least one piece"),
                Logits::All => Tensor::cat(&parts, 0)?,
            });
        }
        Ok(out)
    }

    /// The forward pass of a pipeline stage. The call's new tokens are cut
    /// into micro-batches (whole sequences packed up to a token budget, a
    /// longer prompt in chunks of it); every rank takes them in the same
    /// order: the first stage embeds, the others receive the activations
    /// from the stage before, each runs its layers, commits its own caches
    /// and sends the activations on; the last stage computes the logits
    /// and gives them to every rank.
    fn forward_pipeline<C: SequenceCache + KvStore>(
        &self,
        pp: &PpPart,
        batch: &mut [SeqStep<'_, C>],
        logits: Logits,
    ) -> Result<Vec<Tensor>> {
        let started = std::time::Instant::now();
        let mut waited = std::time::Duration::ZERO;
        self.check_batch(batch)?;
        let (d, vocab) = (self.inner.spec.hidden_size, self.inner.spec.vocab_size);
        let (rank, comm) = (pp.comm.rank(), &*pp.comm);
        let total: usize = batch.iter().map(|s| s.tokens.len()).sum();
        // Several micro-batches per stage keep the stages busy together.
        // They are cut where one process's kernels would compute the same
        // bits: in multiples of the attention's query block, never leaving
        // a piece below the row count where the matmuls and the attention
        // change algorithm (one process takes the whole call at once).
        let budget =
            (total / (4 * comm.size()) / fast::QUERY_BLOCK * fast::QUERY_BLOCK).clamp(fast::QUERY_BLOCK, UBATCH);
        let small = fast::BLOCKED_FROM;
        let mut items: Vec<Vec<(usize, Range<usize>)>> = Vec::new();
        let mut open: Vec<(usize, Range<usize>)> = Vec::new();
        let mut open_tokens = 0;
        // One process takes a call of up to UBATCH tokens at once, a longer
        // one sequence by sequence in pieces of UBATCH: so do the stages.
        let whole_call = total <= UBATCH;
        for (i, s) in batch.iter().enumerate() {
            let len = s.tokens.len();
            let pieces: Vec<Range<usize>> = if whole_call {
                vec![0..len]
            } else {
                (0..len).step_by(UBATCH).map(|a| a..(a + UBATCH).min(len)).collect()
            };
            for piece in pieces {
                let mut start = piece.start;
                while start < piece.end {
                    let left = piece.end - start;
                    let take = if left - left.min(budget) < small { left } else { budget };
                    if !open.is_empty() && (!whole_call || open_tokens + take > budget) {
                        items.push(std::mem::take(&mut open));
                        open_tokens = 0;
                    }
                    open.push((i, start..start + take));
                    open_tokens += take;
                    start += take;
                }
            }
        }
        if !open.is_empty() {
            if whole_call && open_tokens < small && total >= small && !items.is_empty() {
                // Whole short sequences: they join the micro-batch before.
                items.last_mut().expect("an item").extend(open);
            } else {
                items.push(open);
            }
        }
        let mut per_seq: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
        for item in &items {
            let ids: Vec<u32> = item.iter().flat_map(|(i, r)| batch[*i].tokens[r.clone()].iter().copied()).collect();
            let mut spans = Vec::with_capacity(item.len());
            let mut rows = Vec::new();
            let mut at = 0;
            for (i, r) in item {
                spans.push((at, r.len(), batch[*i].cache.len()));
                match logits {
                    Logits::All => rows.extend(at..at + r.len()),
                    Logits::Last if r.end == batch[*i].tokens.len() => rows.push(at + r.len() - 1),
                    Logits::Last => {}
                }
                at += r.len();
            }
            let input = if pp.first() {
                None
            } else {
                let mut buf = vec![0f32; ids.len() * d];
                let t0 = std::time::Instant::now();
                comm.recv(rank - 1, &mut buf);
                waited += t0.elapsed();
                Some(buf)
            };
            let out = {
                let mut caches: Vec<&mut C> = Vec::with_capacity(item.len());
                let mut next = item.iter().map(|(i, _)| *i).peekable();
                for (i, s) in batch.iter_mut().enumerate() {
                    if next.peek() == Some(&i) {
                        next.next();
                        caches.push(&mut *s.cache);
                    }
                }
                let run = |caches: &mut Vec<&mut C>| self.inner.forward(&ids, &spans, caches, &rows, input.as_deref());
                if rayon::current_thread_index().is_some() {
                    run(&mut caches)?
                } else {
                    rayon::scope(|_| run(&mut caches))?
                }
            };
            for (i, r) in item {
                batch[*i].cache.commit(r.len())?;
            }
            if pp.last() {
                // The logits rows of this micro-batch, back to their sequences.
                let mut row = 0;
                for (i, r) in item {
                    let n = match logits {
                        Logits::All => r.len(),
                        Logits::Last => usize::from(r.end == batch[*i].tokens.len()),
                    };
                    per_seq[*i].extend_from_slice(&out[row * vocab..(row + n) * vocab]);
                    row += n;
                }
            } else {
                let t0 = std::time::Instant::now();
                comm.send(rank + 1, &out);
                waited += t0.elapsed();
            }
        }
        // Every rank returns the last stage's logits.
        let last = comm.size() - 1;
        let mut bytes: Vec<u8> = if pp.last() {
            per_seq.iter().flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes())).collect()
        } else {
            Vec::new()
        };
        let t0 = std::time::Instant::now();
        comm.broadcast(&mut bytes, last);
        waited += t0.elapsed();
        let all: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for s in batch.iter() {
            let n = match logits {
                Logits::All => s.tokens.len(),
                Logits::Last => 1,
            };
            if all.len() < (at + n) * vocab {
                return Err(Error::input("pipeline", "the last stage sent fewer logits than the call needs"));
            }
            let t = Tensor::from_slice(&all[at * vocab..(at + n) * vocab], (n, vocab), &Device::Cpu)?;
            out.push(match logits {
                Logits::All => t,
                Logits::Last => t.get(0)?,
            });
            at += n;
        }
        use std::sync::atomic::Ordering::Relaxed;
        pp.busy_ns.fetch_add(started.elapsed().as_nanos() as u64, Relaxed);
        pp.wait_ns.fetch_add(waited.as_nanos() as u64, Relaxed);
        Ok(out)
    }

    /// Under pipeline parallelism: this rank's stage, its layers, and the
    /// time it spent in forward calls and waiting in them.
    pub fn pipeline_times(&self) -> Option<PipelineTimes> {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.pp.as_ref().map(|p| PipelineTimes {
            stage: p.comm.rank(),
            layers: (p.layers.start, p.layers.end),
            busy_s: p.busy_ns.load(Relaxed) as f64 * 1e-9,
            wait_s: p.wait_ns.load(Relaxed) as f64 * 1e-9,
        })
    }

    fn forward_kv_once<C: SequenceCache + KvStore>(
        &self,
        batch: &mut [SeqStep<'_, C>],
        logits: Logits,
    ) -> Result<Vec<Tensor>> {
        let spans = self.check_batch(batch)?;
        let ids: Vec<u32> = batch.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        // Rows whose logits are wanted.
        let rows: Vec<usize> = match logits {
            Logits::Last => spans.iter().map(|&(s, l, _)| s + l - 1).collect(),
            Logits::All => (0..ids.len()).collect(),
        };
        let out = {
            let mut caches: Vec<&mut C> = batch.iter_mut().map(|s| &mut *s.cache).collect();
            // On a worker thread of rayon's pool, the hundred-odd parallel
            // kernels of a step hand work to the other workers directly
            // instead of each waking the pool from outside and putting the
            // caller to sleep (perf, decode: 12% of the time was in the
            // scheduler).
            if rayon::current_thread_index().is_some() {
                self.inner.forward(&ids, &spans, &mut caches, &rows, None)?
            } else {
                rayon::scope(|_| self.inner.forward(&ids, &spans, &mut caches, &rows, None))?
            }
        };
        for (s, &(_, len, _)) in batch.iter_mut().zip(&spans) {
            s.cache.commit(len)?;
        }
        let vocab = self.inner.spec.vocab_size;
        let out = Tensor::from_vec(out, (rows.len(), vocab), &Device::Cpu)?;
        match logits {
            Logits::Last => (0..batch.len()).map(|i| Ok(out.get(i)?)).collect(),
            Logits::All => spans.iter().map(|&(s, l, _)| Ok(out.narrow(0, s, l)?)).collect(),
        }
    }
}

/// Rows `r` and columns `c` of the weight `name` (`[rows, cols]`) stored
/// for `kernels` (block or dense: candle's kernels take whole matrices).
fn weight_part(
    f: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    r: Range<usize>,
    c: Range<usize>,
    kernels: Kernels,
) -> Result<Weight> {
    if r == (0..rows) && c == (0..cols) {
        return weight(f, name, rows, cols, kernels);
    }
    Ok(match kernels {
        Kernels::Blocks => Weight::Blocks(Arc::new(f.q8_matrix_part(name, rows, cols, r, c)?)),
        Kernels::Dense => {
            let Weight::Dense { w, .. } = weight(f, name, rows, cols, Kernels::Dense)? else {
                unreachable!("dense weights load as Weight::Dense")
            };
            let mut out = Vec::with_capacity(r.len() * c.len());
            for row in r.clone() {
                out.extend_from_slice(&w[row * cols + c.start..row * cols + c.end]);
            }
            Weight::Dense { w: Arc::new(out), rows: r.len(), cols: c.len() }
        }
        Kernels::Candle => return Err(Error::Unsupported(format!("a part of `{name}` with candle's kernels"))),
    })
}

/// The weight `name` (`[rows, cols]`) stored for `kernels`.
fn weight(f: &GgufFile, name: &str, rows: usize, cols: usize, kernels: Kernels) -> Result<Weight> {
    Ok(match kernels {
        Kernels::Blocks => Weight::Blocks(Arc::new(f.q8_matrix(name, rows, cols)?)),
        Kernels::Dense => {
            let t = f.qtensor_checked(name, &[rows, cols], &Device::Cpu)?;
            let w = t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            Weight::Dense { w: Arc::new(w), rows, cols }
        }
        Kernels::Candle => {
            let q = f.qtensor_checked(name, &[rows, cols], &Device::Cpu)?;
            // candle has an AVX2 kernel for Q8_0 and only a scalar one for
            // Q5_0; Q8_0 holds Q5_0's blocks exactly.
            if q.dtype() == GgmlDType::Q5_0 {
                let info = f.tensor_info(name).ok_or_else(|| Error::MissingTensor { name: name.into() })?;
                let data = crate::gguf::repack_q5_0_as_q8_0(f.tensor_data(info));
                Weight::Candle(Arc::new(qtensor_from_ggml(GgmlDType::Q8_0, &data, vec![rows, cols], &Device::Cpu)?))
            } else {
                Weight::Candle(q)
            }
        }
    })
}

impl Inner {
    /// The forward pass over `ids` (all sequences' new tokens, `spans` =
    /// (start, len, past) per sequence) returning the logits of `rows`.
    fn forward<C: KvStore>(
        &self,
        ids: &[u32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut C],
        rows: &[usize],
        input: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let mut sc = self.scratch.lock().ok().and_then(|mut pool| pool.pop()).unwrap_or_default();
        let logits = self.forward_with(ids, spans, caches, rows, &mut sc, input)?;
        if let Ok(mut pool) = self.scratch.lock() {
            pool.push(sc);
        }
        Ok(logits)
    }

    fn forward_with<C: KvStore>(
        &self,
        ids: &[u32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut C],
        rows: &[usize],
        sc: &mut Scratch,
        input: Option<&[f32]>,
    ) -> Result<Vec<f32>> {
        let spec = &self.spec;
        let (d, hd, mut nh, mut nkv, mut ff) =
            (spec.hidden_size, spec.head_dim, spec.n_heads, spec.n_kv_heads, spec.intermediate_size);
        if let Some(p) = &self.tp {
            (nh, nkv, ff) = (p.heads.mine().len(), p.kv_heads.len(), p.ff.mine().len());
        }
        let t = ids.len();
        let eps = spec.norm_eps as f32;
        let Scratch { x, h, q, k, v, att, o, g, u, hr, wide, positions, tables, acts, full, part } = sc;
        let x = sized(x, t * d);
        match (input, &self.embed) {
            // A later pipeline stage: the previous stage's activations.
            (Some(inp), _) => x.copy_from_slice(&inp[..t * d]),
            (None, Some(embed)) => {
                for (i, &id) in ids.iter().enumerate() {
                    let row = &mut x[i * d..(i + 1) * d];
                    embed.row_into(id as usize, row)?;
                    if let Some(scale) = spec.embed_scale {
                        for v in row.iter_mut() {
                            *v *= scale;
                        }
                    }
                }
            }
            (None, None) => return Err(Error::input("decoder", "a later pipeline stage needs its input activations")),
        }
        positions.clear();
        positions.extend(spans.iter().flat_map(|&(_, len, past)| (past as u32)..((past + len) as u32)));
        tables.resize_with(self.ropes.len(), Default::default);
        for (&(base, scale), (cos, sin)) in self.ropes.iter().zip(tables.iter_mut()) {
            fast::rope_tables_into(base, scale, hd, positions, cos, sin);
        }
        let rope = match spec.rope_layout {
            RopeLayout::Halves => fast::rope_halves,
            RopeLayout::Interleaved => fast::rope_interleaved,
        };
        let sdpa = SdpaOptions { scale: spec.attn_scale, softcap: spec.attn_softcap };

        let h = sized(h, t * d);
        let q = sized(q, t * nh * hd);
        let k = sized(k, t * nkv * hd);
        let v = sized(v, t * nkv * hd);
        let att = sized(att, t * nh * hd);
        let o = sized(o, t * d);
        let g = sized(g, t * ff);
        let u = sized(u, t * ff);
        for l in &self.layers {
            let li = l.index;
            // Attention.
            fast::rms_norm_rows_to(x, &l.attn_norm, eps, h);
            forward_many(
                &mut Input::new(h, t, d, acts),
                &mut [(&l.wq, &mut *q), (&l.wk, &mut *k), (&l.wv, &mut *v)],
                wide,
            )?;
            if let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) {
                fast::rms_norm_rows(q, qn, eps);
                fast::rms_norm_rows(k, kn, eps);
            }
            let (cos, sin) = &tables[l.rope];
            rope(q, nh, hd, cos, sin);
            rope(k, nkv, hd, cos, sin);
            let call = AttnCall { n_heads: nh, n_kv_heads: nkv, head_dim: hd, past: 0, sdpa, window: l.window };
            for (c, &(s, len, _)) in caches.iter_mut().zip(spans) {
                c.attend_slices(
                    li,
                    &q[s * nh * hd..(s + len) * nh * hd],
                    &k[s * nkv * hd..(s + len) * nkv * hd],
                    &v[s * nkv * hd..(s + len) * nkv * hd],
                    len,
                    &call,
                    &mut att[s * nh * hd..(s + len) * nh * hd],
                )?;
            }
            match &self.tp {
                None => l.wo.forward(&mut Input::new(att, t, nh * hd, acts), o, wide)?,
                Some(p) => {
                    // Every head's output, then this rank's rows of the projection.
                    let all = sized(full, t * spec.n_heads * hd);
                    p.head_cols.gather(&*p.comm, att, t, all);
                    let mine = sized(part, t * p.width.mine().len());
                    l.wo.forward(&mut Input::new(all, t, spec.n_heads * hd, acts), mine, wide)?;
                    p.width.gather(&*p.comm, mine, t, o);
                }
            }
            residual(x, o, l.post_attn_norm.as_deref(), eps);

            // Gated FFN.
            fast::rms_norm_rows_to(x, &l.ffn_norm, eps, h);
            forward_many(&mut Input::new(h, t, d, acts), &mut [(&l.wg, &mut *g), (&l.wu, &mut *u)], wide)?;
            match spec.activation {
                GatedActivation::GeluTanh => fast::gelu_tanh_mul(g, u),
                GatedActivation::Silu => fast::silu_mul(g, u),
            }
            match &self.tp {
                None => l.wd.forward(&mut Input::new(g, t, ff, acts), o, wide)?,
                Some(p) => {
                    let all = sized(full, t * spec.intermediate_size);
                    p.ff.gather(&*p.comm, g, t, all);
                    let mine = sized(part, t * p.width.mine().len());
                    l.wd.forward(&mut Input::new(all, t, spec.intermediate_size, acts), mine, wide)?;
                    p.width.gather(&*p.comm, mine, t, o);
                }
            }
            residual(x, o, l.post_ffn_norm.as_deref(), eps);
        }
        // A pipeline stage before the last hands on its activations.
        let Some(head) = &self.head else {
            return Ok(x.to_vec());
        };
        // Only the wanted rows go through the final norm and the head.
        hr.clear();
        for &r in rows {
            hr.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        fast::rms_norm_rows(hr, &self.final_norm, eps);
        let vocab = head.rows();
        let mut logits = vec![0f32; rows.len() * vocab];
        head.forward(&mut Input::new(hr, rows.len(), d, acts), &mut logits, wide)?;
        if let Some(p) = &self.tp {
            let mut all = vec![0f32; rows.len() * spec.vocab_size];
            p.vocab.gather(&*p.comm, &logits, rows.len(), &mut all);
            logits = all;
        }
        if let Some(cap) = spec.final_softcap {
            let cap = cap as f32;
            for z in &mut logits {
                *z = (*z / cap).tanh() * cap;
            }
        }
        Ok(logits)
    }
}

/// `x += y`, or `x += rms_norm(y) * w` with a post-norm.
fn residual(x: &mut [f32], y: &mut [f32], post_norm: Option<&[f32]>, eps: f32) {
    match post_norm {
        Some(w) => fast::add_rms_normed(x, y, w, eps),
        None => {
            for (a, b) in x.iter_mut().zip(y.iter()) {
                *a += b;
            }
        }
    }
}

impl LanguageModel for Decoder {
    type Cache = LayerCaches;

    fn new_cache(&self) -> Result<LayerCaches> {
        Ok(LayerCaches::with_dtype(self.inner.spec.n_layers(), self.kv_dtype))
    }

    fn vocab_size(&self) -> usize {
        self.inner.spec.vocab_size
    }

    fn context_length(&self) -> usize {
        self.inner.spec.context_length
    }

    fn forward(&self, batch: &mut [SeqStep<'_, LayerCaches>], logits: Logits) -> Result<Vec<Tensor>> {
        self.forward_kv(batch, logits)
    }
}

impl PagedLanguageModel for Decoder {
    fn kv_shape(&self) -> KvShape {
        let mut shape = KvShape { dtype: self.kv_dtype, ..self.inner.spec.kv_shape() };
        if let Some(p) = &self.inner.tp {
            // This rank's cache holds its KV heads only.
            shape = KvShape { n_kv_heads: p.kv_heads.len(), ..shape };
        }
        shape
    }

    fn forward_paged(&self, batch: &mut [SeqStep<'_, PagedCache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.forward_kv(batch, logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(layers: usize, vocab: usize) -> DecoderSpec {
        DecoderSpec {
            arch: "test".into(),
            vocab_size: vocab,
            hidden_size: 896,
            intermediate_size: 4864,
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            norm_eps: 1e-6,
            norm: NormPlacement::Pre,
            qk_norm: false,
            qkv_bias: true,
            rope_layout: RopeLayout::Halves,
            layers: vec![LayerSpec { rope_base: 1e6, rope_scale: 1.0, window: None }; layers],
            activation: GatedActivation::Silu,
            embed_scale: None,
            attn_scale: 0.125,
            attn_softcap: None,
            final_softcap: None,
            context_length: 4096,
        }
    }

    #[test]
    fn pipeline_stages_balance_the_head_against_layers() {
        // Qwen2.5-0.5B: the head weighs about two layers.
        assert_eq!(stage_layers(&spec(24, 151_936), 2), vec![0..13, 13..24]);
        // A small vocabulary: an even split.
        assert_eq!(stage_layers(&spec(24, 100), 2), vec![0..12, 12..24]);
        // Every stage keeps at least one layer.
        let s = stage_layers(&spec(3, 10_000_000), 3);
        assert_eq!(s, vec![0..1, 1..2, 2..3]);
        for n in 1..=6 {
            let s = stage_layers(&spec(7, 50_000), n);
            assert_eq!(s.len(), n);
            assert_eq!((s[0].start, s[n - 1].end), (0, 7));
            assert!(s.iter().all(|r| !r.is_empty()));
            assert!(s.windows(2).all(|w| w[0].end == w[1].start));
        }
    }
}
