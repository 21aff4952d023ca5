//! Text generation for one prompt: prefill, then one token per step.
//!
//! The prompt runs in a single forward call (matrix-matrix, compute-bound);
//! each later step feeds only the last token and reuses the KV cache
//! (matrix-vector, memory-bound), which is why the two phases are timed
//! separately. Streaming goes through the [`Detokenizer`] and then a stop
//! string filter that holds back any text that might still turn out to be the
//! beginning of a stop string, so what the callback receives is always
//! exactly the final text, never more.

use std::fmt;
use std::time::{Duration, Instant};

use attn_models::{LanguageModel, Logits, SeqStep, Tokenizer};
use attn_nn::{Error, Result};
use candle_core::{DType, Tensor};

use crate::constraint::Constraint;
use crate::detok::Detokenizer;
use crate::processors::SamplingParams;
use crate::sampler::Sampler;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-sequence token (not part of the output).
    Eos,
    /// The text reached a stop string (cut off before it).
    Stop,
    /// `max_tokens` was reached, or the model's context is full.
    Length,
    /// Generation failed for this sequence alone (its logits were not
    /// finite, sampling failed); [`crate::SeqOutput::error`] says why.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Error => "error",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the time went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    /// The prompt's forward call.
    pub prefill: Duration,
    /// One-token forward calls after the prefill (one fewer than the tokens
    /// sampled: the first comes from the prefill's logits, the last is never fed).
    pub decode_steps: usize,
    /// Everything after the prefill: sampling, detokenizing, decode steps.
    pub decode: Duration,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode)
    }
}

fn rate(n: usize, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if n == 0 || s == 0.0 {
        0.0
    } else {
        n as f64 / s
    }
}

/// The result of [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    /// Generated tokens, without the EOS token. When a stop string ended the
    /// generation, these include the tokens that spell it (a token may hold
    /// text on both sides of the cut).
    pub completion_ids: Vec<u32>,
    /// The generated text (control tokens skipped, cut before a stop string);
    /// exactly the concatenation of the streamed pieces.
    pub text: String,
    pub finish_reason: FinishReason,
    /// The sampling seed used: rerun with it to get the same output.
    pub seed: u64,
    pub timings: Timings,
}

/// Encodes `prompt` (adding BOS as the tokenizer's config says) and generates
/// a continuation; see [`generate_from_ids`].
pub fn generate<M, T>(
    model: &M,
    tokenizer: &T,
    prompt: &str,
    params: &SamplingParams,
    on_text: impl FnMut(&str),
) -> Result<Generation>
where
    M: LanguageModel,
    T: Tokenizer + ?Sized,
{
    let ids = tokenizer.encode(prompt, true)?;
    generate_from_ids(model, tokenizer, ids, params, on_text)
}

/// Generates a continuation of `prompt_ids`, calling `on_text` with each new
/// piece of text as soon as it is final.
///
/// Stops at an EOS token of the tokenizer, at a stop string, after
/// `params.max_tokens` tokens, or when prompt plus completion fill the model's
/// context. It is an error if the prompt is empty or leaves no room in the
/// context for a single generated token.
pub fn generate_from_ids<M, T>(
    model: &M,
    tokenizer: &T,
    prompt_ids: Vec<u32>,
    params: &SamplingParams,
    on_text: impl FnMut(&str),
) -> Result<Generation>
where
    M: LanguageModel,
    T: Tokenizer + ?Sized,
{
    generate_constrained(model, tokenizer, prompt_ids, params, None, on_text)
}

/// [`generate_from_ids`] whose output follows `constraint` (a grammar):
/// each step masks the logits before sampling and feeds the token to the
/// grammar after; when the grammar is complete, generation ends with
/// [`FinishReason::Stop`]. EOS is only possible where the grammar may end.
pub fn generate_constrained<M, T>(
    model: &M,
    tokenizer: &T,
    prompt_ids: Vec<u32>,
    params: &SamplingParams,
    mut constraint: Option<&mut Constraint>,
    mut on_text: impl FnMut(&str),
) -> Result<Generation>
where
    M: LanguageModel,
    T: Tokenizer + ?Sized,
{
    let mut sampler = Sampler::new(params)?;
    let ctx = model.context_length();
    check_prompt(&prompt_ids, ctx)?;
    let eos = tokenizer.eos_ids();

    let start = Instant::now();
    let mut cache = model.new_cache()?;
    let mut logits = forward_last(model, &mut cache, &prompt_ids)?;
    let prefill = start.elapsed();

    let start = Instant::now();
    let mut detok = Detokenizer::new(&prompt_ids);
    let mut out = StopFilter::new(&params.stop);
    let mut completion = Vec::new();
    let mut decode_steps = 0;
    let mut grammar_done = false;
    let mut finish_reason = loop {
        if let Some(c) = constraint.as_deref_mut() {
            c.mask(&mut logits)?;
        }
        let tok = sampler.sample(&mut logits, &prompt_ids, &completion)?;
        if eos.contains(&tok) {
            break FinishReason::Eos;
        }
        completion.push(tok);
        if let Some(c) = constraint.as_deref_mut() {
            c.consume(tok)?;
        }
        if out.push(&detok.push(tokenizer, tok)?, &mut on_text) {
            break FinishReason::Stop;
        }
        if constraint.as_deref().is_some_and(Constraint::is_finished) {
            grammar_done = true;
            break FinishReason::Stop;
        }
        if completion.len() >= params.max_tokens || prompt_ids.len() + completion.len() >= ctx {
            break FinishReason::Length;
        }
        logits = forward_last(model, &mut cache, &[tok])?;
        decode_steps += 1;
    };
    if finish_reason != FinishReason::Stop || grammar_done {
        // An incomplete character at the very end: emit it as the tokenizer
        // decodes it, so the stream still equals the final text.
        if out.push(&detok.flush(tokenizer)?, &mut on_text) {
            finish_reason = FinishReason::Stop;
        } else {
            out.finish(&mut on_text);
        }
    }
    let decode = start.elapsed();

    Ok(Generation {
        timings: Timings { prompt_tokens: prompt_ids.len(), prefill, decode_steps, decode },
        prompt_ids,
        completion_ids: completion,
        text: out.text,
        finish_reason,
        seed: sampler.seed(),
    })
}

/// Runs one sequence's new tokens and returns the last position's logits.
pub(crate) fn forward_last<M: LanguageModel>(model: &M, cache: &mut M::Cache, tokens: &[u32]) -> Result<Vec<f32>> {
    let out = model.forward(&mut [SeqStep { tokens, cache }], Logits::Last)?;
    match out.first() {
        Some(t) => logits_to_vec(t),
        None => Err(Error::input("forward", "the model returned no logits")),
    }
}

pub(crate) fn logits_to_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Accumulates the completion text and streams the part of it that can no
/// longer become (the start of) a stop string.
pub(crate) struct StopFilter {
    stops: Vec<String>,
    pub(crate) text: String,
    streamed: usize,
}

impl StopFilter {
    pub(crate) fn new(stops: &[String]) -> Self {
        StopFilter { stops: stops.to_vec(), text: String::new(), streamed: 0 }
    }

    /// Appends `piece`; returns true if the text now contains a stop string,
    /// in which case the text is cut before it and the rest streamed.
    pub(crate) fn push(&mut self, piece: &str, on_text: &mut impl FnMut(&str)) -> bool {
        if piece.is_empty() {
            return false;
        }
        let old_len = self.text.len();
        self.text.push_str(piece);
        if let Some(at) = self.find_stop(old_len) {
            self.text.truncate(at);
            self.finish(on_text);
            return true;
        }
        let safe = self.text.len() - self.held_back();
        self.emit(safe, on_text);
        false
    }

    /// Streams whatever was held back.
    pub(crate) fn finish(&mut self, on_text: &mut impl FnMut(&str)) {
        self.emit(self.text.len(), on_text);
    }

    fn emit(&mut self, end: usize, on_text: &mut impl FnMut(&str)) {
        if end > self.streamed {
            on_text(&self.text[self.streamed..end]);
            self.streamed = end;
        }
    }

    /// The earliest stop string occurrence that ends in the text added after
    /// `old_len` (earlier ones were found before).
    fn find_stop(&self, old_len: usize) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| {
                let mut from = old_len.saturating_sub(s.len() - 1);
                while !self.text.is_char_boundary(from) {
                    from -= 1;
                }
                self.text[from..].find(s.as_str()).map(|i| from + i)
            })
            .min()
    }

    /// Length of the longest end of the text that is a proper beginning of
    /// some stop string.
    fn held_back(&self) -> usize {
        self.stops
            .iter()
            .filter_map(|s| (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k])))
            .max()
            .unwrap_or(0)
    }
}

/// A prompt must hold at least one token and leave room in the context.
pub(crate) fn check_prompt(prompt_ids: &[u32], ctx: usize) -> Result<()> {
    if prompt_ids.is_empty() {
        return Err(Error::input("generate", "the prompt has no tokens"));
    }
    if prompt_ids.len() >= ctx {
        return Err(Error::input(
            "generate",
            format!(
                "the prompt has {} tokens but the model's context holds {ctx}, leaving no room to generate",
                prompt_ids.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn_test_support::toy::{ByteTokenizer, ToyModel, BOS, EOS, FIRST_PIECE};

    const CTX: usize = 64;
    /// "hi" encodes to [BOS, 'h', 'i'].
    const PROMPT_LEN: usize = 3;

    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    /// A tokenizer whose extra pieces are `pieces`, and their ids.
    fn pieces(pieces: &[&[u8]]) -> (ByteTokenizer, Vec<u32>) {
        let tok = ByteTokenizer::with_pieces(&pieces);
        let ids = (0..pieces.len() as u32).map(|i| FIRST_PIECE + i).collect();
        (tok, ids)
    }

    fn scripted(tok: &ByteTokenizer, ctx: usize, script: Vec<u32>) -> ToyModel {
        ToyModel::script(tok.vocab_size(), ctx, PROMPT_LEN, script)
    }

    /// Generates from "hi", checking that the stream is exactly the text.
    fn run(model: &ToyModel, tok: &ByteTokenizer, params: &SamplingParams) -> (Generation, Vec<String>) {
        let mut streamed = Vec::new();
        let g = generate(model, tok, "hi", params, |p| streamed.push(p.to_string())).unwrap();
        assert_eq!(streamed.concat(), g.text, "stream vs text, pieces {streamed:?}");
        assert!(streamed.iter().all(|p| !p.is_empty()));
        (g, streamed)
    }

    fn with_stop(stop: &[&str]) -> SamplingParams {
        SamplingParams { stop: stop.iter().map(|s| s.to_string()).collect(), ..SamplingParams::greedy() }
    }

    #[test]
    fn eos_ends_generation_after_one_prefill_and_cached_steps() {
        let tok = ByteTokenizer::new();
        let model = scripted(&tok, CTX, bytes("abc"));
        let (g, streamed) = run(&model, &tok, &SamplingParams::greedy());
        assert_eq!(g.prompt_ids, vec![BOS, b'h' as u32, b'i' as u32]);
        assert_eq!(g.completion_ids, bytes("abc"), "EOS is not part of the completion");
        assert_eq!(g.text, "abc");
        assert_eq!(streamed, ["a", "b", "c"]);
        assert_eq!(g.finish_reason, FinishReason::Eos);
        assert_eq!(g.finish_reason.to_string(), "eos");
        // The prompt in one call, then one token per call; the EOS is never fed.
        assert_eq!(*model.calls.borrow(), vec![vec![3], vec![1], vec![1], vec![1]]);
        assert_eq!((g.timings.prompt_tokens, g.timings.decode_steps), (3, 3));
        assert!(g.timings.prefill_tokens_per_s() >= 0.0 && g.timings.decode_tokens_per_s() >= 0.0);
    }

    #[test]
    fn max_tokens_ends_with_length() {
        let tok = ByteTokenizer::new();
        let model = scripted(&tok, CTX, bytes("abcdef"));
        let (g, _) = run(&model, &tok, &SamplingParams { max_tokens: 4, ..SamplingParams::greedy() });
        assert_eq!(g.text, "abcd");
        assert_eq!(g.finish_reason, FinishReason::Length);
        assert_eq!(g.finish_reason.as_str(), "length");
        assert_eq!(g.timings.decode_steps, 3, "the last token is not fed");
    }

    #[test]
    fn a_full_context_ends_with_length_and_an_overlong_prompt_is_an_error() {
        let tok = ByteTokenizer::new();
        // Room for 2 tokens after the 3-token prompt.
        let model = scripted(&tok, PROMPT_LEN + 2, bytes("abcdef"));
        let (g, _) = run(&model, &tok, &SamplingParams::greedy());
        assert_eq!((g.text.as_str(), g.finish_reason), ("ab", FinishReason::Length));
        // Room for exactly one.
        let model = scripted(&tok, PROMPT_LEN + 1, bytes("abcdef"));
        assert_eq!(run(&model, &tok, &SamplingParams::greedy()).0.text, "a");
        // No room.
        let model = scripted(&tok, PROMPT_LEN, bytes("abcdef"));
        let err = generate(&model, &tok, "hi", &SamplingParams::greedy(), |_| {}).unwrap_err();
        assert!(err.to_string().contains("3 tokens") && err.to_string().contains("holds 3"), "{err}");
        assert!(model.calls.borrow().is_empty(), "checked before any forward call");
        // An empty prompt (no BOS either) and invalid params are errors too.
        assert!(generate_from_ids(&model, &tok, vec![], &SamplingParams::greedy(), |_| {}).is_err());
        let bad = SamplingParams { top_p: 2.0, ..SamplingParams::default() };
        assert!(matches!(generate(&model, &tok, "hi", &bad, |_| {}), Err(Error::Config { .. })));
    }

    #[test]
    fn stop_string_spanning_tokens_is_cut_and_never_streamed() {
        let (tok, ids) = pieces(&[b"Hel", b"lo, Wo", b"r", b"ld! More"]);
        let model = scripted(&tok, CTX, ids.clone());
        let (g, streamed) = run(&model, &tok, &with_stop(&["World"]));
        assert_eq!(g.text, "Hello, ");
        assert_eq!(g.finish_reason, FinishReason::Stop);
        assert_eq!(g.completion_ids, ids, "the tokens spelling the stop string are kept");
        assert!(streamed.iter().all(|p| !p.contains('W')), "{streamed:?}");
        assert_eq!(streamed, ["Hel", "lo, "]);
        assert_eq!(*model.calls.borrow(), vec![vec![3], vec![1], vec![1], vec![1]], "no step after the stop");

        // The earliest of several stop strings wins, whichever completes first.
        let model = scripted(&tok, CTX, ids.clone());
        assert_eq!(run(&model, &tok, &with_stop(&["ld", "o, W"])).0.text, "Hell");
        // A stop string in the first token leaves nothing.
        let model = scripted(&tok, CTX, ids);
        let (g, streamed) = run(&model, &tok, &with_stop(&["Hel"]));
        assert_eq!((g.text.as_str(), g.finish_reason), ("", FinishReason::Stop));
        assert!(streamed.is_empty());
    }

    #[test]
    fn held_back_text_is_released_when_the_match_fails() {
        let (tok, ids) = pieces(&[b"a Wo", b"nder Wor", b"ld"]);
        let model = scripted(&tok, CTX, ids);
        let (g, streamed) = run(&model, &tok, &with_stop(&["World"]));
        assert_eq!(g.text, "a Wonder ");
        assert_eq!(streamed, ["a ", "Wonder "]);

        // At EOS, a partial match is just text.
        let (tok, ids) = pieces(&[b"ab W"]);
        let model = scripted(&tok, CTX, ids);
        let (g, streamed) = run(&model, &tok, &with_stop(&["World"]));
        assert_eq!((g.text.as_str(), g.finish_reason), ("ab W", FinishReason::Eos));
        assert_eq!(streamed, ["ab ", "W"]);
    }

    #[test]
    fn stop_string_split_inside_a_multi_byte_character() {
        // "é!" arrives as the bytes C3 | A9 | '!' in three tokens.
        let tok = ByteTokenizer::new();
        let model = scripted(&tok, CTX, bytes("café! more"));
        let (g, _) = run(&model, &tok, &with_stop(&["é!"]));
        assert_eq!((g.text.as_str(), g.finish_reason), ("caf", FinishReason::Stop));
    }

    #[test]
    fn streaming_is_utf8_safe_with_byte_tokens() {
        let text = "naïve café 🦀 — ok";
        let tok = ByteTokenizer::new();
        let model = scripted(&tok, CTX, bytes(text));
        let (g, streamed) = run(&model, &tok, &SamplingParams::greedy());
        assert_eq!(g.text, text);
        assert!(streamed.iter().all(|p| !p.contains('\u{FFFD}')), "{streamed:?}");
        assert!(streamed.contains(&"🦀".to_string()));

        // Tokens that each hold the end of one character and the start of the next.
        let (tok, ids) = pieces(&[b"caf\xC3", b"\xA9 \xF0\x9F", b"\xA6\x80!"]);
        let model = scripted(&tok, CTX, ids);
        let (g, streamed) = run(&model, &tok, &SamplingParams::greedy());
        assert_eq!(g.text, "café 🦀!");
        assert!(streamed.iter().all(|p| !p.contains('\u{FFFD}')), "{streamed:?}");
    }

    #[test]
    fn a_character_cut_by_max_tokens_ends_the_text_as_decode_does() {
        let tok = ByteTokenizer::new();
        let model = scripted(&tok, CTX, bytes("aé"));
        let (g, streamed) = run(&model, &tok, &SamplingParams { max_tokens: 2, ..SamplingParams::greedy() });
        assert_eq!(g.text, "a\u{FFFD}");
        assert_eq!(streamed, ["a", "\u{FFFD}"]);
    }

    /// Every lowercase letter equally likely, never EOS.
    fn flat(tok: &ByteTokenizer) -> ToyModel {
        let vocab = tok.vocab_size();
        ToyModel::new(vocab, CTX, move |_| {
            let mut l = vec![f32::NEG_INFINITY; vocab];
            l[b'a' as usize..=b'z' as usize].fill(0.0);
            l
        })
    }

    #[test]
    fn a_seed_reproduces_the_output() {
        let tok = ByteTokenizer::new();
        let params = |seed| SamplingParams { seed, max_tokens: 32, ..SamplingParams::default() };
        let text = |seed| run(&flat(&tok), &tok, &params(seed)).0;
        let a = text(Some(1));
        assert_eq!(a.seed, 1);
        assert_eq!(a.text.len(), 32);
        assert_eq!(a.finish_reason, FinishReason::Length);
        assert_eq!(a.text, text(Some(1)).text);
        assert_ne!(a.text, text(Some(2)).text);
        // Without a seed, the drawn one is reported and repeats the run.
        let drawn = text(None);
        assert_eq!(drawn.text, text(Some(drawn.seed)).text);
    }

    #[test]
    fn penalties_steer_greedy_decoding() {
        // The model always prefers 'a' slightly over 'b', then EOS after 4 tokens.
        let tok = ByteTokenizer::new();
        let vocab = tok.vocab_size();
        let model = ToyModel::new(vocab, CTX, move |seen| {
            let mut l = vec![f32::NEG_INFINITY; vocab];
            if seen.len() >= PROMPT_LEN + 4 {
                l[EOS as usize] = 0.0;
            } else {
                l[b'a' as usize] = 1.0;
                l[b'b' as usize] = 0.5;
            }
            l
        });
        assert_eq!(run(&model, &tok, &SamplingParams::greedy()).0.text, "aaaa");
        // Frequency penalty 0.3: 'a' drops below 'b' after two 'a's, and so on.
        let params = SamplingParams { frequency_penalty: 0.3, ..SamplingParams::greedy() };
        assert_eq!(run(&model, &tok, &params).0.text, "aaba");
    }
}

#[cfg(test)]
mod constrained_tests {
    use super::*;
    use crate::constraint::{ConstraintFactory, GrammarSpec};
    use attn_test_support::toy::ByteTokenizer;

    #[test]
    fn constrained_generation_streams_a_complete_json_object_and_stops() {
        let model = attn_test_support::tiny_gpt(3, 96);
        let tok = ByteTokenizer::new();
        let factory = ConstraintFactory::new(&tok).unwrap();
        let schema = serde_json::json!({"type": "object", "properties": {"mood": {"enum": ["up", "down"]},
            "ids": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2}},
            "required": ["mood", "ids"], "additionalProperties": false});
        for params in [SamplingParams::greedy(), SamplingParams { seed: Some(4), ..SamplingParams::default() }] {
            let params = SamplingParams { max_tokens: 60, ..params };
            let mut c = factory.compile(&GrammarSpec::JsonSchema(schema.clone())).unwrap();
            let mut streamed = String::new();
            let prompt = tok.encode("out:", true).unwrap();
            let g =
                generate_constrained(&model, &tok, prompt, &params, Some(&mut c), |p| streamed.push_str(p)).unwrap();
            assert_eq!(streamed, g.text);
            assert_eq!(g.finish_reason, FinishReason::Stop, "{:?}", g.text);
            let v: serde_json::Value = serde_json::from_str(&g.text).unwrap();
            assert!(["up", "down"].contains(&v["mood"].as_str().unwrap()), "{v}");
            assert!(v["ids"].as_array().unwrap().iter().all(|x| x == 1 || x == 2), "{v}");
            assert_eq!(c.mask_times().len(), g.completion_ids.len());
        }
    }
}
