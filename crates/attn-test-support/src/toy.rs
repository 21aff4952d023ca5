//! A toy language model whose next-token logits are a hand-written function
//! of the tokens so far, and a byte-level tokenizer that cuts multi-byte
//! characters between tokens (ids 0..256 are bytes, then BOS and EOS).

use std::cell::RefCell;

use attn_models::{LanguageModel, Logits, SeqStep, SequenceCache, Tokenizer};
use attn_nn::{Error, Result};
use candle_core::{Device, Tensor};

pub const BOS: u32 = 256;
pub const EOS: u32 = 257;
/// Byte tokens 0..256, then BOS and EOS, then the multi-byte pieces.
pub const FIRST_PIECE: u32 = 258;

/// The cache is just the tokens seen.
#[derive(Debug, Clone, Default)]
pub struct ToyCache(pub Vec<u32>);

impl SequenceCache for ToyCache {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn truncate(&mut self, len: usize) -> Result<()> {
        self.0.truncate(len);
        Ok(())
    }
}

type Rule = Box<dyn Fn(&[u32]) -> Vec<f32>>;

pub struct ToyModel {
    vocab: usize,
    ctx: usize,
    /// Logits of the next token given every token so far.
    rule: Rule,
    /// Per forward call, the number of new tokens of each sequence.
    pub calls: RefCell<Vec<Vec<usize>>>,
}

impl ToyModel {
    pub fn new(vocab: usize, ctx: usize, rule: impl Fn(&[u32]) -> Vec<f32> + 'static) -> Self {
        ToyModel { vocab, ctx, rule: Box::new(rule), calls: RefCell::new(Vec::new()) }
    }

    /// Next-token probabilities from the previous token via `table`
    /// (`(previous, [(next, probability)])`); unlisted tokens get probability 0.
    pub fn bigram(vocab: usize, ctx: usize, table: &[(u32, &[(u32, f32)])]) -> Self {
        let table: Vec<(u32, Vec<(u32, f32)>)> = table.iter().map(|(p, row)| (*p, row.to_vec())).collect();
        Self::new(vocab, ctx, move |seen| {
            let prev = *seen.last().expect("a prompt");
            let mut logits = vec![f32::NEG_INFINITY; vocab];
            let (_, row) = table.iter().find(|(p, _)| *p == prev).expect("a table row for every reachable token");
            for &(tok, p) in row {
                logits[tok as usize] = p.ln();
            }
            logits
        })
    }

    /// The logits the model gives after `seen`.
    pub fn forward_logits(&self, seen: &[u32]) -> Vec<f32> {
        (self.rule)(seen)
    }

    /// Emits `script` after a prompt of `prompt_len` tokens, then EOS.
    pub fn script(vocab: usize, ctx: usize, prompt_len: usize, script: Vec<u32>) -> Self {
        Self::new(vocab, ctx, move |seen| {
            let next = script.get(seen.len() - prompt_len).copied().unwrap_or(EOS);
            one_hot(vocab, next)
        })
    }
}

pub fn one_hot(vocab: usize, tok: u32) -> Vec<f32> {
    let mut logits = vec![f32::NEG_INFINITY; vocab];
    logits[tok as usize] = 0.0;
    logits
}

impl LanguageModel for ToyModel {
    type Cache = ToyCache;

    fn new_cache(&self) -> Result<ToyCache> {
        Ok(ToyCache::default())
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn context_length(&self) -> usize {
        self.ctx
    }
    fn forward(&self, batch: &mut [SeqStep<'_, ToyCache>], logits: Logits) -> Result<Vec<Tensor>> {
        self.calls.borrow_mut().push(batch.iter().map(|s| s.tokens.len()).collect());
        let mut out = Vec::with_capacity(batch.len());
        for step in batch.iter_mut() {
            if step.tokens.is_empty() || step.cache.len() + step.tokens.len() > self.ctx {
                return Err(Error::input("toy forward", "empty step or context overflow"));
            }
            let mut rows = Vec::new();
            for &t in step.tokens {
                step.cache.0.push(t);
                if logits == Logits::All {
                    rows.extend((self.rule)(&step.cache.0));
                }
            }
            let t = match logits {
                Logits::Last => Tensor::from_vec((self.rule)(&step.cache.0), self.vocab, &Device::Cpu)?,
                Logits::All => Tensor::from_vec(rows, (step.tokens.len(), self.vocab), &Device::Cpu)?,
            };
            out.push(t);
        }
        Ok(out)
    }
}

/// Ids 0..256 are bytes, then `<bos>`, `<eos>`, then `pieces` (byte strings).
///
/// Decoding an id past the vocabulary is an error, unless the tokenizer is
/// [`lenient`](ByteTokenizer::lenient): then it decodes to `<unk>` (nothing
/// when skipping special tokens), as a server's tokenizer must so that the
/// engine's own vocabulary check answers the client.
#[derive(Debug, Clone, Default)]
pub struct ByteTokenizer {
    pub pieces: Vec<Vec<u8>>,
    lenient: bool,
}

impl ByteTokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_pieces(pieces: &[&[u8]]) -> Self {
        ByteTokenizer { pieces: pieces.iter().map(|p| p.to_vec()).collect(), lenient: false }
    }

    pub fn lenient() -> Self {
        ByteTokenizer { pieces: Vec::new(), lenient: true }
    }

    fn bytes(&self, id: u32) -> Option<&[u8]> {
        match id {
            0..=255 => None,
            _ => self.pieces.get((id - FIRST_PIECE) as usize).map(|v| v.as_slice()),
        }
    }
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = if add_special { vec![BOS] } else { vec![] };
        ids.extend(text.bytes().map(u32::from));
        Ok(ids)
    }
    /// Text never yields control ids here, so message text needs no care.
    fn encode_chat(&self, text: &str, _plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        self.encode(text, false)
    }
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            match id {
                0..=255 => bytes.push(id as u8),
                BOS | EOS if skip_special => {}
                BOS => bytes.extend(b"<bos>"),
                EOS => bytes.extend(b"<eos>"),
                _ => match self.bytes(id) {
                    Some(piece) => bytes.extend(piece),
                    None if self.lenient && skip_special => {}
                    None if self.lenient => bytes.extend(b"<unk>"),
                    None => return Err(Error::input("decode", format!("bad id {id}"))),
                },
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
    fn piece(&self, id: u32) -> Option<String> {
        self.decode(&[id], false).ok()
    }
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match id {
            0..=255 => Some(vec![id as u8]),
            BOS => Some(b"<bos>".to_vec()),
            EOS => Some(b"<eos>".to_vec()),
            _ => self.bytes(id).map(<[u8]>::to_vec),
        }
    }
    fn is_special(&self, id: u32) -> bool {
        id == BOS || id == EOS
    }
    fn vocab_size(&self) -> usize {
        FIRST_PIECE as usize + self.pieces.len()
    }
    fn bos_id(&self) -> Option<u32> {
        Some(BOS)
    }
    fn eos_ids(&self) -> Vec<u32> {
        vec![EOS]
    }
}
