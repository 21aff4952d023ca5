//! The scheduler of continuous (in-flight) batching: at every step, which
//! sequences run and how many of their tokens.
//!
//! Running sequences go first, oldest first: a decoding sequence needs one
//! token, a sequence still prefilling gets a chunk of its prompt of at most
//! what is left of the step's token budget (chunked prefill, so a long prompt
//! never stalls the decodes around it). Then waiting sequences are admitted
//! in arrival order while the budget, the sequence limit and the KV pool
//! allow, each starting after whatever its prompt found in the prefix cache.
//! When the pool cannot give a running sequence its next block, the youngest
//! running sequence is preempted: its blocks are released and it goes back to
//! the head of the queue, to be recomputed (its tokens so far become its
//! prompt; the prefix cache usually still holds most of them).

use std::collections::{HashMap, VecDeque};

use attn_nn::{Error, PagedCache, Result};

use crate::block_manager::BlockManager;

pub type SeqId = u64;

/// Limits of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences in the running batch at once.
    pub max_num_seqs: usize,
    /// Tokens one forward call may process (decodes count one each).
    pub max_batched_tokens: usize,
    /// Prefill chunk of sequences that need every position's logits
    /// (prompt logprobs): those logits are `chunk x vocab` floats.
    pub max_logits_chunk: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { max_num_seqs: 64, max_batched_tokens: 512, max_logits_chunk: 32 }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_num_seqs == 0 {
            return Err(Error::config("max_num_seqs", "must be at least 1"));
        }
        if self.max_batched_tokens < self.max_num_seqs {
            return Err(Error::config(
                "max_batched_tokens",
                format!(
                    "{} is below max_num_seqs {}: every running sequence needs a token per step",
                    self.max_batched_tokens, self.max_num_seqs
                ),
            ));
        }
        if self.max_logits_chunk == 0 {
            return Err(Error::config("max_logits_chunk", "must be at least 1"));
        }
        Ok(())
    }
}

/// What the scheduler needs to know of a sequence.
pub trait Schedulable {
    /// Prompt plus generated tokens: what the cache must end up holding.
    fn tokens(&self) -> &[u32];
    fn cache(&self) -> &PagedCache;
    fn cache_mut(&mut self) -> &mut PagedCache;
    /// Needs every position's logits (no prefix caching, small chunks).
    fn wants_all_logits(&self) -> bool;
    /// Sequences it will fork into after its prefill (n > 1), counted
    /// against the sequence limit at admission.
    fn fork_count(&self) -> usize {
        0
    }
}

/// The plan of one step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Sequences to run with how many of their pending tokens.
    pub batch: Vec<(SeqId, usize)>,
    /// Block copies to make before the forward call (copy-on-write).
    pub copies: Vec<(u32, u32)>,
    /// Sequences moved back to the queue this step.
    pub preempted: Vec<SeqId>,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Scheduler { cfg, ..Default::default() })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn add(&mut self, id: SeqId) {
        self.waiting.push_back(id);
    }

    /// A sequence forked from a running one runs from the next step on.
    pub fn add_running(&mut self, id: SeqId) {
        self.running.push(id);
    }

    /// Forgets a finished or aborted sequence (its blocks are the caller's to free).
    pub fn remove(&mut self, id: SeqId) {
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    fn chunk<S: Schedulable>(&self, s: &S, budget: usize) -> usize {
        let pending = s.tokens().len() - s.cache().len();
        let cap = if s.wants_all_logits() { self.cfg.max_logits_chunk } else { usize::MAX };
        pending.min(budget).min(cap)
    }

    fn preempt<S: Schedulable>(&mut self, id: SeqId, seqs: &mut HashMap<SeqId, S>, bm: &mut BlockManager) {
        if let Some(s) = seqs.get_mut(&id) {
            let c = s.cache_mut();
            bm.free(c.block_table());
            c.block_table_mut().clear();
            // Cannot fail: 0 is within any table.
            let _ = c.set_len(0);
        }
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
        self.preemptions += 1;
    }

    /// Plans the next step and reserves the KV blocks it writes.
    pub fn schedule<S: Schedulable>(&mut self, seqs: &mut HashMap<SeqId, S>, bm: &mut BlockManager) -> Schedule {
        let mut plan = Schedule::default();
        let mut budget = self.cfg.max_batched_tokens;
        // Decodes first (one token each), then prefill chunks from what is
        // left, so a long prompt never stalls the sequences already talking.
        self.running.retain(|id| seqs.contains_key(id));
        let pending = |s: &S| s.tokens().len() - s.cache().len();
        let (decodes, prefills): (Vec<SeqId>, Vec<SeqId>) =
            self.running.iter().partition(|id| seqs.get(id).is_some_and(|s| pending(s) == 1));
        for id in decodes.into_iter().chain(prefills) {
            if !self.running.contains(&id) {
                continue; // preempted earlier in this step
            }
            let s = &seqs[&id];
            let n = self.chunk(s, budget);
            if n == 0 {
                continue;
            }
            let len = s.cache().len();
            loop {
                let s = seqs.get_mut(&id).expect("running sequences exist");
                if bm.reserve(s.cache_mut().block_table_mut(), len, len + n, &mut plan.copies).is_ok() {
                    plan.batch.push((id, n));
                    budget -= n;
                    break;
                }
                // Out of blocks: make room by preempting the youngest.
                let victim = *self.running.last().expect("`id` is running");
                plan.preempted.push(victim);
                if let Some(at) = plan.batch.iter().position(|&(b, _)| b == victim) {
                    budget += plan.batch.remove(at).1;
                }
                self.preempt(victim, seqs, bm);
                if victim == id {
                    break;
                }
            }
        }
        // Nothing new joins while sequences are being pushed out.
        if !plan.preempted.is_empty() {
            return plan;
        }
        while budget > 0 {
            let Some(&id) = self.waiting.front() else { break };
            let Some(s) = seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if self.running.len() + 1 + s.fork_count() > self.cfg.max_num_seqs && !self.running.is_empty() {
                break;
            }
            if s.cache().is_empty() && s.cache().block_table().is_empty() && !s.wants_all_logits() {
                let hit = bm.lookup_prefix(s.tokens());
                let c = s.cache_mut();
                let cached = hit.len() * bm.block_size();
                *c.block_table_mut() = hit;
                let _ = c.set_len(cached);
            }
            let n = self.chunk(s, budget);
            let len = s.cache().len();
            if bm.reserve(s.cache_mut().block_table_mut(), len, len + n, &mut plan.copies).is_err() {
                // Give the prefix hits back; try again when blocks free up.
                let c = s.cache_mut();
                bm.free(c.block_table());
                c.block_table_mut().clear();
                let _ = c.set_len(0);
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            plan.batch.push((id, n));
            budget -= n;
        }
        plan
    }
}
