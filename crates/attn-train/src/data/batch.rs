//! Batches by token budget with length bucketing, and a loader thread that
//! prepares them ahead of the trainer.
//!
//! An epoch's batches are a pure function of (seed, epoch): examples are
//! shuffled, sorted by length within pools of a few thousand (so a batch
//! holds similar lengths and little padding), cut into batches whose padded
//! size stays within the token budget, and the batch order is shuffled
//! again. The position of the next batch (epoch, index) is the data cursor
//! a checkpoint stores.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use attn_nn::{Error, Result};

/// Tokenized examples of one split.
#[derive(Debug, Clone)]
pub enum Examples {
    /// Language modelling windows of `seq_len + 1` tokens.
    Lm(Vec<Vec<u32>>),
    /// Source ids (ending in EOS) and target ids (`BOS ... EOS`).
    Pairs(Vec<(Vec<u32>, Vec<u32>)>),
    /// Token ids and a class label.
    Labeled(Vec<(Vec<u32>, u32)>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Lm(v) => v.len(),
            Examples::Pairs(v) => v.len(),
            Examples::Labeled(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The padded width this example needs.
    fn width(&self, i: usize) -> usize {
        match self {
            Examples::Lm(v) => v[i].len(),
            Examples::Pairs(v) => v[i].0.len().max(v[i].1.len()),
            Examples::Labeled(v) => v[i].0.len(),
        }
    }

    /// Real (non-padding) tokens of example `i`.
    fn tokens(&self, i: usize) -> usize {
        match self {
            Examples::Lm(v) => v[i].len(),
            Examples::Pairs(v) => v[i].0.len() + v[i].1.len(),
            Examples::Labeled(v) => v[i].0.len(),
        }
    }
}

/// Right-padded rows (pad id 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Padded {
    pub ids: Vec<u32>,
    pub rows: usize,
    pub cols: usize,
    pub lengths: Vec<usize>,
}

impl Padded {
    fn new(rows: &[&[u32]]) -> Self {
        let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0u32; rows.len() * cols];
        for (i, r) in rows.iter().enumerate() {
            ids[i * cols..i * cols + r.len()].copy_from_slice(r);
        }
        Padded { ids, rows: rows.len(), cols, lengths: rows.iter().map(|r| r.len()).collect() }
    }
}

impl Padded {
    /// Rows `range`, re-padded to their own widest row.
    fn rows(&self, range: std::ops::Range<usize>) -> Padded {
        let rows: Vec<&[u32]> = range.map(|i| &self.ids[i * self.cols..i * self.cols + self.lengths[i]]).collect();
        Padded::new(&rows)
    }
}

/// Where the next batch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    pub epoch: usize,
    pub batch: usize,
}

#[derive(Debug, Clone)]
pub struct Batch {
    /// This batch's position.
    pub at: Cursor,
    /// The position after it.
    pub next: Cursor,
    /// LM windows, translation sources, or classification inputs.
    pub a: Padded,
    /// Translation targets.
    pub b: Option<Padded>,
    pub labels: Vec<u32>,
    pub real_tokens: usize,
    pub padded_tokens: usize,
}

impl Batch {
    /// Shard `index` of `count` for data parallelism: a contiguous run of
    /// rows (the first shards one row longer when the rows do not divide),
    /// re-padded to its own widest row; `None` when it gets no rows.
    pub fn shard(&self, index: usize, count: usize) -> Option<Batch> {
        if count <= 1 {
            return Some(self.clone());
        }
        let range = attn_dist::split_even(self.a.rows, count, 1).into_iter().nth(index)?;
        if range.is_empty() {
            return None;
        }
        let a = self.a.rows(range.clone());
        let b = self.b.as_ref().map(|b| b.rows(range.clone()));
        let labels = if self.labels.is_empty() { Vec::new() } else { self.labels[range.clone()].to_vec() };
        let real_tokens = a.lengths.iter().sum::<usize>() + b.as_ref().map_or(0, |b| b.lengths.iter().sum::<usize>());
        let padded_tokens = a.ids.len() + b.as_ref().map_or(0, |b| b.ids.len());
        Some(Batch { at: self.at, next: self.next, a, b, labels, real_tokens, padded_tokens })
    }
}

/// Indices of each batch of an epoch. With `shuffle` (training) the plan
/// depends on (seed, epoch); without it (evaluation) examples are taken in
/// length order.
pub fn plan_epoch(
    ex: &Examples,
    seed: u64,
    epoch: usize,
    budget: usize,
    max_rows: usize,
    shuffle: bool,
) -> Vec<Vec<usize>> {
    let n = ex.len();
    let mut order: Vec<usize> = (0..n).collect();
    const POOL: usize = 4096;
    if shuffle {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(attn_nn::rng::derive(&[seed, epoch as u64, 1])));
        for pool in order.chunks_mut(POOL) {
            pool.sort_by_key(|&i| ex.width(i));
        }
    } else {
        order.sort_by_key(|&i| ex.width(i));
    }
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut widest = 0;
    for i in order {
        let w = ex.width(i).min(budget);
        let full = (cur.len() + 1) * widest.max(w) > budget || (max_rows > 0 && cur.len() == max_rows);
        if !cur.is_empty() && full {
            batches.push(std::mem::take(&mut cur));
            widest = 0;
        }
        widest = widest.max(w);
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    if shuffle {
        batches.shuffle(&mut ChaCha8Rng::seed_from_u64(attn_nn::rng::derive(&[seed, epoch as u64, 2])));
    }
    batches
}

/// Share of padded positions over a plan.
pub fn padding_fraction(ex: &Examples, plan: &[Vec<usize>]) -> f64 {
    let (mut real, mut total) = (0usize, 0usize);
    for b in plan {
        let bt = make_batch(ex, b, Cursor::default(), Cursor::default());
        real += bt.real_tokens;
        total += bt.padded_tokens;
    }
    if total == 0 {
        0.0
    } else {
        1.0 - real as f64 / total as f64
    }
}

pub fn make_batch(ex: &Examples, idx: &[usize], at: Cursor, next: Cursor) -> Batch {
    let real_tokens = idx.iter().map(|&i| ex.tokens(i)).sum();
    match ex {
        Examples::Lm(v) => {
            let a = Padded::new(&idx.iter().map(|&i| v[i].as_slice()).collect::<Vec<_>>());
            let padded_tokens = a.ids.len();
            Batch { at, next, a, b: None, labels: vec![], real_tokens, padded_tokens }
        }
        Examples::Pairs(v) => {
            let a = Padded::new(&idx.iter().map(|&i| v[i].0.as_slice()).collect::<Vec<_>>());
            let b = Padded::new(&idx.iter().map(|&i| v[i].1.as_slice()).collect::<Vec<_>>());
            let padded_tokens = a.ids.len() + b.ids.len();
            Batch { at, next, a, b: Some(b), labels: vec![], real_tokens, padded_tokens }
        }
        Examples::Labeled(v) => {
            let a = Padded::new(&idx.iter().map(|&i| v[i].0.as_slice()).collect::<Vec<_>>());
            let padded_tokens = a.ids.len();
            let labels = idx.iter().map(|&i| v[i].1).collect();
            Batch { at, next, a, b: None, labels, real_tokens, padded_tokens }
        }
    }
}

/// Training batches from a cursor on, prepared on a background thread.
pub struct Loader {
    rx: Receiver<Batch>,
    handle: Option<JoinHandle<()>>,
    /// Total time the trainer spent waiting for a batch.
    pub waited: Duration,
}

impl Loader {
    pub fn start(
        ex: Arc<Examples>,
        seed: u64,
        budget: usize,
        max_rows: usize,
        from: Cursor,
        capacity: usize,
    ) -> Result<Self> {
        if ex.is_empty() {
            return Err(Error::input("loader", "the training split is empty"));
        }
        let (tx, rx) = sync_channel(capacity.max(1));
        let handle = std::thread::Builder::new()
            .name("attn-loader".into())
            .spawn(move || {
                let mut epoch = from.epoch;
                let mut start = from.batch;
                loop {
                    let plan = plan_epoch(&ex, seed, epoch, budget, max_rows, true);
                    for (i, idx) in plan.iter().enumerate().skip(start) {
                        let next = if i + 1 < plan.len() {
                            Cursor { epoch, batch: i + 1 }
                        } else {
                            Cursor { epoch: epoch + 1, batch: 0 }
                        };
                        if tx.send(make_batch(&ex, idx, Cursor { epoch, batch: i }, next)).is_err() {
                            return; // the trainer is gone
                        }
                    }
                    epoch += 1;
                    start = 0;
                }
            })
            .map_err(|e| Error::input("loader", format!("cannot start the loader thread: {e}")))?;
        Ok(Loader { rx, handle: Some(handle), waited: Duration::ZERO })
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        let t = Instant::now();
        let b = self.rx.recv().map_err(|_| Error::input("loader", "the loader thread stopped"))?;
        self.waited += t.elapsed();
        Ok(b)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Unblock the thread (its send fails once the receiver is gone).
        let (_, dummy) = sync_channel(0);
        let rx = std::mem::replace(&mut self.rx, dummy);
        drop(rx);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(n: usize) -> Examples {
        Examples::Pairs((0..n).map(|i| (vec![5; 1 + i % 17], vec![6; 2 + (i * 7) % 13])).collect())
    }

    #[test]
    fn batches_respect_the_budget_and_cover_the_epoch_once() {
        let ex = pairs(500);
        let plan = plan_epoch(&ex, 1, 0, 64, 0, true);
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..500).collect::<Vec<_>>());
        for b in &plan {
            let w = b.iter().map(|&i| ex.width(i)).max().unwrap();
            assert!(b.len() * w <= 64, "{} rows of {w}", b.len());
        }
        assert_eq!(plan, plan_epoch(&ex, 1, 0, 64, 0, true));
        assert_ne!(plan, plan_epoch(&ex, 1, 1, 64, 0, true));
        // Bucketing keeps padding low compared with random batches.
        assert!(padding_fraction(&ex, &plan) < 0.35, "{}", padding_fraction(&ex, &plan));
    }

    #[test]
    fn loader_resumes_from_a_cursor() {
        let ex = Arc::new(pairs(300));
        let mut full = Loader::start(ex.clone(), 9, 80, 0, Cursor::default(), 4).unwrap();
        let all: Vec<Batch> = (0..60).map(|_| full.next_batch().unwrap()).collect();
        let mut resumed = Loader::start(ex, 9, 80, 0, all[37].at, 4).unwrap();
        for b in &all[37..] {
            let r = resumed.next_batch().unwrap();
            assert_eq!((r.at, &r.a, &r.b), (b.at, &b.a, &b.b));
        }
        assert!(all.iter().any(|b| b.at.epoch == 1), "60 batches span two epochs");
    }
}
