//! Grammar-constrained decoding (structured output) through `llguidance`.
//!
//! A [`ConstraintFactory`] is built once per tokenizer: a byte trie of every
//! token ([`Tokenizer::token_bytes`]; control tokens are marked special so a
//! grammar never produces them, EOS aside) and llguidance's parser factory,
//! whose slicer precomputes token classes (the vocabulary cut by which
//! tokens can occur inside a JSON string, ...) so a mask costs a walk of
//! the small part of the trie the lexer allows, not of 150k tokens.
//!
//! Each request compiles its grammar ([`GrammarSpec`]: a JSON schema, any
//! JSON object, or a Lark grammar) into a [`Constraint`]. Per token the
//! engine calls [`Constraint::mask`] on the raw logits row, before
//! penalties, temperature, top-k and top-p, so every sampler stays within
//! the allowed tokens; then [`Constraint::consume`] with the token chosen.
//! EOS is allowed only where the grammar may end; once the grammar admits
//! no further token, [`Constraint::is_finished`] says the sequence is done.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attn_models::Tokenizer;
use attn_nn::{Error, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

/// What a constrained sequence must produce.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// A value valid under this JSON schema (OpenAI's `json_schema`).
    JsonSchema(Value),
    /// A Lark grammar (llguidance's dialect; tool-call formats).
    Lark(String),
}

/// How JSON is laid out when the schema does not say (an `x-guidance`
/// object in the schema overrides it): the separators of Python's
/// `json.dumps` and no other whitespace, so a model cannot loop on
/// newlines and every output is one line.
fn json_layout() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "})
}

impl GrammarSpec {
    fn to_grammar(&self) -> Result<TopLevelGrammar> {
        let with_layout = |mut schema: Value| -> Result<TopLevelGrammar> {
            if let Some(o) = schema.as_object_mut() {
                o.entry("x-guidance").or_insert_with(json_layout);
            } else if !schema.is_boolean() {
                // (`true` and `false` are schemas too; llguidance takes them as they are.)
                return Err(Error::input("grammar", "a JSON schema must be an object (or a boolean)"));
            }
            Ok(TopLevelGrammar::from_json_schema(schema))
        };
        match self {
            GrammarSpec::JsonObject => with_layout(json!({"type": "object"})),
            GrammarSpec::JsonSchema(s) => with_layout(s.clone()),
            GrammarSpec::Lark(g) => Ok(TopLevelGrammar::from_lark(g.clone())),
        }
    }
}

/// The per-tokenizer half of constrained decoding: build once (it walks the
/// whole vocabulary), share behind an `Arc`, compile grammars from it.
pub struct ConstraintFactory {
    factory: ParserFactory,
    vocab_size: usize,
}

impl fmt::Debug for ConstraintFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConstraintFactory").field("vocab_size", &self.vocab_size).finish()
    }
}

impl ConstraintFactory {
    /// The token trie of `tokenizer` and llguidance's parser factory over it.
    pub fn new<T: Tokenizer + ?Sized>(tokenizer: &T) -> Result<Self> {
        let n = tokenizer.vocab_size();
        let eos = tokenizer.eos_ids();
        if eos.is_empty() {
            return Err(Error::input(
                "grammar",
                "the tokenizer has no end-of-sequence token to end constrained output",
            ));
        }
        if let Some(&bad) = eos.iter().find(|&&t| t as usize >= n) {
            return Err(Error::input("grammar", format!("EOS id {bad} is outside the vocabulary of {n}")));
        }
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id).unwrap_or_default();
                if tokenizer.is_special(id) || eos.contains(&id) {
                    // llguidance's spelling of a special token: a marker byte, then its name.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(if bytes.is_empty() { format!("<[{id}]>").into_bytes() } else { bytes });
                    w
                } else {
                    bytes
                }
            })
            .collect();
        let info = TokRxInfo {
            vocab_size: n as u32,
            tok_eos: eos[0],
            tok_bos: tokenizer.bos_id(),
            tok_pad: None,
            tok_unk: None,
            tok_end_of_turn: None,
        };
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| Error::input("grammar", format!("llguidance: {e}")))?;
        factory.quiet();
        Ok(ConstraintFactory { factory, vocab_size: n })
    }

    /// Compiles `spec` into a fresh constraint. The error says what is
    /// wrong with the grammar (an invalid or unsupported schema).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let grammar = spec.to_grammar()?;
        let parser = self.factory.create_parser(grammar).map_err(|e| Error::input("grammar", e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::input("grammar", e));
        }
        Ok(Constraint { matcher, vocab_size: self.vocab_size, mask_times: Vec::new() })
    }
}

/// One sequence's grammar state. Cloning it forks the state (`n` choices).
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
    /// How long each [`Constraint::mask`] took.
    mask_times: Vec<Duration>,
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.is_finished())
            .field("masks", &self.mask_times.len())
            .finish()
    }
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to
    /// `-inf` (ids past the tokenizer's vocabulary too: a model's logits row
    /// may be padded). At least one token stays allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let start = Instant::now();
        let allowed = self.matcher.compute_mask_or_eos().map_err(|e| Error::input("grammar", e.to_string()))?;
        let words = allowed.as_slice();
        let mut any = false;
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX && chunk.len() == 32 {
                any = true;
                continue;
            }
            for (i, x) in chunk.iter_mut().enumerate() {
                if bits >> i & 1 == 0 {
                    *x = f32::NEG_INFINITY;
                } else {
                    any = true;
                }
            }
        }
        self.mask_times.push(start.elapsed());
        if !any {
            return Err(Error::input("grammar", "the grammar allows no token of this vocabulary here"));
        }
        Ok(())
    }

    /// Advances the grammar by the token chosen after [`Constraint::mask`].
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| Error::input("grammar", e.to_string()))
    }

    /// No token may follow: the output is complete.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether the output so far is a complete match (EOS would be allowed).
    pub fn is_accepting(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false)
    }

    /// The time each mask so far took (the grammar's cost per token).
    pub fn mask_times(&self) -> &[Duration] {
        &self.mask_times
    }

    /// The tokenizer vocabulary the grammar was compiled for.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn_test_support::toy::{ByteTokenizer, BOS, EOS};

    fn allowed(c: &mut Constraint, n: usize) -> Vec<u32> {
        let mut row = vec![0.0f32; n];
        c.mask(&mut row).unwrap();
        row.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, _)| i as u32).collect()
    }

    /// Feeds `text` byte by byte, checking each byte was allowed.
    fn feed(c: &mut Constraint, n: usize, text: &str) {
        for b in text.bytes() {
            assert!(allowed(c, n).contains(&(b as u32)), "{:?} not allowed", b as char);
            c.consume(b as u32).unwrap();
        }
    }

    #[test]
    fn json_schema_mask_allows_only_valid_continuations() {
        let tok = ByteTokenizer::with_pieces(&[&b"{\""[..], &b"true"[..], &b"\xc3"[..]]);
        let f = ConstraintFactory::new(&tok).unwrap();
        let n = tok.vocab_size() + 5; // a padded logits row
        let schema = json!({
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
            "required": ["ok", "tag"],
            "additionalProperties": false
        });
        let mut c = f.compile(&GrammarSpec::JsonSchema(schema)).unwrap();
        let first = allowed(&mut c, n);
        // `{` and the piece `{"`; never BOS, EOS, padding or other bytes.
        assert!(first.contains(&(b'{' as u32)) && first.contains(&258), "{first:?}");
        assert!(!first.contains(&BOS) && !first.contains(&EOS) && !first.contains(&(b' ' as u32)));
        assert!(first.iter().all(|&t| (t as usize) < tok.vocab_size()));
        feed(&mut c, n, "{\"ok\": ");
        let v = allowed(&mut c, n);
        assert!(v.contains(&(b't' as u32)) && v.contains(&(b'f' as u32)) && v.contains(&259), "{v:?}");
        assert!(!v.contains(&(b'1' as u32)) && !v.contains(&(b'"' as u32)));
        c.consume(259).unwrap(); // "true" as one token
        feed(&mut c, n, ", \"tag\": \"");
        let v = allowed(&mut c, n);
        assert_eq!(v, vec![b'a' as u32, b'b' as u32]);
        feed(&mut c, n, "b\"");
        assert!(!allowed(&mut c, n).contains(&EOS), "the object is not closed yet");
        feed(&mut c, n, "}");
        // Complete: only EOS remains, and the grammar says so.
        assert!(c.is_finished() || allowed(&mut c, n) == vec![EOS]);
        assert!(c.is_accepting());
    }

    #[test]
    fn json_object_refuses_other_values_and_bad_tokens() {
        let tok = ByteTokenizer::new();
        let f = ConstraintFactory::new(&tok).unwrap();
        let mut c = f.compile(&GrammarSpec::JsonObject).unwrap();
        assert_eq!(allowed(&mut c, tok.vocab_size()), vec![b'{' as u32]);
        assert!(c.consume(b'[' as u32).is_err(), "a token outside the mask is an error");
        // Forks are independent.
        let mut a = f.compile(&GrammarSpec::JsonObject).unwrap();
        feed(&mut a, 258, "{");
        let mut b = a.clone();
        feed(&mut a, 258, "}");
        assert!(allowed(&mut b, 258).contains(&(b'"' as u32)));
        assert!(a.is_accepting() && !b.is_accepting());
    }

    #[test]
    fn invalid_grammars_are_errors() {
        let tok = ByteTokenizer::new();
        let f = ConstraintFactory::new(&tok).unwrap();
        for bad in [json!({"type": "nonsense"}), json!(17), json!({"$ref": "#/$defs/missing"})] {
            let e = f.compile(&GrammarSpec::JsonSchema(bad.clone()));
            assert!(e.is_err(), "{bad}");
        }
        assert!(f.compile(&GrammarSpec::Lark("start: foo".into())).is_err(), "an undefined rule");
        let mut l = f.compile(&GrammarSpec::Lark("start: \"yes\" | \"no\"".into())).unwrap();
        assert_eq!(allowed(&mut l, 258), vec![b'n' as u32, b'y' as u32]);
    }
}
