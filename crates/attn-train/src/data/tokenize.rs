//! Tokenizers trained on the training split (or loaded pretrained), saved
//! as `tokenizer.json` so that `attn generate` / `attn eval` load the model
//! with exactly the tokenizer it was trained with.
//!
//! - `char`: one token per character seen in the training text, plus the
//!   special tokens; written as a `tokenizers` BPE model without merges.
//! - `bpe`: byte-level BPE (GPT-2 style, no unknown tokens) trained with the
//!   `tokenizers` crate.
//! - `pretrained`: an existing `tokenizer.json` (e.g. MiniLM's WordPiece).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use attn_nn::{Error, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::{TokenizerConfig, TokenizerKind, SPECIALS};

pub struct TextTokenizer {
    inner: Tokenizer,
    /// Fast path for char tokenizers (identical ids, tested).
    chars: Option<HashMap<char, u32>>,
    /// Characters (char) or bytes (byte-level BPE) each token stands for,
    /// for bits-per-character / bits-per-byte.
    unit_lengths: Vec<u32>,
    kind: TokenizerKind,
}

fn specials() -> Vec<AddedToken> {
    SPECIALS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect()
}

impl TextTokenizer {
    /// Trains (char, bpe) on `texts` or loads (pretrained) the tokenizer.
    pub fn build(cfg: &TokenizerConfig, pretrained: Option<&Path>, texts: &[&str]) -> Result<Self> {
        match cfg.kind {
            TokenizerKind::Char => Self::train_char(texts),
            TokenizerKind::Bpe => Self::train_bpe(texts, cfg.vocab_size.unwrap_or(8000), cfg.min_frequency),
            TokenizerKind::Pretrained => {
                let p = pretrained.ok_or_else(|| Error::config("tokenizer.path", "required"))?;
                Self::load(p, TokenizerKind::Pretrained)
            }
        }
    }

    fn train_char(texts: &[&str]) -> Result<Self> {
        let set: BTreeSet<char> = texts.iter().flat_map(|t| t.chars()).collect();
        if set.is_empty() {
            return Err(Error::input("tokenizer", "no training text"));
        }
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for (i, s) in SPECIALS.iter().enumerate() {
            vocab.insert(s.to_string(), i as u32);
        }
        let mut chars = HashMap::new();
        for c in set {
            let id = vocab.len() as u32;
            vocab.insert(c.to_string(), id);
            chars.insert(c, id);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), vec![])
            .unk_token("<unk>".into())
            .build()
            .map_err(|e| Error::input("tokenizer", format!("char vocabulary: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_decoder(Some(Fuse::new()));
        inner.add_special_tokens(specials()).map_err(|e| Error::input("tokenizer", e.to_string()))?;
        let mut t = Self::wrap(inner, TokenizerKind::Char);
        t.chars = Some(chars);
        Ok(t)
    }

    fn train_bpe(texts: &[&str], vocab_size: usize, min_frequency: u64) -> Result<Self> {
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(min_frequency)
            .special_tokens(specials())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        inner
            .train(&mut trainer, texts.iter())
            .map_err(|e| Error::input("tokenizer", format!("BPE training failed: {e}")))?;
        inner.add_special_tokens(specials()).map_err(|e| Error::input("tokenizer", e.to_string()))?;
        Ok(Self::wrap(inner, TokenizerKind::Bpe))
    }

    /// Loads a `tokenizer.json` written by [`TextTokenizer::save`] (or any).
    pub fn load(path: &Path, kind: TokenizerKind) -> Result<Self> {
        let mut inner =
            Tokenizer::from_file(path).map_err(|e| Error::format(path, format!("not a valid tokenizer.json: {e}")))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| Error::format(path, e.to_string()))?;
        let mut t = Self::wrap(inner, kind);
        if kind == TokenizerKind::Char {
            let chars = t
                .inner
                .get_vocab(false)
                .into_iter()
                .filter_map(|(s, id)| {
                    let mut it = s.chars();
                    match (it.next(), it.next()) {
                        (Some(c), None) => Some((c, id)),
                        _ => None,
                    }
                })
                .collect();
            t.chars = Some(chars);
        }
        Ok(t)
    }

    fn wrap(inner: Tokenizer, kind: TokenizerKind) -> Self {
        let n = inner.get_vocab_size(true);
        let mut unit_lengths = vec![0u32; n];
        for (tok, id) in inner.get_vocab(true) {
            if (id as usize) < n && !SPECIALS.contains(&tok.as_str()) {
                // Byte-level tokens spell one byte per character.
                unit_lengths[id as usize] = tok.chars().count() as u32;
            }
        }
        if kind == TokenizerKind::Char {
            // An unknown character still stands for one character.
            if let Some(unk) = inner.token_to_id("<unk>") {
                unit_lengths[unk as usize] = 1;
            }
        }
        TextTokenizer { inner, chars: None, unit_lengths, kind }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, false).map_err(|e| Error::format(path, format!("cannot write tokenizer: {e}")))
    }

    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn unit_lengths(&self) -> &[u32] {
        &self.unit_lengths
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids of `text` without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(map) = &self.chars {
            let unk = 3;
            return Ok(text.chars().map(|c| *map.get(&c).unwrap_or(&unk)).collect());
        }
        let add_special = self.kind == TokenizerKind::Pretrained;
        let e = self.inner.encode(text, add_special).map_err(|e| Error::input("tokenizer", e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    /// Ids of many texts (in parallel for the `tokenizers` models). A
    /// pretrained tokenizer adds its own special tokens ([CLS] ... [SEP]).
    pub fn encode_many(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        if self.chars.is_some() {
            return texts.iter().map(|t| self.encode(t)).collect();
        }
        let add_special = self.kind == TokenizerKind::Pretrained;
        let enc = self
            .inner
            .encode_batch(texts.to_vec(), add_special)
            .map_err(|e| Error::input("tokenizer", e.to_string()))?;
        Ok(enc.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::input("tokenizer", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_fast_path_matches_the_saved_tokenizer() {
        let texts = ["To be, or not to be:\nthat is the question.\n", "Ay, there's the rub;\n"];
        let t = TextTokenizer::train_char(&texts).unwrap();
        let dir = std::env::temp_dir().join(format!("attn-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("tokenizer.json");
        t.save(&p).unwrap();
        let back = Tokenizer::from_file(&p).unwrap();
        let s = "not to be, that is the rub.\nZ";
        let ours = t.encode(s).unwrap();
        let theirs = back.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(ours, theirs);
        assert_eq!(*ours.last().unwrap(), 3, "unknown char maps to <unk>");
        assert_eq!(back.decode(&ours[..ours.len() - 1], true).unwrap(), "not to be, that is the rub.\n");
        let reloaded = TextTokenizer::load(&p, TokenizerKind::Char).unwrap();
        assert_eq!(reloaded.encode(s).unwrap(), ours);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn bpe_round_trips_and_counts_bytes() {
        let texts: Vec<String> =
            (0..200).map(|i| format!("the quick brown fox {i} jumps über the lazy dog\n")).collect();
        let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
        let t = TextTokenizer::train_bpe(&refs, 400, 2).unwrap();
        assert!(t.vocab_size() > 300 && t.vocab_size() <= 400, "{}", t.vocab_size());
        let s = "the lazy fox über 42\n";
        let ids = t.encode(s).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), s);
        let bytes: u32 = ids.iter().map(|&i| t.unit_lengths()[i as usize]).sum();
        assert_eq!(bytes as usize, s.len());
        assert_eq!(t.token_id("<pad>"), Some(0));
        assert_eq!(t.token_id("</s>"), Some(2));
    }
}
