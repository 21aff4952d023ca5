//! Tokenizers described by an HF `tokenizer.json` (WordPiece, BPE, ...),
//! through the `tokenizers` crate.

use std::path::Path;

use attn_nn::{Error, Result};

use crate::lm::Tokenizer;

pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
    /// Whether the post-processor puts `bos` first (BERT's `[CLS]` does;
    /// the tokenizers attn trains add nothing).
    adds_bos: bool,
    /// Added tokens marked special (`[CLS]`, `<eos>`, ...).
    specials: std::collections::HashSet<u32>,
    /// Byte-level character -> byte, when the decoder is byte-level.
    char_bytes: Option<std::collections::HashMap<char, u8>>,
}

impl HfTokenizer {
    /// Loads `tokenizer.json`, with its own padding switched off and
    /// truncation at `max_len` tokens (special tokens included) when given.
    pub fn from_file(path: &Path, max_len: Option<usize>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))?;
        Self::from_inner(inner, max_len, path)
    }

    /// The same from the text of a `tokenizer.json` (kept in a GGUF's
    /// `tokenizer.huggingface.json`); `origin` names it in errors.
    pub fn from_json(json: &str, max_len: Option<usize>, origin: &Path) -> Result<Self> {
        let inner: tokenizers::Tokenizer =
            json.parse().map_err(|e| Error::format(origin, format!("not a valid tokenizer.json: {e}")))?;
        Self::from_inner(inner, max_len, origin)
    }

    fn from_inner(mut inner: tokenizers::Tokenizer, max_len: Option<usize>, path: &Path) -> Result<Self> {
        inner.with_padding(None);
        let trunc = max_len.map(|max_length| tokenizers::TruncationParams { max_length, ..Default::default() });
        inner.with_truncation(trunc).map_err(|e| Error::format(path, format!("truncation: {e}")))?;
        let id = |t: &str| inner.token_to_id(t);
        let bos = id("[CLS]").or_else(|| id("<s>")).or_else(|| id("<bos>"));
        let eos = ["[SEP]", "</s>", "<eos>"].iter().filter_map(|t| id(t)).collect();
        let adds_bos = bos.is_some() && inner.encode("a", true).is_ok_and(|e| e.get_ids().first().copied() == bos);
        let specials =
            inner.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(i, _)| i).collect();
        let char_bytes = matches!(inner.get_decoder(), Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_)))
            .then(|| crate::bpe::bytes_to_unicode().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect());
        Ok(HfTokenizer { inner, bos, eos, adds_bos, specials, char_bytes })
    }

    /// Token ids of a batch, each truncated; no padding.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let enc =
            self.inner.encode_batch(texts.to_vec(), true).map_err(|e| Error::input("tokenizer", e.to_string()))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let e = self.inner.encode(text, add_special).map_err(|e| Error::input("tokenizer", e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::input("tokenizer", e.to_string()))
    }

    fn piece(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// A byte-level piece with its byte alphabet undone; otherwise the
    /// token decoded alone.
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.inner.id_to_token(id)?;
        if let (Some(map), false) = (&self.char_bytes, self.specials.contains(&id)) {
            if let Some(bytes) = piece.chars().map(|c| map.get(&c).copied()).collect() {
                return Some(bytes);
            }
        }
        if self.specials.contains(&id) {
            return Some(piece.into_bytes());
        }
        self.inner.decode(&[id], false).ok().map(String::into_bytes)
    }

    fn is_special(&self, id: u32) -> bool {
        self.specials.contains(&id)
    }

    fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.eos.clone()
    }

    fn adds_bos(&self) -> bool {
        self.adds_bos
    }
}
