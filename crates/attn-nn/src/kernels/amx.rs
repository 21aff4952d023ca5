//! bf16 matmul on AMX tiles (Intel Sapphire Rapids and later): `y = x Wᵀ`
//! with `x` and `W` rounded to bf16 (round to nearest even) and every
//! product summed in f32.
//!
//! One `tdpbf16ps` multiplies a 16 x 32 bf16 tile of `x` by a 32 x 16 tile
//! of `Wᵀ` into a 16 x 16 f32 tile: 8,192 multiply-adds per instruction, 16
//! times the float32 FMA rate of AVX-512 on the same core. The weight is
//! packed once ([`Bf16Matrix::new`]) into the tile layout the instruction
//! reads (pairs of consecutive inputs side by side, "VNNI" order); the
//! activations are rounded to bf16 on each call. The register blocking is
//! 2 x 2 tiles of output (32 rows by 32 columns) over the whole inner
//! dimension, so each loaded tile is used twice.
//!
//! [`available`] says whether the CPU has AMX-BF16 and AVX512-BF16 and the
//! kernel let this process use the tile registers (Linux asks each process
//! to request them, `arch_prctl(ARCH_REQ_XCOMP_PERM)`); elsewhere the
//! callers keep the float32 `gemm` path. `ATTN_AMX=0` turns it off.

use crate::error::{Error, Result};

/// Rows (and output columns) of one tile.
const TILE_ROWS: usize = 16;
/// bf16 values of the inner dimension in one tile row (64 bytes).
const TILE_K: usize = 32;
/// bf16 values in one packed weight tile.
const TILE_ELEMS: usize = TILE_ROWS * TILE_K;

/// Whether the AMX bf16 kernel can run here (checked once per process).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| std::env::var("ATTN_AMX").map_or(true, |v| v != "0") && detect())
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if !is_x86_feature_detected!("avx512f") || !is_x86_feature_detected!("avx512bf16") {
        return false;
    }
    // cpuid is present on every x86_64 CPU; leaf 7 counts when the maximum
    // leaf (leaf 0's eax) reaches it.
    let (max_leaf, leaf7) = (__cpuid_count(0, 0).eax, __cpuid_count(7, 0));
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    if max_leaf < 7 || !amx_bf16 || !amx_tile {
        return false;
    }
    request_tiles()
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Asks Linux for the tile data state (XTILEDATA, feature 18) for this
/// process; `false` where the kernel refuses (or is not Linux).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tiles() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes which register
    // state the process may use; it reads and writes no memory of ours.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tiles() -> bool {
    false
}

/// A weight `[n, k]` rounded to bf16 and packed in AMX tiles: `n` padded to
/// a multiple of 16 and `k` to a multiple of 32 with zeros; tile
/// `(nb, kb)` (output columns `16 nb ..`, inputs `32 kb ..`) at
/// `(nb * k_tiles + kb) * 512`, its row `r` holding, for each of the 16
/// columns `j`, the pair `W[16 nb + j][32 kb + 2r]`, `W[16 nb + j][32 kb + 2r + 1]`.
#[derive(Debug, Clone)]
pub struct Bf16Matrix {
    n: usize,
    k: usize,
    k_tiles: usize,
    n_tiles: usize,
    data: Vec<u16>,
    /// The bias, zero-padded to whole tiles; the accumulators start from it.
    bias: Option<Vec<f32>>,
}

/// `x` rounded to bf16, nearest even (NaN kept a quiet NaN).
pub fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl Bf16Matrix {
    /// Packs the row-major `[n, k]` weight `w` and the optional `[n]`
    /// bias (kept in f32 and added exactly: the sums start from it).
    pub fn new(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Result<Self> {
        if w.len() != n * k || n == 0 || k == 0 {
            return Err(Error::input("amx", format!("weight of {} values is not [{n}, {k}]", w.len())));
        }
        if let Some(b) = bias {
            if b.len() != n {
                return Err(Error::input("amx", format!("bias of {} values for {n} outputs", b.len())));
            }
        }
        let (n_tiles, k_tiles) = (n.div_ceil(TILE_ROWS), k.div_ceil(TILE_K));
        let mut data = vec![0u16; n_tiles * k_tiles * TILE_ELEMS];
        for (row, wr) in w.chunks_exact(k).enumerate() {
            let (nb, j) = (row / TILE_ROWS, row % TILE_ROWS);
            for (c, &v) in wr.iter().enumerate() {
                let (kb, kk) = (c / TILE_K, c % TILE_K);
                let (r, p) = (kk / 2, kk % 2);
                data[(nb * k_tiles + kb) * TILE_ELEMS + r * TILE_K + 2 * j + p] = to_bf16(v);
            }
        }
        let bias = bias.map(|b| {
            let mut p = b.to_vec();
            p.resize(n_tiles * TILE_ROWS, 0.0);
            p
        });
        Ok(Bf16Matrix { n, k, k_tiles, n_tiles, data, bias })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes of the packed weight.
    pub fn bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// `out[i * ld + j] = x[i] · W[j] (+ b[j])` for the `m` rows of `x` (`[m, k]`
    /// row-major), columns `0..n` of rows `ld` apart. Split over rayon's
    /// threads (by blocks of 32 rows, or of 32 columns when the rows are
    /// few) when `threaded`. Errors when [`available`] is false.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32], ld: usize, threaded: bool) -> Result<()> {
        let (n, k) = (self.n, self.k);
        if x.len() < m * k || ld < n || (m > 0 && out.len() < (m - 1) * ld + n) {
            return Err(Error::input("amx", format!("buffers too small for [{m}, {k}] -> [{m}, {n}] (ld {ld})")));
        }
        if !available() {
            return Err(Error::input("amx", "this CPU (or process) has no AMX-BF16 tiles"));
        }
        if m == 0 {
            return Ok(());
        }
        #[cfg(target_arch = "x86_64")]
        {
            let m_tiles = m.div_ceil(TILE_ROWS);
            let kp = self.k_tiles * TILE_K;
            thread_local! {
                static SCRATCH: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
            }
            // The thread's buffer, taken out while in use (a call further up
            // this thread's stack, waiting on rayon, leaves an empty one).
            let mut a = SCRATCH.with(|s| s.take());
            a.resize(m_tiles * TILE_ROWS * kp, 0);
            a[m * kp..].fill(0);
            // SAFETY: `available` checked AVX512-BF16; `a` holds m_tiles * 16
            // rows of kp >= k values and x holds m rows of k.
            unsafe { round_rows(x, m, k, &mut a, kp) };
            let out_ptr = SendPtr(out.as_mut_ptr());
            let pairs_m = m_tiles.div_ceil(2);
            let pairs_n = self.n_tiles.div_ceil(2);
            let run = |mp: std::ops::Range<usize>, np: std::ops::Range<usize>| {
                // SAFETY: the tile shapes and every address the kernel reads
                // or writes are within `a`, `self.data` and `out` (checked by
                // `tile_block`); the ranges given to different threads write
                // disjoint output rows or columns.
                unsafe { self.tile_range(&a, kp, m, mp, np, { &out_ptr }.0, ld) }
            };
            if threaded && rayon::current_num_threads() > 1 && pairs_m * pairs_n > 1 {
                use rayon::prelude::*;
                if pairs_m >= rayon::current_num_threads() {
                    (0..pairs_m).into_par_iter().for_each(|p| run(p..p + 1, 0..pairs_n));
                } else {
                    (0..pairs_n).into_par_iter().for_each(|p| run(0..pairs_m, p..p + 1));
                }
            } else {
                run(0..pairs_m, 0..pairs_n);
            }
            SCRATCH.with(|s| s.set(a));
        }
        Ok(())
    }

    /// Output blocks of 32 x 32 (pairs of tiles) `mp` x `np` on this thread.
    ///
    /// # Safety
    /// AMX must be [`available`]; `a` is the rounded input (`kp` per row,
    /// padded to whole tiles), `out` the caller's checked output (row `i`,
    /// column `j` at `out[i * ld + j]`), not written by any other thread
    /// in these blocks.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_range(
        &self,
        a: &[u16],
        kp: usize,
        m: usize,
        mp: std::ops::Range<usize>,
        np: std::ops::Range<usize>,
        out: *mut f32,
        ld: usize,
    ) {
        let m_tiles = m.div_ceil(TILE_ROWS);
        let mut cfg = [0u8; 64];
        cfg[0] = 1; // palette 1
        for t in 0..8 {
            cfg[16 + 2 * t] = 64; // bytes per row
            cfg[48 + t] = TILE_ROWS as u8; // rows
        }
        let mut scratch = [0f32; TILE_ROWS * TILE_ROWS];
        std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.as_ptr(), options(nostack, readonly));
        for pm in mp {
            // A pair of row tiles; an odd last tile is paired with itself
            // (its second result is discarded).
            let mt0 = 2 * pm;
            let mt1 = (mt0 + 1).min(m_tiles - 1);
            for pn in np.clone() {
                let nt0 = 2 * pn;
                let nt1 = (nt0 + 1).min(self.n_tiles - 1);
                let a0 = a.as_ptr().add(mt0 * TILE_ROWS * kp);
                let a1 = a.as_ptr().add(mt1 * TILE_ROWS * kp);
                let b0 = self.data.as_ptr().add(nt0 * self.k_tiles * TILE_ELEMS);
                let b1 = self.data.as_ptr().add(nt1 * self.k_tiles * TILE_ELEMS);
                match &self.bias {
                    // Every row of a tile starts as the bias (row stride 0).
                    Some(b) => std::arch::asm!(
                        "tileloadd tmm0, [{b0} + {z}*1]",
                        "tileloadd tmm1, [{b1} + {z}*1]",
                        "tileloadd tmm2, [{b0} + {z}*1]",
                        "tileloadd tmm3, [{b1} + {z}*1]",
                        b0 = in(reg) b.as_ptr().add(nt0 * TILE_ROWS),
                        b1 = in(reg) b.as_ptr().add(nt1 * TILE_ROWS),
                        z = in(reg) 0usize,
                        options(nostack, readonly),
                    ),
                    None => std::arch::asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        options(nostack, nomem),
                    ),
                }
                std::arch::asm!(
                    "2:",
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "add {a0}, 64",
                    "add {a1}, 64",
                    "add {b0}, 1024",
                    "add {b1}, 1024",
                    "dec {cnt}",
                    "jnz 2b",
                    a0 = inout(reg) a0 => _,
                    a1 = inout(reg) a1 => _,
                    b0 = inout(reg) b0 => _,
                    b1 = inout(reg) b1 => _,
                    cnt = inout(reg) self.k_tiles => _,
                    sa = in(reg) kp * 2,
                    sb = in(reg) 64usize,
                    options(nostack, readonly),
                );
                let tiles = [(mt0, nt0), (mt0, nt1), (mt1, nt0), (mt1, nt1)];
                for (i, &(mt, nt)) in tiles.iter().enumerate() {
                    // Skip the duplicate of an odd last tile.
                    if (i & 1 == 1 && nt1 == nt0) || (i >= 2 && mt1 == mt0) {
                        continue;
                    }
                    let rows = (m - mt * TILE_ROWS).min(TILE_ROWS);
                    let cols = (self.n - nt * TILE_ROWS).min(TILE_ROWS);
                    let o = out.add(mt * TILE_ROWS * ld + nt * TILE_ROWS);
                    if rows == TILE_ROWS && cols == TILE_ROWS {
                        store_tile(i, o, ld * 4);
                    } else {
                        // A partial tile goes through the scratch tile.
                        store_tile(i, scratch.as_mut_ptr(), TILE_ROWS * 4);
                        for r in 0..rows {
                            std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * TILE_ROWS), o.add(r * ld), cols);
                        }
                    }
                }
            }
        }
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
}

/// Stores accumulator tile `tmm{i}` (0..4) to `dst`, rows `stride` bytes
/// apart.
///
/// # Safety
/// AMX configured as in `tile_range`; `dst` has 16 rows of 16 f32 at that
/// stride.
#[cfg(target_arch = "x86_64")]
unsafe fn store_tile(i: usize, dst: *mut f32, stride: usize) {
    use std::arch::asm;
    match i {
        0 => asm!("tilestored [{} + {}*1], tmm0", in(reg) dst, in(reg) stride, options(nostack)),
        1 => asm!("tilestored [{} + {}*1], tmm1", in(reg) dst, in(reg) stride, options(nostack)),
        2 => asm!("tilestored [{} + {}*1], tmm2", in(reg) dst, in(reg) stride, options(nostack)),
        _ => asm!("tilestored [{} + {}*1], tmm3", in(reg) dst, in(reg) stride, options(nostack)),
    }
}

struct SendPtr(*mut f32);
// SAFETY: threads given the pointer write disjoint parts of the output.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Rounds the `m` rows of `x` (`k` values each) to bf16 into rows of `kp`
/// values of `a`, zeros past `k` (`kp` is `k` rounded up to 32).
///
/// # Safety
/// The CPU must have AVX512-BF16; `x.len() >= m * k`, `a.len() >= m * kp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
unsafe fn round_rows(x: &[f32], m: usize, k: usize, a: &mut [u16], kp: usize) {
    use std::arch::x86_64::*;
    for r in 0..m {
        let src = x.as_ptr().add(r * k);
        let dst = a.as_mut_ptr().add(r * kp);
        let mut c = 0;
        while c + 32 <= k {
            let lo = _mm512_loadu_ps(src.add(c));
            let hi = _mm512_loadu_ps(src.add(c + 16));
            // cvtne2ps puts its second operand in the low half.
            let v = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512(dst.add(c) as *mut _, std::mem::transmute::<__m512bh, __m512i>(v));
            c += 32;
        }
        if c < k {
            let left = k - c;
            let mlo: __mmask16 = if left >= 16 { 0xffff } else { (1u32 << left) as u16 - 1 };
            let mhi: __mmask16 = if left > 16 { ((1u32 << (left - 16)) - 1) as u16 } else { 0 };
            let lo = _mm512_maskz_loadu_ps(mlo, src.add(c));
            let hi = _mm512_maskz_loadu_ps(mhi, src.add(c + 16));
            let v = _mm512_cvtne2ps_pbh(hi, lo);
            // The whole last tile column: zeros past k (kp - c == 32).
            _mm512_storeu_si512(dst.add(c) as *mut _, std::mem::transmute::<__m512bh, __m512i>(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(x: f32) -> f32 {
        half::bf16::from_bits(to_bf16(x)).to_f32()
    }

    fn reference(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|c| bf(x[i * k + c]) as f64 * bf(w[j * k + c]) as f64).sum();
                y[i * n + j] = (s + b[j] as f64) as f32;
            }
        }
        y
    }

    #[test]
    fn packing_rejects_wrong_sizes() {
        assert!(Bf16Matrix::new(&[0.0; 5], 2, 3, None).is_err());
        assert!(Bf16Matrix::new(&[], 0, 3, None).is_err());
        assert!(Bf16Matrix::new(&[0.0; 6], 2, 3, Some(&[0.0; 3])).is_err());
    }

    /// Against a float64 sum of the bf16-rounded inputs, on shapes with and
    /// without partial tiles, with and without a bias, alone and threaded,
    /// into a wider output; calls of different shapes in turn reuse the
    /// thread's buffer (its padding must read as zeros each time).
    #[test]
    fn matches_reference() {
        if !available() {
            eprintln!("skipped: no AMX-BF16 on this CPU");
            return;
        }
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(m, n, k) in &[(1, 1, 1), (5, 17, 33), (16, 16, 32), (33, 47, 100), (64, 96, 384), (70, 35, 64)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for (p, want) in [
                (Bf16Matrix::new(&w, n, k, None).unwrap(), reference(&x, &w, &vec![0.0; n], m, n, k)),
                (Bf16Matrix::new(&w, n, k, Some(&b)).unwrap(), reference(&x, &w, &b, m, n, k)),
            ] {
                for threaded in [false, true] {
                    let ld = n + 3;
                    let mut out = vec![f32::NAN; (m - 1) * ld + n];
                    p.matmul(&x, m, &mut out, ld, threaded).unwrap();
                    for i in 0..m {
                        for j in 0..n {
                            let (g, e) = (out[i * ld + j], want[i * n + j]);
                            assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "[{m},{n},{k}] ({i},{j}): {g} vs {e}");
                        }
                    }
                }
                let mut small = vec![0f32; 1];
                assert!(p.matmul(&x, m, &mut small, n, false).is_err() || m * n == 1);
            }
        }
    }
}
