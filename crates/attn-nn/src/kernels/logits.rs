//! The few loops over a whole vocabulary row that every decoding step runs.
//!
//! With 262,144 logits per row these loops are a visible share of a decode
//! step, so they are written to vectorise: reductions run in 8 independent
//! lanes (the compiler may not reorder float operations on its own) and `exp`
//! is a branch-free polynomial instead of a libm call per element (the
//! Cephes `expf` scheme, accurate to about 1e-7 relative).
//!
//! All take rows that are already checked ([`check`]): no NaN, no `+inf`;
//! `-inf` marks a token that cannot be chosen.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use crate::error::{Error, Result};

const LANES: usize = 8;

/// Errors on an empty row or one with NaN or `+inf` (a broken model).
pub fn check(op: &'static str, logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(Error::input(op, "empty logits"));
    }
    let mut bad = [false; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            bad[i] |= c[i].is_nan() | (c[i] == f32::INFINITY);
        }
    }
    if bad.iter().any(|&b| b) || tail.iter().any(|&l| l.is_nan() || l == f32::INFINITY) {
        return Err(Error::input(op, "the model produced NaN or +inf logits"));
    }
    Ok(())
}

/// The largest finite logit, or `None` if every entry is `-inf`.
pub fn max_finite(logits: &[f32]) -> Option<f32> {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let max = m.iter().chain(tail).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (max > f32::NEG_INFINITY).then_some(max)
}

/// `exp(x)` for `x <= 0` (including `-inf`, which gives exactly 0): the
/// one [`exp_fast`](super::fast::exp_fast) of the attention and activation
/// kernels.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    super::fast::exp_fast(x)
}

/// Writes `exp(logits - max)` into `out` (resized) and returns their sum.
pub fn exp_into(logits: &[f32], max: f32, out: &mut Vec<f32>) -> f64 {
    out.clear();
    out.resize(logits.len(), 0.0);
    for (o, &l) in out.iter_mut().zip(logits) {
        *o = exp_neg(l - max);
    }
    sum(out)
}

/// `sum(exp(logits - max))` without storing the terms.
pub fn sum_exp(logits: &[f32], max: f32) -> f64 {
    // Through a small buffer: the exp loop and the sum each vectorise on
    // their own, fused they do not.
    let mut buf = [0f32; 1024];
    let mut total = 0.0f64;
    for block in logits.chunks(1024) {
        let buf = &mut buf[..block.len()];
        for (o, &l) in buf.iter_mut().zip(block) {
            *o = exp_neg(l - max);
        }
        total += sum(buf);
    }
    total
}

/// Sum of non-negative weights.
pub fn sum(w: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for block in w.chunks(1024) {
        let mut acc = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += c[i];
            }
        }
        total += acc.iter().chain(tail).map(|&x| x as f64).sum::<f64>();
    }
    total
}

/// Index of the largest logit; the lowest index wins a tie. `None` if all are `-inf`.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut at = [usize::MAX; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail_start = logits.len() - chunks.remainder().len();
    for (k, c) in chunks.enumerate() {
        for i in 0..LANES {
            // Strictly greater: each lane keeps its first maximum.
            if c[i] > m[i] {
                m[i] = c[i];
                at[i] = k * LANES + i;
            }
        }
    }
    let mut best: Option<(f32, usize)> = None;
    let lanes = m.iter().zip(at).filter(|(_, a)| *a != usize::MAX).map(|(&l, a)| (l, a));
    let tail = logits[tail_start..].iter().enumerate().map(|(j, &l)| (l, tail_start + j));
    for (l, i) in lanes.chain(tail).filter(|(l, _)| *l > f32::NEG_INFINITY) {
        let better = match best {
            None => true,
            Some((bl, bi)) => l > bl || (l == bl && i < bi),
        };
        if better {
            best = Some((l, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Decoding's total order on `(logit, id)`: higher logit first, then lower id.
pub fn desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// `(logit, id)` ordered so that greater means earlier in [`desc`] order.
#[derive(PartialEq)]
struct Ranked(f32, u32);

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        desc(&(other.0, other.1), &(self.0, self.1))
    }
}

/// The `n` best finite `(logit, id)` pairs, sorted in [`desc`] order (fewer if
/// fewer are finite).
pub fn top_n(logits: &[f32], n: usize) -> Vec<(f32, u32)> {
    if n == 0 {
        return Vec::new();
    }
    let mut out: Vec<(f32, u32)>;
    if n <= 1024 && n < logits.len() / 8 {
        // One pass with a bounded min-heap: most entries fail the first
        // comparison against the current n-th best and cost nothing more.
        let mut heap: BinaryHeap<Reverse<Ranked>> = BinaryHeap::with_capacity(n + 1);
        // The n-th best logit so far (-inf until there are n finite ones).
        let mut worst = f32::NEG_INFINITY;
        for (k, c) in logits.chunks(LANES).enumerate() {
            // Vectorised screen: skip the chunk when nothing in it can enter.
            let mut hit = false;
            for &l in c {
                hit |= l > worst;
            }
            if !hit {
                continue;
            }
            for (j, &l) in c.iter().enumerate() {
                // Later ids lose ties, so an equal logit never displaces an entry.
                if l > worst {
                    heap.push(Reverse(Ranked(l, (k * LANES + j) as u32)));
                    if heap.len() > n {
                        heap.pop();
                    }
                    if heap.len() == n {
                        worst = heap.peek().map_or(f32::NEG_INFINITY, |r| r.0 .0);
                    }
                }
            }
        }
        out = heap.into_iter().map(|Reverse(Ranked(l, i))| (l, i)).collect();
    } else {
        out = finite(logits);
        if n < out.len() {
            out.select_nth_unstable_by(n - 1, desc);
            out.truncate(n);
        }
    }
    out.sort_unstable_by(desc);
    out
}

/// Every finite `(logit, id)`.
pub fn finite(logits: &[f32]) -> Vec<(f32, u32)> {
    logits.iter().enumerate().filter(|(_, l)| **l > f32::NEG_INFINITY).map(|(i, &l)| (l, i as u32)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const NEG: f32 = f32::NEG_INFINITY;

    fn row(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| match rng.gen_range(0..10) {
                0 => NEG,
                1 => 1.5, // ties
                _ => rng.gen_range(-20.0f32..20.0),
            })
            .collect()
    }

    #[test]
    fn exp_matches_libm() {
        let mut x = 0.0f32;
        while x > -100.0 {
            let (fast, exact) = (exp_neg(x), x.exp());
            if x > -87.3 {
                assert!((fast - exact).abs() <= 2e-7 * exact, "exp({x}) = {fast}, libm {exact}");
            } else {
                assert_eq!(fast, 0.0);
            }
            x -= 0.0137;
        }
        assert_eq!(exp_neg(0.0), 1.0);
        assert_eq!(exp_neg(NEG), 0.0);
        assert!((exp_neg(-1e-30) - 1.0).abs() < 1e-7);
    }

    #[test]
    fn reductions_match_plain_loops() {
        for n in [0usize, 1, 7, 8, 9, 1000, 4099] {
            let l = row(n, n as u64);
            let max = l.iter().copied().filter(|x| x.is_finite()).reduce(f32::max);
            assert_eq!(max_finite(&l), max, "n {n}");
            let am = (0..n).filter(|&i| l[i].is_finite()).fold(None, |b: Option<usize>, i| match b {
                Some(j) if l[j] >= l[i] => Some(j),
                _ => Some(i),
            });
            assert_eq!(argmax(&l), am, "n {n}");
            if let Some(m) = max {
                let exact: f64 = l.iter().map(|&x| ((x - m) as f64).exp()).sum();
                assert!((sum_exp(&l, m) - exact).abs() < 1e-6 * exact);
                let mut w = Vec::new();
                assert!((exp_into(&l, m, &mut w) - exact).abs() < 1e-6 * exact);
                assert_eq!(w.len(), n);
            }
        }
        assert_eq!(max_finite(&[NEG; 9]), None);
        assert_eq!(argmax(&[NEG; 9]), None);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]), Some(1));
    }

    #[test]
    fn check_rejects_nan_and_infinity_anywhere() {
        assert!(check("t", &[]).is_err());
        assert!(check("t", &[NEG, 0.0]).is_ok());
        for at in [0, 5, 8, 15, 16] {
            for bad in [f32::NAN, f32::INFINITY] {
                let mut l = vec![0.0; 17];
                l[at] = bad;
                assert!(check("t", &l).is_err(), "{bad} at {at}");
            }
        }
    }

    #[test]
    fn top_n_matches_a_full_sort() {
        for (len, n) in [(5000, 1), (5000, 40), (5000, 1000), (5000, 4000), (50, 10), (10, 20)] {
            let l = row(len, (len + n) as u64);
            let mut all = finite(&l);
            all.sort_by(desc);
            all.truncate(n);
            assert_eq!(top_n(&l, n), all, "len {len}, n {n}");
        }
        assert!(top_n(&[1.0], 0).is_empty());
    }
}
