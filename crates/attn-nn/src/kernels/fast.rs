//! Inference kernels on plain `f32` slices: what a decode or prefill step of
//! a decoder-only model runs between its quantized matmuls, without a tensor
//! per operation.
//!
//! Why: a Gemma 3 270M decode step through candle ops (about 30 tensors per
//! layer, each allocated, each a separate pass) cost about 19 ms for its 18
//! layers, of which the weight reads need about 4 ms. These functions work
//! in place on caller-owned buffers, run the norm, RoPE and activation as
//! one pass per row, and multiply dense matrices with the `gemm` crate
//! (AVX-512 when the CPU has it, see the `x86-v4` feature in Cargo.toml).
//!
//! Layouts are token-major: a `[t, heads, head_dim]` buffer holds token
//! `i`'s head `h` at `(i * heads + h) * head_dim`.

use rayon::prelude::*;

use crate::attention::SdpaOptions;
use crate::error::{Error, Result};
use crate::ffn::Activation;
use crate::kv::KvElem;

/// Defines a function whose body is compiled three times, for AVX-512 (F,
/// BW, VL, DQ), for AVX2 + FMA and for the baseline target, and runs the
/// widest the CPU has. The loops these bodies hold fix their summation order
/// (eight lanes, see [`dot`]) and Rust never fuses a multiply and an add by
/// itself, so the three give identical results: only the vector width
/// changes (the baseline build has SSE2, four lanes).
macro_rules! wide {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                match simd_width() {
                    // SAFETY: simd_width checked the CPU's features.
                    SimdWidth::Avx512 => return unsafe { v4($($arg),*) },
                    SimdWidth::Avx2 => return unsafe { v3($($arg),*) },
                    SimdWidth::Base => {}
                }
            }
            imp($($arg),*)
        }
    };
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum SimdWidth {
    Base,
    Avx2,
    Avx512,
}

/// The widest vector code [`wide!`] functions may run here (once per
/// process; `ATTN_SIMD=base` or `avx2` caps it, for tests and comparisons).
fn simd_width() -> SimdWidth {
    #[cfg(test)]
    if let Some(w) = FORCE_WIDTH.with(|f| f.get()) {
        return w.min(detected_width());
    }
    detected_width()
}

#[cfg(test)]
thread_local! {
    /// A cap on [`simd_width`] for this thread (tests of the three builds).
    static FORCE_WIDTH: std::cell::Cell<Option<SimdWidth>> = const { std::cell::Cell::new(None) };
}

fn detected_width() -> SimdWidth {
    static W: std::sync::OnceLock<SimdWidth> = std::sync::OnceLock::new();
    *W.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let cap = std::env::var("ATTN_SIMD").unwrap_or_default();
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = avx2
                && ["avx512f", "avx512bw", "avx512vl", "avx512dq"].iter().all(|f| match *f {
                    "avx512f" => is_x86_feature_detected!("avx512f"),
                    "avx512bw" => is_x86_feature_detected!("avx512bw"),
                    "avx512vl" => is_x86_feature_detected!("avx512vl"),
                    _ => is_x86_feature_detected!("avx512dq"),
                });
            if avx512 && cap.is_empty() {
                return SimdWidth::Avx512;
            }
            if avx2 && cap != "base" {
                return SimdWidth::Avx2;
            }
        }
        SimdWidth::Base
    })
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` (row-major), multithreaded.
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    matmul_xwt_ld(x, m, k, w, n, out, n)
}

/// [`matmul_xwt`] into columns `0..n` of rows `ld` apart: a block of
/// columns of a wider output.
pub fn matmul_xwt_ld(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32], ld: usize) -> Result<()> {
    matmul_xwt_par(x, (m, k), w, n, out, ld, true)
}

/// [`matmul_xwt_ld`], split over rayon's threads only when `threaded` (and
/// the product is large enough to gain from it).
pub fn matmul_xwt_par(
    x: &[f32],
    (m, k): (usize, usize),
    w: &[f32],
    n: usize,
    out: &mut [f32],
    ld: usize,
    threaded: bool,
) -> Result<()> {
    if x.len() < m * k || w.len() < n * k || ld < n || (m > 0 && out.len() < (m - 1) * ld + n) {
        return Err(Error::input("matmul", format!("buffers too small for [{m}, {k}] x [{n}, {k}]ᵀ")));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the sizes were checked above; the strides describe row-major
    // x (m x k), wᵀ (k x n, read from row-major w) and out (m x n).
    unsafe { gemm_raw((m, n, k), out.as_mut_ptr(), ld, x.as_ptr(), (k, 1), w.as_ptr(), (1, k), threaded) };
    Ok(())
}

/// `dst[m, n] = a[m, k] · b[k, n]` on strided views (`gemm`, AVX-512 where
/// the CPU has it): the one place the crate calls `gemm`. Strides are in
/// elements, (row, column): element `(i, j)` of `a` is
/// `a[i * a_rs + j * a_cs]`; `dst` rows are `dst_rs` apart with unit column
/// stride. Split over rayon's threads when `threaded` and the product is
/// large enough to gain from it.
///
/// # Safety
/// Every element the sizes and strides address must lie inside its buffer,
/// and `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    a: *const f32,
    (a_rs, a_cs): (usize, usize),
    b: *const f32,
    (b_rs, b_cs): (usize, usize),
    threaded: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threaded && m * n * k >= 1 << 18 && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        false,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        0.0,
        1.0,
        false,
        false,
        false,
        par,
    );
}

wide! {
/// RMSNorm of each `d`-wide row of `x` in place: `x / rms(x) * w`.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let ss = dot(row, row);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for (v, g) in row.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}
}

/// [`rms_norm_rows`] from `x` into `out`.
pub fn rms_norm_rows_to(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    out[..x.len()].copy_from_slice(x);
    rms_norm_rows(&mut out[..x.len()], w, eps);
}

/// `x += rms_norm(y) * w`, row by row (Gemma's post-norm residual).
pub fn add_rms_normed(x: &mut [f32], y: &mut [f32], w: &[f32], eps: f32) {
    rms_norm_rows(y, w, eps);
    for (a, b) in x.iter_mut().zip(y.iter()) {
        *a += b;
    }
}

/// The cos and sin of RoPE's angles for each position ("halves" layout:
/// `[positions.len(), head_dim / 2]` each), with the rounding of
/// [`crate::RotaryEmbedding`]: inverse frequencies and products in f32.
pub fn rope_tables(base: f64, scale: f64, head_dim: usize, positions: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    rope_tables_into(base, scale, head_dim, positions, &mut cos, &mut sin);
    (cos, sin)
}

/// [`rope_tables`] into buffers kept by the caller (no allocation once they
/// are large enough).
pub fn rope_tables_into(
    base: f64,
    scale: f64,
    head_dim: usize,
    positions: &[u32],
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let half = head_dim / 2;
    cos.clear();
    sin.clear();
    let freq = |i: usize| (1.0 / base.powf((2 * i) as f64 / head_dim as f64) / scale) as f32;
    let mut small = [0f32; 256];
    let inv: std::borrow::Cow<[f32]> = if half <= small.len() {
        for (i, f) in small[..half].iter_mut().enumerate() {
            *f = freq(i);
        }
        std::borrow::Cow::Borrowed(&small[..half])
    } else {
        std::borrow::Cow::Owned((0..half).map(freq).collect())
    };
    for &p in positions {
        for f in inv.iter() {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
}

/// Rotates every head of every token of `x` (`[t, heads, head_dim]`) by its
/// token's row of the tables, "halves" layout (GPT-NeoX, Llama, Gemma).
pub fn rope_halves(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for (i, tok) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
        for h in tok.chunks_exact_mut(head_dim) {
            let (x1, x2) = h.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * c[j] - b * s[j];
                x2[j] = a * s[j] + b * c[j];
            }
        }
    }
}

/// Rotates every head of every token of `x` (`[t, heads, head_dim]`) by its
/// token's row of the tables, "interleaved" layout: pair `j` is elements
/// `2j, 2j + 1` (GPT-J; llama.cpp's `llama` GGUFs, whose converter permutes
/// the q/k rows so that this layout computes HF's split-halves rotation).
pub fn rope_interleaved(x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for (i, tok) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (c, s) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
        for h in tok.chunks_exact_mut(head_dim) {
            for (j, pair) in h.chunks_exact_mut(2).enumerate() {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c[j] - b * s[j];
                pair[1] = a * s[j] + b * c[j];
            }
        }
    }
}

/// `e^x` for `f32` without a libm call, so loops over it vectorize: Cody-
/// Waite range reduction to `r` in `[-ln2/2, ln2/2]`, Cephes' degree-6
/// polynomial, and the exponent set directly. Relative error below 2e-7
/// (tested); 0 below -87.3 (where `e^x` is under f32's normal range) and
/// +inf above 88.7.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer (ties to even) in the low bits.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let bits = (t.to_bits() as i32 - SHIFTER.to_bits() as i32 + 127) << 23;
    let y = e * f32::from_bits(bits as u32);
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// `g = gelu_tanh(g) * u` element-wise (GeGLU), in parallel for large
/// inputs. `0.5 (1 + tanh z) = 1 / (1 + e^(-2z))`, so no tanh is needed.
pub fn gelu_tanh_mul(g: &mut [f32], u: &[f32]) {
    const CHUNK: usize = 1 << 14;
    if g.len() >= 2 * CHUNK {
        g.par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(|(g, u)| gelu_tanh_mul_seq(g, u));
    } else {
        gelu_tanh_mul_seq(g, u);
    }
}

wide! {
fn gelu_tanh_mul_seq(g: &mut [f32], u: &[f32]) {
    for (a, b) in g.iter_mut().zip(u) {
        *a = gelu_tanh(*a) * b;
    }
}
}

/// GELU, tanh approximation: `0.5 x (1 + tanh z)` with
/// `z = sqrt(2/pi) (x + 0.044715 x^3)`, computed as `x / (1 + e^(-2z))`
/// (no tanh call, so loops over it vectorize).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const S2PI: f32 = 0.797_884_6; // sqrt(2 / pi)
    let inner = S2PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + exp_fast(-2.0 * inner))
}

/// Exact GELU, `x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))` (BERT's `gelu`).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `x sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// `erf(x)` in f32: a rational approximation on `[-4, 4]` (Eigen's
/// `generic_fast_erf_float`; outside, `erf` is `±1` in f32), written with
/// plain arithmetic so loops over it vectorise. Error about 2 ulp.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_6e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// `x = act(x)` element-wise, one straight (vectorisable) loop per
/// activation, in parallel for large inputs when [`may_split`].
pub fn activation_in_place(x: &mut [f32], act: Activation) {
    const CHUNK: usize = 1 << 14;
    let seq = |x: &mut [f32]| activation_seq(x, act);
    if x.len() >= 2 * CHUNK && may_split() {
        x.par_chunks_mut(CHUNK).for_each(seq);
    } else {
        seq(x);
    }
}

wide! {
fn activation_seq(x: &mut [f32], act: Activation) {
    match act {
        Activation::GeluErf => x.iter_mut().for_each(|v| *v = gelu_erf(*v)),
        Activation::GeluTanh => x.iter_mut().for_each(|v| *v = gelu_tanh(*v)),
        Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Silu => x.iter_mut().for_each(|v| *v = silu(*v)),
    }
}
}

wide! {
fn silu_mul_seq(g: &mut [f32], u: &[f32]) {
    for (a, b) in g.iter_mut().zip(u) {
        *a = silu(*a) * b;
    }
}
}

/// `g = silu(g) * u` element-wise (SwiGLU), in parallel for large inputs.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    const CHUNK: usize = 1 << 14;
    if g.len() >= 2 * CHUNK {
        g.par_chunks_mut(CHUNK).zip(u.par_chunks(CHUNK)).for_each(|(g, u)| silu_mul_seq(g, u));
    } else {
        silu_mul_seq(g, u);
    }
}

/// Where the attention kernel reads one layer's stored keys and values:
/// the rows of kv head `kv_head` at position `pos`, in the cache's number
/// format ([`KvElem`]: f32 or f16, widened to f32 inside the kernel's row
/// loops). Contiguous caches, rings and paged block tables implement it; the
/// kernel reads only positions inside each query's causal window.
pub trait KvRows: Sync {
    type Elem: KvElem;
    fn key(&self, pos: usize, kv_head: usize) -> &[Self::Elem];
    fn value(&self, pos: usize, kv_head: usize) -> &[Self::Elem];
}

/// The shape of one attention call over a cache.
#[derive(Debug, Clone, Copy)]
pub struct AttnCall {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Positions already cached before this call's `t` new ones.
    pub past: usize,
    pub sdpa: SdpaOptions,
    pub window: Option<usize>,
}

/// Causal attention of `t` new queries (`q`, `[t, n_heads, head_dim]`, at
/// positions `past..past + t`) over the cache's positions `0..past + t`
/// (the new keys already written), within the sliding window: only
/// positions from `past + 1 - window` on are read, so a cache may have
/// dropped older ones. Writes `[t, n_heads, head_dim]` to `out`.
///
/// Few queries (decode) go query by query in spans of keys
/// ([`attend_rows`]); from [`BLOCKED_FROM`] on (prefill) they go through
/// `gemm` in blocks of query rows, so the score buffer is at most
/// `QUERY_BLOCK x (past + t)` per head. Query by query, each result does not
/// depend on how many others share the call.
pub fn attend<K: KvRows>(q: &[f32], t: usize, call: &AttnCall, kv: &K, out: &mut [f32]) -> Result<()> {
    let AttnCall { n_heads, n_kv_heads, head_dim: d, .. } = *call;
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(Error::input("attention", format!("{n_kv_heads} kv heads do not divide {n_heads} heads")));
    }
    if q.len() != t * n_heads * d || out.len() != q.len() {
        return Err(Error::input("attention", format!("q holds {} values, expected {}", q.len(), t * n_heads * d)));
    }
    if call.window == Some(0) {
        return Err(Error::input("attention", "sliding window must be at least 1"));
    }
    if t >= BLOCKED_FROM {
        return attend_blocked(q, t, call, kv, out);
    }
    attend_rows(q, t, call, kv, out);
    Ok(())
}

/// Keys one task of [`attend_rows`] reads: a query's window is cut into
/// spans of this many positions, fixed, so a result depends only on the
/// query and the cache, not on the thread count or the call's other rows.
const DECODE_SPAN: usize = 512;

/// Attention for a few queries (decode, verification of drafts): each
/// query's window, per kv head, is cut into [`DECODE_SPAN`]-position spans;
/// a task reads each key and value of its span once for all the query heads
/// that share that kv head (GQA / MQA), and leaves each head's running max,
/// sum of exponentials and unnormalised output; the spans are then merged
/// in order (flash-decoding). The row loops run with AVX2/FMA/F16C where the
/// CPU has them, so a 64-wide f16 dot is inlined rather than called per key.
fn attend_rows<K: KvRows>(q: &[f32], t: usize, call: &AttnCall, kv: &K, out: &mut [f32]) {
    let AttnCall { n_heads, n_kv_heads, head_dim: d, past, .. } = *call;
    let group = n_heads / n_kv_heads;
    // (query row, kv head, first position, end) per task.
    let mut tasks = Vec::new();
    for i in 0..t {
        let pos = past + i;
        let lo = call.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        for g in 0..n_kv_heads {
            let mut p = lo;
            while p <= pos {
                let end = (p + DECODE_SPAN).min(pos + 1);
                tasks.push((i, g, p, end));
                p = end;
            }
        }
    }
    // Per task: `group` rows of [max, sum, out (d values)].
    let width = 2 + d;
    let mut parts = vec![0f32; tasks.len() * group * width];
    let work = |(&(i, g, lo, hi), part): (&(usize, usize, usize, usize), &mut [f32])| {
        let qs = &q[(i * n_heads + g * group) * d..(i * n_heads + (g + 1) * group) * d];
        #[cfg(target_arch = "x86_64")]
        if crate::kv::has_f16c() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked).
            return unsafe { attend_span_avx2(qs, d, kv, g, lo, hi, call.sdpa, part) };
        }
        attend_span(qs, d, kv, g, lo, hi, call.sdpa, part)
    };
    let reads = t * n_heads * (past + t);
    if reads >= 1 << 14 && tasks.len() > 1 {
        tasks.par_iter().zip(parts.par_chunks_mut(group * width)).for_each(work);
    } else {
        tasks.iter().zip(parts.chunks_mut(group * width)).for_each(work);
    }
    // Merge each (query, kv head)'s spans in order.
    let mut k = 0;
    while k < tasks.len() {
        let (i, g, _, _) = tasks[k];
        let mut e = k;
        while e < tasks.len() && tasks[e].0 == i && tasks[e].1 == g {
            e += 1;
        }
        for j in 0..group {
            let h = g * group + j;
            let dst = &mut out[(i * n_heads + h) * d..(i * n_heads + h + 1) * d];
            let row = |task: usize| &parts[(task * group + j) * width..(task * group + j + 1) * width];
            let max = (k..e).map(|task| row(task)[0]).fold(f32::NEG_INFINITY, f32::max);
            let mut total = 0f32;
            dst.fill(0.0);
            for task in k..e {
                let r = row(task);
                let c = exp_fast(r[0] - max);
                total += c * r[1];
                for (o, v) in dst.iter_mut().zip(&r[2..]) {
                    *o += c * v;
                }
            }
            let inv = 1.0 / total;
            for o in dst.iter_mut() {
                *o *= inv;
            }
        }
        k = e;
    }
}

/// [`attend_span`] compiled for AVX2, FMA and F16C.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_span_avx2<K: KvRows>(
    qs: &[f32],
    d: usize,
    kv: &K,
    g: usize,
    lo: usize,
    hi: usize,
    o: SdpaOptions,
    part: &mut [f32],
) {
    attend_span(qs, d, kv, g, lo, hi, o, part)
}

/// The query heads `qs` (`[group, d]`) sharing kv head `g` over positions
/// `lo..hi`: per head, `[max, Σ e^(s - max), Σ e^(s - max) v]` into `part`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_span<K: KvRows>(
    qs: &[f32],
    d: usize,
    kv: &K,
    g: usize,
    lo: usize,
    hi: usize,
    o: SdpaOptions,
    part: &mut [f32],
) {
    thread_local! {
        // Score rows reused across calls: no allocation per task.
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let group = qs.len() / d;
    let n = hi - lo;
    let scale = o.scale as f32;
    let cap = o.softcap.map(|c| c as f32);
    SCORES.with_borrow_mut(|scores| {
        scores.clear();
        scores.resize(group * n, 0.0);
        let mut dots = [0f32; 8];
        for (i, p) in (lo..hi).enumerate() {
            let key = kv.key(p, g);
            // The group's heads share one read (and widening) of the key.
            for j0 in (0..group).step_by(8) {
                let m = (group - j0).min(8);
                K::Elem::dot_many(&qs[j0 * d..(j0 + m) * d], d, key, &mut dots[..m]);
                for (jj, &dv) in dots[..m].iter().enumerate() {
                    let mut s = dv * scale;
                    if let Some(c) = cap {
                        s = (s / c).tanh() * c;
                    }
                    scores[(j0 + jj) * n + i] = s;
                }
            }
        }
        let width = 2 + d;
        for j in 0..group {
            let sj = &mut scores[j * n..(j + 1) * n];
            let max = max_lanes(sj);
            for v in sj.iter_mut() {
                *v = exp_fast(*v - max);
            }
            let r = &mut part[j * width..(j + 1) * width];
            r[0] = max;
            r[1] = sum(sj);
            r[2..].fill(0.0);
        }
        for (i, p) in (lo..hi).enumerate() {
            let val = kv.value(p, g);
            for j0 in (0..group).step_by(8) {
                let m = (group - j0).min(8);
                for (jj, w) in dots[..m].iter_mut().enumerate() {
                    *w = scores[(j0 + jj) * n + i];
                }
                K::Elem::axpy_many(&dots[..m], val, &mut part[j0 * width + 2..], width);
            }
        }
    });
}

pub const QUERY_BLOCK: usize = 128;

/// Calls with this many queries or more take the blocked `gemm` path.
pub const BLOCKED_FROM: usize = 48;

fn attend_blocked<K: KvRows>(q: &[f32], t: usize, call: &AttnCall, kv: &K, out: &mut [f32]) -> Result<()> {
    let AttnCall { n_heads, n_kv_heads, head_dim: d, past, sdpa, window } = *call;
    let group = n_heads / n_kv_heads;
    let total = past + t;
    let scale = sdpa.scale as f32;
    let cap = sdpa.softcap.map(|c| c as f32);
    // The first position any query of the call sees: the cache may hold
    // nothing older (a sliding window's ring, freed paged blocks).
    let first = window.map_or(0, |w| (past + 1).saturating_sub(w));
    let mut keys = vec![0f32; total * d];
    let mut vals_t = vec![0f32; d * total];
    let mut row = vec![0f32; d];
    let mut qh = vec![0f32; QUERY_BLOCK * d];
    let mut scores = vec![0f32; QUERY_BLOCK * total];
    let mut oh = vec![0f32; QUERY_BLOCK * d];
    for g in 0..n_kv_heads {
        for p in first..total {
            K::Elem::widen(kv.key(p, g), &mut keys[p * d..(p + 1) * d]);
            K::Elem::widen(kv.value(p, g), &mut row);
            for (j, v) in row.iter().enumerate() {
                vals_t[j * total + p] = *v;
            }
        }
        for h in g * group..(g + 1) * group {
            let mut i0 = 0;
            while i0 < t {
                let rows = QUERY_BLOCK.min(t - i0);
                for r in 0..rows {
                    let src = ((i0 + r) * n_heads + h) * d;
                    qh[r * d..(r + 1) * d].copy_from_slice(&q[src..src + d]);
                }
                // Keys past the block's last query are masked anyway.
                let span = past + i0 + rows;
                let lo0 = window.map_or(0, |w| (past + i0 + 1).saturating_sub(w));
                let n = span - lo0;
                matmul_xwt(&qh[..rows * d], rows, d, &keys[lo0 * d..span * d], n, &mut scores[..rows * n])?;
                scores[..rows * n].par_chunks_mut(n).enumerate().for_each(|(r, srow)| {
                    let pos = past + i0 + r;
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    let (a, b) = (lo - lo0, pos + 1 - lo0);
                    let mut max = f32::NEG_INFINITY;
                    for s in &mut srow[a..b] {
                        *s *= scale;
                        if let Some(c) = cap {
                            *s = (*s / c).tanh() * c;
                        }
                        max = max.max(*s);
                    }
                    softmax_shifted(&mut srow[a..b], max);
                    srow[..a].fill(0.0);
                    srow[b..].fill(0.0);
                });
                // o = p · v, reading vᵀ's columns lo0..span in place: element
                // (key p, column j) of v is vals_t[j * total + lo0 + p].
                // SAFETY: p < n and j < d address vals_t[..d * total]; the
                // score rows are rows x n and oh rows x d, not overlapping.
                unsafe {
                    gemm_raw(
                        (rows, d, n),
                        oh.as_mut_ptr(),
                        d,
                        scores.as_ptr(),
                        (n, 1),
                        vals_t.as_ptr().add(lo0),
                        (1, total),
                        true,
                    )
                };
                for r in 0..rows {
                    let dst = ((i0 + r) * n_heads + h) * d;
                    out[dst..dst + d].copy_from_slice(&oh[r * d..(r + 1) * d]);
                }
                i0 += rows;
            }
        }
    }
    Ok(())
}

wide! {
/// `s = softmax(s)` in place given `max`, the largest element: `e^(s - max)`
/// normalised to sum 1 (the one softmax every attention kernel ends in).
pub fn softmax_shifted(s: &mut [f32], max: f32) {
    for v in s.iter_mut() {
        *v = exp_fast(*v - max);
    }
    let inv = 1.0 / sum(s);
    for v in s.iter_mut() {
        *v *= inv;
    }
}
}

wide! {
/// `s = softmax(s * scale)` in place.
pub fn softmax_scaled(s: &mut [f32], scale: f32) {
    // Eight lanes for the max (a single running max would not vectorise).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = s.chunks_exact_mut(8);
    let mut max = chunks.into_remainder().iter_mut().fold(f32::NEG_INFINITY, |m, v| {
        *v *= scale;
        m.max(*v)
    });
    for c in s.chunks_exact_mut(8) {
        for i in 0..8 {
            c[i] *= scale;
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    for l in lanes {
        max = max.max(l);
    }
    softmax_shifted(s, max);
}
}

/// The largest element (NaNs ignored, as `f32::max` does; -inf when
/// empty), in eight independent lanes so that the loop vectorises (a single
/// running max does not).
#[inline]
pub fn max_lanes(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let mut m = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    for l in lanes {
        m = m.max(l);
    }
    m
}

/// Sum in eight independent lanes (vectorises; see [`dot`]).
#[inline]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for v in rem {
        s += v;
    }
    s
}

/// Dot product in eight independent lanes (one vector register). Plain
/// multiply and add: `mul_add` without a compile-time FMA target feature is
/// a libm call per element (measured: 13 ms of a 40 ms decode step).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Whether a kernel may split its work over rayon's threads: not when it
/// already runs on one of them (a caller that runs one independent piece of
/// work per thread, e.g. one group of sentences each), and not with one thread.
#[inline]
pub fn may_split() -> bool {
    rayon::current_thread_index().is_none() && rayon::current_num_threads() > 1
}

/// Calls `f` with the values of `t` as one f32 slice, without a copy when the
/// tensor is a contiguous f32 CPU tensor (otherwise a converted copy).
/// Inference only: reading the storage records no operation for autograd.
pub fn view_f32<R>(t: &candle_core::Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.dtype() == candle_core::DType::F32 && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let candle_core::Storage::Cpu(c) = &*storage {
            let v = c.as_slice::<f32>()?;
            let start = layout.start_offset();
            return f(&v[start..start + layout.shape().elem_count()]);
        }
    }
    let v = t.to_dtype(candle_core::DType::F32)?.to_device(&candle_core::Device::Cpu)?.flatten_all()?.to_vec1()?;
    f(&v)
}

/// `x[r, :] = layer_norm(x[r, :] + residual[r, :]) * w + b`, row by row, for
/// every `w.len()`-wide row (`(v - mean) / sqrt(var + eps)`, biased
/// variance, statistics in f32 over two passes). In parallel for large
/// inputs when [`may_split`].
pub fn layer_norm_rows(x: &mut [f32], residual: Option<&[f32]>, w: &[f32], b: Option<&[f32]>, eps: f32) {
    let d = w.len();
    let work = |(r, row): (usize, &mut [f32])| {
        if let Some(res) = residual {
            for (v, rr) in row.iter_mut().zip(&res[r * d..(r + 1) * d]) {
                *v += rr;
            }
        }
        layer_norm_row(row, w, b, eps);
    };
    if x.len() >= 1 << 15 && may_split() {
        x.par_chunks_mut(d).enumerate().for_each(work);
    } else {
        x.chunks_mut(d).enumerate().for_each(work);
    }
}

wide! {
fn layer_norm_row(row: &mut [f32], w: &[f32], b: Option<&[f32]>, eps: f32) {
    let n = row.len() as f32;
    let mean = sum(row) / n;
    let mut acc = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            let t = c[i] - mean;
            acc[i] += t * t;
        }
    }
    let mut var = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for v in rem {
        var += (v - mean) * (v - mean);
    }
    let inv = 1.0 / (var / n + eps).sqrt();
    match b {
        Some(b) => {
            for ((v, g), bb) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * inv * g + bb;
            }
        }
        None => {
            for (v, g) in row.iter_mut().zip(w) {
                *v = (*v - mean) * inv * g;
            }
        }
    }
}
}

wide! {
/// `x[r, 0..bias.len()] += bias` for every row of `x`, rows `ld` apart.
pub fn add_bias_rows(x: &mut [f32], bias: &[f32], ld: usize) {
    for row in x.chunks_mut(ld) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}
}

/// Bidirectional self-attention of every packed sequence over itself (an
/// encoder's attention).
///
/// `qkv` is `[total, 3 * hidden]`: each row holds the token's query, key
/// and value (`hidden = n_heads * head_dim` each, head `h` at columns
/// `h * head_dim ..`). Sequence `s` is rows `offsets[s] .. offsets[s + 1]`
/// (`offsets` starts at 0 and ends at `total`). Writes `[total, hidden]`
/// (heads side by side) to `out`. Sequences run in parallel when
/// [`may_split`]; each sequence's result depends only on its own rows.
pub fn attend_packed(
    qkv: &[f32],
    offsets: &[usize],
    (n_heads, head_dim): (usize, usize),
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let hidden = n_heads * head_dim;
    let total = *offsets.last().unwrap_or(&0);
    if offsets.first().copied().unwrap_or(0) != 0 || offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::input("attention", "offsets must start at 0 and not decrease"));
    }
    if qkv.len() != total * 3 * hidden || out.len() != total * hidden {
        return Err(Error::input(
            "attention",
            format!("buffers of {} and {} values for {total} rows of width {hidden}", qkv.len(), out.len()),
        ));
    }
    // One disjoint slice of `out` per sequence.
    let mut parts = Vec::with_capacity(offsets.len().saturating_sub(1));
    let mut rest = out;
    for w in offsets.windows(2) {
        let (head, tail) = rest.split_at_mut((w[1] - w[0]) * hidden);
        parts.push((w[0], w[1] - w[0], head));
        rest = tail;
    }
    let work = |scores: &mut Vec<f32>, (start, len, dst): (usize, usize, &mut [f32])| {
        attend_one(&qkv[start * 3 * hidden..(start + len) * 3 * hidden], len, (n_heads, head_dim), scale, scores, dst);
    };
    if parts.len() > 1 && may_split() {
        // Longest first, so the big ones do not end up last on one thread.
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        parts.into_par_iter().for_each_init(Vec::new, work);
    } else {
        let mut scores = Vec::new();
        parts.into_iter().for_each(|p| work(&mut scores, p));
    }
    Ok(())
}

/// Attention of one sequence (`qkv` its `[l, 3 * hidden]` rows) into `dst`
/// (`[l, hidden]`), `scores` a scratch buffer.
fn attend_one(
    qkv: &[f32],
    l: usize,
    (n_heads, hd): (usize, usize),
    scale: f32,
    scores: &mut Vec<f32>,
    dst: &mut [f32],
) {
    if l == 0 {
        return;
    }
    let hidden = n_heads * hd;
    let row = 3 * hidden;
    scores.clear();
    scores.resize(l * l, 0.0);
    for h in 0..n_heads {
        let q = qkv[h * hd..].as_ptr();
        let k = qkv[hidden + h * hd..].as_ptr();
        let v = qkv[2 * hidden + h * hd..].as_ptr();
        // SAFETY: q, k, v address rows 0..l (stride `row`) and columns
        // 0..hd of their head inside `qkv` (l rows of `row` values);
        // scores is l x l; dst is l rows of `hidden`, columns h*hd..+hd.
        // scores and dst are separate buffers from qkv.
        unsafe {
            // scores[i, j] = q_i · k_j: b = kᵀ, element (c, j) at j*row + c
            gemm_raw((l, l, hd), scores.as_mut_ptr(), l, q, (row, 1), k, (1, row), false);
        }
        for srow in scores.chunks_exact_mut(l) {
            softmax_scaled(srow, scale);
        }
        unsafe {
            // dst[i, h] = sum_j p[i, j] v_j
            gemm_raw((l, hd, l), dst[h * hd..].as_mut_ptr(), hidden, scores.as_ptr(), (l, 1), v, (row, 1), false);
        }
    }
}

/// Mean of each packed sequence's `d`-wide rows, L2-normalised when
/// `normalize` (sentence-transformers' mean pooling + `Normalize`):
/// `[offsets.len() - 1, d]`. An empty sequence gives zeros.
pub fn mean_pool_packed(x: &[f32], d: usize, offsets: &[usize], normalize: bool) -> Vec<f32> {
    let n = offsets.len().saturating_sub(1);
    let mut out = vec![0f32; n * d];
    for (s, o) in out.chunks_exact_mut(d).enumerate() {
        let (a, b) = (offsets[s], offsets[s + 1]);
        for r in a..b {
            for (acc, v) in o.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                *acc += v;
            }
        }
        let count = ((b - a) as f32).max(1e-9);
        for v in o.iter_mut() {
            *v /= count;
        }
        if normalize {
            let norm = dot(o, o).sqrt().max(1e-12);
            for v in o.iter_mut() {
                *v /= norm;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::scaled_dot_product_attention;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    fn rand_scaled(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        rand_vec(n, seed).into_iter().map(|v| v * scale).collect()
    }

    /// erf by its Taylor series in f64 (converges fast for |x| <= 4 with
    /// enough terms), the reference for the f32 approximation.
    fn erf_ref(x: f64) -> f64 {
        // Past 4, erf is within 2e-8 of ±1 (and the series would cancel badly).
        if x.abs() > 4.0 {
            return x.signum();
        }
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn max_lanes_matches_a_running_max() {
        for n in [0, 1, 7, 8, 9, 33, 512] {
            let mut x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.25).collect();
            let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_lanes(&x).to_bits(), want.to_bits(), "n = {n}");
            if n > 2 {
                x[1] = f32::NAN;
                let want = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max_lanes(&x).to_bits(), want.to_bits(), "n = {n} with a NaN");
            }
        }
    }

    /// The `wide!` kernels give bit-identical results at every vector width
    /// (the CPU's widest, AVX2, and the baseline build).
    #[test]
    fn wide_kernels_match_across_widths() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let d = 77;
        let x: Vec<f32> = (0..5 * d).map(|_| rng.gen_range(-6.0..6.0)).collect();
        let w: Vec<f32> = (0..d).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let run = |width: SimdWidth| {
            FORCE_WIDTH.with(|f| f.set(Some(width)));
            let mut outs: Vec<Vec<f32>> = Vec::new();
            let mut a = x.clone();
            rms_norm_rows(&mut a, &w, 1e-6);
            outs.push(a);
            let mut a = x.clone();
            layer_norm_rows(&mut a, Some(&x), &w, Some(&w), 1e-12);
            outs.push(a);
            for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu, Activation::Silu] {
                let mut a = x.clone();
                activation_in_place(&mut a, act);
                outs.push(a);
            }
            let (mut g, mut h) = (x.clone(), x.clone());
            gelu_tanh_mul(&mut g, &w);
            silu_mul(&mut h, &w);
            outs.extend([g, h]);
            let mut a = x.clone();
            softmax_scaled(&mut a, 0.3);
            outs.push(a);
            let mut a = x.clone();
            add_bias_rows(&mut a, &w[..10], 13);
            outs.push(a);
            FORCE_WIDTH.with(|f| f.set(None));
            outs
        };
        let widest = run(SimdWidth::Avx512);
        for width in [SimdWidth::Avx2, SimdWidth::Base] {
            let got = run(width);
            for (i, (a, b)) in widest.iter().zip(&got).enumerate() {
                let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "kernel {i} differs between {:?} and {width:?}", detected_width());
            }
        }
    }

    #[test]
    fn erf_and_activations_match_plain_formulas() {
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let (got, want) = (erf(x) as f64, erf_ref(x as f64));
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
        let xs: Vec<f32> = (-80..=80).map(|i| i as f32 / 10.0).collect();
        for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu, Activation::Silu] {
            let mut got = xs.clone();
            activation_in_place(&mut got, act);
            for (x, g) in xs.iter().zip(&got) {
                let x64 = *x as f64;
                let want = match act {
                    Activation::GeluErf => 0.5 * x64 * (1.0 + erf_ref(x64 / 2f64.sqrt())),
                    Activation::GeluTanh => {
                        0.5 * x64
                            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044_715 * x64.powi(3))).tanh())
                    }
                    Activation::Relu => x64.max(0.0),
                    Activation::Silu => x64 / (1.0 + (-x64).exp()),
                };
                assert!((*g as f64 - want).abs() < 1e-6 * want.abs().max(1.0), "{act:?}({x}) = {g}, want {want}");
            }
        }
    }

    #[test]
    fn layer_norm_and_softmax_match_the_formulas() {
        let d = 37;
        let x = rand_scaled(3 * d, 21, 3.0);
        let (w, b, res) = (rand_vec(d, 22), rand_vec(d, 23), rand_vec(3 * d, 24));
        let mut got = x.clone();
        layer_norm_rows(&mut got, Some(&res), &w, Some(&b), 1e-12);
        for r in 0..3 {
            let row: Vec<f64> = (0..d).map(|j| (x[r * d + j] + res[r * d + j]) as f64).collect();
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            for j in 0..d {
                let want = (row[j] - mean) / (var + 1e-12).sqrt() * w[j] as f64 + b[j] as f64;
                assert!((got[r * d + j] as f64 - want).abs() < 1e-5, "row {r} col {j}");
            }
        }
        let s0 = rand_scaled(19, 25, 5.0);
        let mut s = s0.clone();
        softmax_scaled(&mut s, 0.7);
        let m = s0.iter().map(|v| (v * 0.7) as f64).fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = s0.iter().map(|v| ((v * 0.7) as f64 - m).exp()).sum();
        for (got, v) in s.iter().zip(&s0) {
            assert!((*got as f64 - ((*v * 0.7) as f64 - m).exp() / z).abs() < 1e-6);
        }
    }

    /// Packed attention against a plain triple loop per sequence and head,
    /// with sequences of lengths 0, 1, 5 and 70 in one call.
    #[test]
    fn packed_attention_matches_a_plain_loop() {
        let (h, hd) = (3, 8);
        let hidden = h * hd;
        let lens = [5usize, 0, 70, 1];
        let mut offsets = vec![0];
        for l in lens {
            offsets.push(offsets.last().unwrap() + l);
        }
        let total = *offsets.last().unwrap();
        let qkv = rand_scaled(total * 3 * hidden, 9, 2.0);
        let mut out = vec![f32::NAN; total * hidden];
        attend_packed(&qkv, &offsets, (h, hd), 0.35, &mut out).unwrap();
        // The same on one of rayon's threads (no split inside).
        let mut serial = vec![f32::NAN; total * hidden];
        rayon::scope(|s| s.spawn(|_| attend_packed(&qkv, &offsets, (h, hd), 0.35, &mut serial).unwrap()));
        assert_eq!(out, serial);
        let at =
            |r: usize, part: usize, head: usize, c: usize| qkv[r * 3 * hidden + part * hidden + head * hd + c] as f64;
        for s in 0..lens.len() {
            let (o, l) = (offsets[s], lens[s]);
            for head in 0..h {
                for i in 0..l {
                    let sc: Vec<f64> = (0..l)
                        .map(|j| (0..hd).map(|c| at(o + i, 0, head, c) * at(o + j, 1, head, c)).sum::<f64>() * 0.35)
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for c in 0..hd {
                        let want: f64 = (0..l).map(|j| e[j] / z * at(o + j, 2, head, c)).sum();
                        let got = out[(o + i) * hidden + head * hd + c] as f64;
                        assert!((got - want).abs() < 1e-5, "seq {s} head {head} row {i}: {got} vs {want}");
                    }
                }
            }
        }
        assert!(attend_packed(&qkv, &[0, 3], (h, hd), 0.35, &mut out).is_err());
    }

    #[test]
    fn pooling_averages_and_normalises() {
        let x = [0.0f32, 0.0, 6.0, 8.0, 5.0, 5.0];
        let p = mean_pool_packed(&x, 2, &[0, 2, 2, 3], true);
        assert!((p[0] - 0.6).abs() < 1e-6 && (p[1] - 0.8).abs() < 1e-6, "{p:?}");
        assert_eq!(&p[2..4], &[0.0, 0.0]);
        assert!((p[4] - 0.5f32.sqrt()).abs() < 1e-6);
        assert_eq!(mean_pool_packed(&x, 2, &[0, 2], false), [3.0, 4.0]);
    }

    #[test]
    fn matmul_matches_a_plain_loop() {
        let (m, k, n) = (37, 50, 29);
        let (x, w) = (rand_vec(m * k, 1), rand_vec(n * k, 2));
        let mut out = vec![0f32; m * n];
        matmul_xwt(&x, m, k, &w, n, &mut out).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
                assert!((out[i * n + j] - want).abs() < 1e-4);
            }
        }
        assert!(matmul_xwt(&x, m, k, &w[..10], n, &mut out).is_err());
    }

    /// Both paths (query by query in key spans, blocked gemm) against
    /// candle's attention with an explicit causal/window mask, with GQA, a
    /// past, and soft-capping; decode over several spans of keys (and a
    /// window cutting a span) merges them exactly enough.
    #[test]
    fn attention_matches_the_reference() {
        let dev = Device::Cpu;
        for &(h, kvh, past, t, window, softcap) in &[
            (4, 2, 0, 5, None, None),
            (4, 2, 7, 1, None, Some(5.0)),
            (4, 2, 3, 150, Some(40), None),
            (4, 2, 130, 20, None, Some(3.0)),
            (6, 2, 1300, 2, None, None),
            (6, 2, 1100, 3, Some(700), Some(4.0)),
            (3, 1, DECODE_SPAN - 1, 1, None, None),
        ] {
            let d = 16;
            let total = past + t;
            let q = rand_vec(t * h * d, 3);
            let k = rand_vec(total * kvh * d, 4);
            let v = rand_vec(total * kvh * d, 5);
            let mut cache = crate::kv::RawKv::new(kvh, d, window, crate::kv::KvDtype::F32);
            let cut = past * kvh * d;
            cache.append(&k[..cut], &v[..cut]);
            let sdpa = SdpaOptions { scale: 0.3, softcap };
            let call = AttnCall { n_heads: h, n_kv_heads: kvh, head_dim: d, past, sdpa, window };
            let mut out = vec![0f32; q.len()];
            cache.append_and_attend(&q, &k[cut..], &v[cut..], t, &call, &mut out).unwrap();
            // Reference: head-major tensors and an additive mask.
            let qt =
                Tensor::from_vec(q.clone(), (t, h, d), &dev).unwrap().transpose(0, 1).unwrap().unsqueeze(0).unwrap();
            let kt = Tensor::from_vec(k, (total, kvh, d), &dev).unwrap().transpose(0, 1).unwrap().unsqueeze(0).unwrap();
            let vt = Tensor::from_vec(v, (total, kvh, d), &dev).unwrap().transpose(0, 1).unwrap().unsqueeze(0).unwrap();
            let mut mask = vec![0f32; t * total];
            for i in 0..t {
                let pos = past + i;
                for j in 0..total {
                    let visible = j <= pos && window.is_none_or(|w| pos - j < w);
                    if !visible {
                        mask[i * total + j] = f32::NEG_INFINITY;
                    }
                }
            }
            let mask = Tensor::from_vec(mask, (1, 1, t, total), &dev).unwrap();
            let want = scaled_dot_product_attention(
                &qt.contiguous().unwrap(),
                &kt.contiguous().unwrap(),
                &vt.contiguous().unwrap(),
                Some(&mask),
                sdpa,
                None,
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
            let diff = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "past {past} t {t} window {window:?}: max diff {diff}");
        }
    }

    #[test]
    fn fast_exp_and_gelu_match_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp_fast(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.001_7;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_fast(-100.0), 0.0);
        assert_eq!(exp_fast(100.0), f32::INFINITY);
        assert!(exp_fast(f32::NAN).is_nan());
        // GeGLU against the tanh formula, in f64.
        let xs: Vec<f32> = (0..4001).map(|i| -20.0 + i as f32 * 0.01).collect();
        let mut g = xs.clone();
        gelu_tanh_mul(&mut g, &vec![1.0; xs.len()]);
        for (x, got) in xs.iter().zip(&g) {
            let x = *x as f64;
            let want = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x.powi(3))).tanh());
            assert!((*got as f64 - want).abs() < 1e-6 * want.abs().max(1.0), "gelu({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn norms_rope_and_gelu_match_plain_formulas() {
        let d = 8;
        let mut x = rand_vec(2 * d, 7);
        let w = rand_vec(d, 8);
        let orig = x.clone();
        rms_norm_rows(&mut x, &w, 1e-6);
        for r in 0..2 {
            let row = &orig[r * d..(r + 1) * d];
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / d as f32 + 1e-6).sqrt();
            for j in 0..d {
                assert!((x[r * d + j] - row[j] / rms * w[j]).abs() < 1e-5);
            }
        }
        // RoPE at position 0 is the identity; at p it rotates pairs (j, j + d/2).
        let (c, s) = rope_tables(10_000.0, 1.0, d, &[0, 3]);
        let mut y = orig.clone();
        rope_halves(&mut y, 1, d, &c, &s);
        assert_eq!(&y[..d], &orig[..d]);
        let a = 3.0f32 * (1.0 / 10_000f64.powf(2.0 / d as f64)) as f32;
        let (x1, x2) = (orig[d + 1], orig[d + 1 + d / 2]);
        assert!((y[d + 1] - (x1 * a.cos() - x2 * a.sin())).abs() < 1e-6);
        let mut g = vec![1.0f32, -2.0];
        gelu_tanh_mul(&mut g, &[2.0, 1.0]);
        assert!((g[0] - 2.0 * 0.841_192).abs() < 1e-5 && (g[1] + 0.045_402).abs() < 1e-5, "{g:?}");
    }
}
