//! Deliberately naive reference maths for the nn blocks (f64 loops over
//! `Vec`s), so that tests compare candle's tensor code and attn's kernels
//! with something obviously correct; seeded random data and weights.

use attn_nn::{Linear, WeightSource};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Deterministic "pretrained" weights for any name: seeded by the name, so
/// the test does not depend on candle's global random generator.
pub struct SeededSource;

impl WeightSource for SeededSource {
    fn load(
        &self,
        name: &str,
        shape: &[usize],
        _: attn_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> attn_nn::Result<Tensor> {
        // FNV-1a of the name: a seed that never changes between Rust releases.
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        let mut r = rng(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = if shape.len() == 1 {
            // Norm scales near 1 (near 0 for the `1 + w` RMSNorm of the
            // queries, which then scales by about 1), biases near 0.
            let centre = if name.ends_with(".weight") && name != "attn.q_norm.weight" { 1.0 } else { 0.0 };
            rand_vec(&mut r, n, 0.3).iter().map(|x| x + centre).collect()
        } else {
            rand_vec(&mut r, n, 1.5 / (*shape.last().unwrap() as f32).sqrt())
        };
        Ok(Tensor::from_vec(v, shape, device)?.to_dtype(dtype)?)
    }

    fn contains(&self, _: &str) -> bool {
        true
    }
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `(-scale, scale)`.
pub fn rand_vec(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

pub fn tensor(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

pub fn u32_tensor(data: &[u32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

/// A random dense [`Linear`] and the plain copies of its weight (`[out, in]`)
/// and bias.
pub struct RefLinear {
    pub layer: Linear,
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub in_f: usize,
    pub out_f: usize,
}

pub fn rand_linear(rng: &mut StdRng, in_f: usize, out_f: usize, bias: bool) -> RefLinear {
    let scale = 1.0 / (in_f as f32).sqrt();
    let w = rand_vec(rng, out_f * in_f, scale);
    let b = bias.then(|| rand_vec(rng, out_f, 0.5));
    let layer = Linear::new(tensor(&w, &[out_f, in_f]), b.as_ref().map(|b| tensor(b, &[out_f]))).unwrap();
    RefLinear { layer, w, b, in_f, out_f }
}

impl RefLinear {
    /// `x` is `rows` rows of `in_f` values; returns `rows` rows of `out_f`.
    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        linear_ref(x, &self.w, self.b.as_deref(), self.in_f, self.out_f)
    }
}

/// `y[r, o] = sum_i x[r, i] * w[o, i] + b[o]`.
pub fn linear_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, in_f: usize, out_f: usize) -> Vec<f32> {
    assert_eq!(x.len() % in_f, 0);
    let rows = x.len() / in_f;
    let mut y = vec![0f32; rows * out_f];
    for r in 0..rows {
        for o in 0..out_f {
            let mut acc = b.map_or(0.0, |b| b[o] as f64);
            for i in 0..in_f {
                acc += x[r * in_f + i] as f64 * w[o * in_f + i] as f64;
            }
            y[r * out_f + o] = acc as f32;
        }
    }
    y
}

/// Softmax of one row, in f64.
pub fn softmax_ref(row: &[f64]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

/// The error function to about 1e-12 on the range the tests use: the Taylor
/// series `2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1))` for |x| <= 4
/// (terms stay below 1e5, so f64 cancellation costs < 1e-10), and +-1 beyond
/// (erfc(4) = 1.5e-8).
pub fn erf(x: f64) -> f64 {
    if x.abs() > 4.0 {
        return x.signum();
    }
    let mut sum = 0.0;
    let mut term = x; // (-1)^n x^(2n+1) / n!
    let mut n = 0u32;
    loop {
        let contrib = term / (2 * n + 1) as f64;
        sum += contrib;
        if contrib.abs() < 1e-17 {
            break;
        }
        n += 1;
        term *= -x * x / n as f64;
    }
    2.0 / std::f64::consts::PI.sqrt() * sum
}

pub fn gelu_erf_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

pub fn gelu_tanh_ref(x: f64) -> f64 {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
}

pub fn silu_ref(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

pub fn relu_ref(x: f64) -> f64 {
    x.max(0.0)
}

/// Rotary embedding of one head vector at `pos`, by the textbook formula:
/// pair `i` is rotated by `pos * base^(-2i/d)`. Interleaved pairs are
/// `(x[2i], x[2i+1])`; halves pairs are `(x[i], x[i + d/2])`.
pub fn rope_ref(x: &[f32], pos: usize, base: f64, interleaved: bool) -> Vec<f32> {
    rope_ref_at(x, pos as f64, base, interleaved)
}

/// [`rope_ref`] at a fractional position (linear position scaling).
pub fn rope_ref_at(x: &[f32], pos: f64, base: f64, interleaved: bool) -> Vec<f32> {
    let d = x.len();
    let half = d / 2;
    let mut out = vec![0f32; d];
    for i in 0..half {
        let angle = pos * base.powf(-((2 * i) as f64) / d as f64);
        let (s, c) = angle.sin_cos();
        let (a, b) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let (x0, x1) = (x[a] as f64, x[b] as f64);
        out[a] = (x0 * c - x1 * s) as f32;
        out[b] = (x0 * s + x1 * c) as f32;
    }
    out
}

/// Naive attention. `q`: `[b, h, tq, d]`, `k`, `v`: `[b, hkv, tk, d]`, flat
/// row-major. Query head `hi` reads kv head `hi / (h / hkv)`. Keys for which
/// `allowed(b, i, j)` is false are left out of the softmax entirely.
#[allow(clippy::too_many_arguments)]
pub fn attention_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (b, h, hkv, tq, tk, d): (usize, usize, usize, usize, usize, usize),
    scale: f64,
    softcap: Option<f64>,
    allowed: impl Fn(usize, usize, usize) -> bool,
) -> Vec<f32> {
    let g = h / hkv;
    let mut out = vec![0f32; b * h * tq * d];
    for bi in 0..b {
        for hi in 0..h {
            let kh = hi / g;
            for i in 0..tq {
                let qrow = &q[((bi * h + hi) * tq + i) * d..][..d];
                let mut keys = Vec::new();
                let mut scores = Vec::new();
                for j in 0..tk {
                    if !allowed(bi, i, j) {
                        continue;
                    }
                    let krow = &k[((bi * hkv + kh) * tk + j) * d..][..d];
                    let mut s = 0f64;
                    for c in 0..d {
                        s += qrow[c] as f64 * krow[c] as f64;
                    }
                    s *= scale;
                    if let Some(cap) = softcap {
                        s = (s / cap).tanh() * cap;
                    }
                    keys.push(j);
                    scores.push(s);
                }
                assert!(!keys.is_empty(), "reference: query row with no visible key");
                let p = softmax_ref(&scores);
                for c in 0..d {
                    let mut acc = 0f64;
                    for (n, &j) in keys.iter().enumerate() {
                        acc += p[n] * v[((bi * hkv + kh) * tk + j) * d + c] as f64;
                    }
                    out[((bi * h + hi) * tq + i) * d + c] = acc as f32;
                }
            }
        }
    }
    out
}

/// `[b, t, n * d]` (heads side by side) -> `[b, n, t, d]`.
pub fn split_heads_ref(x: &[f32], b: usize, t: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; b * n * t * d];
    for bi in 0..b {
        for ti in 0..t {
            for hi in 0..n {
                for c in 0..d {
                    out[((bi * n + hi) * t + ti) * d + c] = x[(bi * t + ti) * n * d + hi * d + c];
                }
            }
        }
    }
    out
}

/// `[b, n, t, d]` -> `[b, t, n * d]`.
pub fn merge_heads_ref(x: &[f32], b: usize, t: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; b * t * n * d];
    for bi in 0..b {
        for hi in 0..n {
            for ti in 0..t {
                for c in 0..d {
                    out[(bi * t + ti) * n * d + hi * d + c] = x[((bi * n + hi) * t + ti) * d + c];
                }
            }
        }
    }
    out
}

/// LayerNorm of each row of `dim` values (biased variance).
pub fn layer_norm_ref(x: &[f32], w: &[f32], b: Option<&[f32]>, dim: usize, eps: f64) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (r, row) in x.chunks(dim).enumerate() {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        for c in 0..dim {
            let n = (row[c] as f64 - mean) / (var + eps).sqrt();
            out[r * dim + c] = (n * w[c] as f64 + b.map_or(0.0, |b| b[c] as f64)) as f32;
        }
    }
    out
}

/// RMSNorm of each row; the scale is `w` or `1 + w`.
pub fn rms_norm_ref(x: &[f32], w: &[f32], dim: usize, eps: f64, add_one: bool) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (r, row) in x.chunks(dim).enumerate() {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / dim as f64;
        for c in 0..dim {
            let scale = if add_one { 1.0 + w[c] as f64 } else { w[c] as f64 };
            out[r * dim + c] = (row[c] as f64 / (ms + eps).sqrt() * scale) as f32;
        }
    }
    out
}
