//! Beam search: keep the `width` most probable partial sequences instead of
//! one, because the locally best token can lead to a globally worse sequence.
//!
//! It follows HF transformers' `BeamSearchScorer`, so scores are comparable:
//! each step ranks the `2 * width` best continuations over all beams; an EOS
//! among the first `width` of them finishes a hypothesis, the first `width`
//! non-EOS ones become the next beams. A finished hypothesis scores
//! `sum of logprobs / generated_len ^ length_penalty` (the length counts the
//! EOS token), and a pool keeps the `width` best.
//!
//! The beams advance together: one `forward` call with one `SeqStep` per beam.
//! A beam that continues in several ways clones its cache (`SequenceCache:
//! Clone`); the last child takes the parent's cache without a copy.

use attn_models::{LanguageModel, Logits, SeqStep};
use attn_nn::{Error, Result};

use crate::generate::{forward_last, logits_to_vec, FinishReason};
use attn_nn::kernels::logits::{check, max_finite, sum_exp, top_n};

/// Beam search settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamParams {
    /// Number of beams (1 is greedy search).
    pub width: usize,
    /// Exponent of the length normalisation; > 0 favours longer sequences,
    /// < 0 shorter ones, 0 ranks by total log-probability.
    pub length_penalty: f32,
    /// Stop as soon as `width` hypotheses have finished. Otherwise go on
    /// until no running beam can still beat the worst finished one.
    pub early_stopping: bool,
    /// The most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// How many hypotheses to return (1..=width).
    pub n_best: usize,
}

impl Default for BeamParams {
    fn default() -> Self {
        BeamParams { width: 4, length_penalty: 1.0, early_stopping: false, max_tokens: 256, n_best: 1 }
    }
}

impl BeamParams {
    pub fn validate(&self) -> Result<()> {
        if self.width == 0 {
            return Err(Error::config("width", "must be at least 1"));
        }
        if self.n_best == 0 || self.n_best > self.width {
            return Err(Error::config(
                "n_best",
                format!("must be in 1..={} (the width), got {}", self.width, self.n_best),
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(Error::config("length_penalty", format!("must be finite, got {}", self.length_penalty)));
        }
        if self.max_tokens == 0 {
            return Err(Error::config("max_tokens", "must be at least 1"));
        }
        Ok(())
    }
}

/// One finished sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated tokens, without the EOS token.
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities (EOS included).
    pub logprob: f64,
    /// `logprob / generated_len ^ length_penalty`; hypotheses are ranked by it.
    pub score: f64,
    /// `Eos` or `Length` (max tokens or a full context).
    pub finish_reason: FinishReason,
}

/// Beam search from `prompt_ids`; returns the `n_best` hypotheses, best first.
/// `eos_ids` end a hypothesis (usually the tokenizer's `eos_ids()`).
pub fn beam_search<M: LanguageModel>(
    model: &M,
    prompt_ids: &[u32],
    eos_ids: &[u32],
    params: &BeamParams,
) -> Result<Vec<Hypothesis>> {
    params.validate()?;
    let ctx = model.context_length();
    if prompt_ids.is_empty() {
        return Err(Error::input("beam_search", "the prompt has no tokens"));
    }
    if prompt_ids.len() >= ctx {
        return Err(Error::input(
            "beam_search",
            format!("the prompt has {} tokens but the model's context holds {ctx}", prompt_ids.len()),
        ));
    }
    let width = params.width;
    let max_len = params.max_tokens.min(ctx - prompt_ids.len());
    let mut pool = Pool { hyps: Vec::new(), width, alpha: params.length_penalty as f64 };

    let mut cache = model.new_cache()?;
    let logits = forward_last(model, &mut cache, prompt_ids)?;
    let mut beams = vec![Beam { tokens: Vec::new(), logprob: 0.0, cache, logits }];

    for len in 1..=max_len {
        // The 2 * width best (score, beam, token) over all beams.
        let mut cands = Vec::with_capacity(beams.len() * 2 * width);
        for (b, beam) in beams.iter().enumerate() {
            for (tok, lp) in top_logprobs(&beam.logits, 2 * width)? {
                cands.push((beam.logprob + lp, b, tok));
            }
        }
        cands.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        cands.truncate(2 * width);

        let mut next = Vec::with_capacity(width);
        for (rank, &(score, b, tok)) in cands.iter().enumerate() {
            if eos_ids.contains(&tok) {
                if rank < width {
                    pool.add(beams[b].tokens.clone(), score, len, FinishReason::Eos);
                }
            } else {
                next.push((score, b, tok));
                if next.len() == width {
                    break;
                }
            }
        }
        let Some(&(best_running, _, _)) = next.first() else {
            return Ok(pool.best(params.n_best)); // nothing left to extend
        };
        if pool.is_done(best_running, len, max_len, params.early_stopping) {
            return Ok(pool.best(params.n_best));
        }
        let extend = |&(_, b, tok): &(f64, usize, u32)| {
            let mut t = beams[b].tokens.clone();
            t.push(tok);
            t
        };
        if len == max_len {
            for n in &next {
                pool.add(extend(n), n.0, len, FinishReason::Length);
            }
            break;
        }

        // Fork the caches: every child but a parent's last gets a copy.
        let tokens: Vec<Vec<u32>> = next.iter().map(extend).collect();
        let mut children_left = vec![0usize; beams.len()];
        next.iter().for_each(|&(_, b, _)| children_left[b] += 1);
        let mut parents: Vec<Option<M::Cache>> = beams.into_iter().map(|beam| Some(beam.cache)).collect();
        let mut caches = Vec::with_capacity(next.len());
        for &(_, b, _) in &next {
            children_left[b] -= 1;
            let cache = if children_left[b] == 0 { parents[b].take() } else { parents[b].clone() };
            caches.push(cache.ok_or_else(|| Error::input("beam_search", "beam cache missing"))?);
        }
        drop(parents);

        let new_tokens: Vec<[u32; 1]> = next.iter().map(|&(_, _, tok)| [tok]).collect();
        let mut steps: Vec<SeqStep<'_, M::Cache>> =
            caches.iter_mut().zip(&new_tokens).map(|(cache, t)| SeqStep { tokens: t, cache }).collect();
        let out = model.forward(&mut steps, Logits::Last)?;
        drop(steps);
        if out.len() != caches.len() {
            return Err(Error::input(
                "beam_search",
                format!("the model returned {} logits rows for {} beams", out.len(), caches.len()),
            ));
        }
        beams = Vec::with_capacity(next.len());
        for (((t, cache), logits), &(logprob, _, _)) in tokens.into_iter().zip(caches).zip(out).zip(&next) {
            beams.push(Beam { tokens: t, logprob, cache, logits: logits_to_vec(&logits)? });
        }
    }
    Ok(pool.best(params.n_best))
}

struct Beam<C> {
    tokens: Vec<u32>,
    logprob: f64,
    cache: C,
    /// Logits for the beam's next token.
    logits: Vec<f32>,
}

/// The `n` most likely next tokens with their log-probabilities (fewer if
/// fewer have a finite logit; none is an error, as when sampling).
fn top_logprobs(logits: &[f32], n: usize) -> Result<Vec<(u32, f64)>> {
    check("beam_search", logits)?;
    let max = max_finite(logits).ok_or_else(|| Error::input("beam_search", "no token has a finite logit"))?;
    let log_z = max as f64 + sum_exp(logits, max).ln();
    Ok(top_n(logits, n).into_iter().map(|(l, id)| (id, l as f64 - log_z)).collect())
}

/// The best `width` finished hypotheses so far, sorted best first.
struct Pool {
    hyps: Vec<Hypothesis>,
    width: usize,
    alpha: f64,
}

impl Pool {
    fn score(&self, logprob: f64, len: usize) -> f64 {
        logprob / (len as f64).powf(self.alpha)
    }

    fn add(&mut self, tokens: Vec<u32>, logprob: f64, len: usize, finish_reason: FinishReason) {
        let score = self.score(logprob, len);
        if self.hyps.len() == self.width && self.hyps.last().is_some_and(|worst| score <= worst.score) {
            return;
        }
        let at = self.hyps.partition_point(|h| h.score >= score);
        self.hyps.insert(at, Hypothesis { tokens, logprob, score, finish_reason });
        self.hyps.truncate(self.width);
    }

    /// Whether no running beam (best sum `best_running` at length `len`) can
    /// still enter the pool.
    fn is_done(&self, best_running: f64, len: usize, max_len: usize, early_stopping: bool) -> bool {
        let Some(worst) = self.hyps.last().filter(|_| self.hyps.len() == self.width) else { return false };
        if early_stopping {
            return true;
        }
        // Log-probabilities only fall as a beam grows; the length term is at
        // its most favourable at the longest length (alpha > 0) or now.
        let best_len = if self.alpha > 0.0 { max_len } else { len };
        worst.score >= self.score(best_running, best_len)
    }

    fn best(mut self, n: usize) -> Vec<Hypothesis> {
        self.hyps.truncate(n);
        self.hyps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::generate_from_ids;
    use crate::processors::SamplingParams;
    use attn_models::Tokenizer;
    use attn_test_support::toy::{ByteTokenizer, ToyModel, BOS, EOS};

    const A: u32 = b'A' as u32;
    const B: u32 = b'B' as u32;
    const C: u32 = b'C' as u32;

    /// Next-token probabilities depend on the previous token only:
    ///
    /// ```text
    /// after BOS: A .5   C .4   B .1
    /// after A:   B .4   C .25  EOS .2  A .15
    /// after B:   EOS .5 A .25  B .15   C .1
    /// after C:   B .9   EOS .05 A .05
    /// ```
    ///
    /// Greedy takes A (.5), then B (.4), then EOS (.5): P(A B) = .1.
    /// Starting with the less likely C pays off: P(C B) = .4 * .9 * .5 = .18.
    fn toy() -> ToyModel {
        let vocab = ByteTokenizer::new().vocab_size();
        ToyModel::bigram(
            vocab,
            64,
            &[
                (BOS, &[(A, 0.5), (C, 0.4), (B, 0.1)]),
                (A, &[(B, 0.4), (C, 0.25), (EOS, 0.2), (A, 0.15)]),
                (B, &[(EOS, 0.5), (A, 0.25), (B, 0.15), (C, 0.1)]),
                (C, &[(B, 0.9), (EOS, 0.05), (A, 0.05)]),
            ],
        )
    }

    fn ln(p: f64) -> f64 {
        p.ln()
    }

    fn params(width: usize, n_best: usize, early_stopping: bool, max_tokens: usize, alpha: f32) -> BeamParams {
        BeamParams { width, n_best, early_stopping, max_tokens, length_penalty: alpha }
    }

    fn assert_hyp(h: &Hypothesis, tokens: &[u32], logprob: f64, len: usize, alpha: f64, reason: FinishReason) {
        assert_eq!(h.tokens, tokens);
        assert!((h.logprob - logprob).abs() < 1e-5, "{h:?}: logprob {logprob}");
        let score = logprob / (len as f64).powf(alpha);
        assert!((h.score - score).abs() < 1e-5, "{h:?}: score {score}");
        assert_eq!(h.finish_reason, reason);
    }

    #[test]
    fn greedy_takes_the_locally_best_path() {
        let tok = ByteTokenizer::new();
        let g = generate_from_ids(&toy(), &tok, vec![BOS], &SamplingParams::greedy(), |_| {}).unwrap();
        assert_eq!(g.text, "AB");
        assert_eq!(g.finish_reason, FinishReason::Eos);
        // Beam width 1 is greedy search.
        let hyps = beam_search(&toy(), &[BOS], &[EOS], &params(1, 1, true, 10, 1.0)).unwrap();
        assert_eq!(hyps.len(), 1);
        assert_hyp(&hyps[0], &[A, B], ln(0.5 * 0.4 * 0.5), 3, 1.0, FinishReason::Eos);
    }

    #[test]
    fn beam_width_two_finds_the_globally_more_probable_sequence() {
        // Step 1: beams A (.5), C (.4).
        // Step 2: candidates C B .36, A B .2, A C .125, A EOS .1: beams C B, A B.
        // Step 3: C B EOS .18 and A B EOS .1 rank first and second: both
        // finish (length 3, counting EOS); the pool is full, early stop.
        let model = toy();
        let hyps = beam_search(&model, &[BOS], &[EOS], &params(2, 2, true, 10, 1.0)).unwrap();
        assert_eq!(hyps.len(), 2);
        assert_hyp(&hyps[0], &[C, B], ln(0.4 * 0.9 * 0.5), 3, 1.0, FinishReason::Eos);
        assert_hyp(&hyps[1], &[A, B], ln(0.5 * 0.4 * 0.5), 3, 1.0, FinishReason::Eos);
        // Prefill, then one batched call per step with one token per beam.
        assert_eq!(*model.calls.borrow(), vec![vec![1], vec![1, 1], vec![1, 1]]);
        // n_best = 1 returns the best only.
        let best = beam_search(&toy(), &[BOS], &[EOS], &params(2, 1, true, 10, 1.0)).unwrap();
        assert_eq!(best, hyps[..1]);
    }

    #[test]
    fn without_early_stopping_the_search_goes_on_while_a_beam_could_win() {
        // After step 3 the running beams are C B A (.09) and C B B (.054).
        // With alpha = 1 and max 4 tokens, C B A could still score up to
        // ln(.09) / 4 = -0.60 > ln(.1) / 3 = -0.77, so step 4 runs: C B A B
        // (.036), C B B EOS (.027), C B A C (.0225) all score below the pool.
        let model = toy();
        let hyps = beam_search(&model, &[BOS], &[EOS], &params(2, 2, false, 4, 1.0)).unwrap();
        assert_hyp(&hyps[0], &[C, B], ln(0.18), 3, 1.0, FinishReason::Eos);
        assert_hyp(&hyps[1], &[A, B], ln(0.1), 3, 1.0, FinishReason::Eos);
        assert_eq!(model.calls.borrow().len(), 4, "one more step than with early stopping");
    }

    #[test]
    fn a_strong_length_penalty_prefers_longer_hypotheses() {
        // alpha = 3, max 4 tokens: step 4 adds C B B EOS (ln .027 / 64 = -0.0564,
        // evicting A B EOS at ln .1 / 27 = -0.0853); at the length limit the
        // running C B A B (ln .036 / 64 = -0.0519) enters too, evicting C B EOS
        // (ln .18 / 27 = -0.0635), and C B A C (ln .0225 / 64 = -0.0593) does not.
        let hyps = beam_search(&toy(), &[BOS], &[EOS], &params(2, 2, false, 4, 3.0)).unwrap();
        assert_hyp(&hyps[0], &[C, B, A, B], ln(0.4 * 0.9 * 0.25 * 0.4), 4, 3.0, FinishReason::Length);
        assert_hyp(&hyps[1], &[C, B, B], ln(0.4 * 0.9 * 0.15 * 0.5), 4, 3.0, FinishReason::Eos);
    }

    #[test]
    fn length_limits_and_invalid_params() {
        // One token allowed: the two best first tokens, unfinished.
        let hyps = beam_search(&toy(), &[BOS], &[EOS], &params(2, 2, true, 1, 0.0)).unwrap();
        assert_hyp(&hyps[0], &[A], ln(0.5), 1, 0.0, FinishReason::Length);
        assert_hyp(&hyps[1], &[C], ln(0.4), 1, 0.0, FinishReason::Length);
        // A context of 2 leaves room for one token after the 1-token prompt.
        let vocab = ByteTokenizer::new().vocab_size();
        let short = ToyModel::bigram(vocab, 2, &[(BOS, &[(A, 1.0)])]);
        let hyps = beam_search(&short, &[BOS], &[EOS], &params(2, 1, true, 10, 1.0)).unwrap();
        assert_eq!((hyps[0].tokens.as_slice(), hyps[0].finish_reason), (&[A][..], FinishReason::Length));
        assert!(beam_search(&short, &[BOS, A], &[EOS], &BeamParams::default()).is_err());
        assert!(beam_search(&short, &[], &[EOS], &BeamParams::default()).is_err());

        for (p, field) in [
            (BeamParams { width: 0, ..BeamParams::default() }, "width"),
            (BeamParams { n_best: 5, ..BeamParams::default() }, "n_best"),
            (BeamParams { n_best: 0, ..BeamParams::default() }, "n_best"),
            (BeamParams { max_tokens: 0, ..BeamParams::default() }, "max_tokens"),
            (BeamParams { length_penalty: f32::NAN, ..BeamParams::default() }, "length_penalty"),
        ] {
            match beam_search(&toy(), &[BOS], &[EOS], &p) {
                Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}
