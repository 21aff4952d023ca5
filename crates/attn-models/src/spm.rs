//! The SentencePiece-style BPE tokenizer that GGUF files describe with
//! `tokenizer.ggml.model = "llama"`: a vocabulary with a score per piece,
//! merged greedily by score, with `<0xXX>` byte fallback. The algorithm is
//! llama.cpp's `llm_tokenizer_spm`.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use attn_nn::{Error, Result};

use crate::gguf::{GgufFile, Value};
use crate::lm::Tokenizer;

/// Token types of `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

const SPACE: &str = "\u{2581}";

#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    index: HashMap<String, u32>,
    byte_ids: [Option<u32>; 256],
    /// Control and user-defined tokens matched verbatim in the text, longest first.
    specials: Vec<(String, u32)>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

#[derive(Debug, PartialEq)]
struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    len: usize,
}

impl Eq for Bigram {}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        // Highest score first; ties go to the leftmost pair.
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl SpmTokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let bad = |msg: String| Error::format(f.path(), msg);
        let model = f.meta_str("tokenizer.ggml.model")?;
        if model != "llama" {
            return Err(Error::Unsupported(format!(
                "GGUF tokenizer model `{model}` (only `llama`, SentencePiece BPE)"
            )));
        }
        let tokens = f
            .meta_opt("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("metadata `tokenizer.ggml.tokens` is missing or not an array".into()))?;
        let pieces = tokens
            .iter()
            .map(|t| t.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`tokenizer.ggml.tokens` holds a non-string".into()))?;
        let n = pieces.len();
        let scores = match f.meta_opt("tokenizer.ggml.scores").and_then(Value::as_array) {
            Some(a) if a.len() == n => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
            Some(a) => return Err(bad(format!("{} scores for {n} tokens", a.len()))),
            None => vec![0.0; n],
        };
        let types = match f.meta_opt("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) if a.len() == n => a
                .iter()
                .map(|v| match v {
                    Value::I32(x) => TokenType::from_i64(*x as i64),
                    other => TokenType::from_i64(other.as_u64().unwrap_or(1) as i64),
                })
                .collect(),
            Some(a) => return Err(bad(format!("{} token types for {n} tokens", a.len()))),
            None => vec![TokenType::Normal; n],
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
        let flag = |key: &str, default: bool| f.meta_opt(key).and_then(Value::as_bool).unwrap_or(default);
        let mut t = SpmTokenizer::new(pieces, scores, types)?;
        t.bos = id("tokenizer.ggml.bos_token_id")?;
        t.eos = id("tokenizer.ggml.eos_token_id")?;
        t.unk = id("tokenizer.ggml.unknown_token_id")?;
        t.eot = id("tokenizer.ggml.eot_token_id")?.or_else(|| t.index.get("<end_of_turn>").copied());
        t.add_bos = flag("tokenizer.ggml.add_bos_token", true);
        t.add_eos = flag("tokenizer.ggml.add_eos_token", false);
        t.add_space_prefix = flag("tokenizer.ggml.add_space_prefix", true);
        Ok(t)
    }

    /// A tokenizer from its vocabulary (no BOS/EOS, no space prefix).
    pub fn new(pieces: Vec<String>, scores: Vec<f32>, types: Vec<TokenType>) -> Result<Self> {
        if pieces.len() != scores.len()
            || pieces.len() != types.len()
            || pieces.is_empty()
            || pieces.len() > u32::MAX as usize
        {
            return Err(Error::input("tokenizer", "pieces, scores and types must be non-empty and of equal length"));
        }
        let mut index = HashMap::with_capacity(pieces.len());
        let mut byte_ids = [None; 256];
        let mut specials = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            index.entry(p.clone()).or_insert(i as u32);
            match types[i] {
                TokenType::Byte => {
                    if let Some(b) = p.strip_prefix("<0x").and_then(|s| s.strip_suffix('>')) {
                        if let Ok(b) = u8::from_str_radix(b, 16) {
                            byte_ids[b as usize] = Some(i as u32);
                        }
                    }
                }
                TokenType::Control | TokenType::UserDefined if !p.is_empty() => specials.push((p.clone(), i as u32)),
                _ => {}
            }
        }
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        Ok(SpmTokenizer {
            pieces,
            scores,
            types,
            index,
            byte_ids,
            specials,
            bos: None,
            eos: None,
            eot: None,
            unk: None,
            add_bos: false,
            add_eos: false,
            add_space_prefix: false,
        })
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Splits `text` on special-token strings: `(segment, Some(id))` for a
    /// special token, `(segment, None)` for ordinary text.
    fn split_specials<'a>(&self, text: &'a str, plain: &[std::ops::Range<usize>]) -> Vec<(&'a str, Option<u32>)> {
        split_specials(text, &self.specials, plain)
    }

    /// The control and user-defined token strings matched in text.
    pub fn special_strings(&self) -> Vec<String> {
        self.specials.iter().map(|(s, _)| s.clone()).collect()
    }

    /// Token ids of `text`; special-token strings overlapping `plain`
    /// byte ranges are read as text.
    fn encode_spans(&self, text: &str, add_special: bool, plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let mut first = true;
        for (seg, special) in self.split_specials(text, plain) {
            match special {
                Some(id) => out.push(id),
                None => {
                    if first && self.add_space_prefix {
                        self.encode_segment(&format!(" {seg}"), &mut out);
                    } else {
                        self.encode_segment(seg, &mut out);
                    }
                }
            }
            first = false;
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// SentencePiece BPE of one stretch of ordinary text.
    fn encode_segment(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let text = text.replace(' ', SPACE);
        let mut symbols: Vec<Symbol> = Vec::new();
        for (start, ch) in text.char_indices() {
            let idx = symbols.len();
            symbols.push(Symbol {
                start,
                len: ch.len_utf8(),
                prev: idx.checked_sub(1),
                next: if start + ch.len_utf8() < text.len() { Some(idx + 1) } else { None },
            });
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: usize, right: usize| {
            let s = symbols[left].start;
            let e = symbols[right].start + symbols[right].len;
            if let Some(&id) = self.index.get(&text[s..e]) {
                heap.push(Bigram { left, right, score: self.scores[id as usize], len: e - s });
            }
        };
        for i in 1..symbols.len() {
            try_add(&mut heap, &symbols, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            // Skip bigrams made stale by an earlier merge.
            if symbols[l].len == 0 || symbols[r].len == 0 || symbols[l].len + symbols[r].len != b.len {
                continue;
            }
            if symbols[l].next != Some(r) {
                continue;
            }
            symbols[l].len += symbols[r].len;
            symbols[r].len = 0;
            symbols[l].next = symbols[r].next;
            if let Some(n) = symbols[r].next {
                symbols[n].prev = Some(l);
            }
            if let Some(p) = symbols[l].prev {
                try_add(&mut heap, &symbols, p, l);
            }
            if let Some(n) = symbols[l].next {
                try_add(&mut heap, &symbols, l, n);
            }
        }
        let mut cur = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = cur {
            let s = &symbols[i];
            let piece = &text[s.start..s.start + s.len];
            match self.index.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        match (self.byte_ids[b as usize], self.unk) {
                            (Some(id), _) | (None, Some(id)) => out.push(id),
                            (None, None) => {}
                        }
                    }
                }
            }
            cur = s.next;
        }
    }
}

impl Tokenizer for SpmTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_spans(text, add_special, &[])
    }

    fn encode_chat(&self, text: &str, plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        self.encode_spans(text, false, plain)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(piece) = self.pieces.get(id as usize) else {
                return Err(Error::input(
                    "decode",
                    format!("token id {id} outside the vocabulary of {}", self.pieces.len()),
                ));
            };
            match self.types[id as usize] {
                TokenType::Byte => {
                    if let Some(b) = piece
                        .strip_prefix("<0x")
                        .and_then(|s| s.strip_suffix('>'))
                        .and_then(|s| u8::from_str_radix(s, 16).ok())
                    {
                        bytes.push(b);
                    }
                }
                TokenType::Control | TokenType::Unknown | TokenType::Unused if skip_special => {}
                _ => bytes.extend_from_slice(piece.replace(SPACE, " ").as_bytes()),
            }
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        Ok(text)
    }

    fn piece(&self, id: u32) -> Option<String> {
        self.pieces.get(id as usize).cloned()
    }

    /// `▁` as a space, a byte token `<0xNN>` as its byte.
    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let piece = self.pieces.get(id as usize)?;
        if self.types[id as usize] == TokenType::Byte {
            let byte = piece.strip_prefix("<0x").and_then(|s| s.strip_suffix('>'));
            if let Some(b) = byte.and_then(|s| u8::from_str_radix(s, 16).ok()) {
                return Some(vec![b]);
            }
        }
        Some(piece.replace(SPACE, " ").into_bytes())
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
        let mut v: Vec<u32> = self.eos.into_iter().chain(self.eot).collect();
        v.dedup();
        v
    }
}

/// Cuts `text` into plain segments and special-token strings (longest
/// first: `specials` is sorted by decreasing length): `(segment, Some(id))`
/// for a special token, `(segment, None)` for text. A special-token string
/// that overlaps a `plain` byte range stays text. Shared by the
/// SentencePiece and byte-level BPE tokenizers.
pub(crate) fn split_specials<'a>(
    text: &'a str,
    specials: &[(String, u32)],
    plain: &[std::ops::Range<usize>],
) -> Vec<(&'a str, Option<u32>)> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let (mut rest_start, mut i) = (0, 0);
    while i < text.len() {
        let mut matched = None;
        if text.is_char_boundary(i) {
            for (s, id) in specials {
                if bytes[i..].starts_with(s.as_bytes()) && !plain.iter().any(|r| r.start < i + s.len() && i < r.end) {
                    matched = Some((s.len(), *id));
                    break;
                }
            }
        }
        match matched {
            Some((len, id)) => {
                if rest_start < i {
                    out.push((&text[rest_start..i], None));
                }
                out.push((&text[i..i + len], Some(id)));
                i += len;
                rest_start = i;
            }
            None => i += 1,
        }
    }
    if rest_start < text.len() {
        out.push((&text[rest_start..], None));
    }
    out
}
