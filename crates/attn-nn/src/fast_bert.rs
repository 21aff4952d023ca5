//! Encoder (BERT) inference kernels on plain `f32` buffers: what a fused
//! sentence-embedding forward runs between its `gemm` matmuls.
//!
//! Sequences are packed without padding: a batch of sequences of lengths
//! `l_0, l_1, ...` is one `[sum(l_i), width]` row-major buffer, sequence
//! `s` in rows `offsets[s] .. offsets[s] + l_s`. Row-wise kernels (norms,
//! activations) do not care where a sequence starts; attention runs per
//! sequence and never sees another sequence's rows, so no mask is needed
//! and no work is spent on padding.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::fast::gemm_raw;

/// Below this many elements a row-wise pass stays on the calling thread.
const PAR_ELEMS: usize = 1 << 15;

/// How a kernel may use rayon's threads: split its own work (`Inner`), or
/// run on the calling thread only (`Serial`, for callers that already run
/// one independent piece of work per thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    Inner,
    Serial,
}

impl Par {
    fn split(self, elems: usize) -> bool {
        self == Par::Inner && elems >= PAR_ELEMS && rayon::current_num_threads() > 1
    }
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` (row-major) with `gemm`, split over
/// rayon's threads when `par` is [`Par::Inner`] and the product is large.
pub fn matmul_xwt(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32], par: Par) -> Result<()> {
    crate::kernels::fast::matmul_xwt_par(x, (m, k), w, n, out, n, par == Par::Inner)
}

/// `x[r, c] = layer_norm(x[r, :] + bias + residual[r, :])`, row by row:
/// `(v - mean) / sqrt(var + eps) * w + b` with the biased variance. `bias`
/// and `residual` are optional (empty slices skip them).
#[allow(clippy::too_many_arguments)]
pub fn add_layer_norm_rows(x: &mut [f32], bias: &[f32], residual: &[f32], w: &[f32], b: &[f32], eps: f32, par: Par) {
    let d = w.len();
    let work = |(r, row): (usize, &mut [f32])| {
        if !bias.is_empty() {
            for (v, bb) in row.iter_mut().zip(bias) {
                *v += bb;
            }
        }
        if !residual.is_empty() {
            for (v, rr) in row.iter_mut().zip(&residual[r * d..(r + 1) * d]) {
                *v += rr;
            }
        }
        layer_norm_row(row, w, b, eps);
    };
    if par.split(x.len()) {
        x.par_chunks_mut(d).enumerate().for_each(work);
    } else {
        x.chunks_mut(d).enumerate().for_each(work);
    }
}

/// LayerNorm of one row in place (statistics in f32, two passes).
#[inline]
pub fn layer_norm_row(row: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = sum8(row) / n;
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
    for ((v, g), bb) in row.iter_mut().zip(w).zip(b) {
        *v = (*v - mean) * inv * g + bb;
    }
}

#[inline]
fn sum8(x: &[f32]) -> f32 {
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

/// `erf(x)` in f32: a rational approximation on `[-4, 4]` (Eigen's
/// `generic_fast_erf_float`; outside, `erf` is `±1` in f32), written with
/// plain arithmetic so loops over it vectorise. Error about 2 ulp.
#[inline]
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

/// `exp(x)` without a libm call (vectorisable): [`crate::kernels::fast::exp_fast`].
pub use crate::kernels::fast::exp_fast as exp;

/// The activation of an encoder's feed-forward layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncAct {
    /// `x * (1 + erf(x / sqrt 2)) / 2` (BERT's `gelu`)
    GeluErf,
    /// GELU's tanh approximation
    GeluTanh,
    Relu,
    Silu,
}

impl EncAct {
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            EncAct::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            EncAct::GeluTanh => {
                const S2PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (S2PI * (x + 0.044_715 * x * x * x)).tanh())
            }
            EncAct::Relu => x.max(0.0),
            EncAct::Silu => x / (1.0 + exp(-x)),
        }
    }
}

/// `x[r, :] = act(x[r, :] + bias)` for every `bias.len()`-wide row.
pub fn bias_act_rows(x: &mut [f32], bias: &[f32], act: EncAct, par: Par) {
    let n = bias.len();
    let work = |row: &mut [f32]| match act {
        // One arm per activation so each loop is a straight vectorisable body.
        EncAct::GeluErf => row.iter_mut().zip(bias).for_each(|(v, b)| *v = EncAct::GeluErf.apply(*v + b)),
        EncAct::GeluTanh => row.iter_mut().zip(bias).for_each(|(v, b)| *v = EncAct::GeluTanh.apply(*v + b)),
        EncAct::Relu => row.iter_mut().zip(bias).for_each(|(v, b)| *v = (*v + b).max(0.0)),
        EncAct::Silu => row.iter_mut().zip(bias).for_each(|(v, b)| *v = EncAct::Silu.apply(*v + b)),
    };
    if par.split(x.len()) {
        x.par_chunks_mut(n).for_each(work);
    } else {
        x.chunks_mut(n).for_each(work);
    }
}

/// `x[r, :] += bias` for every `bias.len()`-wide row.
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// The shape of a packed encoder self-attention call.
#[derive(Debug, Clone, Copy)]
pub struct EncAttn {
    pub n_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q · k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// Bidirectional self-attention of every packed sequence over itself.
///
/// `qkv` is `[total, 3 * hidden]`: each row holds the token's query, key
/// and value (`hidden = n_heads * head_dim` each, head `h` at columns
/// `h * head_dim ..`). Sequence `s` is rows `offsets[s] .. offsets[s + 1]`
/// (`offsets` starts at 0 and ends at `total`). Writes `[total, hidden]`
/// (heads side by side) to `out`. Sequences run in parallel with
/// [`Par::Inner`]; each sequence's result depends only on its own rows.
pub fn attend_packed(qkv: &[f32], offsets: &[usize], a: &EncAttn, out: &mut [f32], par: Par) -> Result<()> {
    let hidden = a.n_heads * a.head_dim;
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
        attend_one(&qkv[start * 3 * hidden..(start + len) * 3 * hidden], len, a, scores, dst);
    };
    if par == Par::Inner && parts.len() > 1 && rayon::current_num_threads() > 1 {
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
fn attend_one(qkv: &[f32], l: usize, a: &EncAttn, scores: &mut Vec<f32>, dst: &mut [f32]) {
    if l == 0 {
        return;
    }
    let (hd, hidden) = (a.head_dim, a.n_heads * a.head_dim);
    let row = 3 * hidden;
    scores.clear();
    scores.resize(l * l, 0.0);
    for h in 0..a.n_heads {
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
            softmax_scaled(srow, a.scale);
        }
        unsafe {
            // dst[i, h] = sum_j p[i, j] v_j
            gemm_raw((l, hd, l), dst[h * hd..].as_mut_ptr(), hidden, scores.as_ptr(), (l, 1), v, (row, 1), false);
        }
    }
}

/// `s = softmax(s * scale)` in place.
#[inline]
pub fn softmax_scaled(s: &mut [f32], scale: f32) {
    // Eight lanes for the max and the sum, a plain map for exp: each loop
    // vectorises (a single running f32 sum or max would not).
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = s.chunks_exact(8);
    let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    for c in chunks {
        for i in 0..8 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    for l in lanes {
        max = max.max(l);
    }
    let m = max * scale;
    for v in s.iter_mut() {
        *v = exp(*v * scale - m);
    }
    let inv = 1.0 / sum8(s);
    for v in s.iter_mut() {
        *v *= inv;
    }
}

/// Mean of each packed sequence's rows, L2-normalised (sentence-transformers'
/// mean pooling + `Normalize`): `[offsets.len() - 1, d]`. An empty sequence
/// gives zeros.
pub fn mean_pool_normalize_packed(x: &[f32], d: usize, offsets: &[usize]) -> Vec<f32> {
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
        let norm = o.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for v in o.iter_mut() {
            *v /= norm;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-1.0..1.0) * scale).collect()
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
    fn erf_and_exp_match_f64() {
        for i in -600..=600 {
            let x = i as f32 / 100.0;
            let want = erf_ref(x as f64);
            let got = erf(x) as f64;
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
        }
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(((got - want) / want).abs() < 5e-7, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp(-200.0), 0.0);
    }

    #[test]
    fn activations_match_plain_formulas() {
        for i in -80..=80 {
            let x = i as f32 / 10.0;
            let gelu = 0.5 * x as f64 * (1.0 + erf_ref(x as f64 / 2f64.sqrt()));
            assert!((EncAct::GeluErf.apply(x) as f64 - gelu).abs() < 1e-6, "gelu({x})");
            let t = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
            assert!((EncAct::GeluTanh.apply(x) - t).abs() < 1e-6);
            assert!((EncAct::Silu.apply(x) - x / (1.0 + (-x).exp())).abs() < 1e-6);
            assert_eq!(EncAct::Relu.apply(x), x.max(0.0));
        }
        let mut v = vec![1.0f32, -1.0, 0.5, 2.0];
        bias_act_rows(&mut v, &[1.0, 1.0], EncAct::Relu, Par::Inner);
        assert_eq!(v, [2.0, 0.0, 1.5, 3.0]);
    }

    #[test]
    fn layer_norm_matches_the_formula() {
        let d = 37;
        let x = rand_vec(3 * d, 1, 3.0);
        let (w, b) = (rand_vec(d, 2, 1.0), rand_vec(d, 3, 1.0));
        let (bias, res) = (rand_vec(d, 4, 1.0), rand_vec(3 * d, 5, 1.0));
        let mut got = x.clone();
        add_layer_norm_rows(&mut got, &bias, &res, &w, &b, 1e-12, Par::Serial);
        for r in 0..3 {
            let row: Vec<f64> = (0..d).map(|j| (x[r * d + j] + bias[j] + res[r * d + j]) as f64).collect();
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            for j in 0..d {
                let want = (row[j] - mean) / (var + 1e-12).sqrt() * w[j] as f64 + b[j] as f64;
                assert!((got[r * d + j] as f64 - want).abs() < 1e-5, "row {r} col {j}");
            }
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
        let qkv = rand_vec(total * 3 * hidden, 9, 2.0);
        let a = EncAttn { n_heads: h, head_dim: hd, scale: 0.35 };
        let mut out = vec![f32::NAN; total * hidden];
        attend_packed(&qkv, &offsets, &a, &mut out, Par::Inner).unwrap();
        let mut serial = vec![f32::NAN; total * hidden];
        attend_packed(&qkv, &offsets, &a, &mut serial, Par::Serial).unwrap();
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
        assert!(attend_packed(&qkv, &[0, 3], &a, &mut out, Par::Serial).is_err());
    }

    #[test]
    fn matmul_matches_a_plain_loop_serial_and_split() {
        let (m, k, n) = (70, 90, 80);
        let (x, w) = (rand_vec(m * k, 11, 1.0), rand_vec(n * k, 12, 1.0));
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        matmul_xwt(&x, m, k, &w, n, &mut a, Par::Inner).unwrap();
        matmul_xwt(&x, m, k, &w, n, &mut b, Par::Serial).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|c| x[i * k + c] * w[j * k + c]).sum();
                assert!((a[i * n + j] - want).abs() < 1e-4 && (b[i * n + j] - want).abs() < 1e-4);
            }
        }
        assert!(matmul_xwt(&x, m, k, &w[..10], n, &mut a, Par::Serial).is_err());
    }

    #[test]
    fn pooling_averages_and_normalises() {
        let x = [0.0f32, 0.0, 6.0, 8.0, 5.0, 5.0];
        let p = mean_pool_normalize_packed(&x, 2, &[0, 2, 2, 3]);
        assert!((p[0] - 0.6).abs() < 1e-6 && (p[1] - 0.8).abs() < 1e-6, "{p:?}");
        assert_eq!(&p[2..4], &[0.0, 0.0]);
        assert!((p[4] - 0.5f32.sqrt()).abs() < 1e-6);
    }
}
