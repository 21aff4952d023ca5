//! The random stream behind parameter initialisation and dropout.
//!
//! candle's CPU random ops draw from an unseeded thread RNG, so neither a
//! fresh model nor a dropout mask could be reproduced. attn draws both from
//! this per-thread ChaCha stream instead: a trainer seeds it once before it
//! builds a model and again before every micro-batch (from the run seed and
//! the step), which makes a training run a pure function of its config and
//! lets a resumed run continue exactly where a killed one stopped. Threads
//! that never seed it get a fixed default seed, never an unseeded one.

use std::cell::RefCell;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

thread_local! {
    static RNG: RefCell<ChaCha8Rng> = RefCell::new(ChaCha8Rng::seed_from_u64(0x5eed));
}

/// Restarts this thread's stream from `seed`.
pub fn seed(seed: u64) {
    RNG.with(|r| *r.borrow_mut() = ChaCha8Rng::seed_from_u64(seed));
}

/// A seed derived from several numbers (run seed, step, micro-batch, ...),
/// well mixed so that neighbouring inputs give unrelated streams.
pub fn derive(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &p in parts {
        h ^= p.wrapping_add(0x9e37_79b9_7f4a_7c15).wrapping_add(h << 6).wrapping_add(h >> 2);
        // splitmix64 finaliser
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
    }
    h
}

/// `n` draws from U[0, 1).
pub fn uniform(n: usize) -> Vec<f32> {
    RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n).map(|_| r.gen::<f32>()).collect()
    })
}

/// `n` draws from U[lo, hi).
pub fn uniform_range(n: usize, lo: f32, hi: f32) -> Vec<f32> {
    uniform(n).into_iter().map(|u| lo + (hi - lo) * u).collect()
}

/// `n` draws from N(mean, std) (Box-Muller).
pub fn normal(n: usize, mean: f32, std: f32) -> Vec<f32> {
    RNG.with(|r| {
        let mut r = r.borrow_mut();
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = 1.0 - r.gen::<f64>();
            let u2: f64 = r.gen::<f64>();
            let rad = (-2.0 * u1.ln()).sqrt();
            let a = 2.0 * std::f64::consts::PI * u2;
            out.push(mean + std * (rad * a.cos()) as f32);
            out.push(mean + std * (rad * a.sin()) as f32);
        }
        out.truncate(n);
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeding_reproduces_the_stream() {
        seed(7);
        let a = uniform(5);
        seed(7);
        assert_eq!(a, uniform(5));
        seed(8);
        assert_ne!(a, uniform(5));
        assert_ne!(derive(&[1, 2]), derive(&[2, 1]));
    }

    #[test]
    fn normal_has_the_right_moments() {
        seed(1);
        let x = normal(100_000, 1.0, 2.0);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.03, "{var}");
    }
}
