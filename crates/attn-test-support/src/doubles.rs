//! Test doubles that misbehave on purpose: a model whose logits turn NaN for
//! one sequence or that stalls until released ([`Poisoned`]) and a tokenizer that blocks until released
//! ([`GatedTokenizer`]), to show that one request's failure or slowness
//! stays its own.

use std::sync::{Arc, Condvar, Mutex};

use attn_models::{LanguageModel, Logits, PagedLanguageModel, SeqStep, Tokenizer};
use attn_nn::{KvShape, PagedCache, Result};
use candle_core::Tensor;

/// Wraps a model and misbehaves for chosen sequences: one whose new tokens
/// in a step contain `poison` gets NaN logits in that step; a step in which
/// any sequence's new tokens contain the `stall` token blocks until its
/// gate opens. Every other sequence gets the wrapped model's logits.
pub struct Poisoned<M> {
    pub inner: M,
    pub poison: Option<u32>,
    pub stall: Option<(u32, Arc<Gate>)>,
}

impl<M> Poisoned<M> {
    pub fn new(inner: M, poison: u32) -> Self {
        Poisoned { inner, poison: Some(poison), stall: None }
    }

    /// Only stalls (no poison) when it sees `token`.
    pub fn stalling(inner: M, token: u32, gate: Arc<Gate>) -> Self {
        Poisoned { inner, poison: None, stall: Some((token, gate)) }
    }

    fn wait<C>(&self, batch: &[SeqStep<'_, C>]) {
        if let Some((tok, gate)) = &self.stall {
            if batch.iter().any(|s| s.tokens.contains(tok)) {
                gate.pass();
            }
        }
    }

    fn spoil<C>(&self, batch: &[SeqStep<'_, C>], out: Vec<Tensor>) -> Result<Vec<Tensor>> {
        out.into_iter()
            .zip(batch)
            .map(
                |(t, s)| {
                    if self.poison.is_some_and(|p| s.tokens.contains(&p)) {
                        Ok(t.affine(0.0, f64::NAN)?)
                    } else {
                        Ok(t)
                    }
                },
            )
            .collect()
    }
}

impl<M: LanguageModel> LanguageModel for Poisoned<M> {
    type Cache = M::Cache;

    fn new_cache(&self) -> Result<M::Cache> {
        self.inner.new_cache()
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn context_length(&self) -> usize {
        self.inner.context_length()
    }

    fn forward(&self, batch: &mut [SeqStep<'_, M::Cache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.wait(batch);
        let out = self.inner.forward(batch, logits)?;
        self.spoil(batch, out)
    }
}

impl<M: PagedLanguageModel> PagedLanguageModel for Poisoned<M> {
    fn kv_shape(&self) -> KvShape {
        self.inner.kv_shape()
    }

    fn forward_paged(&self, batch: &mut [SeqStep<'_, PagedCache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.wait(batch);
        let out = self.inner.forward_paged(batch, logits)?;
        self.spoil(batch, out)
    }
}

/// A gate that blocked callers wait on until it opens.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    waiting: usize,
}

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Gate::default())
    }

    /// Lets every waiting and future caller through.
    pub fn open(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.open = true;
        self.changed.notify_all();
    }

    /// Callers blocked at the gate now.
    pub fn waiting(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).waiting
    }

    /// Blocks until the gate opens (counted in [`Gate::waiting`] meanwhile).
    pub fn pass(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.waiting += 1;
        self.changed.notify_all();
        while !s.open {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.waiting -= 1;
    }
}

/// Wraps a tokenizer: encoding a text that contains `marker` blocks the
/// calling thread until `gate` opens (a stand-in for a huge prompt that
/// keeps a CPU busy).
pub struct GatedTokenizer<T> {
    pub inner: T,
    pub marker: String,
    pub gate: Arc<Gate>,
}

impl<T: Tokenizer> Tokenizer for GatedTokenizer<T> {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        if text.contains(&self.marker) {
            self.gate.pass();
        }
        self.inner.encode(text, add_special)
    }

    fn encode_chat(&self, text: &str, plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        if text.contains(&self.marker) {
            self.gate.pass();
        }
        self.inner.encode_chat(text, plain)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special)
    }

    fn piece(&self, id: u32) -> Option<String> {
        self.inner.piece(id)
    }

    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    fn bos_id(&self) -> Option<u32> {
        self.inner.bos_id()
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.inner.eos_ids()
    }

    fn adds_bos(&self) -> bool {
        self.inner.adds_bos()
    }
}
