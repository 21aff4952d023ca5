//! Block-quantized matrices and a batched matmul that reads each weight once
//! per call, however many rows it multiplies.
//!
//! Why: candle 0.11's quantized matmul costs about as much per activation
//! row for several rows as for one (measured on Gemma 3 270M, 2 threads:
//! the output projection takes 17 ms for 1 row, 89 ms for 4, 221 ms for
//! 16), so a batch of decoding sequences gained nothing from batching.
//!
//! Layout: the integer weights are cut in blocks of 32 along `cols` and
//! rearranged for SIMD: sixteen rows form a group, and a group's block `b`
//! is one 512-byte panel in which each 64-byte line holds 4 consecutive
//! weights of each of the 16 rows. One AVX-512 VNNI `vpdpbusd` multiplies a
//! line by 4 activation bytes (broadcast) and adds into 16 lanes, one per
//! row, so the inner loop has no horizontal sums and a block's exact
//! integer dot for 16 rows takes 8 instructions. `vpdpbusd` wants unsigned
//! weights, so they are stored as `u = w + off`; the activation side
//! removes the `off · Σx` that adds, exactly, by starting each block's
//! integer sum at `-off · Σx`.
//!
//! Formats (GGUF type, stored width with the VNNI kernel, bytes per 32
//! weights as kept here against the file's):
//!
//! - Q8_0 (and any float or other GGUF type, quantized to it): 8-bit
//!   lines, `off` 128, an f16 scale per block (34 = 34).
//! - Q5_0: 4-bit planes (a line of two nibbles holds two lines of weights)
//!   plus one 64-bit mask of bit 4 per line, `off` 16 (22 = 22).
//! - Q4_0: 4-bit planes, `off` 8 (18 = 18).
//! - Q4_1: 4-bit planes of `q` in `0..=15` (`off` 0), an f16 scale `d` and
//!   f16 min `m` per block: `w = d·q + m` (20 = 20).
//! - Q4_K: as Q4_1 with the per-block scale `d·sc` and min `-dmin·mn`
//!   kept as the file has them: 6-bit `sc`, `mn` (one byte each) per block,
//!   f16 `d`, `dmin` per super-block of 256 (18.5 against 18).
//! - Q6_K: 4-bit planes plus a 2-bit plane (bits 4 and 5), `u = q` in
//!   `0..=63`, `off` 32; an `i8` scale per 16 weights and an f16 `d` per
//!   super-block: `w = d·sc·(q - 32)` (26.25 = 26.25).
//!
//! The narrow planes are widened to a line of bytes in registers just
//! before the `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw` (AVX2), so decode
//! reads the file's bytes, not 8 bits per weight. The portable kernel gets
//! the weights widened to 8-bit lines at load (with the same scales).
//!
//! Activations are quantized per row to blocks of 32 `i8` with an f32 scale
//! `sx`, keeping each block's sum `Σx` and the sum of its first 16 values.
//!
//! Every output element is computed by the same arithmetic whatever the
//! number of rows, the tiling, and the code path (AVX-512 VNNI, AVX2 or
//! portable). Per block, with `a` and `c` the weight row's two factors:
//!
//! - one scale (Q8_0, Q5_0, Q4_0): `s = Σ w·x`, `acc = fma(a·sx, s, acc)`;
//! - scale and min (Q4_1: `a = d`, `c = m`; Q4_K: `a = d·sc`,
//!   `c = -(dmin·mn)`, each product rounded to f32 as ggml's
//!   `dequantize_row_q4_K` does): `s = Σ q·x`, `acc = fma(a·sx, s, acc)`,
//!   then `acc = fma(c·sx, Σx, acc)`;
//! - two halves (Q6_K: `a = d·sc₀`, `c = d·sc₁`): `s₀`, `s₁` the dots of
//!   the block's two 16-weight halves, `acc = fma(a·sx, s₀, acc)` then
//!   `acc = fma(c·sx, s₁, acc)`;
//!
//! over the blocks in order. So a sequence's logits do not depend on what
//! else is in the batch, and the SIMD paths equal the portable one bit for
//! bit (tested). [`Q8Matrix::dequantize_rows`] gives ggml's dequantized
//! values exactly (`d·q`, `q·d + m`, `d·sc·q - dmin·mn`, `d·sc·(q-32)`).

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

const BLOCK: usize = 32;
/// Weight rows interleaved per group (one AVX-512 lane each).
const GROUP: usize = 16;
/// 64-byte lines per (group, block) panel: 4 weights of each of 16 rows.
const LINES: usize = BLOCK / 4;
/// Blocks of 32 per k-quant super-block (256 weights: Q4_K, Q6_K).
const SUPER_BLOCKS: usize = 8;
const SUPER: usize = SUPER_BLOCKS * BLOCK;

/// One 64-byte line of a weight panel, cache-line aligned.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `[rows, cols]` weight in integer blocks of 32 along `cols`.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    blocks: usize,
    groups: usize,
    quants: Quants,
    scales: Scales,
}

/// The integer weights of a [`Q8Matrix`] by storage width. `w` below is
/// the integer a block's dot uses (see the module docs).
#[derive(Debug, Clone)]
enum Quants {
    /// `[group][block][line 0..8]`; line `k` byte `4j + t` is weight
    /// `4k + t` of the block in row `16 group + j`, stored as `w + 128`.
    Q8(Vec<Line>),
    /// Q5_0's 5-bit weights (`-16..=15`), stored as `u = w + 16` in two
    /// parts. `nib`: `[group][block][line 0..4]`, line `i` byte `4j + t`
    /// holds the low 4 bits of weight `8i + t` (low nibble) and of weight
    /// `8i + 4 + t` (high nibble) of row `j`, so nibble plane `k` lines up
    /// with [`Quants::Q8`]'s line `k`. `high`: `[group][block][k 0..8]`, bit
    /// `4j + t` is bit 4 of weight `4k + t` of row `j`.
    Q5 { nib: Vec<Line>, high: Vec<u64> },
    /// 4-bit weights stored as `u = w + off` in [`Quants::Q5`]'s nibble
    /// planes: Q4_0 (`w` in `-8..=7`, `off` 8), Q4_1 and Q4_K (`w = q` in
    /// `0..=15`, `off` 0).
    Q4 { nib: Vec<Line>, off: u8 },
    /// Q6_K's 6-bit weights (`-32..=31`) stored as `u = w + 32`: the low 4
    /// bits in [`Quants::Q5`]'s nibble planes, bits 4 and 5 in `crumbs`:
    /// `[group][block][line 0..2]`, line `i` byte `4j + t` holds them for
    /// weight `4k + t` of row `j` at bits `2(k % 4)` and `2(k % 4) + 1`,
    /// `k = 4i + k % 4`.
    Q6 { nib: Vec<Line>, crumbs: Vec<Line> },
}

impl Quants {
    /// The offset `u - w` of the stored unsigned weights.
    fn offset(&self) -> i32 {
        match self {
            Quants::Q8(_) => 128,
            Quants::Q5 { .. } => 16,
            Quants::Q4 { off, .. } => *off as i32,
            Quants::Q6 { .. } => 32,
        }
    }
}

/// The float factors of a [`Q8Matrix`]'s blocks. Tables are `[group]
/// [block or super-block][word][row 0..16]`.
#[derive(Debug, Clone)]
enum Scales {
    /// One f16 scale per block (Q8_0, Q5_0, Q4_0): one word.
    Plain(Vec<u16>),
    /// Q4_1: f16 scale `d` and min `m` per block: two words.
    Min(Vec<u16>),
    /// Q4_K: `sm` the 6-bit scale `sc` and min `mn` per block (two words);
    /// `d` the f16 `d` and `dmin` per super-block (two words).
    K4 { sm: Vec<u8>, d: Vec<u16> },
    /// Q6_K: `sc` the `i8` scales of the block's two halves (two words);
    /// `d` the f16 `d` per super-block (one word).
    K6 { sc: Vec<i8>, d: Vec<u16> },
}

/// How a block's integer dots are scaled (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    One,
    Min,
    Halves,
}

/// Storage kinds, for [`Q8Matrix::zeroed`].
#[derive(Debug, Clone, Copy)]
enum Store {
    Q8,
    Q5,
    Q4(u8),
    Q6,
}

#[derive(Debug, Clone, Copy)]
enum ScaleKind {
    Plain,
    Min,
    K4,
    K6,
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
    /// unsigned weights and for the min of Q4_1/Q4_K (see the module docs).
    sums: Vec<i32>,
    /// `[m][blocks]`: the sum of the block's first 16 quants (Q6_K's
    /// halves).
    lows: Vec<i32>,
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
        self.lows.resize(m * nb, 0);
        let simd = Kernel::detected() == Kernel::Vnni;
        let work = |i: usize, s: &mut [f32], q: &mut [i8], c: &mut [i32], l: &mut [i32]| {
            let row = &x[i * cols..(i + 1) * cols];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX-512 F/BW were detected with the VNNI kernel.
                unsafe { quantize_row_avx512(row, nb, s, q, c, l) };
                return;
            }
            let _ = simd;
            quantize_row(row, nb, s, q);
            block_sums(q, c, l);
        };
        let (scales, quants, sums, lows) = (&mut self.scales, &mut self.quants, &mut self.sums, &mut self.lows);
        if m * cols >= 1 << 16 {
            scales
                .par_chunks_mut(nb)
                .zip(quants.par_chunks_mut(nb * BLOCK))
                .zip(sums.par_chunks_mut(nb))
                .zip(lows.par_chunks_mut(nb))
                .enumerate()
                .for_each(|(i, (((s, q), c), l))| work(i, s, q, c, l));
        } else {
            let rows = scales
                .chunks_mut(nb)
                .zip(quants.chunks_mut(nb * BLOCK))
                .zip(sums.chunks_mut(nb))
                .zip(lows.chunks_mut(nb));
            for (i, (((s, q), c), l)) in rows.enumerate() {
                work(i, s, q, c, l);
            }
        }
        Ok(())
    }

    pub fn rows(&self) -> usize {
        self.m
    }
}

/// Each block's sum and the sum of its first half.
fn block_sums(quants: &[i8], sums: &mut [i32], lows: &mut [i32]) {
    for ((q, s), l) in quants.chunks(BLOCK).zip(sums.iter_mut()).zip(lows.iter_mut()) {
        *l = q[..BLOCK / 2].iter().map(|&v| v as i32).sum::<i32>();
        *s = *l + q[BLOCK / 2..].iter().map(|&v| v as i32).sum::<i32>();
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

/// [`quantize_row`] and [`block_sums`] with AVX-512, bit for bit the same
/// (tested): full blocks in two registers, a partial last block by the
/// portable code.
///
/// # Safety
/// The CPU has AVX-512 F and BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(
    x: &[f32],
    blocks: usize,
    scales: &mut [f32],
    quants: &mut [i8],
    sums: &mut [i32],
    lows: &mut [i32],
) {
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
            if h == 0 {
                lows[b] = _mm512_reduce_add_epi32(q);
            }
            sum = _mm512_add_epi32(sum, q);
            _mm_storeu_si128(quants.as_mut_ptr().add(b * BLOCK + 16 * h) as *mut __m128i, _mm512_cvtepi32_epi8(q));
        }
        sums[b] = _mm512_reduce_add_epi32(sum);
    }
    if full < blocks {
        let lo = full * BLOCK;
        quantize_row(&x[lo.min(x.len())..], blocks - full, &mut scales[full..], &mut quants[lo..]);
        block_sums(&quants[lo..blocks * BLOCK], &mut sums[full..blocks], &mut lows[full..blocks]);
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

/// Writes row `j` (of 16) of block `b` into one group's 8-bit panels.
fn set_lines(lines: &mut [Line], j: usize, b: usize, q: &[i8; BLOCK]) {
    for (k, line) in lines[b * LINES..(b + 1) * LINES].iter_mut().enumerate() {
        for t in 0..4 {
            line.0[4 * j + t] = (q[4 * k + t] as u8) ^ 0x80;
        }
    }
}

/// Writes the low 4 bits of row `j`'s (of 16) stored weights `u` of block
/// `b` into one group's nibble planes.
fn set_nibbles(nib: &mut [Line], j: usize, b: usize, u: &[u8; BLOCK]) {
    for (c, &v) in u.iter().enumerate() {
        let (k, t) = (c / 4, c % 4);
        let byte = &mut nib[b * 4 + k / 2].0[4 * j + t];
        *byte = if k % 2 == 0 { (*byte & 0xf0) | (v & 0x0f) } else { (*byte & 0x0f) | ((v & 0x0f) << 4) };
    }
}

/// Bit 4 of row `j`'s stored weights `u` of block `b` into a group's masks.
fn set_high_bits(high: &mut [u64], j: usize, b: usize, u: &[u8; BLOCK]) {
    for (c, &v) in u.iter().enumerate() {
        let bit = 1u64 << (4 * j + c % 4);
        let h = &mut high[b * LINES + c / 4];
        *h = if v & 0x10 != 0 { *h | bit } else { *h & !bit };
    }
}

/// Bits 4 and 5 of row `j`'s stored weights `u` of block `b` into a group's
/// 2-bit planes.
fn set_crumbs(crumbs: &mut [Line], j: usize, b: usize, u: &[u8; BLOCK]) {
    for (c, &v) in u.iter().enumerate() {
        let (k, t) = (c / 4, c % 4);
        let shift = 2 * (k % 4);
        let byte = &mut crumbs[b * 2 + k / 4].0[4 * j + t];
        *byte = (*byte & !(3 << shift)) | (((v >> 4) & 3) << shift);
    }
}

/// Fills a `[group][unit][word 0..W][row 0..16]` table, groups in
/// parallel: `f(r, i)` gives row `r`'s words for unit `i` (a block or a
/// super-block).
fn fill_table<T: Copy + Send + Sync, const W: usize>(
    table: &mut [T],
    units: usize,
    rows: usize,
    f: impl Fn(usize, usize) -> [T; W] + Sync,
) {
    if units == 0 {
        return;
    }
    table.par_chunks_mut(units * W * GROUP).enumerate().for_each(|(g, chunk)| {
        for j in 0..GROUP.min(rows - g * GROUP) {
            for i in 0..units {
                for (wi, &v) in f(g * GROUP + j, i).iter().enumerate() {
                    chunk[(i * W + wi) * GROUP + j] = v;
                }
            }
        }
    });
}

/// The 6-bit scale and min of block `j` (of 8) of a Q4_K super-block, from
/// its 12 packed bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Checks that `data` holds `rows` rows of `cols` weights in blocks of
/// `per` weights and `size` bytes.
fn check_bytes(data: &[u8], rows: usize, cols: usize, (per, size): (usize, usize), what: &str) -> Result<()> {
    let want = if cols == 0 || cols % per != 0 {
        None
    } else {
        rows.checked_mul(cols / per).and_then(|n| n.checked_mul(size))
    };
    if want == Some(data.len()) {
        return Ok(());
    }
    let reason = match want {
        None if cols == 0 || cols % per != 0 => {
            format!("a {rows}x{cols} matrix of {what}: rows must be whole blocks of {per} weights")
        }
        None => format!("a {rows}x{cols} matrix of {what} is too large"),
        Some(n) => format!("{} bytes of {what} for a {rows}x{cols} matrix ({n} expected)", data.len()),
    };
    Err(Error::input("q8 matrix", reason))
}

/// f16 bits from two little-endian bytes.
fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
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
    /// An all-zero matrix in the given storage (padding rows stay zero).
    /// An all-zero matrix of `rows` rows stored as `part` is: the target of
    /// [`Q8Matrix::splice_rows`].
    pub fn empty_like(part: &Q8Matrix, rows: usize) -> Self {
        let store = match &part.quants {
            Quants::Q8(_) => Store::Q8,
            Quants::Q5 { .. } => Store::Q5,
            Quants::Q4 { off, .. } => Store::Q4(*off),
            Quants::Q6 { .. } => Store::Q6,
        };
        let kind = match &part.scales {
            Scales::Plain(_) => ScaleKind::Plain,
            Scales::Min(_) => ScaleKind::Min,
            Scales::K4 { .. } => ScaleKind::K4,
            Scales::K6 { .. } => ScaleKind::K6,
        };
        Self::zeroed(rows, part.cols, store, kind)
    }

    /// Writes `part` (converted alone, same columns and storage) as rows
    /// `r0..r0 + part.rows()`, `r0` a multiple of 16: a large matrix
    /// converted in row chunks, so that only a chunk of the source is
    /// resident at a time. Every table is `[group][...]`, so a chunk is one
    /// contiguous copy per table.
    pub fn splice_rows(&mut self, r0: usize, part: &Q8Matrix) -> Result<()> {
        if r0 % GROUP != 0 || part.cols != self.cols || r0 + part.rows > self.rows {
            return Err(Error::input(
                "q8 matrix",
                format!(
                    "rows {r0}..{} of {} ({} columns) do not take a {}x{} part",
                    r0 + part.rows,
                    self.rows,
                    self.cols,
                    part.rows,
                    part.cols
                ),
            ));
        }
        let (g0, ng) = (r0 / GROUP, part.groups);
        fn put<T: Copy>(dst: &mut [T], src: &[T], g0: usize, ng: usize) {
            let per = src.len() / ng.max(1);
            dst[g0 * per..g0 * per + src.len()].copy_from_slice(src);
        }
        let mismatch = || Error::input("q8 matrix", "the part is stored in another format");
        match (&mut self.quants, &part.quants) {
            (Quants::Q8(d), Quants::Q8(s)) => put(d, s, g0, ng),
            (Quants::Q5 { nib: dn, high: dh }, Quants::Q5 { nib: sn, high: sh }) => {
                put(dn, sn, g0, ng);
                put(dh, sh, g0, ng);
            }
            (Quants::Q4 { nib: dn, off: a }, Quants::Q4 { nib: sn, off: b }) if a == b => put(dn, sn, g0, ng),
            (Quants::Q6 { nib: dn, crumbs: dc }, Quants::Q6 { nib: sn, crumbs: sc }) => {
                put(dn, sn, g0, ng);
                put(dc, sc, g0, ng);
            }
            _ => return Err(mismatch()),
        }
        match (&mut self.scales, &part.scales) {
            (Scales::Plain(d), Scales::Plain(s)) | (Scales::Min(d), Scales::Min(s)) => put(d, s, g0, ng),
            (Scales::K4 { sm: dm, d: dd }, Scales::K4 { sm: sm_, d: sd }) => {
                put(dm, sm_, g0, ng);
                put(dd, sd, g0, ng);
            }
            (Scales::K6 { sc: dc, d: dd }, Scales::K6 { sc: sc_, d: sd }) => {
                put(dc, sc_, g0, ng);
                put(dd, sd, g0, ng);
            }
            _ => return Err(mismatch()),
        }
        Ok(())
    }

    fn zeroed(rows: usize, cols: usize, store: Store, kind: ScaleKind) -> Self {
        let blocks = cols.div_ceil(BLOCK);
        let groups = rows.div_ceil(GROUP);
        let panels = groups * blocks;
        let quants = match store {
            Store::Q8 => Quants::Q8(vec![Line([0x80; 64]); panels * LINES]),
            // u = 16 (w = 0): low nibbles 0, high bits set.
            Store::Q5 => Quants::Q5 { nib: vec![Line([0; 64]); panels * 4], high: vec![u64::MAX; panels * LINES] },
            // u = off (w = 0) in both nibbles.
            Store::Q4(off) => Quants::Q4 { nib: vec![Line([off * 0x11; 64]); panels * 4], off },
            // u = 32 (w = 0): low nibbles 0, bits 4-5 = 0b10 in each crumb.
            Store::Q6 => {
                Quants::Q6 { nib: vec![Line([0; 64]); panels * 4], crumbs: vec![Line([0xaa; 64]); panels * 2] }
            }
        };
        let supers = groups * blocks.div_ceil(SUPER_BLOCKS);
        let scales = match kind {
            ScaleKind::Plain => Scales::Plain(vec![0; panels * GROUP]),
            ScaleKind::Min => Scales::Min(vec![0; panels * 2 * GROUP]),
            ScaleKind::K4 => Scales::K4 { sm: vec![0; panels * 2 * GROUP], d: vec![0; supers * 2 * GROUP] },
            ScaleKind::K6 => Scales::K6 { sc: vec![0; panels * 2 * GROUP], d: vec![0; supers * GROUP] },
        };
        Q8Matrix { rows, cols, blocks, groups, quants, scales }
    }

    /// Fills the integer weights of every group in parallel; `row(r, b)`
    /// gives row `r`'s block `b` as the `w` of the module docs.
    fn fill_quants(&mut self, row: impl Fn(usize, usize) -> [i8; BLOCK] + Sync) {
        let (nb, rows) = (self.blocks, self.rows);
        if nb == 0 {
            return;
        }
        let off = self.quants.offset();
        let live = move |g: usize| GROUP.min(rows - g * GROUP);
        let unsigned = move |q: [i8; BLOCK]| q.map(|w| (w as i32 + off) as u8);
        match &mut self.quants {
            Quants::Q8(lines) => lines.par_chunks_mut(nb * LINES).enumerate().for_each(|(g, lines)| {
                for j in 0..live(g) {
                    for b in 0..nb {
                        set_lines(lines, j, b, &row(g * GROUP + j, b));
                    }
                }
            }),
            Quants::Q5 { nib, high } => {
                nib.par_chunks_mut(nb * 4).zip(high.par_chunks_mut(nb * LINES)).enumerate().for_each(
                    |(g, (nib, high))| {
                        for j in 0..live(g) {
                            for b in 0..nb {
                                let u = unsigned(row(g * GROUP + j, b));
                                set_nibbles(nib, j, b, &u);
                                set_high_bits(high, j, b, &u);
                            }
                        }
                    },
                )
            }
            Quants::Q4 { nib, .. } => nib.par_chunks_mut(nb * 4).enumerate().for_each(|(g, nib)| {
                for j in 0..live(g) {
                    for b in 0..nb {
                        set_nibbles(nib, j, b, &unsigned(row(g * GROUP + j, b)));
                    }
                }
            }),
            Quants::Q6 { nib, crumbs } => {
                nib.par_chunks_mut(nb * 4).zip(crumbs.par_chunks_mut(nb * 2)).enumerate().for_each(
                    |(g, (nib, crumbs))| {
                        for j in 0..live(g) {
                            for b in 0..nb {
                                let u = unsigned(row(g * GROUP + j, b));
                                set_nibbles(nib, j, b, &u);
                                set_crumbs(crumbs, j, b, &u);
                            }
                        }
                    },
                )
            }
        }
    }

    /// Fills a [`Scales::Plain`] table: `f(r, b)` gives the f16 bits.
    fn fill_plain(&mut self, f: impl Fn(usize, usize) -> u16 + Sync) {
        if let Scales::Plain(s) = &mut self.scales {
            fill_table(s, self.blocks, self.rows, |r, b| [f(r, b)]);
        }
    }

    /// From a row-major f32 matrix.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if w.len() != rows * cols || cols == 0 {
            return Err(Error::input("q8 matrix", format!("{} values for a {rows}x{cols} matrix", w.len())));
        }
        let block = |r: usize, b: usize| {
            let lo = b * BLOCK;
            quantize_block_f16(&w[r * cols + lo..r * cols + (lo + BLOCK).min(cols)])
        };
        let mut m = Self::zeroed(rows, cols, Store::Q8, ScaleKind::Plain);
        m.fill_quants(|r, b| block(r, b).1);
        m.fill_plain(|r, b| block(r, b).0);
        Ok(m)
    }

    /// From rows produced 16 at a time (a group) by `rows_of(r0, n, out)`,
    /// which writes rows `r0..r0 + n` (`[n, cols]`) into `out`: the same
    /// matrix as [`Self::from_f32`] on all the rows, without holding them
    /// all in f32 (a GGUF tensor of a type without its own panels,
    /// dequantized a group at a time).
    pub fn from_f32_rows(
        rows: usize,
        cols: usize,
        rows_of: impl Fn(usize, usize, &mut [f32]) -> Result<()> + Sync,
    ) -> Result<Self> {
        if cols == 0 {
            return Err(Error::input("q8 matrix", format!("a {rows}x{cols} matrix")));
        }
        let mut m = Self::zeroed(rows, cols, Store::Q8, ScaleKind::Plain);
        let nb = m.blocks;
        let (Quants::Q8(lines), Scales::Plain(scales)) = (&mut m.quants, &mut m.scales) else {
            unreachable!("zeroed as Q8 with plain scales");
        };
        lines.par_chunks_mut(nb * LINES).zip(scales.par_chunks_mut(nb * GROUP)).enumerate().try_for_each(
            |(g, (lines, scales))| {
                let n = GROUP.min(rows - g * GROUP);
                let mut buf = vec![0f32; n * cols];
                rows_of(g * GROUP, n, &mut buf)?;
                for (j, row) in buf.chunks(cols).enumerate() {
                    for (b, src) in row.chunks(BLOCK).enumerate() {
                        let (s, q) = quantize_block_f16(src);
                        scales[b * GROUP + j] = s;
                        set_lines(lines, j, b, &q);
                    }
                }
                Ok::<(), Error>(())
            },
        )?;
        Ok(m)
    }

    /// From GGUF Q8_0 blocks (34 bytes each: an f16 scale, then 32 `i8`),
    /// exactly.
    pub fn from_q8_0_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        const Q8_0: usize = 34;
        check_bytes(data, rows, cols, (BLOCK, Q8_0), "Q8_0")?;
        let nb = cols / BLOCK;
        let blk = |r: usize, b: usize| &data[(r * nb + b) * Q8_0..(r * nb + b + 1) * Q8_0];
        let mut m = Self::zeroed(rows, cols, Store::Q8, ScaleKind::Plain);
        m.fill_quants(|r, b| {
            let mut q = [0i8; BLOCK];
            for (qi, &v) in q.iter_mut().zip(&blk(r, b)[2..]) {
                *qi = v as i8;
            }
            q
        });
        m.fill_plain(|r, b| le16(blk(r, b)));
        Ok(m)
    }

    /// From GGUF Q5_0 blocks (22 bytes each: an f16 scale, 32 high bits,
    /// then 16 bytes of low nibbles), exactly. With the VNNI and AVX2
    /// kernels the panels stay 5-bit (22 bytes per 32 weights, as in the
    /// file) and are unpacked in registers; for the portable kernel the
    /// weights are widened to 8 bits at load.
    pub fn from_q5_0_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_q5_0_bytes_packed(data, rows, cols, Kernel::detected() != Kernel::Portable)
    }

    fn from_q5_0_bytes_packed(data: &[u8], rows: usize, cols: usize, packed: bool) -> Result<Self> {
        const Q5_0: usize = 22;
        check_bytes(data, rows, cols, (BLOCK, Q5_0), "Q5_0")?;
        let nb = cols / BLOCK;
        let blk = |r: usize, b: usize| &data[(r * nb + b) * Q5_0..(r * nb + b + 1) * Q5_0];
        let mut m = Self::zeroed(rows, cols, if packed { Store::Q5 } else { Store::Q8 }, ScaleKind::Plain);
        m.fill_quants(|r, b| {
            let blk = blk(r, b);
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let mut q = [0i8; BLOCK];
            for (j, &byte) in blk[6..].iter().enumerate() {
                let lo = (byte & 0x0f) | ((((qh >> j) << 4) & 0x10) as u8);
                let hi = (byte >> 4) | (((qh >> (j + 12)) & 0x10) as u8);
                q[j] = lo as i8 - 16;
                q[j + 16] = hi as i8 - 16;
            }
            q
        });
        m.fill_plain(|r, b| le16(blk(r, b)));
        Ok(m)
    }

    /// From GGUF Q4_0 blocks (18 bytes each: an f16 scale, then 16 bytes of
    /// nibbles, element `j` low and `j + 16` high, value minus 8), exactly;
    /// in 4 bits with the VNNI kernel, else widened to 8 (as Q5_0).
    pub fn from_q4_0_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_q4_0_bytes_packed(data, rows, cols, Kernel::detected() != Kernel::Portable)
    }

    fn from_q4_0_bytes_packed(data: &[u8], rows: usize, cols: usize, packed: bool) -> Result<Self> {
        const Q4_0: usize = 18;
        check_bytes(data, rows, cols, (BLOCK, Q4_0), "Q4_0")?;
        let nb = cols / BLOCK;
        let blk = |r: usize, b: usize| &data[(r * nb + b) * Q4_0..(r * nb + b + 1) * Q4_0];
        let mut m = Self::zeroed(rows, cols, if packed { Store::Q4(8) } else { Store::Q8 }, ScaleKind::Plain);
        m.fill_quants(|r, b| {
            let mut q = [0i8; BLOCK];
            for (j, &byte) in blk(r, b)[2..].iter().enumerate() {
                q[j] = (byte & 0x0f) as i8 - 8;
                q[j + 16] = (byte >> 4) as i8 - 8;
            }
            q
        });
        m.fill_plain(|r, b| le16(blk(r, b)));
        Ok(m)
    }

    /// From GGUF Q4_1 blocks (20 bytes each: an f16 scale `d`, an f16 min
    /// `m`, then 16 bytes of nibbles `q`, element `j` low and `j + 16` high;
    /// value `q·d + m`), exactly; in 4 bits with the VNNI kernel, else
    /// widened to 8 (as Q5_0).
    pub fn from_q4_1_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_q4_1_bytes_packed(data, rows, cols, Kernel::detected() != Kernel::Portable)
    }

    fn from_q4_1_bytes_packed(data: &[u8], rows: usize, cols: usize, packed: bool) -> Result<Self> {
        const Q4_1: usize = 20;
        check_bytes(data, rows, cols, (BLOCK, Q4_1), "Q4_1")?;
        let nb = cols / BLOCK;
        let blk = |r: usize, b: usize| &data[(r * nb + b) * Q4_1..(r * nb + b + 1) * Q4_1];
        let mut m = Self::zeroed(rows, cols, if packed { Store::Q4(0) } else { Store::Q8 }, ScaleKind::Min);
        m.fill_quants(|r, b| {
            let mut q = [0i8; BLOCK];
            for (j, &byte) in blk(r, b)[4..].iter().enumerate() {
                q[j] = (byte & 0x0f) as i8;
                q[j + 16] = (byte >> 4) as i8;
            }
            q
        });
        if let Scales::Min(s) = &mut m.scales {
            fill_table(s, nb, rows, |r, b| {
                let blk = blk(r, b);
                [le16(blk), le16(&blk[2..])]
            });
        }
        Ok(m)
    }

    /// From GGUF Q4_K super-blocks (144 bytes per 256 weights: f16 `d`, f16
    /// `dmin`, 12 bytes of packed 6-bit scales `sc` and mins `mn` of the
    /// eight blocks of 32, then 128 bytes of nibbles; value
    /// `d·sc·q - dmin·mn`), exactly; in 4 bits with the VNNI kernel, else
    /// widened to 8 (as Q5_0).
    pub fn from_q4_k_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_q4_k_bytes_packed(data, rows, cols, Kernel::detected() != Kernel::Portable)
    }

    fn from_q4_k_bytes_packed(data: &[u8], rows: usize, cols: usize, packed: bool) -> Result<Self> {
        const Q4_K: usize = 144;
        check_bytes(data, rows, cols, (SUPER, Q4_K), "Q4_K")?;
        let (nb, ns) = (cols / BLOCK, cols / SUPER);
        let sup = |r: usize, s: usize| &data[(r * ns + s) * Q4_K..(r * ns + s + 1) * Q4_K];
        let mut m = Self::zeroed(rows, cols, if packed { Store::Q4(0) } else { Store::Q8 }, ScaleKind::K4);
        // Block j of a super-block: the low (j even) or high nibbles of the
        // 32 bytes 32·(j / 2)..
        m.fill_quants(|r, b| {
            let j = b % SUPER_BLOCKS;
            let qs = &sup(r, b / SUPER_BLOCKS)[16 + 32 * (j / 2)..][..BLOCK];
            let mut q = [0i8; BLOCK];
            for (qi, &byte) in q.iter_mut().zip(qs) {
                *qi = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 } as i8;
            }
            q
        });
        if let Scales::K4 { sm, d } = &mut m.scales {
            fill_table(sm, nb, rows, |r, b| {
                let (sc, mn) = scale_min_k4(b % SUPER_BLOCKS, &sup(r, b / SUPER_BLOCKS)[4..16]);
                [sc, mn]
            });
            fill_table(d, ns, rows, |r, s| {
                let blk = sup(r, s);
                [le16(blk), le16(&blk[2..])]
            });
        }
        Ok(m)
    }

    /// From GGUF Q6_K super-blocks (210 bytes per 256 weights: 128 bytes of
    /// low 4 bits `ql`, 64 bytes of high 2 bits `qh`, 16 `i8` scales `sc`
    /// of 16 weights each, an f16 `d`; value `d·sc·(q - 32)`), exactly; in
    /// 6 bits with the VNNI kernel, else widened to 8 (as Q5_0).
    pub fn from_q6_k_bytes(data: &[u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_q6_k_bytes_packed(data, rows, cols, Kernel::detected() != Kernel::Portable)
    }

    fn from_q6_k_bytes_packed(data: &[u8], rows: usize, cols: usize, packed: bool) -> Result<Self> {
        const Q6_K: usize = 210;
        check_bytes(data, rows, cols, (SUPER, Q6_K), "Q6_K")?;
        let (nb, ns) = (cols / BLOCK, cols / SUPER);
        let sup = |r: usize, s: usize| &data[(r * ns + s) * Q6_K..(r * ns + s + 1) * Q6_K];
        let mut m = Self::zeroed(rows, cols, if packed { Store::Q6 } else { Store::Q8 }, ScaleKind::K6);
        // Weight p of a super-block (ggml's dequantize_row_q6_K): in half
        // h = p / 128, quarter i = p % 128 / 32, l = p % 32: the low (i < 2)
        // or high nibble of ql[64h + 32(i % 2) + l], and bits 2i, 2i + 1 of
        // qh[32h + l].
        m.fill_quants(|r, b| {
            let blk = sup(r, b / SUPER_BLOCKS);
            let (ql, qh) = (&blk[..128], &blk[128..192]);
            let mut q = [0i8; BLOCK];
            for (t, qi) in q.iter_mut().enumerate() {
                let p = (b % SUPER_BLOCKS) * BLOCK + t;
                let (h, i, l) = (p / 128, p % 128 / 32, p % 32);
                let byte = ql[64 * h + 32 * (i % 2) + l];
                let low = if i < 2 { byte & 0x0f } else { byte >> 4 };
                let high = (qh[32 * h + l] >> (2 * i)) & 3;
                *qi = (low | (high << 4)) as i8 - 32;
            }
            q
        });
        if let Scales::K6 { sc, d } = &mut m.scales {
            fill_table(sc, nb, rows, |r, b| {
                let at = 192 + 2 * (b % SUPER_BLOCKS);
                let blk = sup(r, b / SUPER_BLOCKS);
                [blk[at] as i8, blk[at + 1] as i8]
            });
            fill_table(d, ns, rows, |r, s| [le16(&sup(r, s)[208..])]);
        }
        Ok(m)
    }

    /// Bits per stored integer weight, not counting the scales (see
    /// [`Self::bytes`]): 8, 6 (Q6_K), 5 (Q5_0) or 4 (Q4_0, Q4_1, Q4_K).
    pub fn weight_bits(&self) -> u32 {
        match self.quants {
            Quants::Q8(_) => 8,
            Quants::Q6 { .. } => 6,
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

    fn form(&self) -> Form {
        match self.scales {
            Scales::Plain(_) => Form::One,
            Scales::Min(_) | Scales::K4 { .. } => Form::Min,
            Scales::K6 { .. } => Form::Halves,
        }
    }

    /// The integer weight `w` (module docs) of row `r`, column `c`.
    #[inline]
    fn weight(&self, r: usize, c: usize) -> i8 {
        let panel = r / GROUP * self.blocks + c / BLOCK;
        let (k, lane) = ((c % BLOCK) / 4, 4 * (r % GROUP) + c % 4);
        let nibble = |nib: &[Line]| {
            let byte = nib[panel * 4 + k / 2].0[lane];
            if k % 2 == 0 {
                byte & 0x0f
            } else {
                byte >> 4
            }
        };
        match &self.quants {
            Quants::Q8(q) => (q[panel * LINES + k].0[lane] ^ 0x80) as i8,
            Quants::Q5 { nib, high } => {
                let hb = ((high[panel * LINES + k] >> lane) & 1) as u8;
                (nibble(nib) | (hb << 4)) as i8 - 16
            }
            Quants::Q4 { nib, off } => nibble(nib) as i8 - *off as i8,
            Quants::Q6 { nib, crumbs } => {
                let hb = (crumbs[panel * 2 + k / 4].0[lane] >> (2 * (k % 4))) & 3;
                (nibble(nib) | (hb << 4)) as i8 - 32
            }
        }
    }

    /// The 32 integer weights `w` of row `r`, block `b`: [`Self::weight`]
    /// for a whole block, reading each panel byte once.
    fn block_weights(&self, r: usize, b: usize) -> [i8; BLOCK] {
        let panel = r / GROUP * self.blocks + b;
        let j = 4 * (r % GROUP);
        let mut q = [0i8; BLOCK];
        match &self.quants {
            Quants::Q8(lines) => {
                for k in 0..LINES {
                    for t in 0..4 {
                        q[4 * k + t] = (lines[panel * LINES + k].0[j + t] ^ 0x80) as i8;
                    }
                }
            }
            Quants::Q5 { nib, high } => {
                for i in 0..LINES / 2 {
                    let (h0, h1) = (high[panel * LINES + 2 * i] >> j, high[panel * LINES + 2 * i + 1] >> j);
                    for t in 0..4 {
                        let byte = nib[panel * 4 + i].0[j + t];
                        q[8 * i + t] = ((byte & 0x0f) | (((h0 >> t) & 1) as u8) << 4) as i8 - 16;
                        q[8 * i + 4 + t] = ((byte >> 4) | (((h1 >> t) & 1) as u8) << 4) as i8 - 16;
                    }
                }
            }
            Quants::Q4 { nib, off } => {
                for i in 0..LINES / 2 {
                    for t in 0..4 {
                        let byte = nib[panel * 4 + i].0[j + t];
                        q[8 * i + t] = (byte & 0x0f) as i8 - *off as i8;
                        q[8 * i + 4 + t] = (byte >> 4) as i8 - *off as i8;
                    }
                }
            }
            Quants::Q6 { nib, crumbs } => {
                for i in 0..LINES / 2 {
                    for t in 0..4 {
                        let byte = nib[panel * 4 + i].0[j + t];
                        for (half, low) in [(0, byte & 0x0f), (1, byte >> 4)] {
                            let k = 2 * i + half;
                            let hb = (crumbs[panel * 2 + k / 4].0[j + t] >> (2 * (k % 4))) & 3;
                            q[4 * k + t] = (low | (hb << 4)) as i8 - 32;
                        }
                    }
                }
            }
        }
        q
    }

    /// Row `r`'s two factors `(a, c)` for block `b` (module docs; `c` is 0
    /// for one-scale formats).
    #[inline]
    fn factors(&self, r: usize, b: usize) -> (f32, f32) {
        let (g, j) = (r / GROUP, r % GROUP);
        let pb = (g * self.blocks + b) * 2 * GROUP + j;
        let ps = g * (self.blocks / SUPER_BLOCKS) + b / SUPER_BLOCKS;
        match &self.scales {
            Scales::Plain(s) => (f16_to_f32(s[(g * self.blocks + b) * GROUP + j]), 0.0),
            Scales::Min(s) => (f16_to_f32(s[pb]), f16_to_f32(s[pb + GROUP])),
            Scales::K4 { sm, d } => {
                let p = ps * 2 * GROUP + j;
                (f16_to_f32(d[p]) * sm[pb] as f32, -(f16_to_f32(d[p + GROUP]) * sm[pb + GROUP] as f32))
            }
            Scales::K6 { sc, d } => {
                let dd = f16_to_f32(d[ps * GROUP + j]);
                (dd * sc[pb] as f32, dd * sc[pb + GROUP] as f32)
            }
        }
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
        Self::matmul_acts_many_with(&mut [(self, out)], a, kernel)
    }

    /// Several matrices of the same input (q, k and v; gate and up) times
    /// the same quantized rows, each into its own output, as one parallel
    /// call: the threads meet once, not once per matrix (in decode, where
    /// each matrix takes microseconds, the meeting is a visible share).
    /// Each output is exactly [`Self::matmul_acts`]'s.
    pub fn matmul_acts_many(parts: &mut [(&Q8Matrix, &mut [f32])], a: &Q8Acts) -> Result<()> {
        Self::matmul_acts_many_with(parts, a, Kernel::detected())
    }

    fn matmul_acts_many_with(parts: &mut [(&Q8Matrix, &mut [f32])], a: &Q8Acts, kernel: Kernel) -> Result<()> {
        let m = a.m;
        for (w, out) in parts.iter() {
            if a.blocks != w.blocks || out.len() < m * w.rows {
                return Err(Error::input(
                    "q8 matmul",
                    format!("{} activation blocks for a {}x{} matrix", a.blocks, w.rows, w.cols),
                ));
            }
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
        let mut tasks: Vec<(usize, usize, usize)> = Vec::new();
        for (i, (w, _)) in parts.iter().enumerate() {
            let per_task =
                if m == 1 { w.groups.div_ceil(threads * 4).max(4) } else { w.groups.div_ceil(threads * 8).max(1) };
            tasks.extend(
                (0..w.groups.div_ceil(per_task)).map(|t| (i, t * per_task, ((t + 1) * per_task).min(w.groups))),
            );
        }
        let outs: Vec<(&Q8Matrix, OutPtr)> = parts.iter_mut().map(|(w, out)| (*w, OutPtr(out.as_mut_ptr()))).collect();
        let run = |&(i, g0, g1): &(usize, usize, usize)| {
            let (w, ptr) = outs[i];
            // SAFETY: each task writes only the rows of its own groups of
            // its own matrix's output.
            unsafe { w.run_groups(a, g0, g1, kernel, ptr.get()) }
        };
        if tasks.len() == 1 {
            run(&tasks[0]);
        } else {
            tasks.par_iter().for_each(run);
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
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx2 && m >= WIDE_FROM {
            return self.run_groups_wide_avx2(a, g0, g1, out);
        }
        self.run_groups_narrow(a, g0, g1, kernel, out)
    }

    /// [`Self::run_groups`] with the tiles of [`Kernel::tile`], the weights
    /// unpacked in registers.
    ///
    /// # Safety
    /// As [`Self::run_groups`].
    unsafe fn run_groups_narrow(&self, a: &Q8Acts, g0: usize, g1: usize, kernel: Kernel, out: *mut f32) {
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
                    Kernel::Avx2 => {
                        tiles_avx2::<false>(self, &Planes::of(self, std::ptr::null()), g, gt, a, n0, nt, &mut res)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => match self.quants {
                        Quants::Q8(_) => tiles_vnni::<W_Q8>(self, g, gt, a, n0, nt, &mut res),
                        Quants::Q5 { .. } => tiles_vnni::<W_Q5>(self, g, gt, a, n0, nt, &mut res),
                        Quants::Q4 { .. } => tiles_vnni::<W_Q4>(self, g, gt, a, n0, nt, &mut res),
                        Quants::Q6 { .. } => tiles_vnni::<W_Q6>(self, g, gt, a, n0, nt, &mut res),
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
        let form = self.form();
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
                        let dot = |t0: usize, t1: usize| {
                            (t0..t1).map(|t| self.weight(r, b * BLOCK + t) as i32 * x[t] as i32).sum::<i32>() as f32
                        };
                        let (fa, fc) = self.factors(r, b);
                        let xs = a.scales[n * nb + b];
                        match form {
                            Form::One => acc = (fa * xs).mul_add(dot(0, BLOCK), acc),
                            Form::Min => {
                                acc = (fa * xs).mul_add(dot(0, BLOCK), acc);
                                acc = (fc * xs).mul_add(a.sums[n * nb + b] as f32, acc);
                            }
                            Form::Halves => {
                                acc = (fa * xs).mul_add(dot(0, BLOCK / 2), acc);
                                acc = (fc * xs).mul_add(dot(BLOCK / 2, BLOCK), acc);
                            }
                        }
                    }
                    res[gi * nt + ni][j] = acc;
                }
            }
        }
    }

    /// Rows `r0..r0 + n` as f32 into `out` (`[n, cols]`): ggml's
    /// dequantized values, bit for bit.
    pub fn dequantize_rows(&self, r0: usize, n: usize, out: &mut [f32]) -> Result<()> {
        if r0 + n > self.rows || out.len() < n * self.cols {
            return Err(Error::input("q8 rows", format!("rows {r0}..{} of {}", r0 + n, self.rows)));
        }
        let c = self.cols;
        let form = self.form();
        let one = |k: usize, dst: &mut [f32]| {
            let r = r0 + k;
            for (b, chunk) in dst.chunks_mut(BLOCK).enumerate() {
                let (fa, fc) = self.factors(r, b);
                let q = self.block_weights(r, b);
                for (t, v) in chunk.iter_mut().enumerate() {
                    let w = q[t] as f32;
                    *v = match form {
                        Form::One => fa * w,
                        // q·d + m (Q4_1), d·sc·q - dmin·mn (Q4_K).
                        Form::Min => fa * w + fc,
                        Form::Halves => (if t < BLOCK / 2 { fa } else { fc }) * w,
                    };
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

    /// Bytes of weight data read by one pass over the matrix: the integer
    /// panels and every scale table.
    pub fn bytes(&self) -> usize {
        let line = std::mem::size_of::<Line>();
        let w = match &self.quants {
            Quants::Q8(q) => q.len() * line,
            Quants::Q5 { nib, high } => nib.len() * line + high.len() * 8,
            Quants::Q4 { nib, .. } => nib.len() * line,
            Quants::Q6 { nib, crumbs } => (nib.len() + crumbs.len()) * line,
        };
        let s = match &self.scales {
            Scales::Plain(s) | Scales::Min(s) => s.len() * 2,
            Scales::K4 { sm, d } => sm.len() + d.len() * 2,
            Scales::K6 { sc, d } => sc.len() + d.len() * 2,
        };
        w + s
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

/// Storage kinds as `tile_vnni` parameters.
#[cfg(target_arch = "x86_64")]
const W_Q8: u8 = 0;
#[cfg(target_arch = "x86_64")]
const W_Q5: u8 = 1;
#[cfg(target_arch = "x86_64")]
const W_Q4: u8 = 2;
#[cfg(target_arch = "x86_64")]
const W_Q6: u8 = 3;

/// `tile_vnni` for `gt` groups × `nt` rows (the tiles of [`Kernel::tile`]).
///
/// # Safety
/// As `tile_vnni`; `W` is the storage of `w`.
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_vnni<const W: u8>(
    w: &Q8Matrix,
    g: usize,
    gt: usize,
    a: &Q8Acts,
    n0: usize,
    nt: usize,
    res: &mut [[f32; GROUP]],
) {
    match (gt, nt) {
        (4, _) => tile_vnni::<4, 1, W>(w, g, a, n0, res),
        (3, _) => tile_vnni::<3, 1, W>(w, g, a, n0, res),
        (2, 1) => tile_vnni::<2, 1, W>(w, g, a, n0, res),
        (2, 2) => tile_vnni::<2, 2, W>(w, g, a, n0, res),
        (2, 3) => tile_vnni::<2, 3, W>(w, g, a, n0, res),
        (2, 4) => tile_vnni::<2, 4, W>(w, g, a, n0, res),
        (2, 5) => tile_vnni::<2, 5, W>(w, g, a, n0, res),
        (2, _) => tile_vnni::<2, 6, W>(w, g, a, n0, res),
        (_, 1) => tile_vnni::<1, 1, W>(w, g, a, n0, res),
        (_, 2) => tile_vnni::<1, 2, W>(w, g, a, n0, res),
        (_, 3) => tile_vnni::<1, 3, W>(w, g, a, n0, res),
        (_, 4) => tile_vnni::<1, 4, W>(w, g, a, n0, res),
        (_, 5) => tile_vnni::<1, 5, W>(w, g, a, n0, res),
        (_, _) => tile_vnni::<1, 6, W>(w, g, a, n0, res),
    }
}

/// Group `g`'s 16 factors `(a, c)` for block `b` (as [`Q8Matrix::factors`]).
///
/// # Safety
/// The CPU has AVX-512 F; group `g` and block `b` exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
#[inline]
unsafe fn factors_avx512(w: &Q8Matrix, g: usize, b: usize) -> (std::arch::x86_64::__m512, std::arch::x86_64::__m512) {
    use std::arch::x86_64::*;
    let nb = w.blocks;
    let pb = (g * nb + b) * 2 * GROUP;
    let ps = g * (nb / SUPER_BLOCKS) + b / SUPER_BLOCKS;
    match &w.scales {
        Scales::Plain(s) => {
            let p = s.as_ptr().add((g * nb + b) * GROUP);
            (_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)), _mm512_setzero_ps())
        }
        Scales::Min(s) => {
            let p = s.as_ptr().add(pb);
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(GROUP) as *const __m256i)),
            )
        }
        Scales::K4 { sm, d } => {
            let p = sm.as_ptr().add(pb);
            let sc = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)));
            let mn = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(GROUP) as *const __m128i)));
            let q = d.as_ptr().add(ps * 2 * GROUP);
            let dd = _mm512_cvtph_ps(_mm256_loadu_si256(q as *const __m256i));
            let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(q.add(GROUP) as *const __m256i));
            // -(dmin·mn): the sign flipped, as the portable negation.
            let m1 = _mm512_castps_si512(_mm512_mul_ps(dmin, mn));
            let neg = _mm512_castsi512_ps(_mm512_xor_si512(m1, _mm512_set1_epi32(i32::MIN)));
            (_mm512_mul_ps(dd, sc), neg)
        }
        Scales::K6 { sc, d } => {
            let p = sc.as_ptr().add(pb);
            let dd = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr().add(ps * GROUP) as *const __m256i));
            let s0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)));
            let s1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(GROUP) as *const __m128i)));
            (_mm512_mul_ps(dd, s0), _mm512_mul_ps(dd, s1))
        }
    }
}

/// `G` groups × `N` activation rows with AVX-512 VNNI; `res[g · N + n]`.
/// Narrow panels (`W`) are widened in registers: the nibble plane masked
/// out, then for 5 bits bit 4 added under a 64-bit mask, for 6 bits bits 4
/// and 5 shifted into place from the 2-bit plane.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VNNI, FMA and F16C; groups `g0..g0 + G` and
/// rows `n0..n0 + N` exist; `W` is the storage of `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn tile_vnni<const G: usize, const N: usize, const W: u8>(
    w: &Q8Matrix,
    g0: usize,
    a: &Q8Acts,
    n0: usize,
    res: &mut [[f32; GROUP]],
) {
    use std::arch::x86_64::*;
    let nb = w.blocks;
    // Weight pointers per kind; the offset `w + off` is removed through the
    // activation sums.
    let (mut q8, mut nib, mut high, mut crumbs) =
        (std::ptr::null::<Line>(), std::ptr::null::<Line>(), std::ptr::null::<u64>(), std::ptr::null::<Line>());
    match &w.quants {
        Quants::Q8(q) => q8 = q.as_ptr().add(g0 * nb * LINES),
        Quants::Q5 { nib: n, high: h } => {
            nib = n.as_ptr().add(g0 * nb * 4);
            high = h.as_ptr().add(g0 * nb * LINES);
        }
        Quants::Q4 { nib: n, .. } => nib = n.as_ptr().add(g0 * nb * 4),
        Quants::Q6 { nib: n, crumbs: c } => {
            nib = n.as_ptr().add(g0 * nb * 4);
            crumbs = c.as_ptr().add(g0 * nb * 2);
        }
    }
    let off = w.quants.offset();
    let form = w.form();
    // Two halves of four lines (Q6_K) or one segment of eight.
    let (segs, per) = if form == Form::Halves { (2, LINES / 2) } else { (1, LINES) };
    let xq = a.quants.as_ptr().add(n0 * nb * BLOCK);
    let xs = a.scales.as_ptr().add(n0 * nb);
    let xsum = a.sums.as_ptr().add(n0 * nb);
    let xlow = a.lows.as_ptr().add(n0 * nb);
    let low4 = _mm512_set1_epi8(0x0f);
    let bit4 = _mm512_set1_epi8(0x10);
    let bits45 = _mm512_set1_epi8(0x30);
    let mut facc = [[_mm512_setzero_ps(); N]; G];
    for b in 0..nb {
        let mut fa = [_mm512_setzero_ps(); G];
        let mut fc = [_mm512_setzero_ps(); G];
        for g in 0..G {
            (fa[g], fc[g]) = factors_avx512(w, g0 + g, b);
        }
        for seg in 0..segs {
            let mut iacc = [[_mm512_setzero_si512(); N]; G];
            for n in 0..N {
                let sum = *xsum.add(n * nb + b);
                let s = match (segs, seg) {
                    (1, _) => sum,
                    (_, 0) => *xlow.add(n * nb + b),
                    _ => sum - *xlow.add(n * nb + b),
                };
                let c = _mm512_set1_epi32(-off * s);
                for row in iacc.iter_mut() {
                    row[n] = c;
                }
            }
            for k in seg * per..(seg + 1) * per {
                let mut wv = [_mm512_setzero_si512(); G];
                for (g, v) in wv.iter_mut().enumerate() {
                    let panel = g * nb + b;
                    *v = if W == W_Q8 {
                        _mm512_load_si512(q8.add(panel * LINES + k) as *const _)
                    } else {
                        let two = _mm512_load_si512(nib.add(panel * 4 + k / 2) as *const _);
                        let plane = if k % 2 == 0 { two } else { _mm512_srli_epi16::<4>(two) };
                        let low = _mm512_and_si512(plane, low4);
                        if W == W_Q5 {
                            _mm512_mask_add_epi8(low, *high.add(panel * LINES + k), low, bit4)
                        } else if W == W_Q6 {
                            // Crumb k % 4 (bits 2(k % 4)..) to bits 4 and 5.
                            let cr = _mm512_load_si512(crumbs.add(panel * 2 + k / 4) as *const _);
                            let cr = match k % 4 {
                                0 => _mm512_slli_epi16::<4>(cr),
                                1 => _mm512_slli_epi16::<2>(cr),
                                2 => cr,
                                _ => _mm512_srli_epi16::<2>(cr),
                            };
                            _mm512_or_si512(low, _mm512_and_si512(cr, bits45))
                        } else {
                            low
                        }
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
                let f = if seg == 0 { fa[g] } else { fc[g] };
                for n in 0..N {
                    let d = _mm512_mul_ps(f, _mm512_set1_ps(*xs.add(n * nb + b)));
                    facc[g][n] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(iacc[g][n]), facc[g][n]);
                }
            }
        }
        if form == Form::Min {
            for g in 0..G {
                for n in 0..N {
                    let d = _mm512_mul_ps(fc[g], _mm512_set1_ps(*xs.add(n * nb + b)));
                    let sum = _mm512_set1_ps(*xsum.add(n * nb + b) as f32);
                    facc[g][n] = _mm512_fmadd_ps(d, sum, facc[g][n]);
                }
            }
        }
    }
    for g in 0..G {
        for n in 0..N {
            _mm512_storeu_ps(res[g * N + n].as_mut_ptr(), facc[g][n]);
        }
    }
}

/// The planes of a [`Q8Matrix`]'s storage, or one group widened to bytes,
/// as raw pointers for [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Planes {
    q8: *const Line,
    nib: *const Line,
    high: *const u64,
    crumbs: *const Line,
    /// A group's lines widened by [`Q8Matrix::widen_group`].
    wide: *const Line,
}

#[cfg(target_arch = "x86_64")]
impl Planes {
    fn of(w: &Q8Matrix, wide: *const Line) -> Self {
        let mut p = Planes {
            q8: std::ptr::null(),
            nib: std::ptr::null(),
            high: std::ptr::null(),
            crumbs: std::ptr::null(),
            wide,
        };
        match &w.quants {
            Quants::Q8(q) => p.q8 = q.as_ptr(),
            Quants::Q5 { nib, high } => (p.nib, p.high) = (nib.as_ptr(), high.as_ptr()),
            Quants::Q4 { nib, .. } => p.nib = nib.as_ptr(),
            Quants::Q6 { nib, crumbs } => (p.nib, p.crumbs) = (nib.as_ptr(), crumbs.as_ptr()),
        }
        p
    }

    /// Asks for panel `pb`'s weight bytes to be brought into the cache
    /// (`pb` may be past the end: prefetches never fault).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn prefetch<const W: u8>(&self, pb: usize) {
        use std::arch::x86_64::*;
        let line = |p: *const Line, i: usize| _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(i) as *const i8);
        match W {
            W_Q8 => (0..LINES).for_each(|k| line(self.q8, pb * LINES + k)),
            _ => {
                (0..4).for_each(|k| line(self.nib, pb * 4 + k));
                if W == W_Q5 {
                    _mm_prefetch::<_MM_HINT_T0>(self.high.wrapping_add(pb * LINES) as *const i8);
                } else if W == W_Q6 {
                    (0..2).for_each(|k| line(self.crumbs, pb * 2 + k));
                }
            }
        }
    }

    /// Line `k`, rows `8h..8h + 8` of panel `pb` (of the widened group when
    /// `WIDE`): 8-bit weights as `w` (signed), narrower ones as `u = w + off`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn line<const W: u8, const WIDE: bool>(&self, pb: usize, k: usize, h: usize) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let half = |p: *const Line| _mm256_load_si256((p as *const u8).add(32 * h) as *const __m256i);
        if W == W_Q8 {
            return _mm256_xor_si256(half(self.q8.add(pb * LINES + k)), _mm256_set1_epi8(-128));
        }
        if WIDE {
            return half(self.wide.add(pb * LINES + k));
        }
        let two = half(self.nib.add(pb * 4 + k / 2));
        let plane = if k % 2 == 0 { two } else { _mm256_srli_epi16::<4>(two) };
        let low = _mm256_and_si256(plane, _mm256_set1_epi8(0x0f));
        if W == W_Q5 {
            // Byte i of the 32-bit mask to bytes 8i..8i + 8, one bit each.
            let spread = _mm256_setr_epi8(
                0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
            );
            let select = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
            let m = (*self.high.add(pb * LINES + k) >> (32 * h)) as u32;
            let v = _mm256_shuffle_epi8(_mm256_set1_epi32(m as i32), spread);
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, select), select);
            _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
        } else if W == W_Q6 {
            let cr = half(self.crumbs.add(pb * 2 + k / 4));
            let cr = match k % 4 {
                0 => _mm256_slli_epi16::<4>(cr),
                1 => _mm256_slli_epi16::<2>(cr),
                2 => cr,
                _ => _mm256_srli_epi16::<2>(cr),
            };
            _mm256_or_si256(low, _mm256_and_si256(cr, _mm256_set1_epi8(0x30)))
        } else {
            low
        }
    }
}

/// Lines whose 16-bit pair sums [`tile_avx2`] may add before widening them:
/// pair sums are at most `2 · u_max · 127` (`u_max` 15, 31, 63; 8-bit
/// weights, through the sign trick, `2 · 128 · 127`).
#[cfg(target_arch = "x86_64")]
const fn lines_in_16_bits(w: u8) -> usize {
    match w {
        W_Q4 => 8,
        W_Q5 => 4,
        W_Q6 => 2,
        _ => 1,
    }
}

/// Block forms as [`tile_avx2`] parameters (see [`Form`]).
#[cfg(target_arch = "x86_64")]
const F_ONE: u8 = 0;
#[cfg(target_arch = "x86_64")]
const F_MIN: u8 = 1;
#[cfg(target_arch = "x86_64")]
const F_HALVES: u8 = 2;

/// [`tile_avx2`] for a tile of [`Kernel::tile`] (one group × `nt` rows,
/// or one widened group × up to 4 rows), dispatched on the storage and form.
///
/// # Safety
/// As [`tile_avx2`].
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_avx2<const WIDE: bool>(
    w: &Q8Matrix,
    p: &Planes,
    g: usize,
    gt: usize,
    a: &Q8Acts,
    n0: usize,
    nt: usize,
    res: &mut [[f32; GROUP]],
) {
    unsafe fn by_size<const W: u8, const F: u8, const WIDE: bool>(
        (w, p, g, _gt, a, n0, nt, res): (&Q8Matrix, &Planes, usize, usize, &Q8Acts, usize, usize, &mut [[f32; GROUP]]),
    ) {
        match nt {
            1 => tile_avx2::<1, W, F, WIDE>(w, p, g, a, n0, res),
            2 => tile_avx2::<2, W, F, WIDE>(w, p, g, a, n0, res),
            3 => tile_avx2::<3, W, F, WIDE>(w, p, g, a, n0, res),
            _ => tile_avx2::<4, W, F, WIDE>(w, p, g, a, n0, res),
        }
    }
    let t = (w, p, g, gt, a, n0, nt, res);
    match (&w.quants, w.form()) {
        (Quants::Q8(_), Form::One) => by_size::<W_Q8, F_ONE, false>(t),
        (Quants::Q8(_), Form::Min) => by_size::<W_Q8, F_MIN, false>(t),
        (Quants::Q8(_), Form::Halves) => by_size::<W_Q8, F_HALVES, false>(t),
        (Quants::Q4 { .. }, Form::One) => by_size::<W_Q4, F_ONE, WIDE>(t),
        (Quants::Q4 { .. }, Form::Min) => by_size::<W_Q4, F_MIN, WIDE>(t),
        (Quants::Q5 { .. }, Form::One) => by_size::<W_Q5, F_ONE, WIDE>(t),
        (Quants::Q6 { .. }, Form::Halves) => by_size::<W_Q6, F_HALVES, WIDE>(t),
        // No loader pairs these storages and forms; the reference takes any.
        _ => t.0.tile_portable(g, gt, a, n0, nt, t.7),
    }
}

/// Rows `8h..8h + 8` of group `g`'s factors `(a, c)` for block `b` (as
/// [`Q8Matrix::factors`]).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; group `g` and block `b` exist.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn factors_avx2(
    w: &Q8Matrix,
    g: usize,
    b: usize,
    h: usize,
) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let nb = w.blocks;
    let pb = (g * nb + b) * 2 * GROUP + 8 * h;
    let ps = g * (nb / SUPER_BLOCKS) + b / SUPER_BLOCKS;
    match &w.scales {
        Scales::Plain(s) => {
            let p = s.as_ptr().add((g * nb + b) * GROUP + 8 * h);
            (_mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)), _mm256_setzero_ps())
        }
        Scales::Min(s) => {
            let p = s.as_ptr().add(pb);
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(GROUP) as *const __m128i)),
            )
        }
        Scales::K4 { sm, d } => {
            let p = sm.as_ptr().add(pb);
            let sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)));
            let mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(GROUP) as *const __m128i)));
            let q = d.as_ptr().add(ps * 2 * GROUP + 8 * h);
            let dd = _mm256_cvtph_ps(_mm_loadu_si128(q as *const __m128i));
            let dmin = _mm256_cvtph_ps(_mm_loadu_si128(q.add(GROUP) as *const __m128i));
            (_mm256_mul_ps(dd, sc), _mm256_xor_ps(_mm256_mul_ps(dmin, mn), _mm256_set1_ps(-0.0)))
        }
        Scales::K6 { sc, d } => {
            let p = sc.as_ptr().add(pb);
            let dd = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr().add(ps * GROUP + 8 * h) as *const __m128i));
            let s0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)));
            let s1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(GROUP) as *const __m128i)));
            (_mm256_mul_ps(dd, s0), _mm256_mul_ps(dd, s1))
        }
    }
}

/// One group × `N` activation rows with AVX2, on the weights at their
/// stored width (or, `WIDE`, on one group widened to bytes once for many
/// rows). Each 32-byte half line holds 4 weights of 8 rows; `vpmaddubsw`
/// multiplies both halves by 4 activation bytes (broadcast) into pair sums,
/// and `vpmaddwd` by ones makes each row's sum in its own lane, so rows
/// never need a horizontal add. Narrow weights are unpacked in registers
/// to unsigned bytes `u = w + off` (at most 63), their pair sums added in
/// 16 bits over [`lines_in_16_bits`] lines before one `vpmaddwd`, and
/// `off · Σx` taken off each block's integer sum; 8-bit weights go through
/// the sign trick (`|w|` times `x` with `w`'s sign), exact since
/// `|x| <= 127`. The integer sums are exact, so the result is the portable
/// kernel's bit for bit.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; group `g` and rows `n0..n0 + N` exist;
/// `W` and `F` are the matrix's storage and form; with `WIDE`, `p.wide`
/// holds group `g` widened.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const N: usize, const W: u8, const F: u8, const WIDE: bool>(
    w: &Q8Matrix,
    p: &Planes,
    g: usize,
    a: &Q8Acts,
    n0: usize,
    res: &mut [[f32; GROUP]],
) {
    use std::arch::x86_64::*;
    /// Blocks ahead that one-row (decode) tiles prefetch: Gemma 3 270M
    /// decode, 2 threads, 93 tok/s without, 105-119 with 6 or 8 (16 and
    /// 24: 101-111); SmolLM2 and Qwen2.5-Coder gain 5-15%.
    const AHEAD: usize = 6;
    let nb = w.blocks;
    let off = if W == W_Q8 { 0 } else { w.quants.offset() };
    let l16 = lines_in_16_bits(W);
    let (segs, per) = if F == F_HALVES { (2, LINES / 2) } else { (1, LINES) };
    let xq = a.quants.as_ptr().add(n0 * nb * BLOCK);
    let xs = a.scales.as_ptr().add(n0 * nb);
    let xsum = a.sums.as_ptr().add(n0 * nb);
    let xlow = a.lows.as_ptr().add(n0 * nb);
    let ones = _mm256_set1_epi16(1);
    let mut facc = [[_mm256_setzero_ps(); N]; 2];
    for b in 0..nb {
        let pb = if WIDE { b } else { g * nb + b };
        if N == 1 && !WIDE {
            p.prefetch::<W>(pb + AHEAD);
        }
        let fac = [factors_avx2(w, g, b, 0), factors_avx2(w, g, b, 1)];
        for seg in 0..segs {
            let mut acc = [[_mm256_setzero_si256(); N]; 2];
            for c0 in (seg * per..(seg + 1) * per).step_by(l16) {
                let mut acc16 = [[_mm256_setzero_si256(); N]; 2];
                for k in c0..c0 + l16 {
                    let lw = [p.line::<W, WIDE>(pb, k, 0), p.line::<W, WIDE>(pb, k, 1)];
                    let mag = if W == W_Q8 { [_mm256_abs_epi8(lw[0]), _mm256_abs_epi8(lw[1])] } else { lw };
                    for n in 0..N {
                        let x4 = (xq.add((n * nb + b) * BLOCK + 4 * k) as *const i32).read_unaligned();
                        let xb = _mm256_set1_epi32(x4);
                        for h in 0..2 {
                            if W == W_Q8 {
                                let pr = _mm256_maddubs_epi16(mag[h], _mm256_sign_epi8(xb, lw[h]));
                                acc[h][n] = _mm256_add_epi32(acc[h][n], _mm256_madd_epi16(pr, ones));
                            } else {
                                acc16[h][n] = _mm256_add_epi16(acc16[h][n], _mm256_maddubs_epi16(mag[h], xb));
                            }
                        }
                    }
                }
                if W != W_Q8 {
                    for h in 0..2 {
                        for n in 0..N {
                            acc[h][n] = _mm256_add_epi32(acc[h][n], _mm256_madd_epi16(acc16[h][n], ones));
                        }
                    }
                }
            }
            for h in 0..2 {
                let f = if seg == 0 { fac[h].0 } else { fac[h].1 };
                for n in 0..N {
                    let s = if off == 0 {
                        acc[h][n]
                    } else {
                        let sum = *xsum.add(n * nb + b);
                        let sx = match (segs, seg) {
                            (1, _) => sum,
                            (_, 0) => *xlow.add(n * nb + b),
                            _ => sum - *xlow.add(n * nb + b),
                        };
                        _mm256_sub_epi32(acc[h][n], _mm256_set1_epi32(off * sx))
                    };
                    let d = _mm256_mul_ps(f, _mm256_set1_ps(*xs.add(n * nb + b)));
                    facc[h][n] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), facc[h][n]);
                }
            }
        }
        if F == F_MIN {
            for h in 0..2 {
                for n in 0..N {
                    let d = _mm256_mul_ps(fac[h].1, _mm256_set1_ps(*xs.add(n * nb + b)));
                    facc[h][n] = _mm256_fmadd_ps(d, _mm256_set1_ps(*xsum.add(n * nb + b) as f32), facc[h][n]);
                }
            }
        }
    }
    for (h, fh) in facc.iter().enumerate() {
        for n in 0..N {
            _mm256_storeu_ps(res[n].as_mut_ptr().add(8 * h), fh[n]);
        }
    }
}

/// From this many activation rows the AVX2 kernel widens each weight group
/// to bytes once and runs [`tile_avx2`] on it over the rows (prefill);
/// below it, [`tile_avx2`] unpacks the narrow planes in registers for each
/// tile (decode).
const WIDE_FROM: usize = 8;

impl Q8Matrix {
    /// Group `g`'s integer weights as unsigned bytes `u = w + off` in
    /// [`Quants::Q8`]'s line layout (`[block][line 0..8]`), into `out`
    /// (`blocks · 8` lines). 8-bit storage is already in that layout and is
    /// not copied: `None`.
    fn widen_group(&self, g: usize, out: &mut [Line]) -> Option<()> {
        if let Quants::Q8(_) = self.quants {
            return None;
        }
        let nb = self.blocks;
        for b in 0..nb {
            let p = g * nb + b;
            for k in 0..LINES {
                let dst = &mut out[b * LINES + k].0;
                let plane = |nib: &[Line], dst: &mut [u8; 64]| {
                    let src = &nib[p * 4 + k / 2].0;
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d = if k % 2 == 0 { s & 0x0f } else { s >> 4 };
                    }
                };
                match &self.quants {
                    Quants::Q8(_) => unreachable!("returned above"),
                    Quants::Q4 { nib, .. } => plane(nib, dst),
                    Quants::Q5 { nib, high } => {
                        plane(nib, dst);
                        let hm = high[p * LINES + k];
                        for (i, d) in dst.iter_mut().enumerate() {
                            *d |= (((hm >> i) & 1) as u8) << 4;
                        }
                    }
                    Quants::Q6 { nib, crumbs } => {
                        plane(nib, dst);
                        let cr = &crumbs[p * 2 + k / 4].0;
                        for (d, c) in dst.iter_mut().zip(cr) {
                            *d |= ((c >> (2 * (k % 4))) & 3) << 4;
                        }
                    }
                }
            }
        }
        Some(())
    }

    /// The AVX2 kernel for many rows: each group of groups `g0..g1` is
    /// widened to bytes once, then multiplied by every activation row, four
    /// at a time.
    ///
    /// # Safety
    /// As [`Self::run_groups`] with the AVX2 kernel.
    #[cfg(target_arch = "x86_64")]
    unsafe fn run_groups_wide_avx2(&self, a: &Q8Acts, g0: usize, g1: usize, out: *mut f32) {
        let m = a.m;
        let mut wide = match self.quants {
            Quants::Q8(_) => Vec::new(),
            _ => vec![Line([0; 64]); self.blocks * LINES],
        };
        let mut res = [[0f32; GROUP]; 4];
        for g in g0..g1 {
            let narrow = self.widen_group(g, &mut wide).is_some();
            let p = Planes::of(self, wide.as_ptr());
            let mut n0 = 0;
            while n0 < m {
                let nt = 4.min(m - n0);
                if narrow {
                    tiles_avx2::<true>(self, &p, g, 1, a, n0, nt, &mut res);
                } else {
                    tiles_avx2::<false>(self, &p, g, 1, a, n0, nt, &mut res);
                }
                let r0 = g * GROUP;
                let valid = GROUP.min(self.rows - r0);
                for ni in 0..nt {
                    let dst = out.add((n0 + ni) * self.rows + r0);
                    std::ptr::copy_nonoverlapping(res[ni].as_ptr(), dst, valid);
                }
                n0 += nt;
            }
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
        let (mut sums1, mut lows1) = (vec![0i32; nb], vec![0i32; nb]);
        block_sums(&q1, &mut sums1, &mut lows1);
        let (mut s2, mut q2) = (vec![1f32; nb], vec![1i8; nb * BLOCK]);
        let (mut sums2, mut lows2) = (vec![0i32; nb], vec![0i32; nb]);
        // SAFETY: AVX-512 was detected above.
        unsafe { quantize_row_avx512(&x, nb, &mut s2, &mut q2, &mut sums2, &mut lows2) };
        assert_eq!(
            s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(q1, q2);
        assert_eq!(sums1, sums2);
        assert_eq!(lows1, lows2);
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

    /// Random file bytes of a GGUF type for `rows x cols` (sane f16 scales,
    /// every other bit random), and candle's dequantization of them.
    fn random_file(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<f32>) {
        use candle_core::quantized::GgmlDType;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut f16 = |lo: f32, hi: f32| half::f16::from_f32(rng.gen_range(lo..hi)).to_bits().to_le_bytes();
        let mut bytes = Vec::new();
        let mut rng2 = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 1000);
        let mut rand_bytes = |n: usize| (0..n).map(|_| rng2.gen::<u8>()).collect::<Vec<u8>>();
        match dtype {
            GgmlDType::Q4_1 => {
                for _ in 0..rows * cols / 32 {
                    bytes.extend(f16(0.001, 0.1));
                    bytes.extend(f16(-0.5, 0.5));
                    bytes.extend(rand_bytes(16));
                }
            }
            GgmlDType::Q4K => {
                for _ in 0..rows * cols / 256 {
                    bytes.extend(f16(0.0001, 0.01));
                    bytes.extend(f16(0.0001, 0.01));
                    bytes.extend(rand_bytes(12 + 128));
                }
            }
            GgmlDType::Q6K => {
                for _ in 0..rows * cols / 256 {
                    bytes.extend(rand_bytes(128 + 64 + 16));
                    bytes.extend(f16(0.0001, 0.01));
                }
            }
            other => panic!("no generator for {other:?}"),
        }
        (bytes.clone(), candle_dequantized(dtype, &bytes, rows, cols))
    }

    fn candle_dequantized(
        dtype: candle_core::quantized::GgmlDType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Vec<f32> {
        let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![rows, cols], &Device::Cpu)
            .expect("qtensor");
        qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// A matrix quantized by candle from random weights: its bytes and
    /// candle's dequantization.
    fn candle_file(
        dtype: candle_core::quantized::GgmlDType,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (Vec<u8>, Vec<f32>) {
        let w = Tensor::from_vec(rand_vec(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let qt = candle_core::quantized::QTensor::quantize(&w, dtype).expect("quantize");
        let bytes = qt.data().expect("bytes").to_vec();
        let deq = qt.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (bytes, deq)
    }

    type Loader = fn(&[u8], usize, usize, bool) -> Result<Q8Matrix>;

    fn loaders() -> [(candle_core::quantized::GgmlDType, Loader, u32, f64); 3] {
        use candle_core::quantized::GgmlDType;
        // (type, loader, bits per stored weight, bits per weight with the scales)
        [
            (GgmlDType::Q4_1, Q8Matrix::from_q4_1_bytes_packed, 4, 5.0),
            (GgmlDType::Q4K, Q8Matrix::from_q4_k_bytes_packed, 4, 4.625),
            (GgmlDType::Q6K, Q8Matrix::from_q6_k_bytes_packed, 6, 6.5625),
        ]
    }

    /// Every check of a new type on one matrix: `dequantize_rows` equals
    /// `deq` (candle's) bit for bit, every kernel equals the portable one
    /// bit for bit, and the portable one is the f32 reference (dequantized
    /// weights times dequantized activations) up to summation order.
    fn check_type(q: &Q8Matrix, deq: &[f32], what: &str, seed: u64) {
        let (rows, cols) = (q.rows(), q.cols());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut got = vec![f32::NAN; rows * cols];
        q.dequantize_rows(0, rows, &mut got).unwrap();
        assert_eq!(bits(&got), bits(deq), "{what}: dequantize_rows differs from candle");
        let mut one = vec![f32::NAN; 3 * cols];
        q.dequantize_rows(rows - 3, 3, &mut one).unwrap();
        assert_eq!(bits(&one), bits(&deq[(rows - 3) * cols..]), "{what}: the last rows");
        for m in [1, 3, 17, 64] {
            let x = rand_vec(m * cols, seed + m as u64);
            let mut acts = Q8Acts::default();
            acts.quantize(&x, m, cols).unwrap();
            let mut want = vec![f32::NAN; m * rows];
            q.matmul_acts_with(&acts, &mut want, Kernel::Portable).unwrap();
            for k in Kernel::available() {
                let mut got = vec![f32::NAN; m * rows];
                q.matmul_acts_with(&acts, &mut got, k).unwrap();
                assert_eq!(bits(&got), bits(&want), "{what}, {k:?}, {m} rows: differs from the portable kernel");
            }
            let nb = cols / BLOCK;
            for n in 0..m {
                let xd = |c: usize| acts.quants[n * nb * BLOCK + c] as f64 * acts.scales[n * nb + c / BLOCK] as f64;
                for r in 0..rows {
                    let reference: f64 = (0..cols).map(|c| deq[r * cols + c] as f64 * xd(c)).sum();
                    // The size of the terms the kernel rounds: |a·q| and |c|
                    // (the min) per weight.
                    let size: f64 = (0..cols)
                        .map(|c| {
                            let (fa, fc) = q.factors(r, c / BLOCK);
                            let wq = q.weight(r, c) as f64;
                            let terms = match q.form() {
                                Form::Halves if c % BLOCK >= BLOCK / 2 => (fc as f64 * wq).abs(),
                                Form::Halves | Form::One => (fa as f64 * wq).abs(),
                                Form::Min => (fa as f64 * wq).abs() + (fc as f64).abs(),
                            };
                            terms * xd(c).abs()
                        })
                        .sum();
                    let got = want[n * rows + r] as f64;
                    assert!(
                        (got - reference).abs() <= 1e-5 * size + 1e-30,
                        "{what}, {m} rows, row {n} output {r}: {got} vs {reference} (terms {size})"
                    );
                }
            }
        }
    }

    #[test]
    fn new_types_match_candle_and_every_kernel_agrees() {
        // 37 rows: three groups, the last partial; 512 columns: two
        // super-blocks.
        let (rows, cols) = (37, 512);
        for (i, (dtype, load, bits, per_weight)) in loaders().into_iter().enumerate() {
            for (source, (bytes, deq)) in [
                ("random bytes", random_file(dtype, rows, cols, 40 + i as u64)),
                ("quantized by candle", candle_file(dtype, rows, cols, 50 + i as u64)),
            ] {
                for packed in [true, false] {
                    let q = load(&bytes, rows, cols, packed).unwrap();
                    assert_eq!(q.weight_bits(), if packed { bits } else { 8 });
                    if packed {
                        // Stored size per weight, scales included (rows padded to 48).
                        let stored = q.bytes() as f64 * 8.0 / (48 * cols) as f64;
                        assert_eq!(stored, per_weight, "{dtype:?}: bits per weight");
                    }
                    check_type(&q, &deq, &format!("{dtype:?} ({source}, packed {packed})"), 60 + i as u64);
                }
            }
        }
    }

    #[test]
    fn malformed_new_type_bytes_are_errors() {
        for (dtype, load, _, _) in loaders() {
            let (rows, cols) = (3, 256);
            let (bytes, _) = random_file(dtype, rows, cols, 70);
            for packed in [true, false] {
                assert!(load(&bytes, rows, cols, packed).is_ok());
                assert!(load(&bytes[..bytes.len() - 1], rows, cols, packed).is_err(), "{dtype:?}: short");
                assert!(load(&bytes, rows + 1, cols, packed).is_err(), "{dtype:?}: too few rows");
                assert!(load(&[], 0, 0, packed).is_err(), "{dtype:?}: no columns");
                assert!(load(&bytes, rows, cols + 16, packed).is_err(), "{dtype:?}: a partial block");
                if dtype != candle_core::quantized::GgmlDType::Q4_1 {
                    // The same bytes as rows of 128: half super-blocks.
                    assert!(load(&bytes, rows * 2, cols / 2, packed).is_err(), "{dtype:?}: a partial super-block");
                }
                assert!(load(&bytes, usize::MAX / 2, cols, packed).is_err(), "{dtype:?}: overflow");
            }
        }
    }

    #[test]
    fn extreme_new_type_weights_do_not_overflow() {
        // Q6_K with every q = 0 (w = -32) and scales -128 against activations
        // of ±127, and Q4_1 with q = 15: every kernel equals the portable one
        // and the dequantized reference.
        let (rows, cols) = (16, 256);
        let mut q6 = Vec::new();
        for _ in 0..rows {
            q6.extend([0u8; 192]);
            q6.extend([0x80u8; 16]);
            q6.extend(half::f16::from_f32(0.01).to_bits().to_le_bytes());
        }
        let mut q41 = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            q41.extend(half::f16::from_f32(0.5).to_bits().to_le_bytes());
            q41.extend(half::f16::from_f32(-3.0).to_bits().to_le_bytes());
            q41.extend([0xffu8; 16]);
        }
        let x: Vec<f32> = (0..cols).map(|c| if c % 3 == 0 { -1.0 } else { 1.0 }).collect();
        for (dtype, bytes, load) in [
            (candle_core::quantized::GgmlDType::Q6K, &q6, Q8Matrix::from_q6_k_bytes_packed as Loader),
            (candle_core::quantized::GgmlDType::Q4_1, &q41, Q8Matrix::from_q4_1_bytes_packed as Loader),
        ] {
            let deq = candle_dequantized(dtype, bytes, rows, cols);
            for packed in [true, false] {
                let q = load(bytes, rows, cols, packed).unwrap();
                let mut acts = Q8Acts::default();
                acts.quantize(&x, 1, cols).unwrap();
                let mut want = vec![0f32; rows];
                q.matmul_acts_with(&acts, &mut want, Kernel::Portable).unwrap();
                // One row (decode), and 16 equal rows (the widened prefill
                // path, whose 16-bit sums run over several lines).
                let many: Vec<f32> = x.iter().cycle().take(16 * cols).copied().collect();
                let mut acts16 = Q8Acts::default();
                acts16.quantize(&many, 16, cols).unwrap();
                for k in Kernel::available() {
                    let mut got = vec![0f32; rows];
                    q.matmul_acts_with(&acts, &mut got, k).unwrap();
                    assert_eq!(got, want, "{dtype:?} {k:?}");
                    let mut got16 = vec![0f32; 16 * rows];
                    q.matmul_acts_with(&acts16, &mut got16, k).unwrap();
                    for row in got16.chunks(rows) {
                        assert_eq!(row, want, "{dtype:?} {k:?}, 16 rows");
                    }
                }
                for (r, g) in want.iter().enumerate() {
                    let reference: f32 = (0..cols).map(|c| deq[r * cols + c] * x[c]).sum();
                    assert!((g - reference).abs() < 1e-3 * reference.abs().max(1.0), "{dtype:?}: {g} vs {reference}");
                }
            }
        }
    }

    /// A matrix converted in row chunks and spliced together equals the
    /// one converted whole, in every storage (what a large GGUF tensor's
    /// loading does).
    #[test]
    fn spliced_row_chunks_equal_the_whole_matrix() {
        let (rows, cols) = (70, 512);
        for (dtype, load, _, _) in loaders() {
            for packed in [false, true] {
                let (bytes, _) = random_file(dtype, rows, cols, 90);
                let row_bytes = bytes.len() / rows;
                let whole = load(&bytes, rows, cols, packed).unwrap();
                let mut spliced: Option<Q8Matrix> = None;
                for r0 in (0..rows).step_by(32) {
                    let n = 32.min(rows - r0);
                    let part = load(&bytes[r0 * row_bytes..(r0 + n) * row_bytes], n, cols, packed).unwrap();
                    let dst = spliced.get_or_insert_with(|| Q8Matrix::empty_like(&part, rows));
                    dst.splice_rows(r0, &part).unwrap();
                }
                let spliced = spliced.unwrap();
                let (mut a, mut b) = (vec![0f32; rows * cols], vec![1f32; rows * cols]);
                whole.dequantize_rows(0, rows, &mut a).unwrap();
                spliced.dequantize_rows(0, rows, &mut b).unwrap();
                assert_eq!(a, b, "{dtype:?} packed {packed}");
                let x = rand_vec(3 * cols, 91);
                assert_eq!(whole.matmul(&x, 3).unwrap(), spliced.matmul(&x, 3).unwrap());
                let mut bad = Q8Matrix::empty_like(&whole, rows);
                assert!(bad.splice_rows(8, &whole).is_err(), "not a group boundary");
            }
        }
        let q8 = Q8Matrix::from_f32(&rand_vec(32 * cols, 92), 32, cols).unwrap();
        let mut other = Q8Matrix::empty_like(
            &Q8Matrix::from_q6_k_bytes(&random_file(candle_core::quantized::GgmlDType::Q6K, 32, cols, 93).0, 32, cols)
                .unwrap(),
            64,
        );
        assert!(other.splice_rows(0, &q8).is_err(), "another format");
    }

    #[test]
    fn rows_a_group_at_a_time_equal_the_whole_matrix() {
        let (rows, cols) = (37, 100);
        let w = rand_vec(rows * cols, 80);
        let whole = Q8Matrix::from_f32(&w, rows, cols).unwrap();
        let parts = Q8Matrix::from_f32_rows(rows, cols, |r0, n, out| {
            out.copy_from_slice(&w[r0 * cols..(r0 + n) * cols]);
            Ok(())
        })
        .unwrap();
        let (mut a, mut b) = (vec![0f32; rows * cols], vec![1f32; rows * cols]);
        whole.dequantize_rows(0, rows, &mut a).unwrap();
        parts.dequantize_rows(0, rows, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(whole.bytes(), parts.bytes());
        let failing = Q8Matrix::from_f32_rows(rows, cols, |r0, _, _| {
            if r0 >= 16 {
                Err(Error::input("test", "a bad group"))
            } else {
                Ok(())
            }
        });
        assert!(failing.is_err());
    }

    #[test]
    fn activation_half_sums() {
        let cols = 100;
        let x = rand_vec(2 * cols, 90);
        let mut acts = Q8Acts::default();
        acts.quantize(&x, 2, cols).unwrap();
        for (i, q) in acts.quants.chunks(BLOCK).enumerate() {
            assert_eq!(acts.lows[i], q[..16].iter().map(|&v| v as i32).sum::<i32>());
            assert_eq!(acts.sums[i], q.iter().map(|&v| v as i32).sum::<i32>());
        }
    }
}
