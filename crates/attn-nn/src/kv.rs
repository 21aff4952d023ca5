//! How keys and values are stored: the number format of a KV cache, the
//! row kernels that read it, and the contiguous cache of one layer.
//!
//! Keys and values are stored in f16 by default (llama.cpp's default too):
//! half the bytes of f32, so twice the tokens in the same memory, and the
//! attention kernel ([`crate::kernels::fast::attend`]) widens each row to f32 as it
//! reads it ([`KvElem::dot`], [`KvElem::axpy`]), with F16C on x86-64 CPUs
//! that have it and a portable loop elsewhere. Scores, softmax and sums stay
//! f32. `f32` storage remains available (exact reference, tests).
//!
//! [`RawKv`] is one layer's contiguous cache. A layer with a sliding window
//! of `w` positions keeps only a ring of `2w` positions: a query never looks
//! further back than `w - 1`, and the spare `w` slots let a call write up to
//! `w + 1` new positions before attending them, and a rollback
//! ([`RawKv::truncate`]) go back up to `w + 1` positions. Longer prefill
//! chunks are split into pieces of at most `w + 1` positions (attention of a
//! query does not depend on later keys, so the result is the same); a longer
//! rollback is an error.

use half::f16;

use crate::error::{Error, Result};
use crate::kernels::fast::{AttnCall, KvRows};

/// The number format of stored keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    F32,
    #[default]
    F16,
}

impl KvDtype {
    /// Bytes of one stored value.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// The format named by the environment variable `ATTN_KV_TYPE` (`f16`,
    /// `f32`), else f16.
    pub fn from_env() -> Result<KvDtype> {
        match std::env::var("ATTN_KV_TYPE") {
            Ok(s) if !s.is_empty() => s.parse(),
            _ => Ok(KvDtype::default()),
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            _ => Err(Error::config("kv cache type", format!("`{s}` is not one of f16, f32"))),
        }
    }
}

/// A stored key/value element and the row kernels that read it as f32.
pub trait KvElem: Copy + Default + Send + Sync + 'static {
    fn from_f32(x: f32) -> Self;
    /// `q · row`.
    fn dot(q: &[f32], row: &[Self]) -> f32;
    /// `y += a * row`.
    fn axpy(a: f32, row: &[Self], y: &mut [f32]);
    /// `out[j] = qs[j] · row` for the `out.len()` query rows of `qs` (`d`
    /// apart), each with exactly the sums of [`KvElem::dot`]; a format may
    /// widen `row` once for all of them.
    #[inline]
    fn dot_many(qs: &[f32], d: usize, row: &[Self], out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = Self::dot(&qs[j * d..(j + 1) * d], row);
        }
    }
    /// `ys[j] += a[j] * row` for the `a.len()` rows of `ys` (`stride` apart,
    /// `row.len()` wide), each as [`KvElem::axpy`] computes it.
    #[inline]
    fn axpy_many(a: &[f32], row: &[Self], ys: &mut [f32], stride: usize) {
        let w = row.len();
        for (j, &aj) in a.iter().enumerate() {
            Self::axpy(aj, row, &mut ys[j * stride..j * stride + w]);
        }
    }
    /// `dst = row` as f32.
    fn widen(row: &[Self], dst: &mut [f32]);
    /// `dst = src` in this format (round to nearest even).
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl KvElem for f32 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline]
    fn dot(q: &[f32], row: &[f32]) -> f32 {
        crate::kernels::fast::dot(q, row)
    }
    #[inline]
    fn axpy(a: f32, row: &[f32], y: &mut [f32]) {
        for (yi, xi) in y.iter_mut().zip(row) {
            *yi += a * xi;
        }
    }
    #[inline]
    fn widen(row: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(row);
    }
    #[inline]
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

/// Whether this CPU converts f16 in hardware (AVX2 + FMA + F16C), detected once.
#[inline]
pub fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F16C: OnceLock<bool> = OnceLock::new();
        *F16C.get_or_init(|| {
            std::env::var("ATTN_KV_KERNEL").as_deref() != Ok("portable")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl KvElem for f16 {
    #[inline]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline]
    fn dot(q: &[f32], row: &[f16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: the CPU has the features (checked above).
            return unsafe { f16c::dot(q, row) };
        }
        dot_f16_portable(q, row)
    }
    #[inline]
    fn axpy(a: f32, row: &[f16], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: as above.
            return unsafe { f16c::axpy(a, row, y) };
        }
        axpy_f16_portable(a, row, y)
    }
    #[inline]
    fn dot_many(qs: &[f32], d: usize, row: &[f16], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() && out.len() <= f16c::MAX_GROUP && d == row.len() {
            // SAFETY: as above.
            return unsafe { f16c::dot_many(qs, d, row, out) };
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = Self::dot(&qs[j * d..(j + 1) * d], row);
        }
    }
    #[inline]
    fn axpy_many(a: &[f32], row: &[f16], ys: &mut [f32], stride: usize) {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: as above.
            return unsafe { f16c::axpy_many(a, row, ys, stride) };
        }
        let w = row.len();
        for (j, &aj) in a.iter().enumerate() {
            Self::axpy(aj, row, &mut ys[j * stride..j * stride + w]);
        }
    }
    #[inline]
    fn widen(row: &[f16], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_f16c() {
            // SAFETY: as above.
            return unsafe { f16c::widen(row, dst) };
        }
        for (d, s) in dst.iter_mut().zip(row) {
            *d = s.to_f32();
        }
    }
    #[inline]
    fn narrow(src: &[f32], dst: &mut [f16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(*s);
        }
    }
}

/// `q · row` widening eight values at a time (the f32 [`crate::kernels::fast::dot`]
/// on each chunk's conversion).
pub fn dot_f16_portable(q: &[f32], row: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let (cq, cr) = (q.chunks_exact(8), row.chunks_exact(8));
    let (rq, rr) = (cq.remainder(), cr.remainder());
    for (x, y) in cq.zip(cr) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in rq.iter().zip(rr) {
        s += x * y.to_f32();
    }
    s
}

/// `y += a * row` with each value widened.
pub fn axpy_f16_portable(a: f32, row: &[f16], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(row) {
        *yi += a * xi.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod f16c {
    //! AVX2 + FMA + F16C row kernels (`vcvtph2ps` widens eight halves).
    use half::f16;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(q: &[f32], row: &[f16]) -> f32 {
        let n = q.len().min(row.len());
        let (qp, rp) = (q.as_ptr(), row.as_ptr());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load8(rp.add(i)), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), load8(rp.add(i + 8)), a1);
            i += 16;
        }
        if i + 8 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load8(rp.add(i)), a0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(a0, a1));
        while i < n {
            s += q[i] * row[i].to_f32();
            i += 1;
        }
        s
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy(a: f32, row: &[f16], y: &mut [f32]) {
        let n = y.len().min(row.len());
        let (rp, yp) = (row.as_ptr(), y.as_mut_ptr());
        let av = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let r = _mm256_fmadd_ps(av, load8(rp.add(i)), _mm256_loadu_ps(yp.add(i)));
            _mm256_storeu_ps(yp.add(i), r);
            i += 8;
        }
        while i < n {
            y[i] += a * row[i].to_f32();
            i += 1;
        }
    }

    /// Query heads [`dot_many`] takes at once (its accumulators stay in
    /// registers).
    pub const MAX_GROUP: usize = 8;

    /// [`dot`] of each of the `out.len()` (at most [`MAX_GROUP`]) rows of
    /// `qs` (`d` apart, `d == row.len()`) with `row`, widening each 8 values
    /// of `row` once: per row the same accumulators, order and tail as
    /// [`dot`], so the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_many(qs: &[f32], d: usize, row: &[f16], out: &mut [f32]) {
        let g = out.len();
        assert!(g <= MAX_GROUP && row.len() == d && qs.len() >= g * d);
        let (qp, rp) = (qs.as_ptr(), row.as_ptr());
        let mut a0 = [_mm256_setzero_ps(); MAX_GROUP];
        let mut a1 = [_mm256_setzero_ps(); MAX_GROUP];
        let mut i = 0;
        while i + 16 <= d {
            let (r0, r1) = (load8(rp.add(i)), load8(rp.add(i + 8)));
            for j in 0..g {
                let q = qp.add(j * d + i);
                a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q), r0, a0[j]);
                a1[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(8)), r1, a1[j]);
            }
            i += 16;
        }
        if i + 8 <= d {
            let r0 = load8(rp.add(i));
            for j in 0..g {
                a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(j * d + i)), r0, a0[j]);
            }
            i += 8;
        }
        for j in 0..g {
            let mut s = hsum(_mm256_add_ps(a0[j], a1[j]));
            for t in i..d {
                s += qs[j * d + t] * row[t].to_f32();
            }
            out[j] = s;
        }
    }

    /// [`axpy`] of `row` into each of the `a.len()` rows of `ys` (`stride`
    /// apart), widening each 8 values of `row` once: every element gets the
    /// same single multiply-add as in [`axpy`], so the same bits.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_many(a: &[f32], row: &[f16], ys: &mut [f32], stride: usize) {
        let (n, g) = (row.len(), a.len());
        if g == 0 {
            return;
        }
        assert!(ys.len() >= (g - 1) * stride + n);
        let (rp, yp) = (row.as_ptr(), ys.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let r = load8(rp.add(i));
            for (j, &aj) in a.iter().enumerate() {
                let y = yp.add(j * stride + i);
                _mm256_storeu_ps(y, _mm256_fmadd_ps(_mm256_set1_ps(aj), r, _mm256_loadu_ps(y)));
            }
            i += 8;
        }
        for t in i..n {
            let v = row[t].to_f32();
            for (j, &aj) in a.iter().enumerate() {
                ys[j * stride + t] += aj * v;
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen(row: &[f16], dst: &mut [f32]) {
        let n = dst.len().min(row.len());
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), load8(row.as_ptr().add(i)));
            i += 8;
        }
        while i < n {
            dst[i] = row[i].to_f32();
            i += 1;
        }
    }
}

/// Stored keys or values in either format.
#[derive(Debug, Clone)]
pub enum KvBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl KvBuf {
    pub fn new(dtype: KvDtype) -> Self {
        Self::zeros(dtype, 0)
    }

    pub fn zeros(dtype: KvDtype, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => KvBuf::F32(vec![0.0; n]),
            KvDtype::F16 => KvBuf::F16(vec![f16::ZERO; n]),
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self {
            KvBuf::F32(_) => KvDtype::F32,
            KvBuf::F16(_) => KvDtype::F16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            KvBuf::F32(v) => v.len(),
            KvBuf::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Grows (zero-filled) or shrinks to `n` values.
    pub fn resize(&mut self, n: usize) {
        match self {
            KvBuf::F32(v) => v.resize(n, 0.0),
            KvBuf::F16(v) => v.resize(n, f16::ZERO),
        }
    }

    /// Stores `src` at `at..at + src.len()`.
    #[inline]
    pub fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            KvBuf::F32(v) => f32::narrow(src, &mut v[at..at + src.len()]),
            KvBuf::F16(v) => f16::narrow(src, &mut v[at..at + src.len()]),
        }
    }

    /// Values `at..at + dst.len()` as f32.
    pub fn read(&self, at: usize, dst: &mut [f32]) {
        match self {
            KvBuf::F32(v) => f32::widen(&v[at..at + dst.len()], dst),
            KvBuf::F16(v) => f16::widen(&v[at..at + dst.len()], dst),
        }
    }

    pub fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize) {
        match self {
            KvBuf::F32(v) => v.copy_within(src, dst),
            KvBuf::F16(v) => v.copy_within(src, dst),
        }
    }
}

/// Keys and values of one layer of one sequence, contiguous and
/// token-major: position `p`, kv head `g` at `(slot(p) * n_kv_heads + g) *
/// head_dim`, where `slot(p) = p` for a global layer and `p % (2 * window)`
/// for a sliding-window layer (a ring, see the module docs).
#[derive(Debug, Clone)]
pub struct RawKv {
    k: KvBuf,
    v: KvBuf,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    window: Option<usize>,
    /// Positions kept (`2 * window`), or every one.
    ring: Option<usize>,
    len: usize,
    /// The oldest position whose slot has not been written over.
    oldest: usize,
}

impl Default for RawKv {
    fn default() -> Self {
        RawKv::new(0, 0, None, KvDtype::default())
    }
}

impl RawKv {
    pub fn new(n_kv_heads: usize, head_dim: usize, window: Option<usize>, dtype: KvDtype) -> Self {
        let ring = window.map(|w| 2 * w);
        RawKv { k: KvBuf::new(dtype), v: KvBuf::new(dtype), n_kv_heads, head_dim, window, ring, len: 0, oldest: 0 }
    }

    /// A cache that attends within `window` but keeps every position (no
    /// ring): the plain reference the ring is tested against.
    pub fn new_full(n_kv_heads: usize, head_dim: usize, window: Option<usize>, dtype: KvDtype) -> Self {
        RawKv { ring: None, ..Self::new(n_kv_heads, head_dim, window, dtype) }
    }

    /// Positions stored so far (the position of the next one).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> KvDtype {
        self.k.dtype()
    }

    pub fn window(&self) -> Option<usize> {
        self.window
    }

    /// Positions the ring holds (sliding-window layers).
    pub fn ring(&self) -> Option<usize> {
        self.ring
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * self.dtype().size()
    }

    fn width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    #[inline]
    fn slot(&self, pos: usize) -> usize {
        match self.ring() {
            Some(r) => pos % r,
            None => pos,
        }
    }

    /// The oldest position still stored.
    pub fn oldest(&self) -> usize {
        self.oldest
    }

    /// Forgets positions from `len` on (a rollback). A sliding-window layer
    /// can go back only while the window before `len` is still in its ring.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.check_truncate(len)?;
        if len >= self.len {
            return Ok(());
        }
        if len == 0 {
            self.oldest = 0;
        }
        if self.ring.is_none() {
            self.k.resize(len * self.width());
            self.v.resize(len * self.width());
        }
        self.len = len;
        Ok(())
    }

    /// Whether [`RawKv::truncate`] to `len` would succeed.
    pub fn check_truncate(&self, len: usize) -> Result<()> {
        // Back to nothing needs nothing.
        if len >= self.len || len == 0 {
            return Ok(());
        }
        if let (Some(w), Some(_)) = (self.window, self.ring) {
            // The next query (at `len`) reads back to `len + 1 - w`.
            if (len + 1).saturating_sub(w) < self.oldest() {
                return Err(Error::input(
                    "kv cache",
                    format!(
                        "cannot roll back from {} to {len} positions: this sliding-window layer keeps only positions {}.. ({} back at most)",
                        self.len,
                        self.oldest(),
                        w + 1
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Appends `[t, n_kv_heads, head_dim]` keys and values (f32, stored in
    /// the cache's format). A sliding-window layer keeps the last `2w`.
    pub fn append(&mut self, k: &[f32], v: &[f32]) {
        let w = self.width();
        if w == 0 {
            return;
        }
        let t = k.len() / w;
        let need = match self.ring() {
            Some(r) => (self.len + t).min(r),
            None => self.len + t,
        };
        if self.k.len() < need * w {
            self.k.resize(need * w);
            self.v.resize(need * w);
        }
        for i in 0..t {
            let o = self.slot(self.len + i) * w;
            self.k.write(o, &k[i * w..(i + 1) * w]);
            self.v.write(o, &v[i * w..(i + 1) * w]);
        }
        self.len += t;
        if let Some(r) = self.ring() {
            self.oldest = self.oldest.max(self.len.saturating_sub(r));
        }
    }

    /// Stores `k`, `v` (`[t, n_kv_heads, head_dim]`) of the next `t`
    /// positions and attends `q` (`[t, n_heads, head_dim]`) to them and the
    /// past, causally and within the layer's window, into `out`. Chunks
    /// longer than the ring allows go in pieces.
    #[allow(clippy::too_many_arguments)]
    pub fn append_and_attend(
        &mut self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        call: &AttnCall,
        out: &mut [f32],
    ) -> Result<()> {
        let w = self.width();
        if (call.n_kv_heads, call.head_dim) != (self.n_kv_heads, self.head_dim)
            || k.len() != t * w
            || v.len() != k.len()
        {
            return Err(Error::input("kv cache", "keys do not match the cache's heads"));
        }
        if call.window != self.window {
            return Err(Error::input("kv cache", "the call's sliding window is not the cache's"));
        }
        let qw = call.n_heads * call.head_dim;
        if q.len() != t * qw || out.len() != q.len() {
            return Err(Error::input("kv cache", "queries do not match the keys"));
        }
        // Most new positions one piece may write: the ring keeps
        // `ring - piece` older ones, and the piece's first query needs `w - 1`.
        let piece = match (self.window, self.ring) {
            (Some(win), Some(_)) => win + 1,
            _ => t.max(1),
        };
        let mut i = 0;
        while i < t {
            let n = piece.min(t - i);
            let past = self.len;
            self.append(&k[i * w..(i + n) * w], &v[i * w..(i + n) * w]);
            let c = AttnCall { past, ..*call };
            self.attend(&q[i * qw..(i + n) * qw], n, &c, &mut out[i * qw..(i + n) * qw])?;
            i += n;
        }
        Ok(())
    }

    fn attend(&self, q: &[f32], t: usize, call: &AttnCall, out: &mut [f32]) -> Result<()> {
        let (w, d, ring) = (self.width(), self.head_dim, self.ring().unwrap_or(usize::MAX));
        match (&self.k, &self.v) {
            (KvBuf::F32(k), KvBuf::F32(v)) => {
                crate::kernels::fast::attend(q, t, call, &RawRows { k, v, w, d, ring }, out)
            }
            (KvBuf::F16(k), KvBuf::F16(v)) => {
                crate::kernels::fast::attend(q, t, call, &RawRows { k, v, w, d, ring }, out)
            }
            _ => Err(Error::input("kv cache", "keys and values stored in different formats")),
        }
    }
}

/// A contiguous (or ring) layer read by the attention kernel.
struct RawRows<'a, E> {
    k: &'a [E],
    v: &'a [E],
    /// Values per position, head size, ring length (`usize::MAX`: none).
    w: usize,
    d: usize,
    ring: usize,
}

impl<E: KvElem> KvRows for RawRows<'_, E> {
    type Elem = E;

    #[inline]
    fn key(&self, pos: usize, g: usize) -> &[E] {
        let o = (pos % self.ring) * self.w + g * self.d;
        &self.k[o..o + self.d]
    }

    #[inline]
    fn value(&self, pos: usize, g: usize) -> &[E] {
        let o = (pos % self.ring) * self.w + g * self.d;
        &self.v[o..o + self.d]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::SdpaOptions;
    use rand::{Rng, SeedableRng};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect()
    }

    fn round_f16(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
    }

    /// Both f16 row kernels (F16C and portable) against f32 arithmetic on
    /// the widened values, for lengths with and without a tail.
    #[test]
    fn f16_row_kernels_match_f32_on_rounded_values() {
        for n in [1, 7, 8, 15, 16, 17, 64, 256, 259] {
            let q = rand_vec(n, n as u64);
            let r32 = round_f16(&rand_vec(n, 100 + n as u64));
            let r16: Vec<f16> = r32.iter().map(|&v| f16::from_f32(v)).collect();
            let want: f64 = q.iter().zip(&r32).map(|(a, b)| *a as f64 * *b as f64).sum();
            let tol = 1e-5 * (n as f64).sqrt() * 4.0;
            assert!((f16::dot(&q, &r16) as f64 - want).abs() < tol, "n {n}");
            assert!((dot_f16_portable(&q, &r16) as f64 - want).abs() < tol, "n {n}");
            let mut y1 = q.clone();
            let mut y2 = q.clone();
            f16::axpy(0.37, &r16, &mut y1);
            axpy_f16_portable(0.37, &r16, &mut y2);
            for j in 0..n {
                let want = q[j] + 0.37 * r32[j];
                assert!((y1[j] - want).abs() < 1e-6 && (y2[j] - want).abs() < 1e-6);
            }
            let mut wide = vec![0f32; n];
            f16::widen(&r16, &mut wide);
            assert_eq!(wide, r32);
        }
        assert_eq!("F16".parse::<KvDtype>().unwrap(), KvDtype::F16);
        assert!("q4".parse::<KvDtype>().is_err());
    }

    fn call(window: Option<usize>, past: usize) -> AttnCall {
        AttnCall {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            past,
            sdpa: SdpaOptions { scale: 0.25, softcap: Some(20.0) },
            window,
        }
    }

    /// An f16 cache attends exactly as an f32 cache holding the f16-rounded
    /// keys and values (decode rows and blocked prefill).
    /// The grouped row kernels give each head exactly the bits of the
    /// per-head ones (head sizes with and without a tail, 1 to 8 heads).
    #[test]
    fn grouped_dot_and_axpy_equal_per_head_calls() {
        for d in [8, 24, 64, 70, 128] {
            let row: Vec<f16> = (0..d).map(|i| f16::from_f32(((i * 29 % 17) as f32 - 8.0) * 0.37)).collect();
            for g in 1..=8 {
                let qs: Vec<f32> = (0..g * d).map(|i| ((i * 13 % 23) as f32 - 11.0) * 0.11).collect();
                let mut got = vec![0f32; g];
                f16::dot_many(&qs, d, &row, &mut got);
                for j in 0..g {
                    assert_eq!(
                        got[j].to_bits(),
                        f16::dot(&qs[j * d..(j + 1) * d], &row).to_bits(),
                        "d {d} g {g} head {j}"
                    );
                }
                let a: Vec<f32> = (0..g).map(|j| 0.3 - 0.1 * j as f32).collect();
                let stride = d + 2;
                let mut ys: Vec<f32> = (0..g * stride).map(|i| (i % 7) as f32 * 0.5).collect();
                let mut want = ys.clone();
                f16::axpy_many(&a, &row, &mut ys, stride);
                for j in 0..g {
                    f16::axpy(a[j], &row, &mut want[j * stride..j * stride + d]);
                }
                assert!(ys.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "axpy d {d} g {g}");
            }
        }
    }

    #[test]
    fn f16_cache_equals_f32_attention_on_rounded_kv() {
        let (kvw, qw) = (2 * 16, 4 * 16);
        for (chunks, window) in [(vec![5usize, 1, 60, 1], None), (vec![70, 3, 1], Some(9))] {
            let mut c16 = RawKv::new(2, 16, window, KvDtype::F16);
            let mut c32 = RawKv::new(2, 16, window, KvDtype::F32);
            for (ci, &t) in chunks.iter().enumerate() {
                let q = rand_vec(t * qw, ci as u64);
                let (k, v) = (rand_vec(t * kvw, 10 + ci as u64), rand_vec(t * kvw, 20 + ci as u64));
                let (mut o16, mut o32) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                c16.append_and_attend(&q, &k, &v, t, &call(window, 0), &mut o16).unwrap();
                c32.append_and_attend(&q, &round_f16(&k), &round_f16(&v), t, &call(window, 0), &mut o32).unwrap();
                let diff = o16.iter().zip(&o32).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 2e-5, "chunk {ci} ({t} tokens), window {window:?}: {diff}");
            }
            assert_eq!(c16.bytes() * 2, c32.bytes());
        }
    }

    /// A sliding-window ring gives what a full cache gives, for chunks
    /// longer than the window, decode steps and rollbacks; it holds 2w
    /// positions; a rollback past what it keeps is an error.
    #[test]
    fn window_ring_equals_full_cache() {
        let (kvw, qw, win) = (2 * 16, 4 * 16, 7);
        let mut ring = RawKv::new(2, 16, Some(win), KvDtype::F32);
        let mut full = RawKv::new(2, 16, None, KvDtype::F32);
        let mut seed = 0;
        let mut step = |ring: &mut RawKv, full: &mut RawKv, t: usize| {
            seed += 1;
            let q = rand_vec(t * qw, seed);
            let (k, v) = (rand_vec(t * kvw, 1000 + seed), rand_vec(t * kvw, 2000 + seed));
            let (mut a, mut b) = (vec![0f32; q.len()], vec![0f32; q.len()]);
            ring.append_and_attend(&q, &k, &v, t, &call(Some(win), 0), &mut a).unwrap();
            // The full cache attends within the same window, in one piece.
            let past = full.len();
            full.append(&k, &v);
            full.attend(&q, t, &call(Some(win), past), &mut b).unwrap();
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "{t} tokens at {past}: {diff}");
        };
        for t in [3, 20, 1, 1, 60, 8, 1, 2] {
            step(&mut ring, &mut full, t);
        }
        assert_eq!(ring.len(), full.len());
        assert_eq!(ring.bytes(), 2 * (2 * win) * kvw * 4, "K and V, 2w positions each");
        // Roll back 8 = w + 1 positions: allowed, and the results still match.
        let to = ring.len() - (win + 1);
        ring.truncate(to).unwrap();
        full.truncate(to).unwrap();
        for t in [1, 4, 30] {
            step(&mut ring, &mut full, t);
        }
        // One more is past what the ring keeps; so is a second rollback
        // into slots the first one's replacements wrote over.
        let e = ring.truncate(ring.len() - (win + 2)).unwrap_err();
        assert!(e.to_string().contains("cannot roll back"), "{e}");
        // Back to empty always works, and the ring starts over.
        let mut reset = ring.clone();
        reset.truncate(0).unwrap();
        assert_eq!((reset.len(), reset.oldest()), (0, 0));
        let mut twice = RawKv::new(2, 16, Some(win), KvDtype::F32);
        twice.append(&rand_vec(40 * kvw, 1), &rand_vec(40 * kvw, 2));
        twice.truncate(40 - (win + 1)).unwrap();
        let e = twice.truncate(40 - 2 * (win + 1)).unwrap_err();
        assert!(e.to_string().contains("cannot roll back"), "{e}");
        // A short sequence can roll back anywhere.
        let mut short = RawKv::new(2, 16, Some(win), KvDtype::F16);
        short.append(&rand_vec(10 * kvw, 1), &rand_vec(10 * kvw, 2));
        short.truncate(0).unwrap();
    }
}
