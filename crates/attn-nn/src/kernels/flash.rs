//! Tiled ("flash") attention: `softmax(q k^T * scale + mask) v` computed a
//! block of queries against a block of keys at a time with an online
//! softmax, so the `[q_len, kv_len]` score matrix never exists.
//!
//! For each query row the kernel keeps a running maximum `m`, a running
//! sum `l` of `exp(s - m)` and an unnormalised output accumulator `o`. A new
//! block of scores with a larger maximum `m'` rescales `l` and `o` by
//! `exp(m - m')` before its own terms are added; at the end `o / l` is the
//! attention output. Memory is the inputs, the output and one block of
//! scratch per thread: linear in the sequence length.
//!
//! Every mask this crate builds leaves each query row a contiguous range of
//! visible keys (causal with a past offset, sliding windows, right padding),
//! so the mask is described by its parameters ([`FlashMask`]) instead of a
//! tensor and masked keys are skipped rather than added to with
//! [`MASK_VALUE`]. Key blocks entirely outside a query block's ranges are
//! never read, which halves the work of causal prefill.
//!
//! Inference only: the kernel runs on plain `f32` slices outside candle's
//! graph, so it has no backward. Callers keep [`scaled_dot_product_attention`]
//! when a gradient is tracked (see [`flash_applies`]).
//!
//! [`MASK_VALUE`]: crate::attention::MASK_VALUE
//! [`scaled_dot_product_attention`]: crate::attention::scaled_dot_product_attention

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::attention::SdpaOptions;
use crate::error::{Error, Result};

/// Query rows per work item.
const BLOCK_Q: usize = 32;
/// Keys per block of the online softmax.
const BLOCK_K: usize = 64;

/// Prompt length from which causal prefill switches to the tiled kernel.
/// Measured on Gemma 3 270M's shape (BENCHMARKS.md, "Tiled attention"):
/// below it the standard path is faster and its scores are small (64 MiB
/// per copy at 2048 tokens); above it they grow with the square of the
/// length (3.3 GiB peak at 8192 tokens against 131 MiB tiled).
pub const FLASH_MIN_LEN: usize = 2048;

/// Input length from which the encoder's (unmasked, padded) attention
/// switches to the tiled kernel: from 512 tokens MiniLM's shape runs as
/// fast tiled as standard with a fifth of the memory, and a batch of
/// encoder inputs multiplies the standard path's score matrices.
pub const FLASH_MIN_LEN_ENCODER: usize = 512;

/// Which keys each query sees: every mask of this crate as parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlashMask<'a> {
    /// The queries are the last `q_len` of `kv_len` positions (the first
    /// `kv_len - q_len` are cached) and see no later key.
    pub causal: bool,
    /// With `causal`: a query at position `i` sees keys `j > i - window`.
    pub window: Option<usize>,
    /// Per batch row, the number of real keys (right padding): keys from
    /// `key_lengths[b]` on are masked. A row left with no visible key
    /// attends uniformly to the keys the causal mask allows (to all keys
    /// without one), as the additive mask of the standard path does.
    pub key_lengths: Option<&'a [usize]>,
}

/// Shapes of a tiled attention call on flat slices: `q` is
/// `[batch, n_heads, q_len, head_dim]`, `k` and `v` are
/// `[batch, n_kv_heads, kv_len, head_dim]`, all row-major.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashShape {
    pub batch: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
}

/// Whether the tiled kernel may replace the standard path for these
/// tensors: only when no gradient flows through them (the kernel is
/// outside candle's autograd; a tensor tracks its op exactly when it is a
/// trainable variable or computed from one) and only on the CPU.
pub fn flash_applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    !tracked && q.device().is_cpu()
}

/// Tiled attention on tensors: same contract and result as
/// [`crate::attention::scaled_dot_product_attention`] with the mask
/// `mask` describes (and no dropout). Computes in f32 and returns `q`'s dtype.
pub fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &FlashMask, opts: SdpaOptions) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if v.dims() != k.dims() || bk != b || dk != d {
        return Err(Error::input(
            "flash attention",
            format!("q {:?}, k {:?}, v {:?} do not match", q.dims(), k.dims(), v.dims()),
        ));
    }
    let shape = FlashShape { batch: b, n_heads: h, n_kv_heads: hkv, q_len: tq, kv_len: tk, head_dim: d };
    let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
    let (qv, kv, vv) = (flat(q)?, flat(k)?, flat(v)?);
    let mut out = vec![0f32; qv.len()];
    flash_attention_f32(&qv, &kv, &vv, shape, mask, opts, &mut out)?;
    Ok(Tensor::from_vec(out, (b, h, tq, d), q.device())?.to_dtype(q.dtype())?)
}

/// Tiled attention on flat f32 slices (layouts in [`FlashShape`]); writes
/// `[batch, n_heads, q_len, head_dim]` into `out`.
pub fn flash_attention_f32(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: FlashShape,
    mask: &FlashMask,
    opts: SdpaOptions,
    out: &mut [f32],
) -> Result<()> {
    check(q, k, v, s, mask, out)?;
    if out.is_empty() {
        return Ok(());
    }
    let d = s.head_dim;
    let group = s.n_heads / s.n_kv_heads;
    let q_blocks = s.q_len.div_ceil(BLOCK_Q);
    let avx2 = has_avx2();
    // One work item: BLOCK_Q query rows of one head of one batch row.
    let work = |(item, dst): (usize, &mut [f32])| {
        let (bh, qb) = (item / q_blocks, item % q_blocks);
        let (bi, h) = (bh / s.n_heads, bh % s.n_heads);
        let i0 = qb * BLOCK_Q;
        let rows = dst.len() / d;
        let kv_head = bi * s.n_kv_heads + h / group;
        let kv_span = kv_head * s.kv_len * d..(kv_head + 1) * s.kv_len * d;
        let q_at = (bh * s.q_len + i0) * d;
        let key_len = mask.key_lengths.map(|l| l[bi]);
        let mut ranges = [(0usize, 0usize, false); BLOCK_Q];
        for (r, range) in ranges.iter_mut().take(rows).enumerate() {
            *range = visible(i0 + r, s, mask, key_len);
        }
        let block = Block {
            q: &q[q_at..q_at + rows * d],
            k: &k[kv_span.clone()],
            v: &v[kv_span],
            ranges: &ranges[..rows],
            d,
            scale: opts.scale as f32,
            softcap: opts.softcap.map(|c| c as f32),
        };
        block.run(dst, avx2);
    };
    let chunk = BLOCK_Q * d;
    // Each (head, query block) pair is independent; below about 32k
    // score elements the rayon hand-off costs more than it saves (the
    // threshold of the paged kernel).
    let parallel = s.batch * s.n_heads * s.q_len * s.kv_len >= 1 << 15;
    let per_head = s.q_len * d;
    if parallel {
        out.par_chunks_mut(per_head)
            .enumerate()
            .flat_map(|(bh, head)| {
                head.par_chunks_mut(chunk).enumerate().map(move |(qb, dst)| (bh * q_blocks + qb, dst))
            })
            .for_each(work);
    } else {
        for (bh, head) in out.chunks_mut(per_head).enumerate() {
            for (qb, dst) in head.chunks_mut(chunk).enumerate() {
                work((bh * q_blocks + qb, dst));
            }
        }
    }
    Ok(())
}

fn check(q: &[f32], k: &[f32], v: &[f32], s: FlashShape, mask: &FlashMask, out: &[f32]) -> Result<()> {
    let ctx = "flash attention";
    if s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
        return Err(Error::input(ctx, format!("{} kv heads do not divide {} query heads", s.n_kv_heads, s.n_heads)));
    }
    let nq = s.batch * s.n_heads * s.q_len * s.head_dim;
    let nk = s.batch * s.n_kv_heads * s.kv_len * s.head_dim;
    if q.len() != nq || k.len() != nk || v.len() != nk || out.len() != nq {
        return Err(Error::input(
            ctx,
            format!(
                "slices of {}, {}, {}, {} values do not fit {s:?} ({nq} query, {nk} key values)",
                q.len(),
                k.len(),
                v.len(),
                out.len()
            ),
        ));
    }
    if s.kv_len == 0 && s.q_len > 0 {
        return Err(Error::input(ctx, "no keys to attend to"));
    }
    if mask.causal && s.q_len > s.kv_len {
        return Err(Error::input(ctx, format!("causal with q_len {} > kv_len {}", s.q_len, s.kv_len)));
    }
    match mask.window {
        Some(0) => return Err(Error::input(ctx, "sliding window must be at least 1")),
        Some(_) if !mask.causal => return Err(Error::input(ctx, "a sliding window needs the causal mask")),
        _ => {}
    }
    if let Some(lens) = mask.key_lengths {
        if lens.len() != s.batch {
            return Err(Error::input(ctx, format!("{} key lengths for a batch of {}", lens.len(), s.batch)));
        }
        if let Some(l) = lens.iter().find(|&&l| l > s.kv_len) {
            return Err(Error::input(ctx, format!("key length {l} > kv_len {}", s.kv_len)));
        }
    }
    Ok(())
}

/// Visible keys `lo..hi` of query `i`, and whether the row is fully masked
/// (then it attends uniformly to `lo..hi`, the keys the causal mask allows).
fn visible(i: usize, s: FlashShape, mask: &FlashMask, key_len: Option<usize>) -> (usize, usize, bool) {
    let (mut lo, mut hi) = (0, s.kv_len);
    if mask.causal {
        let pos = s.kv_len - s.q_len + i;
        hi = pos + 1;
        if let Some(w) = mask.window {
            lo = (pos + 1).saturating_sub(w);
        }
    }
    match key_len {
        Some(len) if lo >= hi.min(len) => (lo, hi, true),
        Some(len) => (lo, hi.min(len), false),
        None => (lo, hi, false),
    }
}

/// One work item: a block of query rows of one head against that head's
/// keys and values.
struct Block<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    ranges: &'a [(usize, usize, bool)],
    d: usize,
    scale: f32,
    softcap: Option<f32>,
}

impl Block<'_> {
    fn run(&self, out: &mut [f32], avx2: bool) {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: AVX2 and FMA were detected at run time.
            return unsafe { self.run_avx2(out) };
        }
        let _ = avx2;
        self.run_generic::<false>(out);
    }

    /// The portable kernel compiled with AVX2 and FMA enabled, so its
    /// loops become 8-wide fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        self.run_generic::<true>(out);
    }

    #[inline(always)]
    fn run_generic<const FMA: bool>(&self, out: &mut [f32]) {
        let d = self.d;
        let rows = self.ranges.len();
        let mut m = [f32::NEG_INFINITY; BLOCK_Q];
        let mut l = [0f32; BLOCK_Q];
        let mut s = [0f32; BLOCK_K];
        out.fill(0.0);
        let k_lo = self.ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let k_hi = self.ranges.iter().map(|r| r.1).max().unwrap_or(0);
        let mut kb = k_lo;
        while kb < k_hi {
            let kb_end = (kb + BLOCK_K).min(k_hi);
            for r in 0..rows {
                let (lo, hi, uniform) = self.ranges[r];
                let (j0, j1) = (lo.max(kb), hi.min(kb_end));
                if j0 >= j1 {
                    continue;
                }
                let n = j1 - j0;
                let scores = &mut s[..n];
                if uniform {
                    scores.fill(0.0);
                } else {
                    self.scores::<FMA>(&self.q[r * d..(r + 1) * d], j0, scores);
                }
                let blk_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let o = &mut out[r * d..(r + 1) * d];
                if blk_max > m[r] {
                    let alpha = (m[r] - blk_max).exp();
                    l[r] *= alpha;
                    o.iter_mut().for_each(|x| *x *= alpha);
                    m[r] = blk_max;
                }
                let mut sum = 0f32;
                for p in scores.iter_mut() {
                    *p = (*p - m[r]).exp();
                    sum += *p;
                }
                l[r] += sum;
                self.accumulate::<FMA>(scores, j0, o);
            }
            kb = kb_end;
        }
        for r in 0..rows {
            let inv = 1.0 / l[r];
            out[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// Scaled (and soft-capped) scores of query row `q` against keys `j0..j0 + s.len()`.
    #[inline(always)]
    fn scores<const FMA: bool>(&self, q: &[f32], j0: usize, s: &mut [f32]) {
        let d = self.d;
        let key = |j: usize| &self.k[j * d..(j + 1) * d];
        let mut quads = s.chunks_exact_mut(4);
        let mut j = j0;
        for out in &mut quads {
            let dots = dot4::<FMA>(q, [key(j), key(j + 1), key(j + 2), key(j + 3)]);
            out.copy_from_slice(&dots);
            j += 4;
        }
        for out in quads.into_remainder() {
            *out = dot::<FMA>(q, key(j));
            j += 1;
        }
        for x in s.iter_mut() {
            *x *= self.scale;
            if let Some(cap) = self.softcap {
                *x = (*x / cap).tanh() * cap;
            }
        }
    }

    /// `o += sum_j p[j] * v[j0 + j]`, four value rows per pass over `o`.
    #[inline(always)]
    fn accumulate<const FMA: bool>(&self, p: &[f32], j0: usize, o: &mut [f32]) {
        let d = self.d;
        let val = |j: usize| &self.v[j * d..(j + 1) * d];
        let mut quads = p.chunks_exact(4);
        let mut j = j0;
        for w in &mut quads {
            let (v0, v1, v2, v3) = (val(j), val(j + 1), val(j + 2), val(j + 3));
            for (c, x) in o.iter_mut().enumerate() {
                let mut acc = madd::<FMA>(w[0], v0[c], *x);
                acc = madd::<FMA>(w[1], v1[c], acc);
                acc = madd::<FMA>(w[2], v2[c], acc);
                *x = madd::<FMA>(w[3], v3[c], acc);
            }
            j += 4;
        }
        for &w in quads.remainder() {
            for (x, &vc) in o.iter_mut().zip(val(j)) {
                *x = madd::<FMA>(w, vc, *x);
            }
            j += 1;
        }
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn hsum(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Dot product in eight lanes.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] = madd::<FMA>(x[i], y[i], acc[i]);
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail = madd::<FMA>(*x, *y, tail);
    }
    hsum(&acc) + tail
}

/// Dot products of `a` with four rows, loading `a` once per eight lanes:
/// four independent accumulators keep the multiply-add units busy.
#[inline(always)]
fn dot4<const FMA: bool>(a: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let n8 = a.len() / 8 * 8;
    let mut c = 0;
    while c < n8 {
        let x = &a[c..c + 8];
        for (r, row) in rows.iter().enumerate() {
            let y = &row[c..c + 8];
            for i in 0..8 {
                acc[r][i] = madd::<FMA>(x[i], y[i], acc[r][i]);
            }
        }
        c += 8;
    }
    let mut out = [0f32; 4];
    for (r, row) in rows.iter().enumerate() {
        let mut tail = 0f32;
        for i in n8..a.len() {
            tail = madd::<FMA>(a[i], row[i], tail);
        }
        out[r] = hsum(&acc[r]) + tail;
    }
    out
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{causal_mask, combine_masks, lengths_to_valid, padding_mask, scaled_dot_product_attention};
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn rand_tensor(dims: &[usize], rng: &mut impl Rng) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    struct Case {
        b: usize,
        h: usize,
        hkv: usize,
        tq: usize,
        tk: usize,
        d: usize,
        causal: bool,
        window: Option<usize>,
        lengths: Option<Vec<usize>>,
        softcap: Option<f64>,
        scale: Option<f64>,
    }

    impl Case {
        fn new(h: usize, hkv: usize, tq: usize, tk: usize, d: usize) -> Self {
            Case { b: 1, h, hkv, tq, tk, d, causal: false, window: None, lengths: None, softcap: None, scale: None }
        }
    }

    /// Largest absolute difference between the tiled kernel and the
    /// standard path with the equivalent additive mask tensor.
    fn max_diff(c: &Case, seed: u64) -> f32 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let q = rand_tensor(&[c.b, c.h, c.tq, c.d], &mut rng);
        let k = rand_tensor(&[c.b, c.hkv, c.tk, c.d], &mut rng);
        let v = rand_tensor(&[c.b, c.hkv, c.tk, c.d], &mut rng);
        let opts = SdpaOptions { scale: c.scale.unwrap_or(1.0 / (c.d as f64).sqrt()), softcap: c.softcap };
        let dev = Device::Cpu;
        let causal = if c.causal { Some(causal_mask(c.tq, c.tk, c.window, &dev).unwrap()) } else { None };
        let pad = c.lengths.as_ref().map(|l| padding_mask(&lengths_to_valid(l, c.tk, &dev).unwrap()).unwrap());
        let mask = combine_masks(causal.as_ref(), pad.as_ref()).unwrap();
        let want = scaled_dot_product_attention(&q, &k, &v, mask.as_ref(), opts, None).unwrap();
        let fm = FlashMask { causal: c.causal, window: c.window, key_lengths: c.lengths.as_deref() };
        let got = flash_attention(&q, &k, &v, &fm, opts).unwrap();
        assert_eq!(got.dims(), want.dims());
        (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    const TOL: f32 = 1e-5;

    #[test]
    fn matches_standard_attention_for_mha_gqa_mqa() {
        for (h, hkv) in [(4, 4), (4, 2), (4, 1)] {
            let c = Case { causal: true, ..Case::new(h, hkv, 70, 70, 16) };
            assert!(max_diff(&c, 1) < TOL, "{h}/{hkv} causal");
            let c = Case::new(h, hkv, 37, 131, 24);
            assert!(max_diff(&c, 2) < TOL, "{h}/{hkv} unmasked");
        }
    }

    #[test]
    fn causal_with_past_windows_softcap_and_scale() {
        // 5 and 1 new queries after 128 cached positions; lengths not
        // multiples of the tiles; head_dim with a tail after the 8 lanes.
        for tq in [1, 5, 33] {
            let c = Case { causal: true, ..Case::new(2, 1, tq, 128 + tq, 20) };
            assert!(max_diff(&c, 3) < TOL, "past, tq {tq}");
            for w in [1, 7, 64, 500] {
                let c = Case { causal: true, window: Some(w), ..Case::new(4, 2, tq, 100 + tq, 16) };
                assert!(max_diff(&c, 4) < TOL, "window {w}, tq {tq}");
            }
        }
        let c = Case { causal: true, softcap: Some(5.0), scale: Some(0.7), ..Case::new(2, 2, 45, 45, 8) };
        assert!(max_diff(&c, 5) < TOL, "softcap and scale");
    }

    #[test]
    fn padding_masks_including_an_empty_row() {
        let c = Case { b: 3, lengths: Some(vec![130, 1, 77]), ..Case::new(3, 3, 130, 130, 32) };
        assert!(max_diff(&c, 6) < TOL);
        // A row without any real key attends uniformly, like the additive mask.
        let c = Case { b: 2, lengths: Some(vec![0, 9]), ..Case::new(2, 1, 9, 9, 8) };
        assert!(max_diff(&c, 7) < TOL);
        let c = Case { b: 2, causal: true, lengths: Some(vec![40, 66]), ..Case::new(2, 2, 66, 66, 8) };
        assert!(max_diff(&c, 8) < TOL, "padding and causal");
    }

    #[test]
    fn random_shapes_and_masks() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for seed in 0..40 {
            let hkv = rng.gen_range(1..=3);
            let h = hkv * rng.gen_range(1..=3);
            let tk = rng.gen_range(1..=150);
            let causal = rng.gen_bool(0.5);
            let tq = if causal { rng.gen_range(1..=tk) } else { rng.gen_range(1..=100) };
            let b = rng.gen_range(1..=2);
            let mut c = Case { b, causal, ..Case::new(h, hkv, tq, tk, rng.gen_range(1..=40)) };
            if causal && rng.gen_bool(0.5) {
                c.window = Some(rng.gen_range(1..=tk + 3));
            }
            if !causal && rng.gen_bool(0.5) {
                c.lengths = Some((0..b).map(|_| rng.gen_range(1..=tk)).collect());
            }
            if rng.gen_bool(0.3) {
                c.softcap = Some(rng.gen_range(1.0..30.0));
            }
            assert!(max_diff(&c, 100 + seed) < TOL, "seed {seed}: b {b} h {h}/{hkv} tq {tq} tk {tk} d {}", c.d);
        }
    }

    #[test]
    fn portable_kernel_matches_the_avx2_one() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (rows, tk, d) = (BLOCK_Q, 150, 40);
        let v = |n: usize, rng: &mut rand_chacha::ChaCha8Rng| {
            (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect::<Vec<_>>()
        };
        let (q, k, vv) = (v(rows * d, &mut rng), v(tk * d, &mut rng), v(tk * d, &mut rng));
        let ranges: Vec<_> = (0..rows).map(|r| (r, tk - r, false)).collect();
        let block = Block { q: &q, k: &k, v: &vv, ranges: &ranges, d, scale: 0.2, softcap: Some(10.0) };
        let (mut a, mut b) = (vec![0f32; rows * d], vec![0f32; rows * d]);
        block.run(&mut a, has_avx2());
        block.run(&mut b, false);
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < TOL, "{diff}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let opts = SdpaOptions { scale: 1.0, softcap: None };
        assert!(flash_attention(&q, &k, &k, &FlashMask::default(), opts).is_err(), "2 kv heads for 3 heads");
        let k = Tensor::zeros((1, 1, 3, 8), DType::F32, &dev).unwrap();
        let causal = FlashMask { causal: true, ..FlashMask::default() };
        assert!(flash_attention(&q, &k, &k, &causal, opts).is_err(), "causal q_len > kv_len");
        let window = FlashMask { causal: true, window: Some(0), key_lengths: None };
        let k = Tensor::zeros((1, 1, 4, 8), DType::F32, &dev).unwrap();
        assert!(flash_attention(&q, &k, &k, &window, opts).is_err(), "window 0");
        let lens = [5];
        let pad = FlashMask { key_lengths: Some(&lens), ..FlashMask::default() };
        assert!(flash_attention(&q, &k, &k, &pad, opts).is_err(), "length beyond kv_len");
        let k7 = Tensor::zeros((1, 1, 4, 7), DType::F32, &dev).unwrap();
        assert!(flash_attention(&q, &k7, &k7, &FlashMask::default(), opts).is_err(), "head_dim mismatch");
        let s = FlashShape { batch: 1, n_heads: 1, n_kv_heads: 1, q_len: 2, kv_len: 2, head_dim: 4 };
        let mut out = vec![0f32; 8];
        assert!(flash_attention_f32(&[0.0; 8], &[0.0; 7], &[0.0; 8], s, &FlashMask::default(), opts, &mut out).is_err());
    }
}

/// The model paths that switch to the tiled kernel for long inputs.
#[cfg(test)]
mod model_path_tests {
    use super::*;
    use crate::attention::{
        causal_mask, lengths_to_valid, padding_mask, scaled_dot_product_attention, AttentionConfig, ContiguousKvCache,
        MultiHeadAttention,
    };
    use crate::linear::Linear;
    use crate::paged::AttendSpec;
    use candle_core::Device;

    fn randn(dims: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn long_prefill_through_the_kv_cache_matches_the_standard_path() {
        let (t, d) = (FLASH_MIN_LEN + 3, 4);
        let (q, k, v) = (randn(&[1, 2, t, d]), randn(&[1, 1, t, d]), randn(&[1, 1, t, d]));
        let spec = AttendSpec { sdpa: SdpaOptions { scale: 0.5, softcap: Some(20.0) }, window: Some(300) };
        let mut cache = ContiguousKvCache::new();
        let got = cache.attend(&q, &k, &v, &spec).unwrap();
        let mask = causal_mask(t, t, spec.window, &Device::Cpu).unwrap();
        let want = scaled_dot_product_attention(&q, &k, &v, Some(&mask), spec.sdpa, None).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        assert_eq!(crate::attention::KvCache::len(&cache), t);
    }

    #[test]
    fn long_padded_encoder_attention_matches_the_standard_path() {
        let (dm, t) = (8, FLASH_MIN_LEN_ENCODER + 5);
        let lin = || Linear::new(randn(&[dm, dm]), Some(randn(&[dm]))).unwrap();
        let attn = MultiHeadAttention::new(AttentionConfig::mha(dm, 2), lin(), lin(), lin(), lin()).unwrap();
        let x = randn(&[2, t, dm]);
        let lengths = [t, 200];
        let got = attn.forward_padded(&x, &lengths, false).unwrap();
        let mask = padding_mask(&lengths_to_valid(&lengths, t, &Device::Cpu).unwrap()).unwrap();
        let want = attn.forward(&x, Some(&mask), None, None, false).unwrap();
        assert!(max_diff(&got, &want) < 1e-4, "{}", max_diff(&got, &want));
        assert!(attn.forward_padded(&x, &[t], false).is_err(), "one length for two rows");
        assert!(attn.forward_padded(&x, &[t + 1, 1], false).is_err(), "length beyond the input");
    }
}
