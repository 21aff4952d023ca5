//! The byte-level BPE tokenizer that GGUF files describe with
//! `tokenizer.ggml.model = "gpt2"` (GPT-2, SmolLM2, Qwen2.5, Llama 3, ...).
//!
//! The vocabulary and merges come from the metadata; how text is split into
//! words before the merges (`tokenizer.ggml.pre`) is not stored in the file,
//! only named, so each supported name maps to the pre-tokenizer of the
//! model's original `tokenizer.json` (the regexes are also in llama.cpp's
//! `llama-vocab.cpp`). The BPE itself runs in the `tokenizers` crate.
//!
//! Control and user-defined tokens (`<|im_start|>`, `<tool_call>`) are
//! matched whole in the text by [`Tokenizer::encode`], leftmost-longest, as
//! HF's added tokens and llama.cpp's special tokens are;
//! [`BpeTokenizer::encode_plain`] tokenizes the same text with no such
//! matching, so a user cannot smuggle turn markers into a prompt.

use std::collections::HashMap;

use attn_nn::{Error, Result};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use crate::gguf::{GgufFile, Value};
use crate::lm::Tokenizer;
pub use crate::spm::TokenType;

/// GPT-2's word split (also what `ByteLevel(use_regex=true)` applies).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Qwen2's word split, from its `tokenizer.json` (llama.cpp spells the
/// case-insensitive group out as `'[sS]|'[tT]|...`: the same language).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Every digit its own word (SmolLM2's `Digits(individual_digits=true)`).
const DIGITS_SPLIT: &str = r"\p{N}";

/// The pre-tokenizers this reader knows, by their `tokenizer.ggml.pre` name.
pub const SUPPORTED_PRE: &[&str] = &["gpt2", "smollm", "qwen2"];

/// How text is cut into words before the merges (`tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex.
    Gpt2,
    /// Every digit alone, then GPT-2's regex (SmolLM2; llama.cpp's SMOLLM,
    /// the same as STARCODER).
    Smollm,
    /// NFC normalisation, then Qwen2's regex (digits one by one, letters
    /// with one leading non-letter, newlines kept together).
    Qwen2,
}

impl PreTokenizer {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" => Some(PreTokenizer::Gpt2),
            "smollm" => Some(PreTokenizer::Smollm),
            "qwen2" => Some(PreTokenizer::Qwen2),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 => "gpt2",
            PreTokenizer::Smollm => "smollm",
            PreTokenizer::Qwen2 => "qwen2",
        }
    }

    /// The regex splits, applied in order, each keeping its matches as words.
    fn splits(&self) -> &'static [&'static str] {
        match self {
            PreTokenizer::Gpt2 => &[GPT2_SPLIT],
            PreTokenizer::Smollm => &[DIGITS_SPLIT, GPT2_SPLIT],
            PreTokenizer::Qwen2 => &[QWEN2_SPLIT],
        }
    }
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
fn token_type(v: i64) -> TokenType {
    match v {
        2 => TokenType::Unknown,
        3 => TokenType::Control,
        4 => TokenType::UserDefined,
        5 => TokenType::Unused,
        6 => TokenType::Byte,
        _ => TokenType::Normal,
    }
}

/// GPT-2's `bytes_to_unicode`: every byte as a printable character (bytes
/// that are printable Latin-1 stand for themselves, the others are moved to
/// U+0100 and up), so a token of arbitrary bytes is a readable string.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

pub struct BpeTokenizer {
    /// Normaliser, pre-tokenizer and BPE model; no added tokens (special
    /// tokens are split off before it runs).
    inner: tokenizers::Tokenizer,
    pre: PreTokenizer,
    pieces: Vec<String>,
    types: Vec<TokenType>,
    /// Byte-level character -> byte, for decoding.
    char_bytes: HashMap<char, u8>,
    /// Control and user-defined tokens matched whole in text, longest first.
    specials: Vec<(String, u32)>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeTokenizer")
            .field("pre", &self.pre)
            .field("vocab", &self.pieces.len())
            .field("specials", &self.specials.len())
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl BpeTokenizer {
    /// Reads the tokenizer from a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let bad = |msg: String| Error::format(f.path(), msg);
        let model = f.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(Error::Unsupported(format!(
                "GGUF tokenizer model `{model}` (this reader is for `gpt2`, byte-level BPE)"
            )));
        }
        let pre_name = match f.meta_opt("tokenizer.ggml.pre") {
            None => {
                return Err(Error::Unsupported(format!(
                    "GGUF without `tokenizer.ggml.pre`: the byte-level BPE pre-tokenizer is unknown (supported: {})",
                    SUPPORTED_PRE.join(", ")
                )))
            }
            Some(v) => v
                .as_str()
                .ok_or_else(|| bad(format!("metadata `tokenizer.ggml.pre` = {} is not a string", v.summary())))?,
        };
        let pre = PreTokenizer::from_name(pre_name).ok_or_else(|| {
            Error::Unsupported(format!(
                "`tokenizer.ggml.pre` = {pre_name:?} (supported byte-level BPE pre-tokenizers: {})",
                SUPPORTED_PRE.join(", ")
            ))
        })?;
        let strings = |key: &str| -> Result<Vec<String>> {
            let a = f
                .meta_opt(key)
                .ok_or_else(|| bad(format!("metadata `{key}` is missing")))?
                .as_array()
                .ok_or_else(|| bad(format!("metadata `{key}` is not an array")))?;
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("`{key}`[{i}] = {} is not a string", v.summary())))
                })
                .collect()
        };
        let pieces = strings("tokenizer.ggml.tokens")?;
        let n = pieces.len();
        if n == 0 || n > u32::MAX as usize {
            return Err(bad(format!("`tokenizer.ggml.tokens` holds {n} tokens")));
        }
        let merges = strings("tokenizer.ggml.merges")?;
        let types = match f.meta_opt("tokenizer.ggml.token_type") {
            None => vec![TokenType::Normal; n],
            Some(v) => {
                let a = v.as_array().ok_or_else(|| {
                    bad(format!("metadata `tokenizer.ggml.token_type` = {} is not an array", v.summary()))
                })?;
                if a.len() != n {
                    return Err(bad(format!("`tokenizer.ggml.token_type` has {} entries for {n} tokens", a.len())));
                }
                a.iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Value::I32(x) => Ok(token_type(*x as i64)),
                        other => other.as_u64().map(|x| token_type(x as i64)).ok_or_else(|| {
                            bad(format!("`tokenizer.ggml.token_type`[{i}] = {} is not an integer", other.summary()))
                        }),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match f.meta_opt(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(i) if (i as usize) < n => Ok(Some(i as u32)),
                    _ => Err(bad(format!("`{key}` = {} is not a token id below {n}", v.summary()))),
                },
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match f.meta_opt(key) {
                None => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| bad(format!("`{key}` = {} is not a boolean", v.summary()))),
            }
        };
        let mut t = BpeTokenizer::new(pieces, types, &merges, pre).map_err(|e| match e {
            Error::Input { reason, .. } => bad(reason),
            other => other,
        })?;
        t.bos = id("tokenizer.ggml.bos_token_id")?;
        t.eos = id("tokenizer.ggml.eos_token_id")?;
        t.eot = id("tokenizer.ggml.eot_token_id")?;
        t.pad = id("tokenizer.ggml.padding_token_id")?;
        t.add_bos = flag("tokenizer.ggml.add_bos_token", false)?;
        t.add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
        if t.add_bos && t.bos.is_none() {
            return Err(bad(
                "`tokenizer.ggml.add_bos_token` is true but `tokenizer.ggml.bos_token_id` is missing".into()
            ));
        }
        if t.add_eos && t.eos.is_none() {
            return Err(bad(
                "`tokenizer.ggml.add_eos_token` is true but `tokenizer.ggml.eos_token_id` is missing".into()
            ));
        }
        t.eos_ids = t.find_eos_ids();
        Ok(t)
    }

    /// A tokenizer from its vocabulary (`pieces` spelled in GPT-2's byte
    /// alphabet, as GGUF and `vocab.json` store them), token types, merges
    /// (`"left right"`, best first) and pre-tokenizer; no BOS/EOS.
    pub fn new(pieces: Vec<String>, types: Vec<TokenType>, merges: &[String], pre: PreTokenizer) -> Result<Self> {
        let n = pieces.len();
        if n == 0 || n > u32::MAX as usize || types.len() != n {
            return Err(Error::input("tokenizer", format!("{n} tokens and {} token types", types.len())));
        }
        let byte_chars = bytes_to_unicode();
        let char_bytes: HashMap<char, u8> = byte_chars.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let spelled = |s: &str| s.chars().all(|c| char_bytes.contains_key(&c));
        // A token outside the byte alphabet (llama.cpp writes some added
        // tokens as raw text) is looked up by its byte spelling, as HF does.
        let mut vocab = Vocab::default();
        for (i, p) in pieces.iter().enumerate() {
            let key = if spelled(p) { p.clone() } else { p.bytes().map(|b| byte_chars[b as usize]).collect() };
            vocab.insert(key, i as u32); // a duplicate keeps its last id, as HF and llama.cpp do
        }
        let mut pairs: Merges = Vec::with_capacity(merges.len());
        for (i, m) in merges.iter().enumerate() {
            let mut parts = m.split(' ');
            let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(Error::input(
                    "tokenizer",
                    format!("`tokenizer.ggml.merges`[{i}] = {m:?} is not two tokens separated by one space"),
                ));
            };
            for part in [a, b] {
                if !vocab.contains_key(part) {
                    return Err(Error::input(
                        "tokenizer",
                        format!("`tokenizer.ggml.merges`[{i}] = {m:?}: {part:?} is not in `tokenizer.ggml.tokens`"),
                    ));
                }
            }
            if !vocab.contains_key(&format!("{a}{b}")) {
                return Err(Error::input(
                    "tokenizer",
                    format!("`tokenizer.ggml.merges`[{i}] = {m:?}: the merged token is not in `tokenizer.ggml.tokens`"),
                ));
            }
            pairs.push((a.to_string(), b.to_string()));
        }
        let model = BPE::builder()
            .vocab_and_merges(vocab, pairs)
            .byte_fallback(false)
            .ignore_merges(false)
            .build()
            .map_err(|e| Error::input("tokenizer", format!("building the BPE model: {e}")))?;
        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for re in pre.splits() {
            let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| Error::input("tokenizer", format!("pre-tokenizer regex: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, false, false).into());
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(Sequence::new(steps)));
        if pre == PreTokenizer::Qwen2 {
            inner.with_normalizer(Some(NFC)).map_err(|e| Error::input("tokenizer", format!("normalizer: {e}")))?;
        }
        let mut specials: Vec<(String, u32)> = pieces
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (p, ty))| matches!(ty, TokenType::Control | TokenType::UserDefined) && !p.is_empty())
            .map(|(i, (p, _))| (p.clone(), i as u32))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        specials.dedup_by(|a, b| a.0 == b.0);
        Ok(BpeTokenizer {
            inner,
            pre,
            pieces,
            types,
            char_bytes,
            specials,
            bos: None,
            eos: None,
            eot: None,
            pad: None,
            add_bos: false,
            add_eos: false,
            eos_ids: Vec::new(),
        })
    }

    /// EOS, end of turn and the chat formats' stop tokens, each once.
    fn find_eos_ids(&self) -> Vec<u32> {
        let by_name = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"]
            .iter()
            .filter_map(|s| self.specials.iter().find(|(p, _)| p == s).map(|&(_, id)| id));
        let mut out: Vec<u32> = Vec::new();
        for id in self.eos.into_iter().chain(self.eot).chain(by_name) {
            if !out.contains(&id) {
                out.push(id);
            }
        }
        out
    }

    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// The id of a control or user-defined token, by its text.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.specials.iter().find(|(p, _)| p == text).map(|&(_, id)| id)
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Token ids of `text` as ordinary text: special-token strings such as
    /// `<|im_end|>` in it become ordinary pieces, never the special id. No
    /// BOS/EOS. For user content that must not open or close chat turns.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.encode_text(text, &mut out)?;
        Ok(out)
    }

    /// Byte-level BPE of one stretch of ordinary text.
    fn encode_text(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let e = self.inner.encode_fast(text, false).map_err(|e| Error::input("tokenizer", e.to_string()))?;
        out.extend_from_slice(e.get_ids());
        Ok(())
    }

    /// Splits `text` on special-token strings, leftmost-longest:
    /// `(segment, Some(id))` for a special token, `(segment, None)` for text.
    fn split_specials<'a>(&self, text: &'a str, plain: &[std::ops::Range<usize>]) -> Vec<(&'a str, Option<u32>)> {
        crate::spm::split_specials(text, &self.specials, plain)
    }

    /// The control and user-defined token strings matched in text.
    pub fn special_strings(&self) -> Vec<String> {
        self.specials.iter().map(|(s, _)| s.clone()).collect()
    }

    fn encode_spans(&self, text: &str, add_special: bool, plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        for (seg, special) in self.split_specials(text, plain) {
            match special {
                Some(id) => out.push(id),
                None => self.encode_text(seg, &mut out)?,
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }
}

impl Tokenizer for BpeTokenizer {
    /// Token ids of `text`, special-token strings matched whole; with
    /// `add_special`, BOS/EOS only where the GGUF asks for them.
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_spans(text, add_special, &[])
    }

    fn encode_chat(&self, text: &str, plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        self.encode_spans(text, false, plain)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else {
                return Err(Error::input(
                    "decode",
                    format!("token id {id} outside the vocabulary of {}", self.pieces.len()),
                ));
            };
            if skip_special && self.types[id as usize] == TokenType::Control {
                continue;
            }
            // HF's ByteLevel decoder: a token wholly in the byte alphabet is
            // bytes; any other (a raw added token) is its own UTF-8.
            let start = bytes.len();
            for c in piece.chars() {
                match self.char_bytes.get(&c) {
                    Some(&b) => bytes.push(b),
                    None => {
                        bytes.truncate(start);
                        bytes.extend_from_slice(piece.as_bytes());
                        break;
                    }
                }
            }
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn piece(&self, id: u32) -> Option<String> {
        self.pieces.get(id as usize).cloned()
    }

    /// The piece with GPT-2's byte alphabet undone; a raw added token (not
    /// spelled in the alphabet) is its own UTF-8, as in [`Tokenizer::decode`].
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.pieces.get(id as usize)?;
        let bytes: Option<Vec<u8>> = piece.chars().map(|c| self.char_bytes.get(&c).copied()).collect();
        Some(bytes.unwrap_or_else(|| piece.as_bytes().to_vec()))
    }

    fn is_special(&self, id: u32) -> bool {
        matches!(self.token_type(id), Some(TokenType::Control | TokenType::Unknown | TokenType::Unused))
    }

    fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.eos_ids.clone()
    }

    /// `tokenizer.ggml.add_bos_token`.
    fn adds_bos(&self) -> bool {
        self.add_bos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], '\u{120}'); // Ġ
        assert_eq!(t[b'\n' as usize], '\u{10A}'); // Ċ
        assert_eq!(t[b'a' as usize], 'a');
        let mut seen: Vec<char> = t.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
    }

    fn tiny() -> BpeTokenizer {
        let pieces: Vec<String> = [
            "a",
            "b",
            "\u{120}",
            "ab",
            "\u{120}ab",
            "<|im_end|>",
            "<",
            "|",
            ">",
            "im",
            "_",
            "end",
            "i",
            "m",
            "e",
            "n",
            "d",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut types = vec![TokenType::Normal; pieces.len()];
        types[5] = TokenType::Control;
        let merges: Vec<String> = ["a b", "\u{120} ab", "i m", "e n", "en d"].iter().map(|s| s.to_string()).collect();
        let mut pieces = pieces;
        pieces.push("en".into());
        types.push(TokenType::Normal);
        BpeTokenizer::new(pieces, types, &merges, PreTokenizer::Gpt2).unwrap()
    }

    #[test]
    fn merges_specials_and_plain_text() {
        let t = tiny();
        assert_eq!(t.encode("ab ab", false).unwrap(), vec![3, 4]);
        assert_eq!(t.encode("ab<|im_end|>", false).unwrap(), vec![3, 5]);
        let plain = t.encode_plain("<|im_end|>").unwrap();
        assert!(!plain.contains(&5) && plain.len() > 1, "{plain:?}");
        assert_eq!(t.decode(&plain, false).unwrap(), "<|im_end|>");
        assert_eq!(t.decode(&[3, 5, 4], true).unwrap(), "ab ab");
        assert_eq!(t.decode(&[3, 5, 4], false).unwrap(), "ab<|im_end|> ab");
        assert!(t.decode(&[99], false).is_err());
    }

    #[test]
    fn bad_merges_are_errors() {
        let pieces: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        let types = vec![TokenType::Normal; 2];
        for m in ["a b", "a", "a b c", "a x"] {
            let err = BpeTokenizer::new(pieces.clone(), types.clone(), &[m.to_string()], PreTokenizer::Gpt2);
            assert!(err.is_err(), "{m}");
        }
    }
}
