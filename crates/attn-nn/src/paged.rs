//! Paged KV storage and the attention that reads through a block table
//! (PagedAttention).
//!
//! Keys and values of every sequence live in one pool of fixed-size blocks
//! of `block_size` positions. A sequence owns a *block table*: position `p`
//! is slot `p % block_size` of block `table[p / block_size]`. Blocks need not
//! be adjacent, so memory is handed out a block at a time instead of a whole
//! context per sequence, and sequences with a common prefix can share the
//! prefix's blocks. Which block belongs to whom, reference counts, prefix
//! hashing and copy-on-write are the engine's block manager's business; this
//! module only stores and reads.
//!
//! Layout of one layer's keys (values alike), f32:
//! `[block][kv_head][slot][head_dim]`, so one head's positions within a
//! block are contiguous and a query streams through them.
//!
//! The attention kernel never gathers the cache into a contiguous tensor:
//! for each query head and query position it walks the visible positions
//! (causal, optionally within a sliding window) through the block table,
//! computes the scores, softmaxes them in f32 and accumulates the values.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::kernels::fast::{AttnCall, KvRows};

use crate::attention::SdpaOptions;
use crate::error::{Error, Result};

/// What a model stores per position: `n_layers` x (K, V) x `n_kv_heads` x `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Bytes of K and V for one position across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

/// How one attention layer attends: score options and an optional sliding window.
#[derive(Debug, Clone, Copy)]
pub struct AttendSpec {
    pub sdpa: SdpaOptions,
    /// A query at position `i` sees keys `j` with `i - window < j <= i`.
    pub window: Option<usize>,
}

struct LayerBlocks {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The block pool: every layer's keys and values for `num_blocks` blocks.
pub struct KvPool {
    shape: KvShape,
    block_size: usize,
    num_blocks: usize,
    layers: Vec<Mutex<LayerBlocks>>,
}

impl std::fmt::Debug for KvPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPool")
            .field("shape", &self.shape)
            .field("block_size", &self.block_size)
            .field("num_blocks", &self.num_blocks)
            .finish()
    }
}

impl KvPool {
    /// A pool of `num_blocks` blocks of `block_size` positions.
    pub fn new(shape: KvShape, block_size: usize, num_blocks: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::config("kv cache", "block size and block count must be at least 1"));
        }
        if shape.n_layers == 0 || shape.n_kv_heads == 0 || shape.head_dim == 0 {
            return Err(Error::config("kv cache", format!("empty KV shape {shape:?}")));
        }
        let per_layer = num_blocks
            .checked_mul(shape.n_kv_heads * block_size * shape.head_dim)
            .ok_or_else(|| Error::config("kv cache", "pool size overflows"))?;
        // Zeroed allocations come from fresh pages: the OS commits them on first write.
        let layers = (0..shape.n_layers)
            .map(|_| Mutex::new(LayerBlocks { k: vec![0.0; per_layer], v: vec![0.0; per_layer] }))
            .collect();
        Ok(KvPool { shape, block_size, num_blocks, layers })
    }

    /// The number of blocks that fit in `bytes` (at least one is needed).
    pub fn blocks_for_bytes(shape: KvShape, block_size: usize, bytes: u64) -> usize {
        let per_block = (shape.bytes_per_token() * block_size) as u64;
        (bytes / per_block.max(1)) as usize
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn layer(&self, i: usize) -> Result<MutexGuard<'_, LayerBlocks>> {
        let l = self.layers.get(i).ok_or_else(|| Error::input("paged kv", format!("layer {i} out of range")))?;
        // A panic while holding the lock cannot leave a half-written block
        // that anyone trusts: the sequence being written is dropped with it.
        Ok(l.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Copies block `src` into block `dst` in every layer (copy-on-write).
    pub fn copy_block(&self, src: u32, dst: u32) -> Result<()> {
        let n = self.block_elems();
        let (s, d) = (src as usize, dst as usize);
        if s >= self.num_blocks || d >= self.num_blocks {
            return Err(Error::input("paged kv", format!("block {src} or {dst} outside the pool")));
        }
        for i in 0..self.shape.n_layers {
            let mut l = self.layer(i)?;
            l.k.copy_within(s * n..(s + 1) * n, d * n);
            l.v.copy_within(s * n..(s + 1) * n, d * n);
        }
        Ok(())
    }

    fn block_elems(&self) -> usize {
        self.shape.n_kv_heads * self.block_size * self.shape.head_dim
    }

    /// Element offset of (block, kv head, slot).
    fn offset(&self, block: u32, head: usize, slot: usize) -> usize {
        ((block as usize * self.shape.n_kv_heads + head) * self.block_size + slot) * self.shape.head_dim
    }

    /// Keys and values of positions `0..len` of `layer` gathered into
    /// `[1, n_kv_heads, len, head_dim]` tensors (tests and debugging; the
    /// attention kernel reads the blocks in place).
    pub fn gather(&self, layer: usize, table: &[u32], len: usize) -> Result<(Tensor, Tensor)> {
        self.check_table(table, len)?;
        let (h, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        let l = self.layer(layer)?;
        let mut k = Vec::with_capacity(h * len * d);
        let mut v = Vec::with_capacity(h * len * d);
        for head in 0..h {
            for p in 0..len {
                let o = self.offset(table[p / self.block_size], head, p % self.block_size);
                k.extend_from_slice(&l.k[o..o + d]);
                v.extend_from_slice(&l.v[o..o + d]);
            }
        }
        let dev = candle_core::Device::Cpu;
        Ok((Tensor::from_vec(k, (1, h, len, d), &dev)?, Tensor::from_vec(v, (1, h, len, d), &dev)?))
    }

    fn check_table(&self, table: &[u32], len: usize) -> Result<()> {
        if len > table.len() * self.block_size {
            return Err(Error::input(
                "paged kv",
                format!("{len} positions need {} blocks, the table has {}", len.div_ceil(self.block_size), table.len()),
            ));
        }
        if let Some(b) = table.iter().find(|&&b| b as usize >= self.num_blocks) {
            return Err(Error::input("paged kv", format!("block {b} outside the pool of {}", self.num_blocks)));
        }
        Ok(())
    }

    /// Writes the new keys/values (`[1, n_kv_heads, t, head_dim]`) of
    /// positions `past..past + t` of `layer`, then attends `q`
    /// (`[1, n_heads, t, head_dim]`, the queries of those positions) to
    /// positions `0..past + t`. Returns `[1, n_heads, t, head_dim]` in `q`'s dtype.
    pub fn write_and_attend(
        &self,
        layer: usize,
        table: &[u32],
        past: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        spec: &AttendSpec,
    ) -> Result<Tensor> {
        let (b, n_heads, t, d) = q.dims4()?;
        let kv_heads = self.shape.n_kv_heads;
        if b != 1 || d != self.shape.head_dim || k.dims() != [1, kv_heads, t, d] || v.dims() != k.dims() {
            return Err(Error::input(
                "paged attention",
                format!("q {:?}, k {:?}, v {:?} do not fit the pool's {:?}", q.dims(), k.dims(), v.dims(), self.shape),
            ));
        }
        if n_heads % kv_heads != 0 {
            return Err(Error::input("paged attention", format!("{kv_heads} kv heads do not divide {n_heads} heads")));
        }
        if spec.window == Some(0) {
            return Err(Error::input("paged attention", "sliding window must be at least 1"));
        }
        let total = past + t;
        self.check_table(table, total)?;
        let dtype = q.dtype();
        let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
        let (qv, kv, vv) = (flat(q)?, flat(k)?, flat(v)?);

        let mut l = self.layer(layer)?;
        for head in 0..kv_heads {
            for i in 0..t {
                let p = past + i;
                let o = self.offset(table[p / self.block_size], head, p % self.block_size);
                let src = (head * t + i) * d;
                l.k[o..o + d].copy_from_slice(&kv[src..src + d]);
                l.v[o..o + d].copy_from_slice(&vv[src..src + d]);
            }
        }
        let l = &*l;
        let group = n_heads / kv_heads;
        let mut out = vec![0f32; n_heads * t * d];
        let work = |(row, dst): (usize, &mut [f32])| {
            let (h, i) = (row / t, row % t);
            let pos = past + i;
            let lo = spec.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let qrow = &qv[row * d..(row + 1) * d];
            self.attend_row(l, table, h / group, qrow, lo, pos + 1, spec.sdpa, dst);
        };
        if n_heads * t * total >= 1 << 15 {
            out.par_chunks_mut(d).enumerate().for_each(|(row, dst)| work((row, dst)));
        } else {
            out.chunks_mut(d).enumerate().for_each(work);
        }
        Ok(Tensor::from_vec(out, (1, n_heads, t, d), q.device())?.to_dtype(dtype)?)
    }

    /// [`KvPool::write_and_attend`] on token-major slices (the fused
    /// inference path, [`crate::kernels::fast`]): `k`, `v` `[t, n_kv_heads, head_dim]`
    /// of positions `past..past + t` are written, then `q`
    /// `[t, n_heads, head_dim]` attends; `out` is `q`'s shape.
    #[allow(clippy::too_many_arguments)]
    pub fn write_and_attend_slices(
        &self,
        layer: usize,
        table: &[u32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        call: &AttnCall,
        out: &mut [f32],
    ) -> Result<()> {
        let (kvh, d) = (self.shape.n_kv_heads, self.shape.head_dim);
        if call.n_kv_heads != kvh || call.head_dim != d || k.len() != t * kvh * d || v.len() != k.len() {
            return Err(Error::input(
                "paged attention",
                format!("{} key values for {t} tokens do not fit the pool's {:?}", k.len(), self.shape),
            ));
        }
        self.check_table(table, call.past + t)?;
        let mut l = self.layer(layer)?;
        for i in 0..t {
            let p = call.past + i;
            for g in 0..kvh {
                let o = self.offset(table[p / self.block_size], g, p % self.block_size);
                let src = (i * kvh + g) * d;
                l.k[o..o + d].copy_from_slice(&k[src..src + d]);
                l.v[o..o + d].copy_from_slice(&v[src..src + d]);
            }
        }
        let rows = PagedRows { pool: self, blocks: &l, table };
        crate::kernels::fast::attend(q, t, call, &rows, out)
    }

    /// One query row over keys `lo..hi` of kv head `head`.
    #[allow(clippy::too_many_arguments)]
    fn attend_row(
        &self,
        l: &LayerBlocks,
        table: &[u32],
        head: usize,
        q: &[f32],
        lo: usize,
        hi: usize,
        opts: SdpaOptions,
        out: &mut [f32],
    ) {
        let d = q.len();
        let bs = self.block_size;
        let scale = opts.scale as f32;
        let mut scores = Vec::with_capacity(hi - lo);
        let mut p = lo;
        while p < hi {
            let (blk, slot) = (table[p / bs], p % bs);
            let n = (bs - slot).min(hi - p);
            let base = self.offset(blk, head, slot);
            for j in 0..n {
                let mut s = dot(q, &l.k[base + j * d..base + (j + 1) * d]) * scale;
                if let Some(cap) = opts.softcap {
                    let cap = cap as f32;
                    s = (s / cap).tanh() * cap;
                }
                scores.push(s);
            }
            p += n;
        }
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in &mut scores {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        out.fill(0.0);
        let mut p = lo;
        let mut si = 0;
        while p < hi {
            let (blk, slot) = (table[p / bs], p % bs);
            let n = (bs - slot).min(hi - p);
            let base = self.offset(blk, head, slot);
            for j in 0..n {
                axpy(scores[si] * inv, &l.v[base + j * d..base + (j + 1) * d], out);
                si += 1;
            }
            p += n;
        }
    }
}

/// One sequence's keys and values in the pool, read through its block table.
struct PagedRows<'a> {
    pool: &'a KvPool,
    blocks: &'a LayerBlocks,
    table: &'a [u32],
}

impl KvRows for PagedRows<'_> {
    #[inline]
    fn key(&self, pos: usize, g: usize) -> &[f32] {
        let bs = self.pool.block_size;
        let o = self.pool.offset(self.table[pos / bs], g, pos % bs);
        &self.blocks.k[o..o + self.pool.shape.head_dim]
    }

    #[inline]
    fn value(&self, pos: usize, g: usize) -> &[f32] {
        let bs = self.pool.block_size;
        let o = self.pool.offset(self.table[pos / bs], g, pos % bs);
        &self.blocks.v[o..o + self.pool.shape.head_dim]
    }
}

/// Dot product with eight independent partial sums, so the compiler can
/// keep them in one vector register.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// One sequence's view of the pool: its block table and how many positions
/// hold keys and values. The engine's block manager fills the table with
/// enough blocks before a forward call; the model writes through it.
///
/// Cloning copies the table, so both clones then name the same blocks:
/// only the block manager's reference counts make that safe.
#[derive(Debug, Clone)]
pub struct PagedCache {
    pool: Arc<KvPool>,
    table: Vec<u32>,
    len: usize,
}

impl PagedCache {
    pub fn new(pool: Arc<KvPool>) -> Self {
        PagedCache { pool, table: Vec::new(), len: 0 }
    }

    pub fn pool(&self) -> &Arc<KvPool> {
        &self.pool
    }

    pub fn block_table(&self) -> &[u32] {
        &self.table
    }

    pub fn block_table_mut(&mut self) -> &mut Vec<u32> {
        &mut self.table
    }

    /// Positions whose keys and values are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the table has room for.
    pub fn capacity(&self) -> usize {
        self.table.len() * self.pool.block_size
    }

    /// Declares the first `len` positions as stored (prefix-cache hits are
    /// stored by someone else; a rollback forgets positions).
    pub fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity() {
            return Err(Error::input("paged kv", format!("length {len} beyond the table's {} slots", self.capacity())));
        }
        self.len = len;
        Ok(())
    }

    /// Attention of `layer` for the new positions `len..len + t` (see
    /// [`KvPool::write_and_attend`]); [`PagedCache::commit`] then advances the length.
    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttendSpec) -> Result<Tensor> {
        self.pool.write_and_attend(layer, &self.table, self.len, q, k, v, spec)
    }

    /// [`KvPool::write_and_attend_slices`] for the new positions `len..len + t`
    /// (`call.past` is taken from the cache).
    pub fn attend_slices(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        call: &AttnCall,
        out: &mut [f32],
    ) -> Result<()> {
        let call = AttnCall { past: self.len, ..*call };
        self.pool.write_and_attend_slices(layer, &self.table, q, k, v, t, &call, out)
    }

    /// Every layer has stored `n` more positions.
    pub fn commit(&mut self, n: usize) -> Result<()> {
        self.set_len(self.len + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{causal_mask, scaled_dot_product_attention, ContiguousKvCache, KvCache};
    use candle_core::Device;

    fn rand(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Chunks of new tokens through scattered blocks equal standard attention
    /// over a contiguous cache, for MHA/GQA/MQA, windows and soft-capping.
    #[test]
    fn paged_attention_matches_standard_attention() {
        for (n_heads, n_kv, window, softcap, block_size, chunks) in [
            (4, 4, None, None, 4, vec![5usize, 1, 1, 7, 1, 3]),
            (4, 2, None, Some(5.0), 3, vec![5, 1, 1, 7, 1, 3]),
            (6, 1, Some(5), None, 4, vec![5, 1, 1, 7, 1, 3]),
            (2, 2, Some(1), None, 16, vec![5, 1, 1, 7, 1, 3]),
            // Large enough for the multi-threaded path, window across chunks.
            (4, 1, Some(40), None, 16, vec![100, 90, 1, 1]),
            (4, 1, Some(512), None, 16, vec![20, 1, 30]),
        ] {
            let d = if chunks[0] == 20 { 256 } else { 16 };
            let shape = KvShape { n_layers: 2, n_kv_heads: n_kv, head_dim: d };
            let pool = Arc::new(KvPool::new(shape, block_size, 32).unwrap());
            let mut paged = PagedCache::new(pool.clone());
            // Deliberately out of order, not starting at 0.
            paged.block_table_mut().extend([7u32, 3, 12, 0, 31, 5, 9, 20, 1, 2, 4, 6, 8, 10, 11, 13]);
            let mut contiguous = ContiguousKvCache::new();
            let opts = SdpaOptions { scale: 0.25, softcap };
            let spec = AttendSpec { sdpa: opts, window };
            let mut seed = 0;
            for chunk in chunks {
                seed += 1;
                let q = rand((1, n_heads, chunk, d), seed * 3);
                let k = rand((1, n_kv, chunk, d), seed * 3 + 1);
                let v = rand((1, n_kv, chunk, d), seed * 3 + 2);
                let got = paged.attend(1, &q, &k, &v, &spec).unwrap();
                paged.commit(chunk).unwrap();
                let (ka, va) = contiguous.append(&k, &v).unwrap();
                let mask = causal_mask(chunk, ka.dims()[2], window, &Device::Cpu).unwrap();
                let want = scaled_dot_product_attention(&q, &ka, &va, Some(&mask), opts, None).unwrap();
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-5, "heads {n_heads}/{n_kv} window {window:?} chunk {chunk}: {diff}");
            }
            // The stored keys read back through the table are the appended ones.
            let (k, _) = pool.gather(1, paged.block_table(), paged.len()).unwrap();
            assert_eq!(max_diff(&k, contiguous.keys().unwrap()), 0.0);
        }
    }

    #[test]
    fn copy_block_and_bad_tables() {
        let shape = KvShape { n_layers: 1, n_kv_heads: 1, head_dim: 4 };
        let pool = Arc::new(KvPool::new(shape, 2, 4).unwrap());
        let mut c = PagedCache::new(pool.clone());
        c.block_table_mut().push(0);
        let spec = AttendSpec { sdpa: SdpaOptions { scale: 1.0, softcap: None }, window: None };
        let (q, k, v) = (rand((1, 1, 2, 4), 1), rand((1, 1, 2, 4), 2), rand((1, 1, 2, 4), 3));
        c.attend(0, &q, &k, &v, &spec).unwrap();
        c.commit(2).unwrap();
        pool.copy_block(0, 3).unwrap();
        let (a, _) = pool.gather(0, &[0], 2).unwrap();
        let (b, _) = pool.gather(0, &[3], 2).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
        // A third position has no block: an error, not a write out of bounds.
        let (q1, k1, v1) = (rand((1, 1, 1, 4), 4), rand((1, 1, 1, 4), 5), rand((1, 1, 1, 4), 6));
        let e = c.attend(0, &q1, &k1, &v1, &spec).unwrap_err();
        assert!(e.to_string().contains("need 2 blocks"), "{e}");
        assert!(pool.copy_block(0, 4).is_err());
        assert!(c.commit(1).is_err());
        assert!(KvPool::new(shape, 0, 4).is_err());
        assert_eq!(KvPool::blocks_for_bytes(shape, 2, 1000), 1000 / (2 * 4 * 4 * 2));
    }
}
