//! The block manager: which KV blocks of the pool belong to which sequence.
//!
//! Blocks are reference-counted. A block that is full and whose contents
//! are known (the tokens of the whole prefix up to its end) gets a hash
//! chained from its predecessor's, so two sequences whose prompts start
//! with the same full blocks find and share them (prefix caching). A block
//! nobody references keeps its hash and its contents until it is needed for
//! something else (least recently released first), so a later request with
//! the same prefix can still hit it. Writing into a block that another
//! sequence also references copies it first (copy-on-write; it happens when
//! forked sequences append their first own token to a shared partial block).
//!
//! When every layer of the model attends within a sliding window
//! (`KvShape::window`), blocks that fall fully before the window of a
//! sequence's next position are released as the sequence advances
//! ([`BlockManager::release_outside_window`]) and marked [`FREED_BLOCK`] in its
//! table; a long sequence then holds about `window / block_size + 1` blocks.
//! Released blocks keep their prefix hash like any other, so a later prompt
//! with the same prefix can still find them. Models that mix global and
//! sliding layers (Gemma 3) keep every block: their global layers read
//! every position (see `attn_nn::paged`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use attn_nn::{Error, Result, FREED_BLOCK};

/// The pool has no free block left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSpace;

/// Counters for the metrics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    pub num_blocks: usize,
    /// Referenced by at least one sequence.
    pub used: usize,
    /// Not referenced, holding a cached prefix that may still be hit.
    pub cached_free: usize,
    /// Prompt tokens looked up in the prefix cache, and found.
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    pub copy_on_write: u64,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    refs: u32,
    hash: Option<u64>,
    /// When it was last released (for least-recently-used eviction).
    released: u64,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    meta: Vec<Meta>,
    /// Never used or evicted: no contents worth keeping.
    free: VecDeque<u32>,
    /// Unreferenced but hashed, by release time.
    evictable: BTreeMap<u64, u32>,
    by_hash: HashMap<u64, u32>,
    clock: u64,
    stats: BlockStats,
}

/// The hash of a full block given its predecessor's and its tokens.
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockManager {
            block_size,
            meta: vec![Meta { refs: 0, hash: None, released: 0 }; num_blocks],
            free: (0..num_blocks as u32).collect(),
            evictable: BTreeMap::new(),
            by_hash: HashMap::new(),
            clock: 0,
            stats: BlockStats { num_blocks, ..BlockStats::default() },
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    pub fn stats(&self) -> BlockStats {
        BlockStats { used: self.meta.len() - self.available(), cached_free: self.evictable.len(), ..self.stats }
    }

    /// Blocks needed to hold `len` positions.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    fn take_block(&mut self) -> std::result::Result<u32, NoSpace> {
        let b = if let Some(b) = self.free.pop_front() {
            b
        } else {
            let (&t, &b) = self.evictable.iter().next().ok_or(NoSpace)?;
            self.evictable.remove(&t);
            if let Some(h) = self.meta[b as usize].hash.take() {
                if self.by_hash.get(&h) == Some(&b) {
                    self.by_hash.remove(&h);
                }
            }
            b
        };
        self.meta[b as usize].refs = 1;
        Ok(b)
    }

    fn retain(&mut self, b: u32) {
        let m = &mut self.meta[b as usize];
        if m.refs == 0 {
            self.evictable.remove(&m.released);
        }
        m.refs += 1;
    }

    /// Finds the longest run of `tokens`' full blocks in the prefix cache,
    /// takes a reference to each and returns them. At least one token is
    /// always left uncached, so the caller computes the last prompt
    /// position's logits itself.
    pub fn lookup_prefix(&mut self, tokens: &[u32]) -> Vec<u32> {
        let mut found = Vec::new();
        let mut parent = 0u64;
        let usable = tokens.len().saturating_sub(1) / self.block_size;
        for chunk in tokens.chunks_exact(self.block_size).take(usable) {
            parent = chain(parent, chunk);
            match self.by_hash.get(&parent) {
                Some(&b) => found.push(b),
                None => break,
            }
        }
        for &b in &found {
            self.retain(b);
        }
        self.stats.prefix_queries += tokens.len() as u64;
        self.stats.prefix_hits += (found.len() * self.block_size) as u64;
        found
    }

    /// Makes `table` hold positions `0..len_after`, writable from `len` on:
    /// appends fresh blocks, and copies the block holding position `len` if
    /// another sequence shares it. Copies to perform on the pool are pushed
    /// to `copies` as `(src, dst)`. On failure nothing is changed.
    pub fn reserve(
        &mut self,
        table: &mut Vec<u32>,
        len: usize,
        len_after: usize,
        copies: &mut Vec<(u32, u32)>,
    ) -> std::result::Result<(), NoSpace> {
        let need = self.blocks_for(len_after).saturating_sub(table.len());
        let cow = len_after > len
            && len % self.block_size != 0
            && table.get(len / self.block_size).is_some_and(|&b| b != FREED_BLOCK && self.meta[b as usize].refs > 1);
        if need + usize::from(cow) > self.available() {
            return Err(NoSpace);
        }
        if cow {
            let i = len / self.block_size;
            let old = table[i];
            let new = self.take_block()?;
            self.release(old);
            table[i] = new;
            copies.push((old, new));
            self.stats.copy_on_write += 1;
        }
        for _ in 0..need {
            table.push(self.take_block()?);
        }
        Ok(())
    }

    /// Registers the full blocks of `table` holding `tokens[..computed]` in
    /// the prefix cache (those not registered yet).
    pub fn register_full_blocks(&mut self, table: &[u32], tokens: &[u32], computed: usize) {
        let full = (computed / self.block_size).min(table.len());
        let mut parent = 0u64;
        for (i, chunk) in tokens[..full * self.block_size].chunks_exact(self.block_size).enumerate() {
            parent = chain(parent, chunk);
            let b = table[i];
            if b == FREED_BLOCK {
                continue;
            }
            let m = &mut self.meta[b as usize];
            if m.hash == Some(parent) {
                continue;
            }
            if m.hash.is_none() && !self.by_hash.contains_key(&parent) {
                m.hash = Some(parent);
                self.by_hash.insert(parent, b);
            }
        }
    }

    /// Drops one reference to each block of `table`.
    pub fn free(&mut self, table: &[u32]) {
        // The end of a sequence is released first, so the start of a shared
        // prefix, needed by every later hit, is evicted last.
        for &b in table.iter().rev().filter(|&&b| b != FREED_BLOCK) {
            self.release(b);
        }
    }

    /// Releases the blocks of `table` that hold only positions before
    /// `keep_from` (the first position the sequence's next query can see)
    /// and marks them [`FREED_BLOCK`]. Returns how many were released.
    pub fn release_outside_window(&mut self, table: &mut [u32], keep_from: usize) -> usize {
        let mut n = 0;
        for b in table.iter_mut().take(keep_from / self.block_size) {
            if *b != FREED_BLOCK {
                self.release(*b);
                *b = FREED_BLOCK;
                n += 1;
            }
        }
        n
    }

    fn release(&mut self, b: u32) {
        self.clock += 1;
        let clock = self.clock;
        let m = &mut self.meta[b as usize];
        if m.refs == 0 {
            return;
        }
        m.refs -= 1;
        if m.refs > 0 {
            return;
        }
        if m.hash.is_some() {
            m.released = clock;
            self.evictable.insert(clock, b);
        } else {
            self.free.push_back(b);
        }
    }

    /// Adds a reference to every block of `table` (forking a sequence).
    pub fn fork(&mut self, table: &[u32]) {
        for &b in table.iter().filter(|&&b| b != FREED_BLOCK) {
            self.retain(b);
        }
    }

    /// Checks the bookkeeping against the tables of the live sequences.
    pub fn check(&self, tables: &[&[u32]]) -> Result<()> {
        let mut refs = vec![0u32; self.meta.len()];
        for t in tables {
            for &b in t.iter().filter(|&&b| b != FREED_BLOCK) {
                refs[b as usize] += 1;
            }
        }
        for (b, m) in self.meta.iter().enumerate() {
            if m.refs != refs[b] {
                return Err(Error::input(
                    "block manager",
                    format!("block {b} has {} refs, tables hold {}", m.refs, refs[b]),
                ));
            }
        }
        let unreferenced = refs.iter().filter(|&&r| r == 0).count();
        if unreferenced != self.available() {
            return Err(Error::input(
                "block manager",
                format!("{unreferenced} unreferenced blocks but {} available", self.available()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_sharing_eviction_and_copy_on_write() {
        let mut bm = BlockManager::new(6, 4);
        let prompt: Vec<u32> = (0..10).collect();
        // A first sequence: nothing cached, 3 blocks for 10 tokens.
        let mut a = bm.lookup_prefix(&prompt);
        assert!(a.is_empty());
        let mut copies = Vec::new();
        bm.reserve(&mut a, 0, 10, &mut copies).unwrap();
        assert_eq!(a.len(), 3);
        bm.register_full_blocks(&a, &prompt, 10);
        // Same 10-token prompt: the two full blocks are shared.
        let mut b = bm.lookup_prefix(&prompt);
        assert_eq!(b, a[..2]);
        bm.reserve(&mut b, 8, 10, &mut copies).unwrap();
        assert_eq!(bm.stats().used, 4);
        assert_eq!((bm.stats().prefix_queries, bm.stats().prefix_hits), (20, 8));
        bm.check(&[&a, &b]).unwrap();

        // A fork shares the partial third block; its first write copies it.
        let mut c = a.clone();
        bm.fork(&c);
        bm.reserve(&mut c, 10, 11, &mut copies).unwrap();
        assert_eq!(copies, vec![(a[2], c[2])]);
        assert_ne!(a[2], c[2]);
        assert_eq!(c[..2], a[..2]);
        assert_eq!(bm.stats().copy_on_write, 1);
        bm.check(&[&a, &b, &c]).unwrap();

        // Out of blocks: an error that changes nothing.
        let mut d = Vec::new();
        assert_eq!(bm.reserve(&mut d, 0, 9, &mut copies), Err(NoSpace));
        assert!(d.is_empty());
        bm.check(&[&a, &b, &c]).unwrap();

        // Released prefix blocks stay cached until the space is needed.
        bm.free(&a);
        bm.free(&b);
        bm.free(&c);
        bm.check(&[]).unwrap();
        assert_eq!(bm.stats().cached_free, 2);
        let again = bm.lookup_prefix(&prompt);
        assert_eq!(again.len(), 2, "hit after release");
        bm.free(&again);
        // Taking every block evicts the cached ones.
        let mut all = Vec::new();
        bm.reserve(&mut all, 0, 24, &mut copies).unwrap();
        assert_eq!(bm.available(), 0);
        bm.free(&all);
        assert!(bm.lookup_prefix(&prompt).is_empty(), "evicted");
        bm.check(&[]).unwrap();
    }

    /// Blocks before a sliding window go back to the pool; forks, frees and
    /// prefix hits skip the holes; released blocks can still be hit.
    #[test]
    fn blocks_outside_the_window_return_to_the_pool() {
        let mut bm = BlockManager::new(8, 4);
        let tokens: Vec<u32> = (0..20).collect();
        let mut a = Vec::new();
        bm.reserve(&mut a, 0, 20, &mut Vec::new()).unwrap();
        bm.register_full_blocks(&a, &tokens, 20);
        assert_eq!(bm.available(), 3);
        // Window 6 at length 20: the next query sees 15.., so blocks 0-2
        // (positions 0..12) go; block 3 (12..16) stays.
        let first = a.clone();
        assert_eq!(bm.release_outside_window(&mut a, 20 + 1 - 6), 3);
        assert_eq!(&a[..3], &[FREED_BLOCK; 3]);
        assert_eq!(bm.available(), 6);
        assert_eq!(bm.release_outside_window(&mut a, 15), 0, "idempotent");
        bm.check(&[&a]).unwrap();
        let mut c = a.clone();
        bm.fork(&c);
        bm.check(&[&a, &c]).unwrap();
        bm.reserve(&mut c, 20, 24, &mut Vec::new()).unwrap();
        bm.register_full_blocks(&c, &(0..24).collect::<Vec<u32>>(), 24);
        bm.free(&c);
        bm.check(&[&a]).unwrap();
        // The released prefix blocks are still in the prefix cache.
        let hit = bm.lookup_prefix(&tokens);
        assert_eq!(hit, first[..4]);
        bm.free(&hit);
        bm.free(&a);
        bm.check(&[]).unwrap();
        assert_eq!(bm.available(), 8);
    }

    #[test]
    fn a_fully_cached_prompt_leaves_its_last_token_to_compute() {
        let mut bm = BlockManager::new(4, 4);
        let prompt: Vec<u32> = (0..8).collect();
        let mut a = Vec::new();
        bm.reserve(&mut a, 0, 8, &mut Vec::new()).unwrap();
        bm.register_full_blocks(&a, &prompt, 8);
        // Both blocks are cached, but only the first is used: the last
        // token must run to produce logits, so its block is computed anew.
        assert_eq!(bm.lookup_prefix(&prompt), a[..1]);
        // A different second block is a miss after the shared first.
        let other: Vec<u32> = (0..4).chain(10..15).collect();
        assert_eq!(bm.lookup_prefix(&other), a[..1]);
    }
}
