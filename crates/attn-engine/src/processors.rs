//! Logits processors: the transformations between the model's raw logits and
//! the choice of the next token.
//!
//! They work in place on a plain `&mut [f32]` (one row of logits) because the
//! row has to come to the CPU anyway for sampling, and for a 262,144-entry
//! vocabulary a single linear pass is cheaper than any tensor round trip.
//! Filters never delete entries; they set the logits of dropped tokens to
//! `-inf`, so indices stay token ids and filters compose in any order.
//! Each filter keeps at least the most likely token, so a row never ends up
//! empty. The order [`process`] applies them in is the one HF transformers and
//! vLLM use: penalties, temperature, top-k, top-p, min-p.
//!
//! Nothing sorts the whole vocabulary: top-k keeps a bounded heap in one
//! pass, and top-p first tries the 64 most likely tokens (for a trained model
//! the nucleus is usually that small), then falls back to a quickselect
//! weighted by probability mass, O(n) even for a flat distribution.

use attn_nn::{Error, Result};

use attn_nn::kernels::logits::{desc, exp_neg, finite, max_finite, sum_exp, top_n};

/// The smallest temperature applied: a positive temperature below it is
/// raised to it (vLLM does the same, with the same bound), because `1 / t`
/// for a tiny `t` turns every logit into `inf` and the row into NaN.
pub const MIN_TEMPERATURE: f32 = 1e-2;

/// How to choose tokens, and when to stop. The defaults change nothing:
/// plain sampling at temperature 1 from the full distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits; `0` means greedy (argmax). Must be `>= 0`.
    /// Values in `(0, MIN_TEMPERATURE)` act as [`MIN_TEMPERATURE`] (as in
    /// vLLM): dividing by a tiny temperature overflows the logits to `inf`.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (ties at the border are kept);
    /// `0` disables the filter.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose
    /// probabilities sum to at least `top_p`. In `(0, 1]`; `1` disables it.
    pub top_p: f32,
    /// Keep tokens whose probability is at least `min_p` times the most likely
    /// one's. In `[0, 1]`; `0` disables it.
    pub min_p: f32,
    /// HF/CTRL repetition penalty over every token seen (prompt and
    /// completion): positive logits are divided by it, negative ones
    /// multiplied. `> 0`; `1` disables it.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty, subtracted once from the logit of every token
    /// already generated (the prompt does not count). In `[-2, 2]`.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty, subtracted once per earlier occurrence of the
    /// token in the completion. In `[-2, 2]`.
    pub frequency_penalty: f32,
    /// Seed of the sampling RNG; `None` draws one (reported in the result so
    /// the run can be repeated).
    pub seed: Option<u64>,
    /// The most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Generation stops when the text contains one of these; the stop string
    /// itself is not part of the returned text.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Deterministic decoding: always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams { temperature: 0.0, ..Self::default() }
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            return Err(Error::config("temperature", format!("must be a finite number >= 0 (0 = greedy), got {t}")));
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::config("top_p", format!("must be in (0, 1] (1 = disabled), got {p}")));
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(Error::config("min_p", format!("must be in [0, 1] (0 = disabled), got {m}")));
        }
        let r = self.repetition_penalty;
        if !r.is_finite() || r <= 0.0 {
            return Err(Error::config(
                "repetition_penalty",
                format!("must be a finite number > 0 (1 = disabled), got {r}"),
            ));
        }
        for (field, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::config(field, format!("must be in [-2, 2] (0 = disabled), got {v}")));
            }
        }
        if self.max_tokens == 0 {
            return Err(Error::config("max_tokens", "must be at least 1"));
        }
        if let Some(i) = self.stop.iter().position(|s| s.is_empty()) {
            return Err(Error::config("stop", format!("entry {i} is empty; an empty stop string would stop at once")));
        }
        Ok(())
    }

    /// True when the next token is the argmax (temperature 0).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Applies every processor `params` asks for, in the HF/vLLM order
/// (penalties, temperature, top-k, top-p, min-p). With temperature 0 only the
/// penalties run: the argmax does not depend on the rest.
///
/// `prompt` and `completion` are the tokens so far; logits must not be NaN.
pub fn process(logits: &mut [f32], params: &SamplingParams, prompt: &[u32], completion: &[u32]) {
    if params.repetition_penalty != 1.0 {
        repetition_penalty(logits, prompt.iter().chain(completion).copied(), params.repetition_penalty);
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        presence_frequency_penalty(logits, completion, params.presence_penalty, params.frequency_penalty);
    }
    if params.is_greedy() {
        return;
    }
    temperature(logits, params.temperature.max(MIN_TEMPERATURE));
    top_k(logits, params.top_k);
    top_p(logits, params.top_p);
    min_p(logits, params.min_p);
}

/// HF/CTRL repetition penalty: for every distinct token in `seen`, a positive
/// logit is divided by `penalty` and a negative one multiplied by it (so a
/// penalty > 1 always makes the token less likely). Ids outside the row are
/// ignored.
pub fn repetition_penalty(logits: &mut [f32], seen: impl IntoIterator<Item = u32>, penalty: f32) {
    // A mark per vocabulary entry: linear in prompt length, no sort.
    let mut done = vec![false; logits.len()];
    for id in seen {
        let i = id as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let l = &mut logits[i];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// OpenAI presence and frequency penalties over the generated tokens:
/// `logit -= count * frequency + (count > 0) * presence`.
pub fn presence_frequency_penalty(logits: &mut [f32], generated: &[u32], presence: f32, frequency: f32) {
    let mut ids = generated.to_vec();
    ids.sort_unstable();
    for run in ids.chunk_by(|a, b| a == b) {
        if let Some(l) = logits.get_mut(run[0] as usize) {
            *l -= run.len() as f32 * frequency + presence;
        }
    }
}

/// Divides the logits by `t` (> 0). Below 1 sharpens, above 1 flattens.
pub fn temperature(logits: &mut [f32], t: f32) {
    if t > 0.0 && t != 1.0 {
        let inv = 1.0 / t;
        logits.iter_mut().for_each(|l| *l *= inv);
    }
}

/// Keeps the `k` largest logits (and any that tie with the k-th); `0` keeps all.
pub fn top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let top = top_n(logits, k);
    if top.len() == k {
        mask_below(logits, top[k - 1].0);
    }
}

/// Nucleus filter: keeps the most likely tokens until their probabilities sum
/// to at least `p` (the token that crosses `p` is kept, so at least one token
/// always is). Tokens of equal logit are taken in id order.
pub fn top_p(logits: &mut [f32], p: f32) {
    if p >= 1.0 {
        return;
    }
    let Some(max) = max_finite(logits) else { return };
    let target = p as f64 * sum_exp(logits, max);
    // Usually a few dozen tokens hold the mass: try that head first.
    let head = top_n(logits, 64);
    let kept = match crossing(&head, 0.0, target, max) {
        Some(n) => head[..n].to_vec(),
        None => {
            let mut cand = finite(logits);
            let n = nucleus_len(&mut cand, target, max);
            cand.truncate(n);
            cand
        }
    };
    logits.fill(f32::NEG_INFINITY);
    for (l, id) in kept {
        logits[id as usize] = l;
    }
}

/// How many of the [`desc`]-sorted `cand` it takes for the mass, starting
/// from `acc`, to reach `target`.
fn crossing(cand: &[(f32, u32)], mut acc: f64, target: f64, max: f32) -> Option<usize> {
    for (i, &(l, _)) in cand.iter().enumerate() {
        acc += exp_neg(l - max) as f64;
        if acc >= target {
            return Some(i + 1);
        }
    }
    None
}

/// The nucleus size over all candidates without sorting them all: a
/// quickselect that halves the range holding the crossing point, weighing the
/// better half each time (O(n) expected).
fn nucleus_len(cand: &mut [(f32, u32)], target: f64, max: f32) -> usize {
    // The crossing lies in lo+1..=hi; cand[..lo] all rank above cand[lo..]
    // and hold `acc` of the mass.
    let (mut lo, mut hi, mut acc) = (0, cand.len(), 0.0);
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        cand[lo..hi].select_nth_unstable_by(mid - lo, desc);
        let upper: f64 = cand[lo..=mid].iter().map(|&(l, _)| exp_neg(l - max) as f64).sum();
        if acc + upper >= target {
            hi = mid + 1;
        } else {
            acc += upper;
            lo = mid + 1;
        }
    }
    cand[lo..hi].sort_unstable_by(desc);
    // Falling short only by rounding: keep the whole range.
    crossing(&cand[lo..hi], acc, target, max).map_or(hi, |n| lo + n)
}

/// Keeps tokens whose probability is at least `p` times the top token's, that
/// is whose logit is at least `max + ln p`. `0` keeps all.
///
/// (All filters expect rows without NaN or `+inf`; [`crate::Sampler`] checks.)
pub fn min_p(logits: &mut [f32], p: f32) {
    if p <= 0.0 {
        return;
    }
    let Some(max) = max_finite(logits) else { return };
    mask_below(logits, max + p.ln());
}

fn mask_below(logits: &mut [f32], threshold: f32) {
    for l in logits.iter_mut() {
        if *l < threshold {
            *l = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const NEG: f32 = f32::NEG_INFINITY;

    /// Logits whose softmax is exactly `probs` (up to float rounding).
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn kept(logits: &[f32]) -> Vec<usize> {
        logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, _)| i).collect()
    }

    #[test]
    fn validate_names_the_field() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        assert!(SamplingParams { top_k: 0, top_p: 1.0, min_p: 0.0, ..ok.clone() }.validate().is_ok());
        assert!(SamplingParams { min_p: 1.0, presence_penalty: -2.0, ..ok.clone() }.validate().is_ok());
        let cases: Vec<(SamplingParams, &str)> = vec![
            (SamplingParams { temperature: -0.5, ..ok.clone() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..ok.clone() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..ok.clone() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..ok.clone() }, "top_p"),
            (SamplingParams { top_p: f32::NAN, ..ok.clone() }, "top_p"),
            (SamplingParams { min_p: -0.1, ..ok.clone() }, "min_p"),
            (SamplingParams { min_p: 1.1, ..ok.clone() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..ok.clone() }, "repetition_penalty"),
            (SamplingParams { presence_penalty: 2.5, ..ok.clone() }, "presence_penalty"),
            (SamplingParams { frequency_penalty: -3.0, ..ok.clone() }, "frequency_penalty"),
            (SamplingParams { max_tokens: 0, ..ok.clone() }, "max_tokens"),
            (SamplingParams { stop: vec!["x".into(), String::new()], ..ok.clone() }, "stop"),
        ];
        for (params, field) in cases {
            match params.validate() {
                Err(Error::Config { field: f, reason }) => {
                    assert_eq!(f, field, "{reason}");
                }
                other => panic!("{field}: expected a config error, got {other:?}"),
            }
        }
        let msg = SamplingParams { top_p: 1.5, ..ok }.validate().unwrap_err().to_string();
        assert!(msg.contains("top_p") && msg.contains("1.5"), "{msg}");
    }

    #[test]
    fn temperature_scales_logits() {
        let mut l = vec![2.0, -1.0, 0.5, NEG];
        temperature(&mut l, 0.5);
        assert_eq!(l, vec![4.0, -2.0, 1.0, NEG]);
        temperature(&mut l, 1.0);
        assert_eq!(l, vec![4.0, -2.0, 1.0, NEG]);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_ties() {
        let mut l = vec![0.1, 3.0, -1.0, 2.0, 0.5];
        top_k(&mut l, 2);
        assert_eq!(l, vec![NEG, 3.0, NEG, 2.0, NEG]);

        let mut l = vec![1.0, 2.0, 2.0, 0.0];
        top_k(&mut l, 2);
        assert_eq!(kept(&l), vec![1, 2]);
        let mut l = vec![1.0, 2.0, 1.0, 0.0];
        top_k(&mut l, 2); // the 2nd largest is 1.0, and both 1.0s tie
        assert_eq!(kept(&l), vec![0, 1, 2]);

        for k in [0, 4, 10] {
            let mut l = vec![1.0, 2.0, 3.0, 4.0];
            top_k(&mut l, k);
            assert_eq!(l, vec![1.0, 2.0, 3.0, 4.0], "k = {k} must not filter");
        }
        let mut l = vec![NEG, 1.0, NEG, NEG];
        top_k(&mut l, 2); // fewer finite entries than k
        assert_eq!(kept(&l), vec![1]);
    }

    #[test]
    fn top_p_keeps_the_smallest_head_reaching_p() {
        // Probabilities 0.05, 0.5, 0.15, 0.3: sorted 0.5, 0.3, 0.15, 0.05.
        let probs = [0.05, 0.5, 0.15, 0.3];
        for (p, want) in [(0.4, vec![1]), (0.75, vec![1, 3]), (0.9, vec![1, 2, 3]), (0.97, vec![0, 1, 2, 3])] {
            let mut l = logits_of(&probs);
            top_p(&mut l, p);
            assert_eq!(kept(&l), want, "top_p = {p}");
            for &i in &want {
                assert_eq!(l[i], probs[i].ln(), "kept logits are unchanged");
            }
        }
        let mut l = logits_of(&probs);
        top_p(&mut l, 1.0);
        assert_eq!(kept(&l), vec![0, 1, 2, 3]);
        // Tiny p keeps only the top token.
        let mut l = logits_of(&probs);
        top_p(&mut l, 1e-6);
        assert_eq!(kept(&l), vec![1]);
        // Already-masked entries carry no mass.
        let mut l = vec![0.0, NEG, 0.0, NEG];
        top_p(&mut l, 0.5);
        assert_eq!(kept(&l), vec![0]);
    }

    /// Plain reference: full sort, then the same cumulative rule.
    fn top_p_reference(logits: &mut [f32], p: f32) {
        let max = max_finite(logits).unwrap();
        let mut cand: Vec<(f32, u32)> =
            logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (l, i as u32)).collect();
        let total = sum_exp(logits, max);
        cand.sort_by(desc);
        let mut cum = 0.0;
        let mut keep = cand.len();
        for (i, &(l, _)) in cand.iter().enumerate() {
            cum += exp_neg(l - max) as f64;
            if cum >= p as f64 * total {
                keep = i + 1;
                break;
            }
        }
        logits.iter_mut().for_each(|l| *l = NEG);
        for &(l, id) in &cand[..keep] {
            logits[id as usize] = l;
        }
    }

    #[test]
    fn top_p_matches_a_full_sort_on_a_large_vocabulary() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (n, scale, p) in [
            (262_144, 1.0f32, 0.9f32),
            (20_000, 8.0, 0.95),
            (20_000, 0.01, 0.5),
            (20_000, 3.0, 0.999),
            (262_144, 30.0, 0.9),
        ] {
            let logits: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect();
            let mut fast = logits.clone();
            let mut slow = logits.clone();
            top_p(&mut fast, p);
            top_p_reference(&mut slow, p);
            assert_eq!(kept(&fast), kept(&slow), "n {n}, scale {scale}, p {p}");
            assert!(!kept(&fast).is_empty());
        }
    }

    #[test]
    fn min_p_keeps_tokens_near_the_top() {
        // Top probability 0.5; min_p 0.2 keeps probabilities >= 0.1.
        let probs = [0.05, 0.5, 0.15, 0.3];
        let mut l = logits_of(&probs);
        min_p(&mut l, 0.2);
        assert_eq!(kept(&l), vec![1, 2, 3]);
        let mut l = logits_of(&probs);
        min_p(&mut l, 1.0);
        assert_eq!(kept(&l), vec![1]);
        let mut l = logits_of(&probs);
        min_p(&mut l, 0.0);
        assert_eq!(kept(&l), vec![0, 1, 2, 3]);
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 1.0, 0.0];
        // Token 0 seen twice: penalised once.
        repetition_penalty(&mut l, [0, 1, 0, 3, 99], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_count_occurrences() {
        let mut l = vec![1.0, 1.0, 1.0, 1.0];
        presence_frequency_penalty(&mut l, &[2, 0, 2, 2], 0.5, 0.25);
        // token 0 once: 1 - 0.25 - 0.5; token 2 three times: 1 - 0.75 - 0.5.
        assert_eq!(l, vec![0.25, 1.0, -0.25, 1.0]);
    }

    #[test]
    fn process_applies_the_pipeline_in_order() {
        // Penalty then temperature then filters.
        let params = SamplingParams {
            temperature: 0.5,
            top_k: 3,
            min_p: 0.3,
            repetition_penalty: 2.0,
            ..SamplingParams::default()
        };
        let mut l = vec![4.0, 3.0, 1.0, 0.5, -1.0];
        process(&mut l, &params, &[0], &[]);
        // penalty: [2, 3, 1, .5, -1]; /0.5: [4, 6, 2, 1, -2]; top-3: [4, 6, 2];
        // min_p 0.3: logit >= 6 + ln 0.3 = 4.796 keeps only token 1.
        assert_eq!(kept(&l), vec![1]);
        assert_eq!(l[1], 6.0);

        // Greedy runs the penalties only.
        let mut l = vec![4.0, 3.0, 1.0];
        process(&mut l, &SamplingParams { top_k: 1, repetition_penalty: 2.0, ..SamplingParams::greedy() }, &[0], &[]);
        assert_eq!(l, vec![2.0, 3.0, 1.0]);
    }
}
