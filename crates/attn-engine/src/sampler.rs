//! Choosing the next token from one row of logits.
//!
//! Sampling uses ChaCha20 seeded from a `u64`: its output stream is fixed by
//! the cipher's specification, and the uniform draw is built here from raw
//! bits, so given the same logits a seed gives the same tokens on every
//! platform and across `rand` releases. Logits that are NaN or `+inf` mean the model is broken; they are
//! an error here rather than a silently wrong token.

use attn_nn::{Error, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::processors::{process, SamplingParams};
use attn_nn::kernels::logits::{self as kernels, check, exp_into, max_finite, sum};

/// Processors plus chooser, with the RNG state of one generation.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
    seed: u64,
    /// Scratch for the unnormalised probabilities (reused across steps).
    weights: Vec<f32>,
}

impl Sampler {
    /// Validates `params`; without a seed in them, draws one from the OS.
    pub fn new(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(rand::random);
        Ok(Sampler { params: params.clone(), rng: ChaCha20Rng::seed_from_u64(seed), seed, weights: Vec::new() })
    }

    /// The seed in use (the drawn one when the params had none).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Processes `logits` in place (see [`process`]) and picks a token:
    /// the argmax at temperature 0, a draw from the softmax otherwise.
    /// `prompt` and `completion` feed the penalties.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], completion: &[u32]) -> Result<u32> {
        check("sample", logits)?;
        process(logits, &self.params, prompt, completion);
        if self.params.is_greedy() {
            argmax(logits)
        } else {
            // Processing must not make a finite row overflow; refuse rather
            // than draw from NaN weights.
            if check("sample", logits).is_err() {
                return Err(Error::input("sample", "the sampling parameters made the logits NaN or +inf"));
            }
            sample_with(logits, &mut self.rng, &mut self.weights)
        }
    }
}

/// The id of the largest logit; the lowest id wins a tie (as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> Result<u32> {
    check("argmax", logits)?;
    kernels::argmax(logits).map(|i| i as u32).ok_or_else(|| Error::input("argmax", "no token has a finite logit"))
}

/// Draws a token with probability `softmax(logits)`; `-inf` entries are
/// never drawn.
pub fn sample(logits: &[f32], rng: &mut impl RngCore) -> Result<u32> {
    check("sample", logits)?;
    sample_with(logits, rng, &mut Vec::new())
}

/// Weights are summed per block first, so only one block is scanned
/// token by token.
const BLOCK: usize = 1024;

fn sample_with(logits: &[f32], rng: &mut impl RngCore, weights: &mut Vec<f32>) -> Result<u32> {
    let max = max_finite(logits).ok_or_else(|| Error::input("sample", "no token has a finite logit"))?;
    let total = exp_into(logits, max, weights);
    Ok(draw(weights, total, rng))
}

/// Draws an index with probability `weights[i] / total` (`total` is the sum
/// of the non-negative `weights`); zero weights are never drawn.
pub(crate) fn draw(weights: &[f32], total: f64, rng: &mut (impl RngCore + ?Sized)) -> u32 {
    let target = uniform(rng) * total;
    let mut cum = 0.0f64;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let mass = sum(block);
        if cum + mass > target {
            let mut c = cum;
            for (j, &w) in block.iter().enumerate() {
                c += w as f64;
                if w > 0.0 && c > target {
                    return (b * BLOCK + j) as u32;
                }
            }
        }
        cum += mass;
    }
    // Only reachable through rounding: the last token that can be drawn.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

/// A uniform draw in [0, 1) from the top 53 bits of one `u64`.
pub(crate) fn uniform(rng: &mut (impl RngCore + ?Sized)) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    fn counts(logits: &[f32], draws: usize, seed: u64) -> Vec<usize> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut c = vec![0; logits.len()];
        for _ in 0..draws {
            c[sample(logits, &mut rng).unwrap() as usize] += 1;
        }
        c
    }

    /// Pearson's chi-square statistic of observed counts against `probs`.
    fn chi_square(counts: &[usize], probs: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&o, &p)| {
                let e = p * n as f64;
                (o as f64 - e).powi(2) / e
            })
            .sum()
    }

    #[test]
    fn argmax_picks_the_largest_and_the_first_of_ties() {
        assert_eq!(argmax(&[0.1, 2.0, -1.0]).unwrap(), 1);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]).unwrap(), 1);
        assert_eq!(argmax(&[NEG, NEG, -5.0]).unwrap(), 2);
        assert!(argmax(&[NEG, NEG]).is_err());
        assert!(argmax(&[]).is_err());
        assert!(argmax(&[1.0, f32::NAN]).is_err());
    }

    #[test]
    fn sampling_follows_the_softmax() {
        // probs 0.1, 0.2, 0.3, 0.4 given as logits with an arbitrary offset.
        let probs = [0.1f64, 0.2, 0.3, 0.4];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32 + 3.0).collect();
        let c = counts(&logits, 100_000, 42);
        let chi2 = chi_square(&c, &probs);
        // 3 degrees of freedom: P(chi2 > 16.27) = 0.001.
        assert!(chi2 < 16.27, "chi2 = {chi2}, counts = {c:?}");
        // And the draws are not just "roughly" right but tight (n p (1-p) sd).
        for (i, &p) in probs.iter().enumerate() {
            let freq = c[i] as f64 / 100_000.0;
            assert!((freq - p).abs() < 0.006, "token {i}: {freq} vs {p}");
        }
    }

    #[test]
    fn masked_tokens_are_never_drawn() {
        let logits = [0.0, NEG, 0.0, NEG, 1.0];
        let c = counts(&logits, 20_000, 1);
        assert_eq!((c[1], c[3]), (0, 0));
        let e = 1f64.exp();
        let probs = [1.0 / (2.0 + e), 0.0, 1.0 / (2.0 + e), 0.0, e / (2.0 + e)];
        // 2 degrees of freedom: P(chi2 > 13.82) = 0.001.
        assert!(chi_square(&c, &probs) < 13.82, "{c:?}");
    }

    #[test]
    fn a_seed_reproduces_the_draws() {
        let logits = vec![0.0f32; 1000];
        let run = |seed| {
            let mut s = Sampler::new(&SamplingParams { seed: Some(seed), ..SamplingParams::default() }).unwrap();
            (0..50).map(|_| s.sample(&mut logits.clone(), &[], &[]).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        let s = Sampler::new(&SamplingParams::default()).unwrap();
        let _ = s.seed(); // drawn, and available to repeat the run
    }

    #[test]
    fn sampler_runs_processors_then_chooses() {
        // top_k = 1 leaves one token: sampling must return it every time.
        let mut s = Sampler::new(&SamplingParams { top_k: 1, seed: Some(3), ..SamplingParams::default() }).unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&mut [0.5, 0.1, 0.9, 0.2], &[], &[]).unwrap(), 2);
        }
        // Greedy honours the repetition penalty: token 2 seen, 0.9/4 < 0.5.
        let mut g = Sampler::new(&SamplingParams { repetition_penalty: 4.0, ..SamplingParams::greedy() }).unwrap();
        assert_eq!(g.sample(&mut [0.5, 0.1, 0.9, 0.2], &[2], &[]).unwrap(), 0);
        // Broken logits are an error, not a token.
        assert!(s.sample(&mut [0.5, f32::NAN], &[], &[]).is_err());
        assert!(s.sample(&mut [0.5, f32::INFINITY], &[], &[]).is_err());
        assert!(s.sample(&mut [NEG, NEG], &[], &[]).is_err());
        assert!(Sampler::new(&SamplingParams { top_p: 0.0, ..SamplingParams::default() }).is_err());
    }
}
