//! Speculative decoding: a cheap drafter proposes `k` tokens, the target
//! model checks all of them in one forward call over the `k + 1` new
//! positions, and every proposal up to the first the target disagrees with
//! is kept.
//!
//! Decode is bound by reading the weights once per call; a call over a few
//! rows reads them once too, so each accepted proposal is a token for the
//! price of a few rows of compute. Two drafters come with the engine:
//! [`ModelDrafter`] (a smaller or more heavily quantized model sharing the
//! tokenizer) and [`NgramDrafter`] (prompt lookup: the tokens that followed
//! the latest earlier occurrence of the last few tokens; no second model).
//!
//! The output is the one plain decoding gives. Greedy: a proposal is kept
//! when it is the target's argmax, and the first disagreement is replaced by
//! that argmax, so the tokens are those of [`crate::generate()`] (given the
//! same logits: a quantized kernel that rounds a many-row call differently
//! from a one-row call can flip a near-tie). Sampling: the standard rule of
//! Leviathan et al. and Chen et al. (2023): keep a proposal `x` drawn from
//! the draft's `q` with probability `min(1, p(x) / q(x))`; on rejection draw
//! from `max(0, p - q)` renormalised; when all are kept, draw one more token
//! from `p`. Every sequence then has exactly the probability plain sampling
//! gives it. `p` and `q` are the distributions after the same processors
//! (penalties, temperature, top-k/p, min-p) plain sampling applies. A
//! deterministic drafter (n-gram) has a one-hot `q`: a proposal is kept with
//! probability `p(x)`, and a rejection draws from `p` without `x`.
//!
//! Stopping is the plain loop's: each kept token goes through the EOS, stop
//! string, `max_tokens` and context checks one at a time, and a step never
//! proposes more tokens than may still be generated. After a step both KV
//! caches are cut back to the tokens that were kept.

use std::time::{Duration, Instant};

use attn_models::{LanguageModel, Logits, SeqStep, SequenceCache, Tokenizer};
use attn_nn::{Error, Result};
use candle_core::Tensor;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::detok::Detokenizer;
use crate::generate::{forward_last, logits_to_vec, FinishReason, Generation, StopFilter, Timings};
use crate::processors::{process, SamplingParams};
use crate::sampler::{draw, uniform};
use attn_nn::kernels::logits::{self as kernels, check, exp_into, max_finite};

/// The most tokens one step may propose: past this the verification call is
/// no longer cheap, and acceptance of a long run is rare.
pub const MAX_DRAFT_TOKENS: usize = 32;

/// What a drafter proposes for one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    /// The proposed continuation (may be shorter than asked, or empty).
    pub tokens: Vec<u32>,
    /// For a drafter that samples: per token, the (processed, normalised)
    /// distribution over the vocabulary it was drawn from. `None` for a
    /// deterministic drafter (each `q` is one-hot on its token).
    pub probs: Option<Vec<Vec<f32>>>,
}

/// Proposes tokens for the target to verify.
pub trait Drafter {
    /// Up to `k` tokens likely to follow `prompt` + `completion`. A sampling
    /// drafter processes its logits with `params` (as plain sampling does,
    /// with the proposals so far counted as completion) and draws from `rng`.
    fn propose(
        &mut self,
        prompt: &[u32],
        completion: &[u32],
        k: usize,
        params: &SamplingParams,
        rng: &mut dyn RngCore,
    ) -> Result<Draft>;
}

/// Prompt-lookup drafting: finds the most recent earlier occurrence of the
/// last `n` tokens of prompt + completion (longest `n` first) and proposes
/// the tokens that followed it. Pays off when the output echoes its input
/// (code edits, lists, quoting, summaries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramDrafter {
    max_n: usize,
    min_n: usize,
}

impl Default for NgramDrafter {
    /// Matches of 3 tokens down to 1.
    fn default() -> Self {
        NgramDrafter { max_n: 3, min_n: 1 }
    }
}

impl NgramDrafter {
    /// Tries suffixes of `max_n` tokens down to `min_n` (`1 <= min_n <= max_n`).
    pub fn new(max_n: usize, min_n: usize) -> Result<Self> {
        if min_n == 0 || min_n > max_n {
            return Err(Error::config("ngram", format!("need 1 <= min_n <= max_n, got min_n {min_n}, max_n {max_n}")));
        }
        Ok(NgramDrafter { max_n, min_n })
    }

    /// The up to `k` tokens after the latest earlier occurrence of the
    /// longest matching suffix of `tokens`; empty when nothing matches.
    pub fn lookup(&self, tokens: &[u32], k: usize) -> Vec<u32> {
        let len = tokens.len();
        for n in (self.min_n..=self.max_n).rev() {
            if len <= n {
                continue;
            }
            let tail = &tokens[len - n..];
            // Occurrences that start before the suffix itself, latest first.
            if let Some(i) = (0..len - n).rev().find(|&i| &tokens[i..i + n] == tail) {
                let start = i + n;
                return tokens[start..(start + k).min(len)].to_vec();
            }
        }
        Vec::new()
    }
}

impl Drafter for NgramDrafter {
    fn propose(
        &mut self,
        prompt: &[u32],
        completion: &[u32],
        k: usize,
        _: &SamplingParams,
        _: &mut dyn RngCore,
    ) -> Result<Draft> {
        let all: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        Ok(Draft { tokens: self.lookup(&all, k), probs: None })
    }
}

/// Drafting with a second language model over the same vocabulary. It keeps
/// its own KV cache across steps and rolls it back to what the target kept.
pub struct ModelDrafter<'a, M: LanguageModel> {
    model: &'a M,
    cache: M::Cache,
    /// The tokens in `cache`.
    fed: Vec<u32>,
}

impl<'a, M: LanguageModel> ModelDrafter<'a, M> {
    /// A drafter for a target whose vocabulary has `target_vocab` tokens;
    /// the draft model must have the same (it must share the tokenizer).
    pub fn new(model: &'a M, target_vocab: usize) -> Result<Self> {
        let v = model.vocab_size();
        if v != target_vocab {
            return Err(Error::config(
                "draft",
                format!(
                    "the draft model's vocabulary has {v} tokens but the target's has {target_vocab}: \
                     a draft model must share the target's tokenizer"
                ),
            ));
        }
        Ok(ModelDrafter { model, cache: model.new_cache()?, fed: Vec::new() })
    }
}

impl<M: LanguageModel> Drafter for ModelDrafter<'_, M> {
    fn propose(
        &mut self,
        prompt: &[u32],
        completion: &[u32],
        k: usize,
        params: &SamplingParams,
        rng: &mut dyn RngCore,
    ) -> Result<Draft> {
        let context: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        if context.is_empty() {
            return Ok(Draft::default());
        }
        // Keep the cached prefix that still agrees; feed at least one token.
        let same = self.fed.iter().zip(&context).take_while(|(a, b)| a == b).count();
        let mut keep = same.min(context.len() - 1);
        if self.cache.truncate(keep).is_err() {
            // Further back than a sliding window's ring keeps: start over.
            self.cache = self.model.new_cache()?;
            keep = 0;
        }
        self.fed.truncate(keep);
        // The last proposal is never fed, so k tokens need context + k - 1 positions.
        let k = k.min((self.model.context_length() + 1).saturating_sub(context.len()));
        let mut draft = Draft { tokens: Vec::with_capacity(k), probs: (!params.is_greedy()).then(Vec::new) };
        let mut proposed = completion.to_vec();
        let mut feed = context[keep..].to_vec();
        let mut weights = Vec::new();
        for _ in 0..k {
            let mut logits = forward_last(self.model, &mut self.cache, &feed)?;
            self.fed.extend_from_slice(&feed);
            let tok = choose(&mut logits, params, prompt, &proposed, &mut weights, rng)?;
            if let Some(probs) = &mut draft.probs {
                probs.push(weights.clone());
            }
            draft.tokens.push(tok);
            proposed.push(tok);
            feed = vec![tok];
        }
        Ok(draft)
    }
}

/// Processes `logits` as plain sampling does and picks a token: the argmax
/// when greedy, else a draw, leaving the normalised distribution in `probs`.
fn choose(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt: &[u32],
    completion: &[u32],
    probs: &mut Vec<f32>,
    rng: &mut dyn RngCore,
) -> Result<u32> {
    check("speculative", logits)?;
    process(logits, params, prompt, completion);
    if params.is_greedy() {
        return kernels::argmax(logits)
            .map(|i| i as u32)
            .ok_or_else(|| Error::input("speculative", "no token has a finite logit"));
    }
    normalise(logits, probs)?;
    Ok(draw(probs, 1.0, rng))
}

/// `probs = softmax(logits)` (processed logits: `-inf` gives 0).
fn normalise(logits: &[f32], probs: &mut Vec<f32>) -> Result<()> {
    let max = max_finite(logits).ok_or_else(|| Error::input("speculative", "no token has a finite logit"))?;
    let total = exp_into(logits, max, probs);
    let inv = (1.0 / total) as f32;
    probs.iter_mut().for_each(|w| *w *= inv);
    Ok(())
}

/// Counters of one speculative generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpecStats {
    /// Forward calls of the target after the prefill (one per step).
    pub target_calls: usize,
    /// Tokens the drafter proposed, and how many of them the target kept.
    pub proposed: usize,
    pub accepted: usize,
    /// Time spent in the drafter (part of the decode time).
    pub draft_time: Duration,
}

impl SpecStats {
    /// Kept proposals over proposals (0 when nothing was proposed).
    pub fn acceptance_rate(&self) -> f64 {
        if self.proposed == 0 {
            0.0
        } else {
            self.accepted as f64 / self.proposed as f64
        }
    }
}

/// The result of [`generate_speculative`]. In `generation.timings`,
/// `decode_steps` counts the tokens chosen after the prefill's (as in plain
/// decoding, where each step chooses one), so `decode_tokens_per_s` compares
/// directly; the number of target calls is in `stats`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeculativeGeneration {
    pub generation: Generation,
    pub stats: SpecStats,
}

/// Checks the number of tokens proposed per step.
pub fn validate_draft_tokens(k: usize) -> Result<()> {
    if k == 0 || k > MAX_DRAFT_TOKENS {
        return Err(Error::config("draft_k", format!("must be in 1..={MAX_DRAFT_TOKENS}, got {k}")));
    }
    Ok(())
}

/// How a rejected proposal is replaced. Only the standard rule keeps the
/// output distribution; the other exists to show that the statistical test
/// can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Draw from `max(0, p - q)` renormalised.
    Residual,
    /// Draw from `p` (wrong: over-weights the tokens the draft favours).
    #[cfg(test)]
    ResampleTarget,
}

/// [`crate::generate_from_ids`] with speculative decoding: `drafter`
/// proposes up to `k` tokens per step (`1..=MAX_DRAFT_TOKENS`), the target
/// verifies them in one call. Same stopping, streaming and result as plain
/// generation; see the module docs for why the output is unchanged.
pub fn generate_speculative<M, D, T>(
    target: &M,
    drafter: &mut D,
    tokenizer: &T,
    prompt_ids: Vec<u32>,
    params: &SamplingParams,
    k: usize,
    on_text: impl FnMut(&str),
) -> Result<SpeculativeGeneration>
where
    M: LanguageModel,
    D: Drafter + ?Sized,
    T: Tokenizer + ?Sized,
{
    run(target, drafter, tokenizer, prompt_ids, params, k, Rule::Residual, on_text)
}

/// The generated tokens with the plain loop's checks, one token at a time.
struct Output<'a, T: ?Sized, F> {
    tokenizer: &'a T,
    eos: Vec<u32>,
    max_tokens: usize,
    ctx: usize,
    prompt_len: usize,
    detok: Detokenizer,
    out: StopFilter,
    completion: Vec<u32>,
    /// Tokens chosen (EOS included).
    chosen: usize,
    on_text: F,
}

impl<T: Tokenizer + ?Sized, F: FnMut(&str)> Output<'_, T, F> {
    /// Takes one chosen token; `Some` when generation ends with it.
    fn push(&mut self, tok: u32) -> Result<Option<FinishReason>> {
        self.chosen += 1;
        if self.eos.contains(&tok) {
            return Ok(Some(FinishReason::Eos));
        }
        self.completion.push(tok);
        if self.out.push(&self.detok.push(self.tokenizer, tok)?, &mut self.on_text) {
            return Ok(Some(FinishReason::Stop));
        }
        if self.completion.len() >= self.max_tokens || self.prompt_len + self.completion.len() >= self.ctx {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// Tokens that may still be generated (at least 1 while running).
    fn room(&self) -> usize {
        (self.max_tokens - self.completion.len()).min(self.ctx - self.prompt_len - self.completion.len())
    }
}

#[allow(clippy::too_many_arguments)]
fn run<M, D, T>(
    target: &M,
    drafter: &mut D,
    tokenizer: &T,
    prompt_ids: Vec<u32>,
    params: &SamplingParams,
    k: usize,
    rule: Rule,
    on_text: impl FnMut(&str),
) -> Result<SpeculativeGeneration>
where
    M: LanguageModel,
    D: Drafter + ?Sized,
    T: Tokenizer + ?Sized,
{
    params.validate()?;
    validate_draft_tokens(k)?;
    let ctx = target.context_length();
    crate::generate::check_prompt(&prompt_ids, ctx)?;
    let vocab = target.vocab_size();
    let seed = params.seed.unwrap_or_else(rand::random);
    // One stream for the target's choices, another for the drafter's, so
    // that how many draws the drafter makes does not shift the target's.
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut draft_rng = ChaCha20Rng::seed_from_u64(seed);
    draft_rng.set_stream(1);

    let start = Instant::now();
    let mut cache = target.new_cache()?;
    let mut logits = forward_last(target, &mut cache, &prompt_ids)?;
    let prefill = start.elapsed();

    let start = Instant::now();
    let mut o = Output {
        tokenizer,
        eos: tokenizer.eos_ids(),
        max_tokens: params.max_tokens,
        ctx,
        prompt_len: prompt_ids.len(),
        detok: Detokenizer::new(&prompt_ids),
        out: StopFilter::new(&params.stop),
        completion: Vec::new(),
        chosen: 0,
        on_text,
    };
    let mut stats = SpecStats::default();
    let mut p = Vec::new();
    let first = choose(&mut logits, params, &prompt_ids, &[], &mut p, &mut rng)?;
    let mut finish = o.push(first)?;
    while finish.is_none() {
        // The target's cache holds everything but the last chosen token.
        let last = *o.completion.last().expect("a token was pushed");
        // k proposals and the bonus token must fit in what may be generated.
        let room = o.room();
        let want = k.min(room - 1);
        let draft = if want > 0 {
            let t = Instant::now();
            let d = drafter.propose(&prompt_ids, &o.completion, want, params, &mut draft_rng)?;
            stats.draft_time += t.elapsed();
            check_draft(&d, want, vocab)?
        } else {
            Draft::default()
        };
        let n = draft.tokens.len();
        stats.proposed += n;
        stats.target_calls += 1;
        let mut feed = Vec::with_capacity(n + 1);
        feed.push(last);
        feed.extend_from_slice(&draft.tokens);
        let rows = forward_rows(target, &mut cache, &feed)?;
        for i in 0..=n {
            let mut row = rows[i * vocab..(i + 1) * vocab].to_vec();
            let (tok, kept) = if i == n {
                // Every proposal kept: one more token from the target.
                (choose(&mut row, params, &prompt_ids, &o.completion, &mut p, &mut rng)?, false)
            } else {
                let x = draft.tokens[i];
                let q = draft.probs.as_ref().map(|q| q[i].as_slice());
                match verify(&mut row, params, &prompt_ids, &o.completion, x, q, &mut p, &mut rng, rule)? {
                    Verdict::Accept => {
                        stats.accepted += 1;
                        (x, true)
                    }
                    Verdict::Replace(t) => (t, false),
                }
            };
            finish = o.push(tok)?;
            if finish.is_some() || !kept {
                break;
            }
        }
        if finish.is_none() {
            cache.truncate(prompt_ids.len() + o.completion.len() - 1)?;
        }
    }
    let mut finish_reason = finish.expect("the loop ends with a reason");
    if finish_reason != FinishReason::Stop {
        // As in plain generation: an incomplete character at the very end.
        let tail = o.detok.flush(tokenizer)?;
        if o.out.push(&tail, &mut o.on_text) {
            finish_reason = FinishReason::Stop;
        } else {
            o.out.finish(&mut o.on_text);
        }
    }
    let decode = start.elapsed();
    Ok(SpeculativeGeneration {
        generation: Generation {
            timings: Timings { prompt_tokens: prompt_ids.len(), prefill, decode_steps: o.chosen - 1, decode },
            prompt_ids,
            completion_ids: o.completion,
            text: o.out.text,
            finish_reason,
            seed,
        },
        stats,
    })
}

/// A drafter's answer, checked before the target sees it.
fn check_draft(d: &Draft, k: usize, vocab: usize) -> Result<Draft> {
    if d.tokens.len() > k {
        return Err(Error::input("speculative", format!("the drafter proposed {} tokens, {k} asked", d.tokens.len())));
    }
    if let Some(&bad) = d.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::input(
            "speculative",
            format!("the drafter proposed token {bad}, outside the vocabulary of {vocab}"),
        ));
    }
    if let Some(q) = &d.probs {
        if q.len() != d.tokens.len() || q.iter().any(|r| r.len() != vocab) {
            return Err(Error::input(
                "speculative",
                "the drafter's distributions do not match its tokens and the vocabulary",
            ));
        }
    }
    Ok(d.clone())
}

/// Runs `tokens` through the target and returns their logits, row-major.
fn forward_rows<M: LanguageModel>(model: &M, cache: &mut M::Cache, tokens: &[u32]) -> Result<Vec<f32>> {
    let out: Vec<Tensor> = model.forward(&mut [SeqStep { tokens, cache }], Logits::All)?;
    let rows = match out.first() {
        Some(t) => logits_to_vec(t)?,
        None => return Err(Error::input("forward", "the model returned no logits")),
    };
    if rows.len() != tokens.len() * model.vocab_size() {
        return Err(Error::input("forward", format!("expected {} rows of logits", tokens.len())));
    }
    Ok(rows)
}

enum Verdict {
    Accept,
    Replace(u32),
}

/// Decides on proposal `x` (drawn from `q`, one-hot when `None`) against the
/// target's row of logits.
#[allow(clippy::too_many_arguments)]
fn verify(
    row: &mut [f32],
    params: &SamplingParams,
    prompt: &[u32],
    completion: &[u32],
    x: u32,
    q: Option<&[f32]>,
    p: &mut Vec<f32>,
    rng: &mut dyn RngCore,
    rule: Rule,
) -> Result<Verdict> {
    if params.is_greedy() {
        let t = choose(row, params, prompt, completion, p, rng)?;
        return Ok(if t == x { Verdict::Accept } else { Verdict::Replace(t) });
    }
    check("speculative", row)?;
    process(row, params, prompt, completion);
    normalise(row, p)?;
    let xi = x as usize;
    let qx = q.map_or(1.0, |q| q[xi]) as f64;
    // Keep with probability min(1, p(x) / q(x)).
    if uniform(rng) * qx < p[xi] as f64 {
        return Ok(Verdict::Accept);
    }
    let residual_from_target = match rule {
        Rule::Residual => false,
        #[cfg(test)]
        Rule::ResampleTarget => true,
    };
    if residual_from_target {
        return Ok(Verdict::Replace(draw(p, 1.0, rng)));
    }
    let mut total = 0.0f64;
    match q {
        Some(q) => {
            for (w, &qi) in p.iter_mut().zip(q) {
                *w = (*w - qi).max(0.0);
                total += *w as f64;
            }
        }
        None => {
            p[xi] = 0.0;
            total = kernels::sum(p);
        }
    }
    if total <= 0.0 {
        // Only through rounding (p and q equal): any draw from p is right.
        normalise(row, p)?;
        total = 1.0;
    }
    Ok(Verdict::Replace(draw(p, total, rng)))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::generate::generate_from_ids;
    use attn_test_support::toy::{ByteTokenizer, ToyModel, BOS};

    fn bytes(s: &str) -> Vec<u32> {
        s.bytes().map(u32::from).collect()
    }

    #[test]
    fn ngram_lookup_proposes_what_followed_the_latest_longest_match() {
        let d = NgramDrafter::default();
        // "b c" occurs at 1 and 5; the latest earlier one (5) is followed by "x y".
        let t = bytes("abcdabcxyzbc");
        assert_eq!(d.lookup(&t, 2), bytes("xy"));
        assert_eq!(d.lookup(&t, 10), bytes("xyzbc"), "runs up to the end of the text");
        // No 3- or 2-token match: the last token alone ("q" after the earlier "d").
        assert_eq!(d.lookup(&bytes("dqrsd"), 3), bytes("qrs"));
        // A 3-token match wins over a later 1-token one.
        assert_eq!(d.lookup(&bytes("abcXcYabc"), 1), bytes("X"));
        // A repeating tail may continue into itself.
        assert_eq!(d.lookup(&bytes("aaaa"), 3), bytes("a"));
        assert!(d.lookup(&bytes("abc"), 4).is_empty());
        assert!(d.lookup(&[], 4).is_empty());
        assert_eq!(NgramDrafter::new(2, 2).unwrap().lookup(&bytes("abXcab"), 2), bytes("Xc"));
        assert!(NgramDrafter::new(2, 2).unwrap().lookup(&bytes("aXcYa"), 2).is_empty());
        assert!(NgramDrafter::new(1, 0).is_err() && NgramDrafter::new(1, 2).is_err());
    }

    /// Plain generation and speculative generation of the same request; the
    /// streamed pieces are checked against the text.
    fn both(
        model: &ToyModel,
        drafter: &mut dyn Drafter,
        tok: &ByteTokenizer,
        prompt: &[u32],
        params: &SamplingParams,
        k: usize,
    ) -> (Generation, SpeculativeGeneration, Vec<String>, Vec<String>) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let plain = generate_from_ids(model, tok, prompt.to_vec(), params, |p| a.push(p.to_string())).unwrap();
        let spec =
            generate_speculative(model, drafter, tok, prompt.to_vec(), params, k, |p| b.push(p.to_string())).unwrap();
        assert_eq!(b.concat(), spec.generation.text);
        (plain, spec, a, b)
    }

    #[test]
    fn greedy_output_equals_plain_decoding_under_every_stop_condition() {
        let tok = ByteTokenizer::new();
        let prompt = tok.encode("ab", true).unwrap();
        let text = "abcabcabXabcabcabcab ca\u{e9}b\u{e9}";
        let script = bytes(text);
        // A draft model that is right most of the time, wrong every fifth token.
        let mut wrong = script.clone();
        for (i, t) in wrong.iter_mut().enumerate() {
            if i % 5 == 3 {
                *t = b'z' as u32;
            }
        }
        let stops: [&[&str]; 4] = [&[], &["Xa"], &["b c"], &["\u{e9}b"]];
        for ctx in [64, prompt.len() + 7] {
            for stop in stops {
                for max_tokens in [1, 2, 3, 5, 8, 13, 40] {
                    let params = SamplingParams {
                        max_tokens,
                        stop: stop.iter().map(|s| s.to_string()).collect(),
                        ..SamplingParams::greedy()
                    };
                    for k in [1, 2, 3, 5, 8] {
                        let target = ToyModel::script(tok.vocab_size(), ctx, prompt.len(), script.clone());
                        let draft = ToyModel::script(tok.vocab_size(), ctx, prompt.len(), wrong.clone());
                        let mut drafters: Vec<Box<dyn Drafter + '_>> = vec![
                            Box::new(NgramDrafter::default()),
                            Box::new(ModelDrafter::new(&draft, tok.vocab_size()).unwrap()),
                        ];
                        for d in drafters.iter_mut() {
                            let (plain, spec, a, b) = both(&target, d.as_mut(), &tok, &prompt, &params, k);
                            let case = format!("ctx {ctx}, stop {stop:?}, max {max_tokens}, k {k}");
                            let g = &spec.generation;
                            assert_eq!(g.completion_ids, plain.completion_ids, "{case}");
                            assert_eq!(g.text, plain.text, "{case}");
                            assert_eq!(g.finish_reason, plain.finish_reason, "{case}");
                            assert_eq!(b, a, "streamed pieces, {case}");
                            assert!(g.completion_ids.len() <= max_tokens);
                            assert_eq!(g.timings.decode_steps, plain.timings.decode_steps, "{case}");
                            assert!(spec.stats.accepted <= spec.stats.proposed);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn accepted_proposals_save_target_calls_and_the_draft_rolls_back() {
        let tok = ByteTokenizer::new();
        let prompt = tok.encode("ab", true).unwrap();
        let script = bytes("cabcabcabcabcabcabcabcabcabcab");
        let params = SamplingParams { max_tokens: 24, ..SamplingParams::greedy() };
        let target = ToyModel::script(tok.vocab_size(), 64, prompt.len(), script.clone());
        let spec =
            generate_speculative(&target, &mut NgramDrafter::default(), &tok, prompt.clone(), &params, 4, |_| {})
                .unwrap();
        assert_eq!(spec.generation.completion_ids, script[..24]);
        // After "c" the pattern repeats: nearly every proposal is kept, 5 tokens a call.
        assert!(spec.stats.accepted >= spec.stats.proposed - 4, "{:?}", spec.stats);
        assert!(spec.stats.target_calls <= 7, "{:?}", spec.stats);
        // Prefill, then one call per step over the last token and the proposals.
        let calls = target.calls.borrow();
        assert_eq!(calls.len(), 1 + spec.stats.target_calls);
        assert_eq!(calls[0], vec![prompt.len()]);

        // The same model as its own draft: everything is kept, and the draft
        // feeds each token once (its cache is only cut back, never rebuilt).
        let target = ToyModel::script(tok.vocab_size(), 64, prompt.len(), script.clone());
        let draft = ToyModel::script(tok.vocab_size(), 64, prompt.len(), script.clone());
        let mut d = ModelDrafter::new(&draft, tok.vocab_size()).unwrap();
        let spec = generate_speculative(&target, &mut d, &tok, prompt.clone(), &params, 3, |_| {}).unwrap();
        assert_eq!(spec.generation.completion_ids, script[..24]);
        assert_eq!(spec.stats.accepted, spec.stats.proposed);
        let fed: usize = draft.calls.borrow().iter().map(|c| c[0]).sum();
        assert!(fed <= prompt.len() + 24, "draft fed {fed} tokens");

        // Bad arguments are errors.
        for k in [0, MAX_DRAFT_TOKENS + 1] {
            let e =
                generate_speculative(&target, &mut NgramDrafter::default(), &tok, prompt.clone(), &params, k, |_| {})
                    .unwrap_err();
            assert!(e.to_string().contains("draft_k"), "{e}");
        }
        let small = ToyModel::script(100, 64, prompt.len(), script);
        let e = ModelDrafter::new(&small, tok.vocab_size()).err().unwrap().to_string();
        assert!(e.contains("100") && e.contains(&tok.vocab_size().to_string()) && e.contains("tokenizer"), "{e}");
    }

    /// A drafter that proposes tokens outside the vocabulary.
    struct Broken;
    impl Drafter for Broken {
        fn propose(
            &mut self,
            _: &[u32],
            _: &[u32],
            k: usize,
            _: &SamplingParams,
            _: &mut dyn RngCore,
        ) -> Result<Draft> {
            Ok(Draft { tokens: vec![1_000_000; k], probs: None })
        }
    }

    #[test]
    fn a_broken_drafter_is_an_error() {
        let tok = ByteTokenizer::new();
        let prompt = tok.encode("ab", true).unwrap();
        let target = ToyModel::script(tok.vocab_size(), 64, prompt.len(), bytes("abcabc"));
        let e =
            generate_speculative(&target, &mut Broken, &tok, prompt, &SamplingParams::greedy(), 2, |_| {}).unwrap_err();
        assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    }

    /// A small random GPT over the byte vocabulary (real KV caches, cut back
    /// on rejection).
    fn gpt(seed: u64) -> attn_models::gpt::Gpt {
        attn_test_support::tiny_gpt(seed, 96)
    }

    #[test]
    fn greedy_gpt_output_equals_plain_decoding_with_every_drafter() {
        let tok = ByteTokenizer::new();
        let target = gpt(7);
        let (same, other) = (gpt(7), gpt(8));
        let params = SamplingParams { max_tokens: 30, ..SamplingParams::greedy() };
        for prompt in [vec![BOS, 5, 6, 7, 5, 6], vec![BOS, 100], (0..40).map(|i| (i * 37 % 250) as u32).collect()] {
            let plain = generate_from_ids(&target, &tok, prompt.clone(), &params, |_| {}).unwrap();
            let mut totals = Vec::new();
            for k in [1, 4] {
                let mut drafters: Vec<Box<dyn Drafter>> = vec![
                    Box::new(NgramDrafter::default()),
                    Box::new(ModelDrafter::new(&same, 258).unwrap()),
                    Box::new(ModelDrafter::new(&other, 258).unwrap()),
                ];
                for d in drafters.iter_mut() {
                    let s =
                        generate_speculative(&target, d.as_mut(), &tok, prompt.clone(), &params, k, |_| {}).unwrap();
                    assert_eq!(s.generation.completion_ids, plain.completion_ids, "prompt {prompt:?}, k {k}");
                    assert_eq!(s.generation.finish_reason, plain.finish_reason);
                    totals.push(s.stats);
                }
            }
            // The model as its own draft keeps everything; another model's
            // proposals are (mostly) rejected, which exercises the rollback.
            assert_eq!(totals[1].accepted, totals[1].proposed, "{totals:?}");
            assert!(totals[2].accepted < totals[2].proposed, "{totals:?}");
        }
    }

    // ---- The output distribution under sampling ---------------------------

    const SYMBOLS: [u32; 3] = [b'a' as u32, b'b' as u32, b'c' as u32];

    /// Next-symbol probabilities from the previous token (rows for a, b, c,
    /// then anything else).
    fn bigram(table: [[f32; 3]; 4]) -> ToyModel {
        ToyModel::new(258, 64, move |seen| {
            let prev = *seen.last().unwrap_or(&BOS);
            let row = SYMBOLS.iter().position(|&s| s == prev).unwrap_or(3);
            let mut l = vec![f32::NEG_INFINITY; 258];
            for (s, p) in SYMBOLS.iter().zip(table[row]) {
                l[*s as usize] = p.ln();
            }
            l
        })
    }

    fn target_model() -> ToyModel {
        bigram([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.3, 0.3, 0.4], [0.4, 0.3, 0.3]])
    }

    /// A draft far from the target (total variation about 0.4 per row).
    fn draft_model() -> ToyModel {
        bigram([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]])
    }

    /// Temperature, nucleus and a penalty that depends on the history, so
    /// the processors matter and some continuations have probability 0.
    fn sampling(max_tokens: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature: 0.8,
            top_p: 0.85,
            repetition_penalty: 1.5,
            max_tokens,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// The exact probability of every completion of `len` tokens under plain
    /// sampling: the product of the processed softmax at each position.
    fn exact(model: &ToyModel, prompt: &[u32], len: usize) -> HashMap<Vec<u32>, f64> {
        let mut out = HashMap::new();
        let mut stack = vec![(Vec::new(), 1.0f64)];
        while let Some((seq, prob)) = stack.pop() {
            if seq.len() == len {
                out.insert(seq, prob);
                continue;
            }
            let mut seen = prompt.to_vec();
            seen.extend(&seq);
            let mut logits = model.forward_logits(&seen);
            process(&mut logits, &sampling(len, 0), prompt, &seq);
            let mut p = Vec::new();
            normalise(&logits, &mut p).unwrap();
            for &s in &SYMBOLS {
                let mut next = seq.clone();
                next.push(s);
                stack.push((next, prob * p[s as usize] as f64));
            }
        }
        out
    }

    /// Pearson's chi-square of `counts` against `probs`, cells expecting
    /// fewer than 5 draws pooled into one, and its critical value at
    /// significance 1e-4 (Wilson-Hilferty: chi2_df(1 - a) ~ df (1 - 2/(9 df)
    /// + z sqrt(2/(9 df)))^3, z = 3.719). Any draw of a sequence of
    /// probability 0 gives an infinite statistic.
    fn chi_square(counts: &HashMap<Vec<u32>, usize>, probs: &HashMap<Vec<u32>, f64>, n: usize) -> (f64, f64) {
        if counts.keys().any(|s| probs.get(s).is_none_or(|&p| p == 0.0)) {
            return (f64::INFINITY, 0.0);
        }
        let (mut stat, mut bins, mut pooled_o, mut pooled_e) = (0.0, 0usize, 0.0, 0.0);
        for (seq, &p) in probs {
            let (o, e) = (*counts.get(seq).unwrap_or(&0) as f64, p * n as f64);
            if e >= 5.0 {
                stat += (o - e).powi(2) / e;
                bins += 1;
            } else {
                pooled_o += o;
                pooled_e += e;
            }
        }
        if pooled_e > 0.0 {
            stat += (pooled_o - pooled_e).powi(2) / pooled_e;
            bins += 1;
        }
        let df = (bins - 1) as f64;
        let h = 2.0 / (9.0 * df);
        (stat, df * (1.0 - h + 3.719 * h.sqrt()).powi(3))
    }

    /// Completions of `len` tokens over `n` seeds.
    fn histogram(n: usize, mut run: impl FnMut(u64) -> Vec<u32>) -> HashMap<Vec<u32>, usize> {
        let mut counts = HashMap::new();
        for seed in 0..n as u64 {
            *counts.entry(run(seed)).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn sampling_keeps_the_output_distribution_and_a_wrong_rule_is_caught() {
        // Four tokens: the first from the prefill, then a step of 2
        // proposals and the bonus token, so every branch of the rule runs.
        const LEN: usize = 4;
        // Enough runs for ~80 cells of 5+ expected draws each; the wrong rule
        // misses by a factor of about 20 in chi-square per run, so fewer do.
        const N: usize = 2500;
        const N_WRONG: usize = 800;
        let tok = ByteTokenizer::new();
        let target = target_model();
        let draft = draft_model();
        // A prompt with no symbol in it (the n-gram drafter finds nothing
        // there before the output repeats), and one full of them.
        for (prompt_text, drafters) in [("x", &[true][..]), ("abcacbba", &[true, false][..])] {
            let prompt = tok.encode(prompt_text, true).unwrap();
            let probs = exact(&target, &prompt, LEN);
            assert!((probs.values().sum::<f64>() - 1.0).abs() < 1e-6);
            assert!(probs.values().filter(|&&p| p == 0.0).count() > 0, "the filters cut some sequences");

            // Plain sampling against the exact distribution: the harness itself.
            let plain = histogram(N, |seed| {
                generate_from_ids(&target, &tok, prompt.clone(), &sampling(LEN, seed), |_| {}).unwrap().completion_ids
            });
            let (stat, crit) = chi_square(&plain, &probs, N);
            assert!(stat < crit, "plain sampling, prompt {prompt_text:?}: chi2 {stat} >= {crit}");

            for &model_draft in drafters {
                let name = if model_draft { "draft model" } else { "ngram" };
                let spec = |rule: Rule, n: usize| {
                    let mut stats = SpecStats::default();
                    let h = histogram(n, |seed| {
                        let g = if model_draft {
                            let mut d = ModelDrafter::new(&draft, 258).unwrap();
                            run(&target, &mut d, &tok, prompt.clone(), &sampling(LEN, seed), 3, rule, |_| {})
                        } else {
                            let mut d = NgramDrafter::default();
                            run(&target, &mut d, &tok, prompt.clone(), &sampling(LEN, seed), 3, rule, |_| {})
                        }
                        .unwrap();
                        assert_eq!(g.generation.completion_ids.len(), LEN);
                        stats.proposed += g.stats.proposed;
                        stats.accepted += g.stats.accepted;
                        g.generation.completion_ids
                    });
                    (h, stats)
                };
                let (h, stats) = spec(Rule::Residual, N);
                let (stat, crit) = chi_square(&h, &probs, N);
                eprintln!("{name}, prompt {prompt_text:?}: chi2 {stat:.1} (critical {crit:.1}), {stats:?}");
                assert!(stat < crit, "{name}, prompt {prompt_text:?}: chi2 {stat} >= {crit}");
                // Some proposals kept and some rejected: both branches ran.
                assert!(stats.accepted > N / 10 && stats.accepted < stats.proposed, "{name}: {stats:?}");

                // Drawing from p after a rejection over-weights what the
                // draft favours: the same test must reject it.
                let (h, _) = spec(Rule::ResampleTarget, N_WRONG);
                let (stat, crit) = chi_square(&h, &probs, N_WRONG);
                eprintln!("{name}, wrong rule, prompt {prompt_text:?}: chi2 {stat:.1} (critical {crit:.1})");
                assert!(stat > crit, "{name}, prompt {prompt_text:?}: the wrong rule passed, chi2 {stat} < {crit}");
            }
        }
    }
}
