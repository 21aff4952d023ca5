//! 8-bit block matrices and a batched matmul that reads each weight once
//! per call, however many rows it multiplies.
//!
//! Why: candle 0.11's quantized matmul costs about as much per activation
//! row for several rows as for one (measured on Gemma 3 270M, 2 threads:
//! the output projection takes 17 ms for 1 row, 89 ms for 4, 221 ms for
//! 16), so a batch of decoding sequences gained nothing from batching.
//!
//! Format: the weights are Q8_0's blocks of 32 `i8` with an f16 scale (34
//! bytes per 32 weights, the same as the GGUF file), rearranged for SIMD:
//! sixteen rows form a group, and a group's block `b` is one 512-byte panel
//! in which each 64-byte line holds 4 consecutive weights of each of the 16
//! rows. One AVX-512 VNNI `vpdpbusd` multiplies a line by 4 activation bytes
//! (broadcast) and adds into 16 lanes, one per row, so the inner loop has no
//! horizontal sums and a block's exact integer dot for 16 rows takes 8
//! instructions. `vpdpbusd` wants unsigned weights, so they are stored as
//! `w + 128`; the activation side removes the `128 · Σx` that adds, exactly,
//! by starting each block's integer sum at `-128 · Σx`.
//!
//! Q5_0 and Q4_0 weights keep their width (22 and 18 bytes per 32, as in
//! the file): the same panels hold 4-bit planes (and, for 5 bits, one
//! 64-bit mask of high bits per line), widened to a line of bytes in
//! registers just before the `vpdpbusd`, with offsets 16 and 8.
//!
//! Activations are quantized per row to blocks of 32 `i8` with an f32 scale.
//!
//! Every output element is computed by the same arithmetic whatever the
//! number of rows, the tiling, and the code path (AVX-512 VNNI, AVX2 or
//! portable): per block the exact integer dot `s`, then
//! `acc = fma(w_scale · x_scale, s, acc)` over the blocks in order. So a
//! sequence's logits do not depend on what else is in the batch, and the
//! SIMD paths equal the portable one bit for bit (tested).

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

const BLOCK: usize = 32;
/// Weight rows interleaved per group (one AVX-512 lane each).
const GROUP: usize = 16;
/// 64-byte lines per (group, block) panel: 4 weights of each of 16 rows.
const LINES: usize = BLOCK / 4;

/// One 64-byte line of a weight panel, cache-line aligned.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `[rows, cols]` weight in 8-bit blocks of 32 along `cols`.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    blocks: usize,
    groups: usize,
    quants: Quants,
    /// `[group][block][row 0..16]`: f16 bits.
    scales: Vec<u16>,
}

/// The weights of a [`Q8Matrix`] by storage width.
#[derive(Debug, Clone)]
enum Quants {
    /// `[group][block][line 0..8]`; line `k` byte `4j + t` is weight
    /// `4k + t` of the block in row `16 group + j`, stored as `w + 128`.
    Q8(Vec<Line>),
    /// Q5_0's 5-bit weights (`-16..=15`, 22 bytes per 32 with the scale),
    /// stored as `u = w + 16` in two parts. `nib`: `[group][block][line
    /// 0..4]`, line `i` byte `4j + t` holds the low 4 bits of weight
    /// `8i + t` (low nibble) and of weight `8i + 4 + t` (high nibble) of row
    /// `j`, so nibble plane `k` lines up with [`Quants::Q8`]'s line `k`.
    /// `high`: `[group][block][k 0..8]`, bit `4j + t` is bit 4 of weight
    /// `4k + t` of row `j`.
    Q5 { nib: Vec<Line>, high: Vec<u64> },
    /// Q4_0's 4-bit weights (`-8..=7`, 18 bytes per 32 with the scale),
    /// stored as `u = w + 8` in [`Quants::Q5`]'s nibble planes.
    Q4 { nib: Vec<Line> },
}

/// Activation rows quantized to blocks of 32 `i8` with an f32 scale; the
/// buffers are kept for reuse across calls.
#[derive(Debug, Clone, Default)]
pub struct Q8Acts {
    m: usize,
    blocks: usize,
    /// `[m][blocks]`
    scales: Vec<f32>,
    /// `[m][blocks · 32]`
    quants: Vec<i8>,
    /// `[m][blocks]`: the sum of the block's quants, for the offset of the
    /// unsigned weights (see the module docs).
    sums: Vec<i32>,
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
        self.sums.resize(m * nb, 0);
        let simd = Kernel::detected() == Kernel::Vnni;
        let work = |i: usize, s: &mut [f32], q: &mut [i8], c: &mut [i32]| {
            let row = &x[i * cols..(i + 1) * cols];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX-512 F/BW were detected with the VNNI kernel.
                unsafe { quantize_row_avx512(row, nb, s, q, c) };
                return;
            }
            let _ = simd;
            quantize_row(row, nb, s, q);
            for (b, cb) in c.iter_mut().enumerate() {
                *cb = q[b * BLOCK..(b + 1) * BLOCK].iter().map(|&v| v as i32).sum::<i32>();
            }
        };
        let (scales, quants, corr) = (&mut self.scales, &mut self.quants, &mut self.sums);
        if m * cols >= 1 << 16 {
            scales
                .par_chunks_mut(nb)
                .zip(quants.par_chunks_mut(nb * BLOCK))
                .zip(corr.par_chunks_mut(nb))
                .enumerate()
                .for_each(|(i, ((s, q), c))| work(i, s, q, c));
        } else {
            let rows = scales.chunks_mut(nb).zip(quants.chunks_mut(nb * BLOCK)).zip(corr.chunks_mut(nb));
            for (i, ((s, q), c)) in rows.enumerate() {
                work(i, s, q, c);
            }
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.m
    }
}

/// Quantizes one row into `blocks` blocks (zero-padded past `x.len()`),
/// rounding half away from zero. Written without `round` (a libm call) so
/// that it vectorizes.
fn quantize_row(x: &[f32], blocks: usize, scales: &mut [f32], quants: &mut [i8]) {
    for b in 0..blocks {
        let lo = b * BLOCK;
        let hi = (lo + BLOCK).min(x.len());
        let src = if lo < x.len() { &x[lo..hi] } else { &[][..] };
        let amax = src.iter().fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        scales[b] = d;
        let q = &mut quants[lo..lo + BLOCK];
        q.fill(0);
        for (qi, v) in q.iter_mut().zip(src) {
            // max then min (not clamp): NaN becomes -127, as in the SIMD path.
            let y = (v * inv).max(-127.0).min(127.0);
            *qi = (y + 0.5f32.copysign(y)) as i32 as i8;
        }
    }
}

/// [`quantize_row`] and the block sums with AVX-512, bit for bit the same
/// (tested): full blocks in two registers, a partial last block by the
/// portable code.
///
/// # Safety
/// The CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(x: &[f32], blocks: usize, scales: &mut [f32], quants: &mut [i8], sums: &mut [i32]) {
    use std::arch::x86_64::*;
    let full = (x.len() / BLOCK).min(blocks);
    let (lo, hi, half) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0), _mm512_set1_ps(0.5));
    let sign = _mm512_set1_epi32(i32::MIN);
    for b in 0..full {
        let p = x.as_ptr().add(b * BLOCK);
        let (v0, v1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        // max(acc, |v|) keeps acc where |v| is NaN, as the portable fold does.
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        scales[b] = d;
        let iv = _mm512_set1_ps(inv);
        let mut sum = _mm512_setzero_si512();
        for (h, v) in [v0, v1].into_iter().enumerate() {
            // max(y, -127) gives -127 for NaN, as f32::max does.
            let y = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v, iv), lo), hi);
            let r = _mm512_or_ps(half, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(y), sign)));
            let q = _mm512_cvttps_epi32(_mm512_add_ps(y, r));
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128(quants.as_mut_ptr().add(b * BLOCK + 16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(q));
        }
        sums[b] = _mm512_reduce_add_epi32(sum);
    }
    if full < blocks {
        let lo = full * BLOCK;
        quantize_row(&x[lo.min(x.len())..], blocks - full, &mut scales[full..], &mut quants[lo..]);
        for b in full..blocks {
            sums[b] = quants[b * BLOCK..(b + 1) * BLOCK].iter().map(|&v| v as i32).sum::<i32>();
        }
    }
}

/// Quantizes one block to an f16 scale (as bits) and 32 `i8`, rounding with
/// the f16 scale so that the stored scale is the one the quants were made for.
fn quantize_block_f16(src: &[f32]) -> (u16, [i8; BLOCK]) {
    let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
    let h = half::f16::from_f32(amax / 127.0);
    let d = h.to_f32();
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (qi, v) in q.iter_mut().zip(src) {
        *qi = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    (h.to_bits(), q)
}

/// Writes row `j` (of 16) of block `b` into one group's panels.
fn set_block(lines: &mut [Line], scales: &mut [u16], j: usize, b: usize, scale: u16, q: &[i8]) {
    scales[b * GROUP + j] = scale;
    for (k, line) in lines[b * LINES..(b + 1) * LINES].iter_mut().enumerate() {
        for t in 0..4 {
            line.0[4 * j + t] = (q[4 * k + t] as u8) ^ 0x80;
        }
    }
}

/// Writes row `j` (of 16) of block `b` into one group's nibble panels
/// (5-bit with `high`, offset 16; 4-bit without, offset 8).
fn set_block_nib(
    nib: &mut [Line],
    mut high: Option<&mut [u64]>,
    scales: &mut [u16],
    (j, b): (usize, usize),
    scale: u16,
    q: &[i8],
) {
    scales[b * GROUP + j] = scale;
    let off = if high.is_some() { 16 } else { 8 };
    for (c, &w) in q.iter().enumerate() {
        let u = (w + off) as u8;
        let (k, t) = (c / 4, c % 4);
        let byte = &mut nib[b * 4 + k / 2].0[4 * j + t];
        if k % 2 == 0 {
            *byte = (*byte & 0xf0) | (u & 0x0f);
        } else {
            *byte = (*byte & 0x0f) | ((u & 0x0f) << 4);
        }
        if let Some(high) = high.as_deref_mut() {
            let bit = 1u64 << (4 * j + t);
            let h = &mut high[b * LINES + k];
            *h = if u & 0x10 != 0 { *h | bit } else { *h & !bit };
        }
    }
}

/// The matmul kernel for this CPU, detected once. `ATTN_Q8_KERNEL=portable`
/// (or `avx2`) picks a slower one, for comparisons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    Portable,
    Avx2,
    Vnni,
}

impl Kernel {
    /// Every kernel this CPU can run, the portable one first.
    pub fn available() -> Vec<Kernel> {
        let mut v = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                v.push(Kernel::Avx2);
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vnni")
                {
                    v.push(Kernel::Vnni);
                }
            }
        }
        v
    }

    /// The kernel `matmul` uses: the fastest available, unless
    /// `ATTN_Q8_KERNEL` names another available one.
    pub fn detected() -> Kernel {
        static K: OnceLock<Kernel> = OnceLock::new();
        *K.get_or_init(|| {
            let avail = Kernel::available();
            let best = *avail.last().expect("portable is always available");
            match std::env::var("ATTN_Q8_KERNEL").ok().as_deref() {
                None | Some("") => best,
                Some(name) => match avail.iter().find(|k| k.name() == name) {
                    Some(k) => *k,
                    None => {
                        let names: Vec<&str> = avail.iter().map(|k| k.name()).collect();
                        eprintln!(
                            "ATTN_Q8_KERNEL={name}: not one of this CPU's kernels ({}); using {}",
                            names.join(", "),
                            best.name()
                        );
                        best
                    }
                },
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Vnni => "vnni",
        }
    }

    /// (weight groups, activation rows) per tile.
    fn tile(self, m: usize) -> (usize, usize) {
        match self {
            Kernel::Vnni if m == 1 => (4, 1),
            Kernel::Vnni => (2, 6),
            Kernel::Avx2 => (1, 4),
            Kernel::Portable => (1, 1),
        }
    }
}

/// The output pointer shared by the tasks of one matmul; each writes its
/// own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own weight rows).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Q8Matrix {
    fn zeroed(rows: usize, cols: usize) -> Self {
        let blocks = cols.div_ceil(BLOCK);
        let groups = rows.div_ceil(GROUP);
        Q8Matrix {
            rows,
            cols,
            blocks,
            groups,
            quants: Quants::Q8(vec![Line([0x80; 64]); groups * blocks * LINES]),
            scales: vec![0; groups * blocks * GROUP],
        }
    }

    fn zeroed_q5(rows: usize, cols: usize) -> Self {
        let mut m = Self::zeroed(rows, cols);
        let panels = m.groups * m.blocks;
        // u = 16 (w = 0): low nibbles 0, high bits set.
        m.quants = Quants::Q5 { nib: vec![Line([0; 64]); panels * 4], high: vec![u64::MAX; panels * LINES] };
        m
    }

    fn zeroed_q4(rows: usize, cols: usize) -> Self {
        let mut m = Self::zeroed(rows, cols);
        // u = 8 (w = 0) in both nibbles.
        m.quants = Quants::Q4 { nib: vec![Line([0x88; 64]); m.groups * m.blocks * 4] };
        m
    }

    /// Fills every group in parallel; `row(r, b)` gives row `r`'s block `b`.
    fn fill(mut self, row: impl Fn(usize, usize) -> (u16, [i8; BLOCK]) + Sync) -> Self {
        let (nb, rows) = (self.blocks, self.rows);
        let live = move |g: usize| GROUP.min(rows - g * GROUP);
        match &mut self.quants {
            Quants::Q8(quants) => {
                quants.par_chunks_mut(nb * LINES).zip(self.scales.par_chunks_mut(nb * GROUP)).enumerate().for_each(
                    |(g, (lines, scales))| {
                        for j in 0..live(g) {
                            for b in 0..nb {
                                let (s, q) = row(g * GROUP + j, b);
                                set_block(lines, scales, j, b, s, &q);
                            }
                        }
                    },
                )
            }
            Quants::Q5 { nib, high } => nib
                .par_chunks_mut(nb * 4)
                .zip(high.par_chunks_mut(nb * LINES))
                .zip(self.scales.par_chunks_mut(nb * GROUP))
                .enumerate()
                .for_each(|(g, ((nib, high), scales))| {
                    for j in 0..live(g) {
                        for b in 0..nb {
                            let (s, q) = row(g * GROUP + j, b);
                            set_block_nib(nib, Some(&mut *high), scales, (j, b), s, &q);
                        }
                    }
                }),
            Quants::Q4 { nib } => {
                nib.par_chunks_mut(nb * 4).zip(self.scales.par_chunks_mut(nb * GROUP)).enumerate().for_each(
                    |(g, (nib, scales))| {
                        for j in 0..live(g) {
                            for b in 0..nb {
                                let (s, q) = row(g * GROUP + j, b);
                                set_block_nib(nib, None, scales, (j, b), s, &q);
                            }
                        }
                    },
                )
            }
        }
        self
    }

    /// From a row-major f32 matrix.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if w.len() != rows * cols || cols == 0 {
            return Err(Error::input("q8 matrix", format!("{} values for a {rows}x{cols} matrix", w.len())));
        }
        Ok(Self::zeroed(rows, cols).fill(|r, b| {
            let lo = b * BLOCK;
            quantize_block_f16(&w[r * cols + lo..r * cols + (lo + BLOCK).min(cols)])
        }))
    }

    /// From GGUF Q8_0 blocks (34 bytes each: an f16 scale, then 32 `i8`),
    /// exactly.
    pub fn from_q8_0_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        const Q8_0: usize = 34;
        if cols % BLOCK != 0 || data.len() != rows * cols / BLOCK * Q8_0 {
            return Err(Error::input("q8 matrix", format!("{} bytes of Q8_0 for a {rows}x{cols} matrix", data.len())));
        }
        let nb = cols / BLOCK;
        Ok(Self::zeroed(rows, cols).fill(|r, b| {
            let blk = &data[(r * nb + b) * Q8_0..(r * nb + b + 1) * Q8_0];
            let mut q = [0i8; BLOCK];
            for (qi, &v) in q.iter_mut().zip(&blk[2..]) {
                *qi = v as i8;
            }
            (u16::from_le_bytes([blk[0], blk[1]]), q)
        }))
    }

    /// From GGUF Q5_0 blocks (22 bytes each: an f16 scale, 32 high bits,
    /// then 16 bytes of low nibbles), exactly. With the VNNI kernel the
    /// panels stay 5-bit (22 bytes per 32 weights, as in the file); the
    /// other kernels expand nibble panels block by block (criterion, one row
    /// 2048 -> 640 with AVX2: 2.0 ms against 57 µs in 8 bits), so for them
    /// the weights are widened to 8 bits at load.
    pub fn from_q5_0_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_q5_0_bytes_packed(data, rows, cols, Kernel::detected() == Kernel::Vnni)
    }

    fn from_q5_0_bytes_packed(data: &[u8], rows: usize, cols: usize, packed: bool) -> Result<Self> {
        const Q5_0: usize = 22;
        if cols % BLOCK != 0 || data.len() != rows * cols / BLOCK * Q5_0 {
            return Err(Error::input("q5 matrix", format!("{} bytes of Q5_0 for a {rows}x{cols} matrix", data.len())));
        }
        let nb = cols / BLOCK;
        let empty = if packed { Self::zeroed_q5(rows, cols) } else { Self::zeroed(rows, cols) };
        Ok(empty.fill(|r, b| {
            let blk = &data[(r * nb + b) * Q5_0..(r * nb + b + 1) * Q5_0];
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let mut q = [0i8; BLOCK];
            for (j, &byte) in blk[6..].iter().enumerate() {
                let lo = (byte & 0x0f) | ((((qh >> j) << 4) & 0x10) as u8);
                let hi = (byte >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
                q[j] = lo as i8 - 16;
                q[j + 16] = hi as i8 - 16;
            }
            (u16::from_le_bytes([blk[0], blk[1]]), q)
        }))
    }

    /// From GGUF Q4_0 blocks (18 bytes each: an f16 scale, then 16 bytes of
    /// nibbles, element `j` low and `j + 16` high, value minus 8), exactly;
    /// in 4 bits with the VNNI kernel, else widened to 8 (as Q5_0).
    pub fn from_q4_0_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_q4_0_bytes_packed(data, rows, cols, Kernel::detected() == Kernel::Vnni)
    }

    fn from_q4_0_bytes_packed(data: &[u8], rows: usize, cols: usize, packed: bool) -> Result<Self> {
        const Q4_0: usize = 18;
        if cols % BLOCK != 0 || data.len() != rows * cols / BLOCK * Q4_0 {
            return Err(Error::input("q4 matrix", format!("{} bytes of Q4_0 for a {rows}x{cols} matrix", data.len())));
        }
        let nb = cols / BLOCK;
        let empty = if packed { Self::zeroed_q4(rows, cols) } else { Self::zeroed(rows, cols) };
        Ok(empty.fill(|r, b| {
            let blk = &data[(r * nb + b) * Q4_0..(r * nb + b + 1) * Q4_0];
            let mut q = [0i8; BLOCK];
            for (j, &byte) in blk[2..].iter().enumerate() {
                q[j] = (byte & 0x0f) as i8 - 8;
                q[j + 16] = (byte >> 4) as i8 - 8;
            }
            (u16::from_le_bytes([blk[0], blk[1]]), q)
        }))
    }

    /// Bits per stored weight: 8, 5 (from Q5_0) or 4 (from Q4_0).
    pub fn weight_bits(&self) -> u32 {
        match self.quants {
            Quants::Q8(_) => 8,
            Quants::Q5 { .. } => 5,
            Quants::Q4 { .. } => 4,
        }
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

    #[inline]
    fn weight(&self, r: usize, c: usize) -> i8 {
        let panel = r / GROUP * self.blocks + c / BLOCK;
        let (k, lane) = ((c % BLOCK) / 4, 4 * (r % GROUP) + c % 4);
        match &self.quants {
            Quants::Q8(q) => (q[panel * LINES + k].0[lane] ^ 0x80) as i8,
            Quants::Q5 { nib, high } => {
                let byte = nib[panel * 4 + k / 2].0[lane];
                let low = if k % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let hb = ((high[panel * LINES + k] >> lane) & 1) as u8;
                (low | (hb << 4)) as i8 - 16
            }
            Quants::Q4 { nib } => {
                let byte = nib[panel * 4 + k / 2].0[lane];
                (if k % 2 == 0 { byte & 0x0f } else { byte >> 4 }) as i8 - 8
            }
        }
    }

    /// Group `g`'s block `b` as an 8-bit panel (`w + 128`), for kernels
    /// without a 5-bit path.
    fn panel_q8(&self, g: usize, b: usize, out: &mut [Line; LINES]) {
        for (k, line) in out.iter_mut().enumerate() {
            for lane in 0..64 {
                let (j, t) = (lane / 4, lane % 4);
                line.0[lane] = if g * GROUP + j < self.rows {
                    (self.weight(g * GROUP + j, b * BLOCK + 4 * k + t) as u8) ^ 0x80
                } else {
                    0x80
                };
            }
        }
    }

    #[inline]
    fn scale(&self, r: usize, b: usize) -> f32 {
        f16_to_f32(self.scales[(r / GROUP * self.blocks + b) * GROUP + r % GROUP])
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
        self.matmul_acts_with(a, out, Kernel::detected())
    }

    /// [`Self::matmul_acts`] with a given kernel (one of
    /// [`Kernel::available`]).
    pub fn matmul_acts_with(&self, a: &Q8Acts, out: &mut [f32], kernel: Kernel) -> Result<()> {
        let m = a.m;
        if a.blocks != self.blocks || out.len() < m * self.rows {
            return Err(Error::input(
                "q8 matmul",
                format!("{} activation blocks for a {}x{} matrix", a.blocks, self.rows, self.cols),
            ));
        }
        if !Kernel::available().contains(&kernel) {
            return Err(Error::input("q8 matmul", format!("kernel {kernel:?} is not available on this CPU")));
        }
        if m == 0 {
            return Ok(());
        }
        // Tasks of whole groups: for one row at least 4 groups (40 KB of a
        // 640-wide matrix) each, else about 8 tasks per thread.
        let threads = rayon::current_num_threads();
        let per_task =
            if m == 1 { self.groups.div_ceil(threads * 4).max(4) } else { self.groups.div_ceil(threads * 8).max(1) };
        let tasks = self.groups.div_ceil(per_task);
        let ptr = OutPtr(out.as_mut_ptr());
        let run = |t: usize| {
            let g1 = ((t + 1) * per_task).min(self.groups);
            // SAFETY: task `t` writes only rows of groups t·per_task..g1.
            unsafe { self.run_groups(a, t * per_task, g1, kernel, ptr.get()) }
        };
        if tasks == 1 {
            run(0);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
        Ok(())
    }

    /// Computes the outputs of weight groups `g0..g1` for every activation
    /// row.
    ///
    /// # Safety
    /// `out` points to `a.m × self.rows` floats, `kernel` is available, and
    /// no other thread writes these groups' outputs.
    unsafe fn run_groups(&self, a: &Q8Acts, g0: usize, g1: usize, kernel: Kernel, out: *mut f32) {
        let m = a.m;
        let (gmax, nmax) = kernel.tile(m);
        let mut res = [[0f32; GROUP]; 12];
        let mut g = g0;
        while g < g1 {
            let gt = gmax.min(g1 - g);
            let mut n0 = 0;
            while n0 < m {
                let nt = nmax.min(m - n0);
                match kernel {
                    Kernel::Portable => self.tile_portable(g, gt, a, n0, nt, &mut res),
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => match nt {
                        1 => tile_avx2::<1>(self, g, a, n0, &mut res),
                        2 => tile_avx2::<2>(self, g, a, n0, &mut res),
                        3 => tile_avx2::<3>(self, g, a, n0, &mut res),
                        _ => tile_avx2::<4>(self, g, a, n0, &mut res),
                    },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => match (gt, nt) {
                        (4, _) => tile_vnni::<4, 1>(self, g, a, n0, &mut res),
                        (3, _) => tile_vnni::<3, 1>(self, g, a, n0, &mut res),
                        (2, 1) => tile_vnni::<2, 1>(self, g, a, n0, &mut res),
                        (2, 2) => tile_vnni::<2, 2>(self, g, a, n0, &mut res),
                        (2, 3) => tile_vnni::<2, 3>(self, g, a, n0, &mut res),
                        (2, 4) => tile_vnni::<2, 4>(self, g, a, n0, &mut res),
                        (2, 5) => tile_vnni::<2, 5>(self, g, a, n0, &mut res),
                        (2, _) => tile_vnni::<2, 6>(self, g, a, n0, &mut res),
                        (_, 1) => tile_vnni::<1, 1>(self, g, a, n0, &mut res),
                        (_, 2) => tile_vnni::<1, 2>(self, g, a, n0, &mut res),
                        (_, 3) => tile_vnni::<1, 3>(self, g, a, n0, &mut res),
                        (_, 4) => tile_vnni::<1, 4>(self, g, a, n0, &mut res),
                        (_, 5) => tile_vnni::<1, 5>(self, g, a, n0, &mut res),
                        (_, _) => tile_vnni::<1, 6>(self, g, a, n0, &mut res),
                    },
                    #[cfg(not(target_arch = "x86_64"))]
                    _ => self.tile_portable(g, gt, a, n0, nt, &mut res),
                }
                for gi in 0..gt {
                    let r0 = (g + gi) * GROUP;
                    let valid = GROUP.min(self.rows - r0);
                    for ni in 0..nt {
                        let dst = out.add((n0 + ni) * self.rows + r0);
                        std::ptr::copy_nonoverlapping(res[gi * nt + ni].as_ptr(), dst, valid);
                    }
                }
                n0 += nt;
            }
            g += gt;
        }
    }

    /// The reference arithmetic, one output at a time: `res[gi · nt + ni]`
    /// holds group `g + gi`'s 16 outputs for activation row `n0 + ni`.
    fn tile_portable(&self, g: usize, gt: usize, a: &Q8Acts, n0: usize, nt: usize, res: &mut [[f32; GROUP]]) {
        let nb = self.blocks;
        for gi in 0..gt {
            for ni in 0..nt {
                let n = n0 + ni;
                for j in 0..GROUP {
                    let r = (g + gi) * GROUP + j;
                    if r >= self.rows {
                        res[gi * nt + ni][j] = 0.0;
                        continue;
                    }
                    let mut acc = 0f32;
                    for b in 0..nb {
                        let x = &a.quants[(n * nb + b) * BLOCK..(n * nb + b + 1) * BLOCK];
                        let s: i32 = (0..BLOCK).map(|t| self.weight(r, b * BLOCK + t) as i32 * x[t] as i32).sum();
                        let d = self.scale(r, b) * a.scales[n * nb + b];
                        acc = d.mul_add(s as f32, acc);
                    }
                    res[gi * nt + ni][j] = acc;
                }
            }
        }
    }

    /// Rows `r0..r0 + n` as f32 into `out` (`[n, cols]`).
    pub fn dequantize_rows(&self, r0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        if r0 + n > self.rows || out.len() < n * self.cols {
            return Err(Error::input("q8 rows", format!("rows {r0}..{} of {}", r0 + n, self.rows)));
        }
        let c = self.cols;
        let one = |k: usize, dst: &mut [f32]| {
            let r = r0 + k;
            for (b, chunk) in dst.chunks_mut(BLOCK).enumerate() {
                let d = self.scale(r, b);
                for (t, v) in chunk.iter_mut().enumerate() {
                    *v = d * self.weight(r, b * BLOCK + t) as f32;
                }
            }
        };
        if n == 1 {
            one(0, &mut out[..c]);
        } else {
            out[..n * c].par_chunks_mut(c).enumerate().for_each(|(k, dst)| one(k, dst));
        }
        Ok(())
    }

    /// Bytes of weight data read by one pass over the matrix.
    pub fn bytes(&self) -> usize {
        let w = match &self.quants {
            Quants::Q8(q) => q.len() * std::mem::size_of::<Line>(),
            Quants::Q5 { nib, high } => nib.len() * std::mem::size_of::<Line>() + high.len() * 8,
            Quants::Q4 { nib } => nib.len() * std::mem::size_of::<Line>(),
        };
        w + self.scales.len() * std::mem::size_of::<u16>()
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

/// `G` groups × `N` activation rows with AVX-512 VNNI; `res[g · N + n]`.
/// 5-bit and 4-bit panels are widened in registers: the nibble plane
/// masked out, and for 5 bits bit 4 added under a 64-bit mask.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI, FMA and F16C; groups `g0..g0 + G` and
/// rows `n0..n0 + N` exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn tile_vnni<const G: usize, const N: usize>(
    w: &Q8Matrix,
    g0: usize,
    a: &Q8Acts,
    n0: usize,
    res: &mut [[f32; GROUP]],
) {
    use std::arch::x86_64::*;
    let nb = w.blocks;
    // Weight pointers per kind; the offset `w + OFF` is removed through the
    // activation sums.
    let (q8, nib, high, off) = match &w.quants {
        Quants::Q8(q) => (q.as_ptr().add(g0 * nb * LINES), std::ptr::null(), std::ptr::null(), 128),
        Quants::Q5 { nib, high } => {
            (std::ptr::null(), nib.as_ptr().add(g0 * nb * 4), high.as_ptr().add(g0 * nb * LINES), 16)
        }
        Quants::Q4 { nib } => (std::ptr::null(), nib.as_ptr().add(g0 * nb * 4), std::ptr::null(), 8),
    };
    let packed = off != 128;
    let five = off == 16;
    let scales = w.scales.as_ptr().add(g0 * nb * GROUP);
    let xq = a.quants.as_ptr().add(n0 * nb * BLOCK);
    let xs = a.scales.as_ptr().add(n0 * nb);
    let xsum = a.sums.as_ptr().add(n0 * nb);
    let low4 = _mm512_set1_epi8(0x0f);
    let bit4 = _mm512_set1_epi8(0x10);
    let mut facc = [[_mm512_setzero_ps(); N]; G];
    for b in 0..nb {
        let mut iacc = [[_mm512_setzero_si512(); N]; G];
        for n in 0..N {
            let c = _mm512_set1_epi32(-off * *xsum.add(n * nb + b));
            for row in iacc.iter_mut() {
                row[n] = c;
            }
        }
        for k in 0..LINES {
            let mut wv = [_mm512_setzero_si512(); G];
            for (g, v) in wv.iter_mut().enumerate() {
                let panel = g * nb + b;
                *v = if packed {
                    let two = _mm512_load_si512(nib.add(panel * 4 + k / 2) as *const _);
                    let plane = if k % 2 == 0 { two } else { _mm512_srli_epi16::<4>(two) };
                    let low = _mm512_and_si512(plane, low4);
                    if five {
                        _mm512_mask_add_epi8(low, *high.add(panel * LINES + k), low, bit4)
                    } else {
                        low
                    }
                } else {
                    _mm512_load_si512(q8.add(panel * LINES + k) as *const _)
                };
            }
            for n in 0..N {
                let x4 = (xq.add((n * nb + b) * BLOCK + 4 * k) as *const i32).read_unaligned();
                let xb = _mm512_set1_epi32(x4);
                for g in 0..G {
                    iacc[g][n] = _mm512_dpbusd_epi32(iacc[g][n], wv[g], xb);
                }
            }
        }
        for g in 0..G {
            let sw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add((g * nb + b) * GROUP) as *const __m256i));
            for n in 0..N {
                let d = _mm512_mul_ps(sw, _mm512_set1_ps(*xs.add(n * nb + b)));
                facc[g][n] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(iacc[g][n]), facc[g][n]);
            }
        }
    }
    for g in 0..G {
        for n in 0..N {
            _mm512_storeu_ps(res[g * N + n].as_mut_ptr(), facc[g][n]);
        }
    }
}

/// One group × `N` activation rows with AVX2, eight weight rows at a time:
/// the 8-bit values are widened to 16 bits, `vpmaddwd` gives pair sums, and
/// one horizontal add per block makes each row's sum. 5-bit and 4-bit
/// panels are first expanded to 8-bit ones.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; group `g0` and rows `n0..n0 + N` exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const N: usize>(w: &Q8Matrix, g0: usize, a: &Q8Acts, n0: usize, res: &mut [[f32; GROUP]]) {
    use std::arch::x86_64::*;
    let nb = w.blocks;
    let scales = w.scales.as_ptr().add(g0 * nb * GROUP);
    let xq = a.quants.as_ptr().add(n0 * nb * BLOCK);
    let xs = a.scales.as_ptr().add(n0 * nb);
    let flip = _mm_set1_epi8(-128);
    let mut buf = [Line([0; 64]); LINES];
    let mut facc = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..nb {
        let lines = match &w.quants {
            Quants::Q8(q) => q.as_ptr().add((g0 * nb + b) * LINES) as *const u8,
            Quants::Q5 { .. } | Quants::Q4 { .. } => {
                w.panel_q8(g0, b, &mut buf);
                buf.as_ptr() as *const u8
            }
        };
        for (h, fh) in facc.iter_mut().enumerate() {
            let mut lo = [_mm256_setzero_si256(); N];
            let mut hi = [_mm256_setzero_si256(); N];
            for k in 0..LINES {
                let p = lines.add(k * 64 + 32 * h);
                let wa = _mm256_cvtepi8_epi16(_mm_xor_si128(_mm_loadu_si128(p as *const __m128i), flip));
                let wb = _mm256_cvtepi8_epi16(_mm_xor_si128(_mm_loadu_si128(p.add(16) as *const __m128i), flip));
                for n in 0..N {
                    let x4 = (xq.add((n * nb + b) * BLOCK + 4 * k) as *const i32).read_unaligned();
                    let xb = _mm256_cvtepi8_epi16(_mm_set1_epi32(x4));
                    lo[n] = _mm256_add_epi32(lo[n], _mm256_madd_epi16(wa, xb));
                    hi[n] = _mm256_add_epi32(hi[n], _mm256_madd_epi16(wb, xb));
                }
            }
            let sw = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(b * GROUP + 8 * h) as *const __m128i));
            for n in 0..N {
                // Rows 0,1,4,5 | 2,3,6,7 after the add; the permute orders them.
                let s = _mm256_permute4x64_epi64::<0xD8>(_mm256_hadd_epi32(lo[n], hi[n]));
                let d = _mm256_mul_ps(sw, _mm256_set1_ps(*xs.add(n * nb + b)));
                fh[n] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), fh[n]);
            }
        }
    }
    for (h, fh) in facc.iter().enumerate() {
        for n in 0..N {
            _mm256_storeu_ps(res[n].as_mut_ptr().add(8 * h), fh[n]);
        }
    }
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
        let (rows, cols) = (70, 100); // not multiples of the group, block or task sizes
        let w = rand_vec(rows * cols, 1);
        let q = Q8Matrix::from_f32(&w, rows, cols).unwrap();
        let m = 9; // a tile of six and a tail of three
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
    fn every_kernel_equals_the_portable_one_bit_for_bit() {
        // 83 rows: six groups, the last partial (tiles of four, two and one
        // groups); 160 columns: five blocks.
        let (rows, cols) = (83, 160);
        let w = rand_vec(rows * cols, 3);
        let q = Q8Matrix::from_f32(&w, rows, cols).unwrap();
        let kernels = Kernel::available();
        for m in [1, 2, 5, 6, 7, 13] {
            let x = rand_vec(m * cols, 4 + m as u64);
            let mut acts = Q8Acts::default();
            acts.quantize(&x, m, cols).unwrap();
            let mut want = vec![0f32; m * rows];
            q.matmul_acts_with(&acts, &mut want, Kernel::Portable).unwrap();
            for &k in &kernels {
                let mut got = vec![f32::NAN; m * rows];
                q.matmul_acts_with(&acts, &mut got, k).unwrap();
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{k:?}, {m} rows: differs from the portable kernel");
            }
        }
        println!("kernels checked: {kernels:?}");
    }

    #[test]
    fn extreme_weights_and_activations_do_not_overflow() {
        // -128 weights (possible in a Q8_0 file) against 127 activations,
        // and the most negative sums, on every kernel.
        let (rows, cols) = (16, 64);
        let mut bytes = Vec::new();
        for r in 0..rows {
            for _ in 0..cols / BLOCK {
                bytes.extend([0x00, 0x3c]); // scale 1.0
                bytes.extend((0..BLOCK).map(|t| if (r + t) % 3 == 0 { 0x80u8 } else { 0x7f }));
            }
        }
        let q = Q8Matrix::from_q8_0_bytes(&bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..cols).map(|c| if c % 2 == 0 { 1.0 } else { -1.0 }).collect();
        let mut acts = Q8Acts::default();
        acts.quantize(&x, 1, cols).unwrap();
        for k in Kernel::available() {
            let mut got = vec![0f32; rows];
            q.matmul_acts_with(&acts, &mut got, k).unwrap();
            for (r, g) in got.iter().enumerate() {
                let want: f32 = (0..cols)
                    .map(|c| {
                        let wv = if (r + c % BLOCK) % 3 == 0 { -128.0 } else { 127.0 };
                        wv * x[c]
                    })
                    .sum::<f32>()
                    / 127.0
                    * 127.0;
                assert!((g - want).abs() < 1e-3 * want.abs().max(1.0), "{k:?} row {r}: {g} vs {want}");
            }
        }
    }

    /// Random Q5_0 blocks and the same weights as Q8_0 blocks, decoded with
    /// ggml's formula: element `j < 16` is the low nibble of byte `j` plus
    /// bit `j` of `qh` as bit 4, element `j + 16` the high nibble plus bit
    /// `j + 16`; value minus 16.
    fn q5_and_q8_blocks(blocks: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (mut q5, mut q8) = (Vec::new(), Vec::new());
        for _ in 0..blocks {
            let d = half::f16::from_f32(rng.gen_range(0.001..0.1)).to_bits().to_le_bytes();
            let qh: u32 = rng.gen();
            let qs: [u8; 16] = rng.gen();
            q5.extend(d);
            q5.extend(qh.to_le_bytes());
            q5.extend(qs);
            q8.extend(d);
            for j in 0..32 {
                let nibble = if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 };
                let v = (nibble | (((qh >> j) & 1) as u8) << 4) as i8 - 16;
                q8.push(v as u8);
            }
        }
        (q5, q8)
    }

    /// `packed` (nibble panels) and `widened` (the same file bytes widened at
    /// load) against `q8` (the same weights as Q8_0): equal dequantized
    /// weights, and matmuls bit for bit on every kernel.
    fn check_against_eight_bits(packed: &Q8Matrix, widened: &Q8Matrix, q8: &Q8Matrix, seed: u64) {
        let (rows, cols) = (q8.rows(), q8.cols());
        assert_eq!(widened.weight_bits(), 8);
        let (mut a, mut b) = (vec![0f32; rows * cols], vec![1f32; rows * cols]);
        packed.dequantize_rows(0, rows, &mut a).unwrap();
        q8.dequantize_rows(0, rows, &mut b).unwrap();
        assert_eq!(a, b);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for m in [1, 3, 8] {
            let x = rand_vec(m * cols, seed + m as u64);
            let mut acts = Q8Acts::default();
            acts.quantize(&x, m, cols).unwrap();
            let mut want = vec![0f32; m * rows];
            q8.matmul_acts_with(&acts, &mut want, Kernel::Portable).unwrap();
            for k in Kernel::available() {
                let mut got = vec![f32::NAN; m * rows];
                packed.matmul_acts_with(&acts, &mut got, k).unwrap();
                assert_eq!(bits(&got), bits(&want), "{k:?}, {m} rows: {}-bit differs from 8-bit", packed.weight_bits());
            }
            let mut got = vec![f32::NAN; m * rows];
            widened.matmul_acts(&acts, &mut got).unwrap();
            assert_eq!(bits(&got), bits(&want), "widened at load");
        }
    }

    #[test]
    fn five_bit_panels_equal_the_same_weights_in_eight_bits() {
        let (rows, cols) = (37, 96);
        let (q5b, q8b) = q5_and_q8_blocks(rows * cols / BLOCK, 11);
        // Nibble panels whatever the CPU, so every kernel is checked on them.
        let q5 = Q8Matrix::from_q5_0_bytes_packed(&q5b, rows, cols, true).unwrap();
        let widened = Q8Matrix::from_q5_0_bytes_packed(&q5b, rows, cols, false).unwrap();
        let q8 = Q8Matrix::from_q8_0_bytes(&q8b, rows, cols).unwrap();
        assert_eq!((q5.weight_bits(), q8.weight_bits()), (5, 8));
        assert!(q5.bytes() * 3 < q8.bytes() * 2, "{} vs {}", q5.bytes(), q8.bytes());
        check_against_eight_bits(&q5, &widened, &q8, 20);
        assert!(Q8Matrix::from_q5_0_bytes(&q5b[..q5b.len() - 1], rows, cols).is_err());
    }

    #[test]
    fn simd_activation_quantization_equals_the_portable_one() {
        if !Kernel::available().contains(&Kernel::Vnni) {
            println!("no AVX-512 on this CPU: only the portable quantization exists");
            return;
        }
        let cols = 100; // three full blocks and a partial one
        let mut x = rand_vec(cols, 9);
        x[5] = f32::NAN;
        x[40] = 0.0;
        x[41] = -0.0;
        x[64..96].fill(0.0); // an all-zero block: scale 0
        let nb = cols.div_ceil(BLOCK);
        let (mut s1, mut q1) = (vec![0f32; nb], vec![0i8; nb * BLOCK]);
        quantize_row(&x, nb, &mut s1, &mut q1);
        let sums1: Vec<i32> = q1.chunks(BLOCK).map(|b| b.iter().map(|&v| v as i32).sum()).collect();
        let (mut s2, mut q2, mut sums2) = (vec![1f32; nb], vec![1i8; nb * BLOCK], vec![0i32; nb]);
        // SAFETY: AVX-512 was detected above.
        unsafe { quantize_row_avx512(&x, nb, &mut s2, &mut q2, &mut sums2) };
        assert_eq!(
            s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(q1, q2);
        assert_eq!(sums1, sums2);
    }

    #[test]
    fn four_bit_panels_equal_the_same_weights_in_eight_bits() {
        let (rows, cols) = (37, 96);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let (mut q4b, mut q8b) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols / BLOCK {
            let d = half::f16::from_f32(rng.gen_range(0.001..0.1)).to_bits().to_le_bytes();
            let qs: [u8; 16] = rng.gen();
            q4b.extend(d);
            q4b.extend(qs);
            q8b.extend(d);
            // ggml: element j < 16 is the low nibble of byte j, j + 16 the high one; minus 8.
            q8b.extend((0..32).map(|j| (if j < 16 { qs[j] & 0x0f } else { qs[j - 16] >> 4 } as i8 - 8) as u8));
        }
        let q4 = Q8Matrix::from_q4_0_bytes_packed(&q4b, rows, cols, true).unwrap();
        let widened = Q8Matrix::from_q4_0_bytes_packed(&q4b, rows, cols, false).unwrap();
        let q8 = Q8Matrix::from_q8_0_bytes(&q8b, rows, cols).unwrap();
        assert_eq!(q4.weight_bits(), 4);
        assert!(q4.bytes() * 9 < q8.bytes() * 5, "{} vs {}", q4.bytes(), q8.bytes());
        check_against_eight_bits(&q4, &widened, &q8, 30);
        assert!(Q8Matrix::from_q4_0_bytes(&q4b[..q4b.len() - 1], rows, cols).is_err());
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
    fn bad_shapes_are_errors() {
        let w = rand_vec(96, 3);
        assert!(Q8Matrix::from_f32(&w, 2, 7).is_err());
        let q = Q8Matrix::from_f32(&w, 1, 96).unwrap();
        assert!(q.matmul(&w[..5], 1).is_err());
        let mut acts = Q8Acts::default();
        acts.quantize(&w, 1, 64).unwrap();
        assert!(q.matmul_acts(&acts, &mut [0f32; 1]).is_err());
    }
}
