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
//! Layout of one layer's keys (values alike), in the pool's number format
//! ([`KvDtype`], f16 by default): `[block][kv_head][slot][head_dim]`, so one
//! head's positions within a block are contiguous and a query streams
//! through them.
//!
//! Attention is the one kernel of [`crate::kernels::fast::attend`], reading the
//! blocks in place through [`KvRows`] (never gathered into a tensor) and
//! widening f16 rows to f32 as it reads them.
//!
//! Sliding windows. All layers of a sequence share one block table, so a
//! block can be given back only when it lies fully outside the window of
//! *every* layer: [`KvShape::window`] is that common window (`None` as soon
//! as one layer is global, as in Gemma 3, whose global layers read every
//! position). The engine's block manager then releases such blocks and
//! leaves [`FREED_BLOCK`] in their place in the table, so positions keep
//! their block index; the kernel never reads below a query's window, and
//! writing into or rolling back onto a freed block is an error. Keeping one
//! table (rather than one table per group of layers with the same window,
//! as vLLM's hybrid allocator does) keeps the block manager's prefix
//! caching, copy-on-write and preemption unchanged; what it gives up is the
//! window saving for models that mix global and sliding layers, whose
//! sliding layers still take pool blocks for every position. Their
//! contiguous caches ([`crate::kv::RawKv`]) do keep only the window.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Tensor};

use crate::kernels::fast::{AttnCall, KvRows};
use crate::kv::{KvBuf, KvDtype, KvElem};

use crate::attention::SdpaOptions;
use crate::error::{Error, Result};

/// What a model stores per position: `n_layers` x (K, V) x `n_kv_heads` x
/// `head_dim` values of `dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: KvDtype,
    /// The sliding window every layer attends within (`None`: at least one
    /// layer sees every position). Blocks fully outside it can be freed.
    pub window: Option<usize>,
}

impl KvShape {
    /// A shape of f16 values with no common window.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        KvShape { n_layers, n_kv_heads, head_dim, dtype: KvDtype::default(), window: None }
    }

    /// Bytes of K and V for one position across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_dim * self.dtype.size()
    }
}

/// What a block table holds in place of a block given back to the pool
/// because it lies outside the window of every layer.
pub const FREED_BLOCK: u32 = u32::MAX;

/// How one attention layer attends: score options and an optional sliding window.
#[derive(Debug, Clone, Copy)]
pub struct AttendSpec {
    pub sdpa: SdpaOptions,
    /// A query at position `i` sees keys `j` with `i - window < j <= i`.
    pub window: Option<usize>,
}

struct LayerBlocks {
    k: KvBuf,
    v: KvBuf,
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
            .map(|_| {
                Mutex::new(LayerBlocks {
                    k: KvBuf::zeros(shape.dtype, per_layer),
                    v: KvBuf::zeros(shape.dtype, per_layer),
                })
            })
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
        let mut k = vec![0f32; h * len * d];
        let mut v = vec![0f32; h * len * d];
        for head in 0..h {
            for p in 0..len {
                let b = table[p / self.block_size];
                if b == FREED_BLOCK {
                    return Err(Error::input("paged kv", format!("position {p} is in a freed block")));
                }
                let o = self.offset(b, head, p % self.block_size);
                let dst = (head * len + p) * d;
                l.k.read(o, &mut k[dst..dst + d]);
                l.v.read(o, &mut v[dst..dst + d]);
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
        if let Some(b) = table.iter().find(|&&b| b != FREED_BLOCK && b as usize >= self.num_blocks) {
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
        let dtype = q.dtype();
        // Token-major f32 slices for the one kernel, and back.
        let flat = |x: &Tensor| -> Result<Vec<f32>> {
            Ok(x.to_dtype(DType::F32)?.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (qv, kv, vv) = (flat(q)?, flat(k)?, flat(v)?);
        let call = AttnCall { n_heads, n_kv_heads: kv_heads, head_dim: d, past, sdpa: spec.sdpa, window: spec.window };
        let mut out = vec![0f32; qv.len()];
        self.write_and_attend_slices(layer, table, &qv, &kv, &vv, t, &call, &mut out)?;
        let out = Tensor::from_vec(out, (1, t, n_heads, d), q.device())?.transpose(1, 2)?.contiguous()?;
        Ok(out.to_dtype(dtype)?)
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
        if call.window == Some(0) {
            return Err(Error::input("paged attention", "sliding window must be at least 1"));
        }
        let total = call.past + t;
        self.check_table(table, total)?;
        // Every block the call reads or writes must still be there.
        let first = call.window.map_or(0, |w| (call.past + 1).saturating_sub(w));
        if total > first {
            if let Some(i) =
                (first / self.block_size..total.div_ceil(self.block_size)).find(|&i| table[i] == FREED_BLOCK)
            {
                return Err(Error::input(
                    "paged attention",
                    format!(
                        "block {i} of the table (positions from {}) was freed: it is outside the window",
                        i * self.block_size
                    ),
                ));
            }
        }
        let mut l = self.layer(layer)?;
        for i in 0..t {
            let p = call.past + i;
            for g in 0..kvh {
                let o = self.offset(table[p / self.block_size], g, p % self.block_size);
                let src = (i * kvh + g) * d;
                l.k.write(o, &k[src..src + d]);
                l.v.write(o, &v[src..src + d]);
            }
        }
        let l = &*l;
        let (bs, hd) = (self.block_size, d);
        match (&l.k, &l.v) {
            (KvBuf::F32(k), KvBuf::F32(v)) => {
                crate::kernels::fast::attend(q, t, call, &PagedRows { pool: self, k, v, table, bs, hd }, out)
            }
            (KvBuf::F16(k), KvBuf::F16(v)) => {
                crate::kernels::fast::attend(q, t, call, &PagedRows { pool: self, k, v, table, bs, hd }, out)
            }
            _ => Err(Error::input("paged kv", "keys and values stored in different formats")),
        }
    }
}

/// One sequence's keys and values in the pool, read through its block table.
struct PagedRows<'a, E> {
    pool: &'a KvPool,
    k: &'a [E],
    v: &'a [E],
    table: &'a [u32],
    bs: usize,
    hd: usize,
}

impl<E: KvElem> KvRows for PagedRows<'_, E> {
    type Elem = E;

    #[inline]
    fn key(&self, pos: usize, g: usize) -> &[E] {
        let o = self.pool.offset(self.table[pos / self.bs], g, pos % self.bs);
        &self.k[o..o + self.hd]
    }

    #[inline]
    fn value(&self, pos: usize, g: usize) -> &[E] {
        let o = self.pool.offset(self.table[pos / self.bs], g, pos % self.bs);
        &self.v[o..o + self.hd]
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
        // The next query (at `len`) reads back to `len + 1 - window`.
        if let Some(w) = self.pool.shape.window {
            let bs = self.pool.block_size;
            let first = (len + 1).saturating_sub(w);
            if len > first && self.table[first / bs..len.div_ceil(bs)].contains(&FREED_BLOCK) {
                return Err(Error::input(
                    "paged kv",
                    format!(
                        "cannot roll back from {} to {len} positions: blocks inside the sliding window of {w} were freed",
                        self.len
                    ),
                ));
            }
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
            for dtype in [KvDtype::F32, KvDtype::F16] {
                let d = if chunks[0] == 20 { 256 } else { 16 };
                let shape = KvShape { dtype, ..KvShape::new(2, n_kv, d) };
                let pool = Arc::new(KvPool::new(shape, block_size, 32).unwrap());
                let mut paged = PagedCache::new(pool.clone());
                // Deliberately out of order, not starting at 0.
                paged.block_table_mut().extend([7u32, 3, 12, 0, 31, 5, 9, 20, 1, 2, 4, 6, 8, 10, 11, 13]);
                let mut contiguous = ContiguousKvCache::new();
                let opts = SdpaOptions { scale: 0.25, softcap };
                let spec = AttendSpec { sdpa: opts, window };
                let mut seed = 0;
                for &chunk in &chunks {
                    seed += 1;
                    let q = rand((1, n_heads, chunk, d), seed * 3);
                    let k = rand((1, n_kv, chunk, d), seed * 3 + 1);
                    let v = rand((1, n_kv, chunk, d), seed * 3 + 2);
                    let got = paged.attend(1, &q, &k, &v, &spec).unwrap();
                    paged.commit(chunk).unwrap();
                    // An f16 pool attends as f32 attention on f16-rounded keys and values.
                    let round = |x: &Tensor| match dtype {
                        KvDtype::F32 => x.clone(),
                        KvDtype::F16 => x.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap(),
                    };
                    let (k, v) = (round(&k), round(&v));
                    let (ka, va) = contiguous.append(&k, &v).unwrap();
                    let mask = causal_mask(chunk, ka.dims()[2], window, &Device::Cpu).unwrap();
                    let want = scaled_dot_product_attention(&q, &ka, &va, Some(&mask), opts, None).unwrap();
                    let diff = max_diff(&got, &want);
                    assert!(diff < 1e-5, "{dtype:?} heads {n_heads}/{n_kv} window {window:?} chunk {chunk}: {diff}");
                }
                // The stored keys read back through the table are the appended ones.
                let (k, _) = pool.gather(1, paged.block_table(), paged.len()).unwrap();
                assert_eq!(max_diff(&k, contiguous.keys().unwrap()), 0.0);
            }
        }
    }

    #[test]
    fn copy_block_and_bad_tables() {
        let shape = KvShape { dtype: KvDtype::F32, ..KvShape::new(1, 1, 4) };
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

    /// Freed blocks (outside a window every layer shares) are never read;
    /// writing into one, or rolling back onto one, is an error.
    #[test]
    fn freed_blocks_outside_the_window() {
        let shape = KvShape { window: Some(5), ..KvShape::new(1, 1, 8) };
        let pool = Arc::new(KvPool::new(shape, 4, 8).unwrap());
        let mut c = PagedCache::new(pool.clone());
        c.block_table_mut().extend([0u32, 1, 2, 3]);
        let spec = AttendSpec { sdpa: SdpaOptions { scale: 0.3, softcap: None }, window: Some(5) };
        let (q, k, v) = (rand((1, 2, 12, 8), 1), rand((1, 1, 12, 8), 2), rand((1, 1, 12, 8), 3));
        c.attend(0, &q, &k, &v, &spec).unwrap();
        c.commit(12).unwrap();
        // Position 12's query reads 8..=12: blocks 0 and 1 are outside.
        c.block_table_mut()[0] = FREED_BLOCK;
        c.block_table_mut()[1] = FREED_BLOCK;
        let (q1, k1, v1) = (rand((1, 2, 1, 8), 4), rand((1, 1, 1, 8), 5), rand((1, 1, 1, 8), 6));
        let got = c.attend(0, &q1, &k1, &v1, &spec).unwrap();
        c.commit(1).unwrap();
        let mut full = PagedCache::new(pool.clone());
        full.block_table_mut().extend([4u32, 5, 6, 7]);
        full.attend(0, &q, &k, &v, &spec).unwrap();
        full.commit(12).unwrap();
        let want = full.attend(0, &q1, &k1, &v1, &spec).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
        // Back to 9: position 9 reads 5..=9, in block 1, which is gone.
        let e = c.set_len(9).unwrap_err();
        assert!(e.to_string().contains("cannot roll back"), "{e}");
        c.set_len(12).unwrap();
        // A 5-position window read from position 4 on needs block 0.
        let mut bad = PagedCache::new(pool);
        bad.block_table_mut().extend([FREED_BLOCK, 1]);
        bad.set_len(3).unwrap_err();
        let e = bad.attend(0, &q1, &k1, &v1, &spec).unwrap_err();
        assert!(e.to_string().contains("was freed"), "{e}");
    }
}
