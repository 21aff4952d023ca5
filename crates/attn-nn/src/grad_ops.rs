//! Fused differentiable ops for training: each is one autograd node with a
//! hand-written backward, instead of the five to fifteen candle nodes the
//! same maths takes when written with tensor ops.
//!
//! candle's backward pass allocates a zeroed gradient and an extra add for
//! every edge of the graph, and reduces a broadcast (a bias, a norm's scale)
//! with a per-element index division; on a small Transformer that was over
//! half of a training step. These ops cut the graph down to the matmuls and
//! one node per layer-norm, bias, softmax, dropout and loss.
//!
//! Every op works on contiguous `f32` (other dtypes take the composed path in
//! the callers). Row loops run in parallel in fixed chunks whose partial sums
//! are added in chunk order, so results do not depend on the thread count:
//! a run resumed on another machine reproduces the same numbers.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Rows per parallel chunk. Fixed, so that sums over rows are independent of
/// the thread count.
const CHUNK_ROWS: usize = 32;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: expects f32, got {:?}", s.dtype()) };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: expects a contiguous tensor"),
    }
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Whether `t` can take the fused path (f32 on the CPU).
pub fn fusable(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu()
}

/// Per-column sums of a `[rows, d]` matrix, in chunk order.
fn column_sums(x: &[f32], d: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = x
        .par_chunks(d * CHUNK_ROWS)
        .map(|chunk| {
            let mut acc = vec![0f32; d];
            for row in chunk.chunks_exact(d) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut out = vec![0f32; d];
    for p in partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// `f(row of x, row of out)` over the rows (`d` wide) of `x`, in parallel chunks.
fn map_rows(x: &[f32], d: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d * CHUNK_ROWS).zip(x.par_chunks(d * CHUNK_ROWS)).for_each(|(yc, xc)| {
        for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
            f(xr, yr);
        }
    });
    y
}

/// `f(row of a, row of b, row of out)` over rows of two same-shaped inputs.
fn zip_rows(a: &[f32], b: &[f32], d: usize, f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    let n = d * CHUNK_ROWS;
    y.par_chunks_mut(n).zip(a.par_chunks(n)).zip(b.par_chunks(n)).for_each(|((yc, ac), bc)| {
        for ((yr, ar), br) in yc.chunks_exact_mut(d).zip(ac.chunks_exact(d)).zip(bc.chunks_exact(d)) {
            f(ar, br, yr);
        }
    });
    y
}

/// `f(a[i], b[i])` elementwise over two same-length inputs, in parallel chunks.
fn zip_elems(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut y = vec![0f32; a.len()];
    let n = 16 * 1024;
    y.par_chunks_mut(n).zip(a.par_chunks(n)).zip(b.par_chunks(n)).for_each(|((y, a), b)| {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = f(a, b);
        }
    });
    y
}

// ---------------------------------------------------------------- bias add

struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "attn-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let d = last_dim(l1);
        if b.len() != d {
            candle_core::bail!("bias of {} for rows of {d}", b.len());
        }
        let y = map_rows(x, d, |xr, yr| {
            for ((y, &x), &b) in yr.iter_mut().zip(xr).zip(b) {
                *y = x + b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let db = grad.contiguous()?.apply_op1_no_bwd(&ColumnSum)?.reshape(b.shape())?;
        Ok((Some(grad.clone()), Some(db)))
    }
}

struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "attn-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = last_dim(l);
        Ok((CpuStorage::F32(column_sums(x, d)), Shape::from(d)))
    }
}

/// `x + b` with `b` (`[d]`) added to every row of `x` (`[..., d]`).
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !(fusable(x) && fusable(b)) {
        return Ok(x.broadcast_add(b)?);
    }
    let d = x.dims().last().copied().unwrap_or(0);
    if b.dims() != [d] {
        return Err(Error::input("bias", format!("bias {:?} for input {:?}", b.dims(), x.dims())));
    }
    Ok(x.contiguous()?.apply_op2(&b.contiguous()?, BiasAdd)?)
}

// ---------------------------------------------------------------- layer norm

/// Layer norm, or with `center: false` RMSNorm: the same maths without the
/// mean (`x / sqrt(mean(x²) + eps) * w`), whose backward drops the mean term.
struct LayerNormOp {
    eps: f32,
    center: bool,
}

/// Mean (0 when not `center`ing) and `1 / sqrt(var + eps)` of one row,
/// two-pass; without centring, `var` is the mean square.
fn row_stats(x: &[f32], eps: f32, center: bool) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = if center { x.iter().sum::<f32>() / n } else { 0.0 };
    let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "attn-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let d = last_dim(l1);
        if w.len() != d || b.len() != d {
            candle_core::bail!("layer norm over {d} with weight {} and bias {}", w.len(), b.len());
        }
        let (eps, center) = (self.eps, self.center);
        let y = map_rows(x, d, |xr, yr| {
            let (mean, rstd) = row_stats(xr, eps, center);
            for (((y, &x), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = x.elem_count();
        let d = w.elem_count();
        let packed =
            x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBwd { eps: self.eps, center: self.center })?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let db = packed.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The layer-norm backward: `[dx (n), dw (d), db (d)]` in one buffer.
struct LayerNormBwd {
    eps: f32,
    center: bool,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "attn-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let d = last_dim(l1);
        let n = x.len();
        let (eps, center) = (self.eps, self.center);
        let mut out = vec![0f32; n + 2 * d];
        let (dx, rest) = out.split_at_mut(n);
        let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(d * CHUNK_ROWS)
            .zip(x.par_chunks(d * CHUNK_ROWS))
            .zip(g.par_chunks(d * CHUNK_ROWS))
            .map(|((dxc, xc), gc)| {
                let mut dw = vec![0f32; d];
                let mut db = vec![0f32; d];
                let mut xhat = vec![0f32; d];
                for ((dxr, xr), gr) in dxc.chunks_exact_mut(d).zip(xc.chunks_exact(d)).zip(gc.chunks_exact(d)) {
                    let (mean, rstd) = row_stats(xr, eps, center);
                    let (mut m1, mut m2) = (0f32, 0f32);
                    for j in 0..d {
                        let xh = (xr[j] - mean) * rstd;
                        xhat[j] = xh;
                        let gx = gr[j] * w[j];
                        m1 += gx;
                        m2 += gx * xh;
                        dw[j] += gr[j] * xh;
                        db[j] += gr[j];
                    }
                    // Without centring, the mean's gradient term is absent.
                    let (m1, m2) = (if center { m1 / d as f32 } else { 0.0 }, m2 / d as f32);
                    for j in 0..d {
                        dxr[j] = rstd * (gr[j] * w[j] - m1 - xhat[j] * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let (dw, db) = rest.split_at_mut(d);
        for (pw, pb) in partials {
            for j in 0..d {
                dw[j] += pw[j];
                db[j] += pb[j];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }
}

/// Layer normalisation over the last dimension with a fused backward.
/// `bias` `None` means no shift (its gradient is not computed).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [d] {
        return Err(Error::input("layer norm", format!("weight {:?} for input {:?}", weight.dims(), x.dims())));
    }
    let zeros;
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => {
            zeros = Tensor::zeros(d, DType::F32, x.device())?;
            zeros.clone()
        }
    };
    Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, &bias, LayerNormOp { eps: eps as f32, center: true })?)
}

/// RMSNorm over the last dimension (`x / sqrt(mean(x²) + eps) * weight`)
/// with a fused backward.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if weight.dims() != [d] {
        return Err(Error::input("rms norm", format!("weight {:?} for input {:?}", weight.dims(), x.dims())));
    }
    let zeros = Tensor::zeros(d, DType::F32, x.device())?;
    Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, &zeros, LayerNormOp { eps: eps as f32, center: false })?)
}

// ---------------------------------------------------------------- softmax

struct SoftmaxOp;

fn softmax_row(x: &[f32], y: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        // A fully masked row: no weight anywhere (the composed softmax gives
        // NaN here; attention masks never produce such rows for real tokens).
        y.fill(0.0);
        return;
    }
    let mut sum = 0f32;
    for (y, &x) in y.iter_mut().zip(x) {
        let e = crate::kernels::fast::exp_fast(x - max);
        *y = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    for y in y.iter_mut() {
        *y *= inv;
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "attn-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = last_dim(l);
        Ok((CpuStorage::F32(map_rows(x, d, softmax_row)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

/// `dx = y * (g - sum(g * y))` per row.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "attn-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let d = last_dim(l1);
        let dx = zip_rows(y, g, d, |yr, gr, dr| {
            let dot: f32 = yr.iter().zip(gr).map(|(&y, &g)| y * g).sum();
            for ((dx, &y), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *dx = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with a fused backward. A row that is all
/// `-inf` gives zeros.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(SoftmaxOp)?)
}

// ---------------------------------------------------------------- dropout

/// Multiplies by a fixed mask (0 or `1/(1-p)` per element); its own
/// backward, since the gradient is the same product.
struct MaskMul {
    mask: Arc<Vec<f32>>,
}

impl CustomOp1 for MaskMul {
    fn name(&self) -> &'static str {
        "attn-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        if x.len() != self.mask.len() {
            candle_core::bail!("dropout mask of {} for {} elements", self.mask.len(), x.len());
        }
        Ok((CpuStorage::F32(zip_elems(x, &self.mask, |x, m| x * m)), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&MaskMul { mask: self.mask.clone() })?))
    }
}

/// `x * mask`, where `mask` holds `0` or `scale` per element.
pub fn mask_mul(x: &Tensor, mask: Vec<f32>) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(MaskMul { mask: Arc::new(mask) })?)
}

// ---------------------------------------------------------------- cross entropy

/// Per-row label-smoothed cross entropy of `[n, v]` logits: row `i` gives
/// `(1 - eps) * -log p[t_i] + eps * mean_j(-log p[j])`, and 0 where the
/// target is ignored.
struct CrossEntropyOp {
    targets: Arc<Vec<Option<u32>>>,
    smoothing: f32,
    /// Filled by the forward: per-row unsmoothed `-log p[t]` (0 where
    /// ignored) and the arg-max of each row.
    stats: Arc<std::sync::Mutex<RowStats>>,
}

/// Side results of the cross-entropy forward.
#[derive(Debug, Clone, Default)]
pub struct RowStats {
    /// `-log p[target]` per row, 0 for ignored rows.
    pub nll: Vec<f32>,
    /// Index of the largest logit per row (the first on ties).
    pub argmax: Vec<u32>,
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// `log(sum(exp(x - max))) + max` of one row.
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|&v| crate::kernels::fast::exp_fast(v - max)).sum();
    sum.ln() + max
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "attn-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let v = last_dim(l);
        let n = x.len() / v;
        if n != self.targets.len() {
            candle_core::bail!("{} targets for {n} rows", self.targets.len());
        }
        let eps = self.smoothing;
        let rows: Vec<(f32, f32, u32)> = x
            .par_chunks_exact(v)
            .zip(self.targets.par_iter())
            .map(|(row, t)| match t {
                None => (0.0, 0.0, argmax(row)),
                Some(t) => {
                    let lse = log_sum_exp(row);
                    let nll = lse - row[*t as usize];
                    let mean_nll = lse - row.iter().sum::<f32>() / v as f32;
                    ((1.0 - eps) * nll + eps * mean_nll, nll, argmax(row))
                }
            })
            .collect();
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.nll = rows.iter().map(|r| r.1).collect();
        stats.argmax = rows.iter().map(|r| r.2).collect();
        Ok((CpuStorage::F32(rows.into_iter().map(|r| r.0).collect()), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let bwd = CrossEntropyBwd { targets: self.targets.clone(), smoothing: self.smoothing };
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &bwd)?))
    }
}

/// `dlogits[i, j] = g_i * (softmax_ij - (1 - eps) [j == t_i] - eps / v)`.
struct CrossEntropyBwd {
    targets: Arc<Vec<Option<u32>>>,
    smoothing: f32,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "attn-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let v = last_dim(l1);
        let eps = self.smoothing;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_exact_mut(v).zip(x.par_chunks_exact(v)).zip(self.targets.par_iter().zip(g.par_iter())).for_each(
            |((dr, xr), (t, &g))| {
                let Some(t) = t else { return };
                let lse = log_sum_exp(xr);
                let uniform = eps / v as f32;
                for (d, &x) in dr.iter_mut().zip(xr) {
                    *d = g * (crate::kernels::fast::exp_fast(x - lse) - uniform);
                }
                dr[*t as usize] -= g * (1.0 - eps);
            },
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Per-row label-smoothed cross entropy (`[n]`, 0 for ignored rows) of
/// `[n, v]` f32 logits. Targets must be checked by the caller (`< v`).
pub fn cross_entropy_rows(logits: &Tensor, targets: Vec<Option<u32>>, label_smoothing: f64) -> Result<Tensor> {
    Ok(cross_entropy_rows_with_stats(logits, targets, label_smoothing)?.0)
}

/// [`cross_entropy_rows`] with the unsmoothed per-row loss and the arg-max
/// of each row, computed in the same pass.
pub fn cross_entropy_rows_with_stats(
    logits: &Tensor,
    targets: Vec<Option<u32>>,
    label_smoothing: f64,
) -> Result<(Tensor, RowStats)> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        return Err(Error::input("cross entropy", format!("{} targets for {n} rows", targets.len())));
    }
    if let Some(bad) = targets.iter().flatten().find(|&&t| t as usize >= v) {
        return Err(Error::input("cross entropy", format!("target id {bad} outside a vocabulary of {v}")));
    }
    let stats = Arc::new(std::sync::Mutex::new(RowStats::default()));
    let op = CrossEntropyOp { targets: Arc::new(targets), smoothing: label_smoothing as f32, stats: stats.clone() };
    let loss = logits.to_dtype(DType::F32)?.contiguous()?.apply_op1(op)?;
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok((loss, stats))
}

// ---------------------------------------------------------------- linear

/// `dst (m x n) = a (m x k) * b (k x n)` for strided row-major-or-not
/// operands; strides are (row, column) in elements.
fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
) {
    debug_assert!(m == 0 || n == 0 || dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || a.len() > (m - 1) * a_rs + (k - 1) * a_cs);
    debug_assert!(n == 0 || k == 0 || b.len() > (k - 1) * b_rs + (n - 1) * b_cs);
    // SAFETY: the callers derive every size and stride from the operands'
    // checked shapes; the debug assertions restate the bounds.
    unsafe {
        crate::kernels::fast::gemm_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            n,
            a.as_ptr(),
            (a_rs, a_cs),
            b.as_ptr(),
            (b_rs, b_cs),
            true,
        )
    }
}

/// `y = x wᵀ (+ b)` for `x` `[..., in]`, `w` `[out, in]`, `b` `[out]`: one
/// node whose backward is two gemms and a column sum.
struct LinearOp {
    bias: bool,
}

impl LinearOp {
    fn forward(
        &self,
        x: &[f32],
        lx: &Layout,
        w: &[f32],
        lw: &Layout,
        b: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (out, inp) = lw.shape().dims2()?;
        let k = last_dim(lx);
        if k != inp || b.is_some_and(|b| b.len() != out) {
            candle_core::bail!("linear: input {:?} for weight {:?}", lx.dims(), lw.dims());
        }
        let rows = x.len() / inp.max(1);
        let mut y = vec![0f32; rows * out];
        gemm_strided((rows, out, inp), &mut y, x, (inp, 1), w, (1, inp));
        if let Some(b) = b {
            y.par_chunks_mut(out * CHUNK_ROWS).for_each(|c| {
                for row in c.chunks_exact_mut(out) {
                    for (y, &b) in row.iter_mut().zip(b) {
                        *y += b;
                    }
                }
            });
        }
        let mut dims = lx.dims().to_vec();
        *dims.last_mut().expect("rank checked") = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// `[dx (rows*in), dw (out*in), db (out)]`.
    fn backward(&self, x: &[f32], w: &[f32], g: &[f32], (rows, out, inp): (usize, usize, usize)) -> Vec<f32> {
        let mut buf = vec![0f32; rows * inp + out * inp + if self.bias { out } else { 0 }];
        let (dx, rest) = buf.split_at_mut(rows * inp);
        let (dw, db) = rest.split_at_mut(out * inp);
        // dx = g w: (rows x out) (out x in)
        gemm_strided((rows, inp, out), dx, g, (out, 1), w, (inp, 1));
        // dw = gᵀ x: (out x rows) (rows x in)
        gemm_strided((out, inp, rows), dw, g, (1, out), x, (inp, 1));
        if self.bias {
            db.copy_from_slice(&column_sums(g, out));
        }
        buf
    }

    fn grads(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let rows = x.elem_count() / inp.max(1);
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearBwd { bias: self.bias })?;
        let dx = packed.narrow(0, 0, rows * inp)?.reshape(x.shape())?;
        let dw = packed.narrow(0, rows * inp, out * inp)?.reshape(w.shape())?;
        let db = if self.bias { Some(packed.narrow(0, rows * inp + out * inp, out)?) } else { None };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "attn-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = CustomOp2::name(self);
        self.forward(slice(s1, l1, name)?, l1, slice(s2, l2, name)?, l2, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "attn-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = CustomOp3::name(self);
        self.forward(slice(s1, l1, name)?, l1, slice(s2, l2, name)?, l2, Some(slice(s3, l3, name)?))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.grads(x, w, grad)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// The linear backward as one buffer (see [`LinearOp::backward`]).
struct LinearBwd {
    bias: bool,
}

impl CustomOp3 for LinearBwd {
    fn name(&self) -> &'static str {
        "attn-linear-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let g = slice(s3, l3, self.name())?;
        let (out, inp) = l2.shape().dims2()?;
        let rows = x.len() / inp.max(1);
        if g.len() != rows * out {
            candle_core::bail!("linear backward: gradient {:?} for {rows} rows of {out}", l3.dims());
        }
        let buf = LinearOp { bias: self.bias }.backward(x, w, g, (rows, out, inp));
        let n = buf.len();
        Ok((CpuStorage::F32(buf), Shape::from(n)))
    }
}

/// `x wᵀ + b` over the last dimension of `x` with a fused backward.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let last = x.dims().last().copied().unwrap_or(0);
    if last != inp || x.rank() == 0 || b.is_some_and(|b| b.dims() != [out]) {
        return Err(Error::input(
            "linear",
            format!("input {:?}, weight {:?}, bias {:?}", x.dims(), w.dims(), b.map(|b| b.dims().to_vec())),
        ));
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp { bias: true })?,
        None => x.apply_op2(&w, LinearOp { bias: false })?,
    })
}

// ---------------------------------------------------------------- attention

/// Dot product with 16 independent accumulators (vectorises without
/// reassociating a single sum).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    acc.iter().sum::<f32>() + s
}

#[inline]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Strided read access to a `[b, h, t, d]` tensor whose last stride is 1.
#[derive(Clone, Copy)]
struct Heads<'a> {
    data: &'a [f32],
    strides: [usize; 3],
}

impl<'a> Heads<'a> {
    fn new(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(v) = s else { candle_core::bail!("{op}: expects f32") };
        let st = l.stride();
        if l.dims().len() != 4 || st[3] != 1 {
            candle_core::bail!("{op}: expects [b, h, t, d] with unit stride over d, got {:?} / {:?}", l.dims(), st);
        }
        Ok(Heads { data: &v[l.start_offset()..], strides: [st[0], st[1], st[2]] })
    }

    #[inline]
    fn row(&self, b: usize, h: usize, t: usize, d: usize) -> &'a [f32] {
        let o = b * self.strides[0] + h * self.strides[1] + t * self.strides[2];
        &self.data[o..o + d]
    }
}

/// Shapes of one fused attention call.
#[derive(Clone, Copy, Debug)]
struct AttnShape {
    b: usize,
    h: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

/// `softmax(q kᵀ · scale + mask) ∘ dropout · v` per (batch, head), heads
/// merged in the output (`[b, tq, h·d]`), with a backward that recomputes
/// the probabilities instead of keeping them.
struct AttentionOp {
    shape: AttnShape,
    scale: f32,
    /// Additive mask `[b, mask_heads, tq, tk]`, `mask_heads` 1 or `h`.
    mask: Option<(Arc<Vec<f32>>, usize)>,
    /// Dropout multipliers `[b, h, tq, tk]`.
    dropout: Option<Arc<Vec<f32>>>,
}

impl AttentionOp {
    /// Probabilities (before dropout) of query rows of head `(bi, hi)` into
    /// `p` (`[tq, tk]`).
    fn probs(&self, q: Heads, k: Heads, bi: usize, hi: usize, p: &mut [f32]) {
        let AttnShape { h, hkv, tq, tk, d, .. } = self.shape;
        let kh = hi / (h / hkv);
        for i in 0..tq {
            let qi = q.row(bi, hi, i, d);
            let row = &mut p[i * tk..(i + 1) * tk];
            for (j, s) in row.iter_mut().enumerate() {
                *s = dot(qi, k.row(bi, kh, j, d)) * self.scale;
            }
            if let Some((m, mh)) = &self.mask {
                let mo = ((bi * mh + if *mh == 1 { 0 } else { hi }) * tq + i) * tk;
                for (s, &mv) in row.iter_mut().zip(&m[mo..mo + tk]) {
                    *s += mv;
                }
            }
            let scores = row.to_vec();
            softmax_row(&scores, row);
        }
    }

    fn drop_row(&self, bi: usize, hi: usize, i: usize) -> Option<&[f32]> {
        let AttnShape { h, tq, tk, .. } = self.shape;
        self.dropout.as_ref().map(|m| {
            let o = ((bi * h + hi) * tq + i) * tk;
            &m[o..o + tk]
        })
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "attn-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (q, k, v) =
            (Heads::new(s1, l1, self.name())?, Heads::new(s2, l2, self.name())?, Heads::new(s3, l3, self.name())?);
        let AttnShape { b, h, hkv, tq, tk, d } = self.shape;
        let g = h / hkv;
        let mut out = vec![0f32; b * tq * h * d];
        // One task per (batch, head); each writes its own columns of the
        // merged output, so tasks hand back their block and it is scattered.
        let blocks: Vec<Vec<f32>> = (0..b * h)
            .into_par_iter()
            .map(|bh| {
                let (bi, hi) = (bh / h, bh % h);
                let mut p = vec![0f32; tq * tk];
                self.probs(q, k, bi, hi, &mut p);
                let mut o = vec![0f32; tq * d];
                for i in 0..tq {
                    let oi = &mut o[i * d..(i + 1) * d];
                    let drop = self.drop_row(bi, hi, i);
                    for j in 0..tk {
                        let mut pij = p[i * tk + j];
                        if let Some(m) = drop {
                            pij *= m[j];
                        }
                        if pij != 0.0 {
                            axpy(oi, pij, v.row(bi, hi / g, j, d));
                        }
                    }
                }
                o
            })
            .collect();
        for (bh, o) in blocks.into_iter().enumerate() {
            let (bi, hi) = (bh / h, bh % h);
            for i in 0..tq {
                let dst = ((bi * tq + i) * h + hi) * d;
                out[dst..dst + d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, tq, h * d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let AttnShape { b, h, hkv, tq, tk, d } = self.shape;
        // The gradient joins q, k, v into one operand list: [q | k | v | grad].
        let go = grad.flatten_all()?.to_vec1::<f32>()?;
        let packed = q.apply_op3_no_bwd(k, v, &AttentionBwd { fwd: self, go })?;
        let (nq, nk) = (b * h * tq * d, b * hkv * tk * d);
        let dq = packed.narrow(0, 0, nq)?.reshape((b, h, tq, d))?;
        let dk = packed.narrow(0, nq, nk)?.reshape((b, hkv, tk, d))?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape((b, hkv, tk, d))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The attention backward, a three-operand op over q, k, v carrying the
/// output gradient `go` (`[b, tq, h·d]`) with it. Returns
/// `[dq | dk | dv]` in one buffer.
struct AttentionBwd<'a> {
    fwd: &'a AttentionOp,
    go: Vec<f32>,
}

impl CustomOp3 for AttentionBwd<'_> {
    fn name(&self) -> &'static str {
        "attn-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let op = self.fwd;
        let (q, k, v) =
            (Heads::new(s1, l1, self.name())?, Heads::new(s2, l2, self.name())?, Heads::new(s3, l3, self.name())?);
        let AttnShape { b, h, hkv, tq, tk, d } = op.shape;
        let g = h / hkv;
        let go = &self.go;
        if go.len() != b * tq * h * d {
            candle_core::bail!("attention backward: gradient of {} for [{b}, {tq}, {}]", go.len(), h * d);
        }
        // dO row i of head hi
        let grow = |bi: usize, hi: usize, i: usize| {
            let o = ((bi * tq + i) * h + hi) * d;
            &go[o..o + d]
        };
        // One task per (batch, kv head): it owns dk, dv of that head and the
        // dq of its g query heads.
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * hkv)
            .into_par_iter()
            .map(|bk| {
                let (bi, kh) = (bk / hkv, bk % hkv);
                let mut dq = vec![0f32; g * tq * d];
                let mut dk = vec![0f32; tk * d];
                let mut dv = vec![0f32; tk * d];
                let mut p = vec![0f32; tq * tk];
                let mut ds = vec![0f32; tk];
                for gi in 0..g {
                    let hi = kh * g + gi;
                    op.probs(q, k, bi, hi, &mut p);
                    for i in 0..tq {
                        let gi_row = grow(bi, hi, i);
                        let prow = &p[i * tk..(i + 1) * tk];
                        let drop = op.drop_row(bi, hi, i);
                        // dP'_ij = dO_i · v_j ; dV_j += P'_ij dO_i
                        let mut rowdot = 0f32;
                        for j in 0..tk {
                            let m = drop.map_or(1.0, |m| m[j]);
                            let pd = prow[j] * m;
                            if pd != 0.0 {
                                axpy(&mut dv[j * d..(j + 1) * d], pd, gi_row);
                            }
                            let dp = if m == 0.0 { 0.0 } else { dot(gi_row, v.row(bi, kh, j, d)) * m };
                            ds[j] = dp;
                            rowdot += dp * prow[j];
                        }
                        let dqi = &mut dq[(gi * tq + i) * d..(gi * tq + i + 1) * d];
                        let qi = q.row(bi, hi, i, d);
                        for j in 0..tk {
                            let s = prow[j] * (ds[j] - rowdot) * op.scale;
                            if s != 0.0 {
                                axpy(dqi, s, k.row(bi, kh, j, d));
                                axpy(&mut dk[j * d..(j + 1) * d], s, qi);
                            }
                        }
                    }
                }
                (dq, dk, dv)
            })
            .collect();
        let (nq, nk) = (b * h * tq * d, b * hkv * tk * d);
        let mut out = vec![0f32; nq + 2 * nk];
        for (bk, (dq, dk, dv)) in parts.into_iter().enumerate() {
            let (bi, kh) = (bk / hkv, bk % hkv);
            let q0 = (bi * h + kh * g) * tq * d;
            out[q0..q0 + g * tq * d].copy_from_slice(&dq);
            let k0 = (bi * hkv + kh) * tk * d;
            out[nq + k0..nq + k0 + tk * d].copy_from_slice(&dk);
            out[nq + nk + k0..nq + nk + k0 + tk * d].copy_from_slice(&dv);
        }
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

/// Fused training attention: `q` `[b, h, tq, d]`, `k`, `v` `[b, hkv, tk, d]`
/// (any layout with unit stride over `d`), an additive `mask` broadcastable
/// to `[b, 1 or h, tq, tk]`, dropout probability `p` applied to the
/// probabilities when `train`. Returns the heads merged: `[b, tq, h·d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    dropout: f32,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if v.dims() != k.dims() || bk != b || dk != d || hkv == 0 || h % hkv != 0 {
        return Err(Error::input(
            "attention",
            format!("q {:?}, k {:?}, v {:?} do not match", q.dims(), k.dims(), v.dims()),
        ));
    }
    let unit =
        |t: &Tensor| -> Result<Tensor> { Ok(if t.stride().last() == Some(&1) { t.clone() } else { t.contiguous()? }) };
    let mask = match mask {
        None => None,
        Some(m) => {
            let mh = if m.rank() == 4 && m.dim(1)? == h && h > 1 { h } else { 1 };
            let full = m.to_dtype(DType::F32)?.broadcast_as((b, mh, tq, tk)).map_err(|_| {
                Error::input("attention", format!("mask {:?} does not broadcast to [{b}, {mh}, {tq}, {tk}]", m.dims()))
            })?;
            Some((Arc::new(full.contiguous()?.flatten_all()?.to_vec1::<f32>()?), mh))
        }
    };
    let dropout = (dropout > 0.0).then(|| {
        let scale = 1.0 / (1.0 - dropout);
        Arc::new(
            crate::rng::uniform(b * h * tq * tk).into_iter().map(|u| if u >= dropout { scale } else { 0.0 }).collect(),
        )
    });
    let op = AttentionOp { shape: AttnShape { b, h, hkv, tq, tk, d }, scale: scale as f32, mask, dropout };
    Ok(unit(q)?.apply_op3(&unit(k)?, &unit(v)?, op)?)
}

// ---------------------------------------------------------------- rotary embedding

/// Rotary position embedding of a contiguous `[b, h, t, d]` input by angles
/// given as `cs` `[b, t, d]`: the `d / 2` cosines, then the `d / 2` sines.
/// `inverse` rotates the other way, which is also the backward.
struct RopeOp {
    interleaved: bool,
    inverse: bool,
}

impl CustomOp2 for RopeOp {
    fn name(&self) -> &'static str {
        "attn-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let cs = slice(s2, l2, self.name())?;
        let (b, h, t, d) = l1.shape().dims4()?;
        if l2.dims() != [b, t, d] || d % 2 != 0 {
            candle_core::bail!("rope: angles {:?} for input {:?}", l2.dims(), l1.dims());
        }
        let half = d / 2;
        let sign = if self.inverse { -1f32 } else { 1.0 };
        let interleaved = self.interleaved;
        let mut y = vec![0f32; x.len()];
        // One chunk per (batch, head): `t` rows of `d`.
        y.par_chunks_mut(t * d).zip(x.par_chunks(t * d)).enumerate().for_each(|(bh, (yc, xc))| {
            let bi = bh / h;
            for ((ti, yr), xr) in yc.chunks_exact_mut(d).enumerate().zip(xc.chunks_exact(d)) {
                let row = &cs[(bi * t + ti) * d..][..d];
                let (cos, sin) = row.split_at(half);
                for j in 0..half {
                    let (c, sn) = (cos[j], sign * sin[j]);
                    let (i1, i2) = if interleaved { (2 * j, 2 * j + 1) } else { (j, j + half) };
                    let (x1, x2) = (xr[i1], xr[i2]);
                    yr[i1] = x1 * c - x2 * sn;
                    yr[i2] = x1 * sn + x2 * c;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = RopeOp { interleaved: self.interleaved, inverse: !self.inverse };
        Ok((Some(grad.contiguous()?.apply_op2_no_bwd(cs, &op)?), None))
    }
}

/// Rotates `x` (`[b, h, t, d]`, f32) by the angles whose cosines and sines
/// are `cos` and `sin` (`[b, t, d / 2]` each), pairing element `j` with
/// `j + d / 2` (halves) or `2j` with `2j + 1` (interleaved). One node whose
/// backward is the inverse rotation; the angles get no gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (b, _, t, d) = x.dims4()?;
    if cos.dims() != [b, t, d / 2] || sin.dims() != cos.dims() || d % 2 != 0 {
        return Err(Error::input(
            "rope",
            format!("cos {:?} and sin {:?} for input {:?}", cos.dims(), sin.dims(), x.dims()),
        ));
    }
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let cs = Tensor::cat(&[cos, sin], 2)?.detach();
    Ok(x.contiguous()?.apply_op2(&cs, RopeOp { interleaved, inverse: false })?)
}

// ---------------------------------------------------------------- activations

/// An activation and its derivative in one node each way.
struct ActivationOp {
    act: crate::ffn::Activation,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

impl ActivationOp {
    #[inline]
    fn value(&self, x: f32) -> f32 {
        use crate::ffn::Activation::*;
        match self.act {
            Relu => x.max(0.0),
            GeluErf => 0.5 * x * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)),
            GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()),
            Silu => x / (1.0 + crate::kernels::fast::exp_fast(-x)),
        }
    }

    #[inline]
    fn derivative(&self, x: f32) -> f32 {
        use crate::ffn::Activation::*;
        match self.act {
            Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            GeluErf => {
                let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = crate::kernels::fast::exp_fast(-0.5 * x * x) * 0.398_942_3; // 1/sqrt(2 pi)
                cdf + x * pdf
            }
            GeluTanh => {
                let inner = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
                let t = inner.tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Silu => {
                let s = 1.0 / (1.0 + crate::kernels::fast::exp_fast(-x));
                s * (1.0 + x * (1.0 - s))
            }
        }
    }
}

impl CustomOp1 for ActivationOp {
    fn name(&self) -> &'static str {
        "attn-activation"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        Ok((CpuStorage::F32(zip_elems(x, x, |x, _| self.value(x))), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &ActivationBwd { act: self.act })?))
    }
}

/// `grad * act'(x)`.
struct ActivationBwd {
    act: crate::ffn::Activation,
}

impl CustomOp2 for ActivationBwd {
    fn name(&self) -> &'static str {
        "attn-activation-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let g = slice(s2, l2, self.name())?;
        let op = ActivationOp { act: self.act };
        Ok((CpuStorage::F32(zip_elems(x, g, |x, g| g * op.derivative(x))), l1.shape().clone()))
    }
}

/// `act(x)` with a fused backward.
pub fn activation(x: &Tensor, act: crate::ffn::Activation) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(ActivationOp { act })?)
}
