//! Serving a model split over MPI ranks (`mpirun -np N attn serve
//! --tensor-parallel ...`): rank 0 runs HTTP, the scheduler and the block
//! manager as in one process; before each step it broadcasts what the
//! step does (block copies, then each sequence's new tokens, block table
//! and cached length), and every other rank replays it on its own part of
//! the model and its own KV pool (the same block numbers, its own heads or
//! layers). The model's collectives inside the forward pass keep the ranks
//! in step; continuous batching, prefix caching and the paged cache work
//! unchanged.

use std::sync::Arc;

use attn_dist::Comm;
use attn_models::{LanguageModel, Logits, PagedLanguageModel, SeqStep};
use attn_nn::{Error, KvPool, KvShape, PagedCache, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Step {
    /// The pool every rank allocates (rank 0's engine sizes it).
    Start {
        block_size: usize,
        num_blocks: usize,
    },
    Copy(Vec<(u32, u32)>),
    Forward {
        all: bool,
        seqs: Vec<SeqPlan>,
    },
    Stop,
}

#[derive(Debug, Serialize, Deserialize)]
struct SeqPlan {
    tokens: Vec<u32>,
    table: Vec<u32>,
    len: usize,
}

fn send(comm: &dyn attn_dist::Collective, step: &Step) {
    let mut bytes = serde_json::to_vec(step).unwrap_or_default();
    comm.broadcast(&mut bytes, 0);
}

/// Rank 0's model: each step is announced to the other ranks before it
/// runs here.
pub struct Leader<M> {
    model: M,
    comm: Comm,
}

impl<M> Leader<M> {
    /// Tells the other ranks the pool to allocate (rank 0's engine config)
    /// and wraps rank 0's part of the model.
    pub fn new(model: M, comm: Comm, block_size: usize, num_blocks: usize) -> Self {
        send(&*comm, &Step::Start { block_size, num_blocks });
        Leader { model, comm }
    }
}

impl<M> Drop for Leader<M> {
    fn drop(&mut self) {
        send(&*self.comm, &Step::Stop);
    }
}

impl<M: LanguageModel> LanguageModel for Leader<M> {
    type Cache = M::Cache;
    fn new_cache(&self) -> Result<M::Cache> {
        self.model.new_cache()
    }
    fn vocab_size(&self) -> usize {
        self.model.vocab_size()
    }
    fn context_length(&self) -> usize {
        self.model.context_length()
    }
    fn forward(&self, _: &mut [SeqStep<'_, M::Cache>], _: Logits) -> Result<Vec<Tensor>> {
        Err(Error::input("serve", "a model split over ranks serves through the paged cache only"))
    }
}

impl<M: PagedLanguageModel> PagedLanguageModel for Leader<M> {
    fn kv_shape(&self) -> KvShape {
        self.model.kv_shape()
    }

    fn forward_paged(&self, batch: &mut [SeqStep<'_, PagedCache>], logits: Logits) -> Result<Vec<Tensor>> {
        let seqs = batch
            .iter()
            .map(|s| SeqPlan { tokens: s.tokens.to_vec(), table: s.cache.block_table().to_vec(), len: s.cache.len() })
            .collect();
        send(&*self.comm, &Step::Forward { all: logits == Logits::All, seqs });
        self.model.forward_paged(batch, logits)
    }

    fn copy_blocks(&self, pool: &KvPool, copies: &[(u32, u32)]) -> Result<()> {
        send(&*self.comm, &Step::Copy(copies.to_vec()));
        self.model.copy_blocks(pool, copies)
    }
}

/// A rank other than 0: replays rank 0's steps on its part of the model
/// until rank 0 stops. A step that fails here failed on rank 0 too (same
/// inputs, same checks) and is answered there.
pub fn follow<M: PagedLanguageModel>(model: &M, comm: &dyn attn_dist::Collective) -> Result<()> {
    let recv = || -> Result<Step> {
        let mut bytes = Vec::new();
        comm.broadcast(&mut bytes, 0);
        serde_json::from_slice(&bytes).map_err(|e| Error::input("serve", format!("rank 0's step: {e}")))
    };
    let pool = match recv()? {
        Step::Start { block_size, num_blocks } => Arc::new(KvPool::new(model.kv_shape(), block_size, num_blocks)?),
        Step::Stop => return Ok(()),
        other => return Err(Error::input("serve", format!("rank 0 began with {other:?}, not the pool"))),
    };
    loop {
        match recv()? {
            Step::Stop => return Ok(()),
            Step::Start { .. } => return Err(Error::input("serve", "rank 0 started a second model")),
            Step::Copy(copies) => model.copy_blocks(&pool, &copies)?,
            Step::Forward { all, seqs } => {
                let mut caches = Vec::with_capacity(seqs.len());
                for s in &seqs {
                    let mut c = PagedCache::new(pool.clone());
                    *c.block_table_mut() = s.table.clone();
                    c.set_len(s.len)?;
                    caches.push(c);
                }
                let mut steps: Vec<SeqStep<'_, PagedCache>> =
                    seqs.iter().zip(caches.iter_mut()).map(|(s, c)| SeqStep { tokens: &s.tokens, cache: c }).collect();
                let mode = if all { Logits::All } else { Logits::Last };
                if let Err(e) = model.forward_paged(&mut steps, mode) {
                    eprintln!("rank {}: a step failed (as on rank 0): {e}", comm.rank());
                }
            }
        }
    }
}
