//! The interfaces the engine drives models and tokenizers through.
//!
//! A causal language model takes a batch of sequences, each with its new
//! tokens and its own cache, and returns logits. A single prompt is a batch
//! of one; continuous batching, beam search and speculative decoding reuse
//! the same call. A seq2seq model becomes a causal LM conditioned on its
//! encoded source (see [`crate::transformer`]).

use attn_nn::kernels::fast::AttnCall;
use attn_nn::{AttendSpec, ContiguousKvCache, KvCache, KvDtype, KvShape, PagedCache, RawKv, Result};

use candle_core::Tensor;

/// Per-sequence decoding state (the KV cache and its position).
pub trait SequenceCache: Clone {
    /// Tokens processed so far (the position of the next token).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Forgets positions from `len` on (speculative decoding rollback). An
    /// error where the cache no longer holds what the positions before
    /// `len` need (a sliding window that has moved on).
    fn truncate(&mut self, len: usize) -> Result<()>;
}

/// Where a causal model's attention layers keep one sequence's keys and
/// values: a contiguous tensor per layer ([`LayerCaches`]) or blocks of a
/// shared pool read through a block table ([`PagedCache`]). The model hands
/// each layer's projected heads over and gets the attended heads back.
pub trait KvStore: Send {
    /// Stores `k`, `v` (`[1, n_kv_heads, t, head_dim]`) of the next `t`
    /// positions of `layer` and attends `q` (`[1, n_heads, t, head_dim]`) to
    /// every stored position, causally and within `spec.window`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttendSpec) -> Result<Tensor>;
    /// The same on plain token-major buffers (the decoder's inference
    /// path): stores `k`, `v` (`[t, n_kv_heads, head_dim]`) of the next `t`
    /// positions of `layer` and attends `q` (`[t, n_heads, head_dim]`) into
    /// `out`; `call.past` is filled in by the store.
    #[allow(clippy::too_many_arguments)]
    fn attend_slices(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        call: &AttnCall,
        out: &mut [f32],
    ) -> Result<()>;
    /// Called once every layer has stored the `n` new positions.
    fn commit(&mut self, n: usize) -> Result<()>;
}

/// One contiguous KV cache per layer: the simple, fast cache of one stream.
///
/// Models on candle tensors (attn's GPT) use the tensor caches; the
/// decoder ([`crate::decoder`]) keeps plain token-major buffers
/// ([`RawKv`]: f16 by default, a ring of twice the window for
/// sliding-window layers). A sequence uses one kind or the other, never both.
#[derive(Debug, Clone)]
pub struct LayerCaches {
    layers: Vec<ContiguousKvCache>,
    raw: Vec<RawKv>,
    dtype: KvDtype,
    /// Sliding-window layers keep every position too (a reference).
    keep_all: bool,
}

impl LayerCaches {
    /// Caches storing keys and values in f16.
    pub fn new(n_layers: usize) -> Self {
        Self::with_dtype(n_layers, KvDtype::default())
    }

    pub fn with_dtype(n_layers: usize, dtype: KvDtype) -> Self {
        LayerCaches {
            layers: vec![ContiguousKvCache::new(); n_layers],
            raw: vec![RawKv::default(); n_layers],
            dtype,
            keep_all: false,
        }
    }

    /// Caches whose sliding-window layers keep every position instead of a
    /// ring of twice the window (the plain reference for tests).
    pub fn keeping_every_position(mut self) -> Self {
        self.keep_all = true;
        self
    }

    /// Bytes of keys and values the plain buffers hold.
    pub fn kv_bytes(&self) -> usize {
        self.raw.iter().map(|c| c.bytes()).sum()
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut ContiguousKvCache {
        &mut self.layers[i]
    }
}

impl SequenceCache for LayerCaches {
    fn len(&self) -> usize {
        // A pipeline stage fills only its own layers.
        let tensors = self.layers.iter().map(|c| c.len()).max().unwrap_or(0);
        tensors.max(self.raw.iter().map(|c| c.len()).max().unwrap_or(0))
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        // Every layer can go back, or none moves.
        for c in &self.raw {
            c.check_truncate(len)?;
        }
        for c in &mut self.layers {
            c.truncate(len)?;
        }
        for c in &mut self.raw {
            c.truncate(len)?;
        }
        Ok(())
    }
}

impl KvStore for LayerCaches {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttendSpec) -> Result<Tensor> {
        match self.layers.get_mut(layer) {
            Some(c) => c.attend(q, k, v, spec),
            None => Err(attn_nn::Error::input("kv cache", format!("layer {layer} out of range"))),
        }
    }

    fn commit(&mut self, _n: usize) -> Result<()> {
        Ok(())
    }

    fn attend_slices(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        call: &AttnCall,
        out: &mut [f32],
    ) -> Result<()> {
        let c = self
            .raw
            .get_mut(layer)
            .ok_or_else(|| attn_nn::Error::input("kv cache", format!("layer {layer} out of range")))?;
        if c.n_kv_heads == 0 {
            *c = if self.keep_all {
                RawKv::new_full(call.n_kv_heads, call.head_dim, call.window, self.dtype)
            } else {
                RawKv::new(call.n_kv_heads, call.head_dim, call.window, self.dtype)
            };
        }
        c.append_and_attend(q, k, v, t, call, out)
    }
}

impl SequenceCache for PagedCache {
    fn len(&self) -> usize {
        PagedCache::len(self)
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        if len < PagedCache::len(self) {
            self.set_len(len)?;
        }
        Ok(())
    }
}

impl KvStore for PagedCache {
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, spec: &AttendSpec) -> Result<Tensor> {
        PagedCache::attend(self, layer, q, k, v, spec)
    }

    fn commit(&mut self, n: usize) -> Result<()> {
        PagedCache::commit(self, n)
    }

    fn attend_slices(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        t: usize,
        call: &AttnCall,
        out: &mut [f32],
    ) -> Result<()> {
        PagedCache::attend_slices(self, layer, q, k, v, t, call, out)
    }
}

/// One sequence's part of a batched forward call.
pub struct SeqStep<'a, C> {
    /// New tokens, appended after what `cache` holds.
    pub tokens: &'a [u32],
    pub cache: &'a mut C,
}

/// Which logits a forward call returns for each sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last new token's: `[vocab]` (generation).
    Last,
    /// Every new token's: `[n_new, vocab]` (scoring, perplexity, speculative verification).
    All,
}

pub trait LanguageModel {
    type Cache: SequenceCache;

    /// A fresh, empty cache for one sequence.
    fn new_cache(&self) -> Result<Self::Cache>;

    fn vocab_size(&self) -> usize;

    /// The longest sequence (prompt + generated) the model supports.
    fn context_length(&self) -> usize;

    /// Runs every sequence's new tokens and appends them to its cache.
    /// Returns f32 logits per sequence, shaped as `logits` asks.
    fn forward(&self, batch: &mut [SeqStep<'_, Self::Cache>], logits: Logits) -> Result<Vec<Tensor>>;
}

/// A causal LM that can also keep its keys and values in a paged pool
/// (serving: continuous batching over a block manager).
pub trait PagedLanguageModel: LanguageModel {
    /// What one position stores, to size the pool.
    fn kv_shape(&self) -> KvShape;

    /// [`LanguageModel::forward`] with paged caches. Each cache's block
    /// table must already have room for its new tokens.
    fn forward_paged(&self, batch: &mut [SeqStep<'_, PagedCache>], logits: Logits) -> Result<Vec<Tensor>>;

    /// Copies whole blocks of `pool` (`(src, dst)`: a forked sequence's
    /// shared last block before it diverges). A model split over ranks
    /// has each rank copy its own pool's blocks.
    fn copy_blocks(&self, pool: &attn_nn::KvPool, copies: &[(u32, u32)]) -> Result<()> {
        for &(src, dst) in copies {
            pool.copy_block(src, dst)?;
        }
        Ok(())
    }
}

/// Text <-> token ids.
pub trait Tokenizer {
    /// Token ids of `text`; with `add_special`, the model's BOS (and EOS
    /// where the model adds one) as its config says.
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>>;

    /// Token ids of a rendered chat prompt (no BOS/EOS added: the template
    /// writes them). Control-token strings are matched only outside
    /// `plain`, the byte ranges of the messages' own text, which is read as
    /// ordinary text: a message cannot open or close a turn. A tokenizer
    /// that cannot keep the two apart refuses text with `plain` ranges.
    fn encode_chat(&self, text: &str, plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        if plain.is_empty() {
            return self.encode(text, false);
        }
        Err(attn_nn::Error::Unsupported("this tokenizer cannot read chat messages apart from control tokens".into()))
    }

    /// Text of `ids`. With `skip_special`, control tokens (BOS, EOS, turn
    /// markers) are left out. Invalid UTF-8 (a multi-byte character cut
    /// between tokens) becomes U+FFFD.
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String>;

    /// The token's text as stored in the vocabulary (for `attn tokenize`).
    fn piece(&self, id: u32) -> Option<String>;

    fn vocab_size(&self) -> usize;

    fn bos_id(&self) -> Option<u32>;

    /// Tokens that end generation (EOS, end of turn).
    fn eos_ids(&self) -> Vec<u32>;

    /// The raw bytes a token adds to the text (byte-level BPE without its
    /// byte alphabet, SentencePiece with `▁` as a space and `<0xNN>` as the
    /// byte), for grammar-constrained decoding, which matches output byte by
    /// byte. `None` outside the vocabulary. For a control token (see
    /// [`Tokenizer::is_special`]) its name as stored. The default decodes
    /// the token alone, which is exact for tokens of whole characters only.
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.decode(&[id], false).ok().map(String::into_bytes)
    }

    /// Whether `id` is a control token (BOS, EOS, turn markers, unknown or
    /// unused): never text a grammar may produce.
    fn is_special(&self, id: u32) -> bool {
        let _ = id;
        false
    }

    /// Whether `encode(text, true)` starts with BOS. llama.cpp's perplexity
    /// puts BOS in each chunk's first place only for such vocabularies.
    fn adds_bos(&self) -> bool {
        self.bos_id().is_some()
    }
}
