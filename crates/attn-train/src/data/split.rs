//! Deterministic train / validation / test splits.
//!
//! Units (paragraphs, sentence pairs, labelled snippets) are first
//! de-duplicated by a normalised key, so a text can never sit in two splits;
//! then a seeded permutation picks the test and validation units. Each
//! split keeps the corpus order of its units.

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use attn_nn::{Error, Result};

#[derive(Debug, Clone)]
pub struct Splits<T> {
    pub train: Vec<T>,
    pub valid: Vec<T>,
    pub test: Vec<T>,
    /// Units dropped as duplicates of an earlier one.
    pub duplicates: usize,
}

/// How many units go to validation and test.
#[derive(Debug, Clone, Copy)]
pub struct SplitSizes {
    pub valid_fraction: f64,
    pub test_fraction: f64,
    pub valid_size: Option<usize>,
    pub test_size: Option<usize>,
}

/// Whitespace-collapsed, lower-cased text: the identity of a unit.
pub fn normalise_key(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

pub fn split<T>(units: Vec<T>, key: impl Fn(&T) -> String, seed: u64, sizes: SplitSizes) -> Result<Splits<T>> {
    let mut seen = HashSet::new();
    let total = units.len();
    let unique: Vec<T> = units.into_iter().filter(|u| seen.insert(key(u))).collect();
    let duplicates = total - unique.len();
    let n = unique.len();
    let count = |size: Option<usize>, frac: f64| size.unwrap_or_else(|| (n as f64 * frac).round() as usize);
    let n_test = count(sizes.test_size, sizes.test_fraction);
    let n_valid = count(sizes.valid_size, sizes.valid_fraction);
    if n_test + n_valid >= n {
        return Err(Error::input(
            "split",
            format!(
                "{n} unique units cannot give {n_test} test and {n_valid} validation units and leave any to train on"
            ),
        ));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(attn_nn::rng::derive(&[seed, 0x5917])));
    // 0 = train, 1 = valid, 2 = test
    let mut which = vec![0u8; n];
    for &i in &order[..n_test] {
        which[i] = 2;
    }
    for &i in &order[n_test..n_test + n_valid] {
        which[i] = 1;
    }
    let mut s = Splits { train: Vec::new(), valid: Vec::new(), test: Vec::new(), duplicates };
    for (u, w) in unique.into_iter().zip(which) {
        match w {
            0 => s.train.push(u),
            1 => s.valid.push(u),
            _ => s.test.push(u),
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(v: usize, t: usize) -> SplitSizes {
        SplitSizes { valid_fraction: 0.0, test_fraction: 0.0, valid_size: Some(v), test_size: Some(t) }
    }

    #[test]
    fn splits_are_disjoint_deterministic_and_deduplicated() {
        let units: Vec<String> = (0..100).map(|i| format!("unit {}", i % 80)).collect();
        let a = split(units.clone(), |u| normalise_key(u), 3, sizes(10, 10)).unwrap();
        let b = split(units.clone(), |u| normalise_key(u), 3, sizes(10, 10)).unwrap();
        let c = split(units, |u| normalise_key(u), 4, sizes(10, 10)).unwrap();
        assert_eq!(a.duplicates, 20);
        assert_eq!((a.train.len(), a.valid.len(), a.test.len()), (60, 10, 10));
        assert_eq!(a.test, b.test);
        assert_ne!(a.test, c.test);
        let all: HashSet<_> = a.train.iter().chain(&a.valid).chain(&a.test).collect();
        assert_eq!(all.len(), 80);
    }

    #[test]
    fn too_small_a_corpus_is_an_error() {
        let units: Vec<String> = (0..5).map(|i| i.to_string()).collect();
        assert!(split(units, |u| u.clone(), 0, sizes(3, 2)).is_err());
    }
}
