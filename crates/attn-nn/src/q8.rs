//! 8-bit block matrices and a batched matmul that reads each weight once
//! per call, however many rows it multiplies.
//!
//! Why: candle 0.11's quantized matmul costs about as much per activation
//! row for several rows as for one (measured on Gemma 3 270M, 2 threads:
//! the output projection takes 17 ms for 1 row, 89 ms for 4, 221 ms for
//! 16), so a batch of decoding sequences gained nothing from batching.
//! Here the weights are 8-bit blocks of 32 with an f32 scale (Q8_0's
//! layout with a float scale), the activations are quantized the same way
//! per row, and each weight block, once loaded, is dotted with every
//! activation row.
//!
//! Every output element is computed by the same arithmetic whatever the
//! number of rows and whichever code path (AVX2 or portable): exact integer
//! dot products per block, then fused multiply-adds into eight lanes in a
//! fixed order. So a sequence's logits do not depend on what else is in the
//! batch, and the AVX2 path equals the portable one bit for bit (tested).

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

const BLOCK: usize = 32;

/// A `[rows, cols]` weight in 8-bit blocks of 32 along `cols`.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    blocks: usize,
    scales: Vec<f32>,
    quants: Vec<i8>,
}

/// Activation rows quantized like [`Q8Matrix`] rows; the buffers are kept
/// for reuse across calls.
#[derive(Debug, Clone, Default)]
pub struct Q8Acts {
    m: usize,
    blocks: usize,
    scales: Vec<f32>,
    quants: Vec<i8>,
}

impl Q8Acts {
    /// Quantizes `m` rows of `cols` values.
    pub fn quantize(&mut self, x: &[f32], m: usize, cols: usize) -> Result<()> {
        if x.len() < m * cols || cols == 0 {
            return Err(Error::input("q8 activations", format!("{} values for {m} rows of {cols}", x.len())));
        }
        let nb = cols.div_ceil(BLOCK);
        self.m = m;
        self.blocks = nb;
        self.scales.resize(m * nb, 0.0);
        self.quants.resize(m * nb * BLOCK, 0);
        let (scales, quants) = (&mut self.scales, &mut self.quants);
        for i in 0..m {
            quantize_row(
                &x[i * cols..(i + 1) * cols],
                nb,
                &mut scales[i * nb..(i + 1) * nb],
                &mut quants[i * nb * BLOCK..(i + 1) * nb * BLOCK],
            );
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.m
    }
}

/// Quantizes one row into `blocks` blocks (zero-padded past `x.len()`).
fn quantize_row(x: &[f32], blocks: usize, scales: &mut [f32], quants: &mut [i8]) {
    for b in 0..blocks {
        let lo = b * BLOCK;
        let hi = (lo + BLOCK).min(x.len());
        let src = if lo < x.len() { &x[lo..hi] } else { &[][..] };
        let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        scales[b] = d;
        let q = &mut quants[lo..lo + BLOCK];
        for (i, qi) in q.iter_mut().enumerate() {
            *qi = src.get(i).map_or(0, |v| (v * inv).round().clamp(-127.0, 127.0) as i8);
        }
    }
}

impl Q8Matrix {
    /// From a row-major f32 matrix.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if w.len() != rows * cols || cols == 0 {
            return Err(Error::input("q8 matrix", format!("{} values for a {rows}x{cols} matrix", w.len())));
        }
        let blocks = cols.div_ceil(BLOCK);
        let mut scales = vec![0f32; rows * blocks];
        let mut quants = vec![0i8; rows * blocks * BLOCK];
        scales
            .par_chunks_mut(blocks)
            .zip(quants.par_chunks_mut(blocks * BLOCK))
            .enumerate()
            .for_each(|(r, (s, q))| quantize_row(&w[r * cols..(r + 1) * cols], blocks, s, q));
        Ok(Q8Matrix { rows, cols, blocks, scales, quants })
    }

    /// From GGUF Q8_0 blocks (34 bytes each: an f16 scale, then 32 `i8`),
    /// exactly: the blocks are this format with a narrower scale.
    pub fn from_q8_0_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        const Q8_0: usize = 34;
        if cols % BLOCK != 0 || data.len() != rows * cols / BLOCK * Q8_0 {
            return Err(Error::input("q8 matrix", format!("{} bytes of Q8_0 for a {rows}x{cols} matrix", data.len())));
        }
        let blocks = cols / BLOCK;
        let mut scales = Vec::with_capacity(rows * blocks);
        let mut quants = Vec::with_capacity(rows * cols);
        for b in data.chunks_exact(Q8_0) {
            scales.push(f16_to_f32(u16::from_le_bytes([b[0], b[1]])));
            quants.extend(b[2..].iter().map(|&q| q as i8));
        }
        Ok(Q8Matrix { rows, cols, blocks, scales, quants })
    }

    /// From a 2-D tensor of any float dtype (a dequantized GGUF weight).
    pub fn from_tensor(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let v = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Self::from_f32(&v, rows, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `x` `[m, cols]` (row-major) times the transpose: `[m, rows]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if x.len() != m * self.cols {
            return Err(Error::input("q8 matmul", format!("{} values for {m} rows of {}", x.len(), self.cols)));
        }
        let mut acts = Q8Acts::default();
        acts.quantize(x, m, self.cols)?;
        let mut out = vec![0f32; m * self.rows];
        self.matmul_acts(&acts, &mut out)?;
        Ok(out)
    }

    /// Rows already quantized (shared by several matrices of the same
    /// input, e.g. q/k/v) times the transpose, into `out` (`[m, rows]`).
    pub fn matmul_acts(&self, a: &Q8Acts, out: &mut [f32]) -> Result<()> {
        let m = a.m;
        if a.blocks != self.blocks || out.len() < m * self.rows {
            return Err(Error::input(
                "q8 matmul",
                format!("{} activation blocks for a {}x{} matrix", a.blocks, self.rows, self.cols),
            ));
        }
        let nb = self.blocks;
        let (xs, xq) = (&a.scales[..m * nb], &a.quants[..m * nb * BLOCK]);
        let avx2 = has_avx2();
        const ROWS_PER_TASK: usize = 64;
        if m == 1 {
            // One row (decode): each task writes its own range of the output.
            out[..self.rows].par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, dst)| {
                let r0 = task * ROWS_PER_TASK;
                for (k, o) in dst.iter_mut().enumerate() {
                    let r = r0 + k;
                    *o = row_dot(
                        &self.scales[r * nb..(r + 1) * nb],
                        &self.quants[r * nb * BLOCK..(r + 1) * nb * BLOCK],
                        xs,
                        xq,
                        avx2,
                    );
                }
            });
            return Ok(());
        }
        // Output transposed ([rows, m]) so that each task writes one range.
        let mut out_t = vec![0f32; self.rows * m];
        out_t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, dst)| {
            let r0 = task * ROWS_PER_TASK;
            for (k, o) in dst.chunks_mut(m).enumerate() {
                let r = r0 + k;
                let ws = &self.scales[r * nb..(r + 1) * nb];
                let wq = &self.quants[r * nb * BLOCK..(r + 1) * nb * BLOCK];
                let mut i = 0;
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // Four activation rows per pass over the weight row.
                    while i + 4 <= m {
                        // SAFETY: AVX2 and FMA were detected at run time; the
                        // slices hold rows i..i+4.
                        let r4 = unsafe { row_dot4_avx2(ws, wq, &xs[i * nb..], &xq[i * nb * BLOCK..], nb) };
                        o[i..i + 4].copy_from_slice(&r4);
                        i += 4;
                    }
                }
                for (i, oi) in o.iter_mut().enumerate().skip(i) {
                    let s = &xs[i * nb..(i + 1) * nb];
                    let q = &xq[i * nb * BLOCK..(i + 1) * nb * BLOCK];
                    *oi = row_dot(ws, wq, s, q, avx2);
                }
            }
        });
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = out_t[r * m + i];
            }
        }
        Ok(())
    }

    /// Rows `r0..r0 + n` as f32 into `out` (`[n, cols]`).
    pub fn dequantize_rows(&self, r0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        if r0 + n > self.rows || out.len() < n * self.cols {
            return Err(Error::input("q8 rows", format!("rows {r0}..{} of {}", r0 + n, self.rows)));
        }
        let (nb, c) = (self.blocks, self.cols);
        out[..n * c].par_chunks_mut(c).enumerate().for_each(|(k, dst)| {
            let r = r0 + k;
            for (b, chunk) in dst.chunks_mut(BLOCK).enumerate() {
                let d = self.scales[r * nb + b];
                let q = &self.quants[(r * nb + b) * BLOCK..];
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v = d * q[j] as f32;
                }
            }
        });
        Ok(())
    }

    /// Bytes of weight data read by one pass over the matrix.
    pub fn bytes(&self) -> usize {
        self.quants.len() + self.scales.len() * std::mem::size_of::<f32>()
    }

    /// `x` `[..., cols]` -> `[..., rows]` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let m: usize = dims[..dims.len() - 1].iter().product();
        let v = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = self.matmul(&v, m)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("at least 1-D") = self.rows;
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
    }
}

/// IEEE half to single precision (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((m << shift) & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
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

/// The dot product of one weight row and one activation row, both in
/// 8-bit blocks. Lane `j` of a block holds the exact integer sum of its
/// elements `4j..4j+3` (as AVX2's maddubs + madd produce it); each lane is
/// accumulated with a fused multiply-add by the product of the two scales,
/// and the eight lanes are summed in order at the end.
#[inline]
fn row_dot(ws: &[f32], wq: &[i8], xs: &[f32], xq: &[i8], avx2: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { row_dot_avx2(ws, wq, xs, xq) };
    }
    let _ = avx2;
    row_dot_portable(ws, wq, xs, xq)
}

fn row_dot_portable(ws: &[f32], wq: &[i8], xs: &[f32], xq: &[i8]) -> f32 {
    let mut acc = [0f32; 8];
    for b in 0..ws.len() {
        let d = ws[b] * xs[b];
        let w = &wq[b * BLOCK..(b + 1) * BLOCK];
        let x = &xq[b * BLOCK..(b + 1) * BLOCK];
        for (j, a) in acc.iter_mut().enumerate() {
            let mut s = 0i32;
            for t in 4 * j..4 * j + 4 {
                s += w[t] as i32 * x[t] as i32;
            }
            *a = d.mul_add(s as f32, *a);
        }
    }
    sum_lanes(&acc)
}

#[inline]
fn sum_lanes(acc: &[f32; 8]) -> f32 {
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(ws: &[f32], wq: &[i8], xs: &[f32], xq: &[i8]) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    for b in 0..ws.len() {
        let w = _mm256_loadu_si256(wq.as_ptr().add(b * BLOCK) as *const __m256i);
        let x = _mm256_loadu_si256(xq.as_ptr().add(b * BLOCK) as *const __m256i);
        // |w| * (x * sign(w)) = w * x, with the unsigned x signed operand
        // order maddubs needs; |w| <= 127 so the 16-bit pair sums never saturate.
        let aw = _mm256_sign_epi8(w, w);
        let sx = _mm256_sign_epi8(x, w);
        let pairs = _mm256_maddubs_epi16(aw, sx);
        let quads = _mm256_madd_epi16(pairs, ones);
        let d = _mm256_set1_ps(ws[b] * xs[b]);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(quads), acc);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    sum_lanes(&lanes)
}

/// [`row_dot_avx2`] for four consecutive activation rows (`xs`, `xq` start
/// at the first; rows are `nb` blocks apart), loading each weight block once.
/// Per output the arithmetic is exactly [`row_dot_avx2`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot4_avx2(ws: &[f32], wq: &[i8], xs: &[f32], xq: &[i8], nb: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        let w = _mm256_loadu_si256(wq.as_ptr().add(b * BLOCK) as *const __m256i);
        let aw = _mm256_sign_epi8(w, w);
        let wsb = ws[b];
        for (r, a) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_si256(xq.as_ptr().add((r * nb + b) * BLOCK) as *const __m256i);
            let sx = _mm256_sign_epi8(x, w);
            let quads = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
            let d = _mm256_set1_ps(wsb * xs[r * nb + b]);
            *a = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(quads), *a);
        }
    }
    let mut out = [0f32; 4];
    for (r, a) in acc.iter().enumerate() {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
        out[r] = sum_lanes(&lanes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
    }

    #[test]
    fn matches_a_float_reference_and_is_batch_invariant() {
        let (rows, cols) = (70, 100); // not multiples of the block or task sizes
        let w = rand_vec(rows * cols, 1);
        let q = Q8Matrix::from_f32(&w, rows, cols).unwrap();
        let m = 9; // two tiles of four and one row
        let x = rand_vec(m * cols, 2);
        let y = q.matmul(&x, m).unwrap();
        for i in 0..m {
            for r in 0..rows {
                let want: f32 = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
                let got = y[i * rows + r];
                // Two 8-bit roundings: about 1% of the dot's scale.
                assert!((got - want).abs() < 0.02 * (cols as f32).sqrt() * 2.0, "{got} vs {want}");
            }
            // The same row alone gives bit-identical outputs.
            let alone = q.matmul(&x[i * cols..(i + 1) * cols], 1).unwrap();
            assert_eq!(alone, y[i * rows..(i + 1) * rows]);
        }
    }

    #[test]
    fn half_conversion_is_exact() {
        for (h, want) in [
            (0x3c00u16, 1.0f32),
            (0xc000, -2.0),
            (0x0001, 5.960_464_5e-8),
            (0x03ff, 6.097_555e-5),
            (0x7bff, 65504.0),
            (0, 0.0),
        ] {
            assert_eq!(f16_to_f32(h), want, "{h:#x}");
        }
        // A Q8_0 block of scale 0.5 and quants 0..32 gives back those values.
        let mut block = vec![0x00u8, 0x38];
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let m = Q8Matrix::from_q8_0_bytes(&block, 1, 32).unwrap();
        let mut out = vec![0f32; 32];
        m.dequantize_rows(0, 1, &mut out).unwrap();
        assert_eq!(out, (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect::<Vec<_>>());
        assert!(Q8Matrix::from_q8_0_bytes(&block[..30], 1, 32).is_err());
    }

    #[test]
    fn avx2_and_portable_paths_agree_bit_for_bit() {
        let cols = 96;
        let w = rand_vec(cols, 3);
        let x = rand_vec(cols, 4);
        let nb = cols / BLOCK;
        let (mut ws, mut wq, mut xs, mut xq) = (vec![0f32; nb], vec![0i8; cols], vec![0f32; nb], vec![0i8; cols]);
        quantize_row(&w, nb, &mut ws, &mut wq);
        quantize_row(&x, nb, &mut xs, &mut xq);
        let a = row_dot(&ws, &wq, &xs, &xq, has_avx2());
        let b = row_dot_portable(&ws, &wq, &xs, &xq);
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(Q8Matrix::from_f32(&w, 2, 7).is_err());
        assert!(Q8Matrix::from_f32(&w, 1, cols).unwrap().matmul(&x[..5], 1).is_err());
    }
}
