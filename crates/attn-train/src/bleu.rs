//! Corpus BLEU exactly as sacreBLEU computes it by default.
//!
//! Mirrors `sacrebleu.corpus_bleu(hyps, [refs])` (sacreBLEU 2.x) with its defaults:
//! `tokenize='13a'`, `smooth_method='exp'`, `lowercase=False`, `force=False`,
//! `use_effective_order=False`, maximum n-gram order 4, and one reference per sentence.
//! The reference values in `fixtures/bleu_reference.json` come from
//! `scripts/fixtures/bleu_reference.py`; `tests/bleu.rs` checks this module against them.
//!
//! What sacreBLEU does, step by step (and what this module reproduces):
//!
//! 1. Each hypothesis and reference is right-stripped (Python `str.rstrip()`, i.e. Unicode
//!    whitespace as `str.isspace` defines it) and then tokenised with the 13a tokenizer
//!    ([`tokenize_13a`]).
//! 2. For every sentence, n-grams of order 1..=4 are counted over the whitespace-split tokens;
//!    the matches of an n-gram are clipped to its count in the reference. Corpus totals are
//!    the sums over sentences of: hypothesis length, reference length, matches per order and
//!    hypothesis n-grams per order.
//! 3. Brevity penalty: `1` if `sys_len >= ref_len`, `exp(1 - ref_len / sys_len)` otherwise, and
//!    `0` when `sys_len == 0 < ref_len`.
//! 4. If no n-gram of any order matches, the score is 0 and all precisions are reported as 0.
//!    Otherwise, for n = 1..=4: stop at the first order with no hypothesis n-grams at all
//!    (its precision and the ones after it stay 0, so the score is 0); an order with n-grams
//!    but no matches gets the "exp" (mteval-v13a) smoothing `100 / (2^k * total)`, where k
//!    counts the zero-match orders seen so far; otherwise the precision is
//!    `100 * matches / total`.
//! 5. `score = bp * exp(sum(log p_n) / 4)` with `log 0` floored to `-9999999999`, on a
//!    0..=100 scale.

use std::collections::HashMap;

/// The maximum n-gram order (sacreBLEU's `MAX_NGRAM_ORDER`).
const MAX_ORDER: usize = 4;

/// sacreBLEU's `my_log`: `log(0)` is floored to this value instead of `-inf`.
const LOG_ZERO: f64 = -9_999_999_999.0;

/// Python's `str.isspace()` for one code point (what `str.split()` and `str.rstrip()` use).
///
/// This is Rust's `char::is_whitespace` (Unicode `White_Space`) plus U+001C..U+001F, which
/// Python also treats as whitespace (their bidirectional class is B or S).
fn py_isspace(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{d}'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// The first regex of sacreBLEU's `TokenizerRegexp`: the character class
/// `[\{-\~\[-\` -\&\(-\+\:-\@\/]`, i.e. `{|}~`, ``[\]^_` ``, space to `&`, `()*+`, `:;<=>?@` and `/`.
/// Not in it: `'`, `,`, `-`, `.`, digits and letters, and every non-ASCII character.
fn is_13a_punct(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

fn is_digit(c: char) -> bool {
    c.is_ascii_digit()
}

fn is_period_or_comma(c: char) -> bool {
    c == '.' || c == ','
}

/// `re.sub` for a two-character pattern `(A)(B)`: scans left to right, and at each position
/// where `first(s[i]) && second(s[i + 1])` writes `repl(s[i], s[i + 1])` and resumes after the
/// pair (matches do not overlap), exactly as Python's `re.sub` does for a fixed-width pattern.
fn sub_pairs(
    s: &[char],
    first: impl Fn(char) -> bool,
    second: impl Fn(char) -> bool,
    repl: impl Fn(char, char, &mut Vec<char>),
) -> Vec<char> {
    let mut out = Vec::with_capacity(s.len() + s.len() / 2);
    let mut i = 0;
    while i < s.len() {
        if i + 1 < s.len() && first(s[i]) && second(s[i + 1]) {
            repl(s[i], s[i + 1], &mut out);
            i += 2;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// sacreBLEU's 13a tokenisation of one line (`sacrebleu.tokenizers.tokenizer_13a.Tokenizer13a`).
///
/// In order: remove `<skipped>`; join `-\n` (delete it); turn the remaining `\n` into spaces;
/// unescape `&quot;`, `&amp;`, `&lt;`, `&gt;` (one after the other, so `&amp;lt;` becomes `<`
/// but `&amp;quot;` stays `&quot;`); pad with a space on each side; then the four regexes of
/// `TokenizerRegexp`: space out the punctuation class of [`is_13a_punct`], split `.` and `,`
/// unless preceded by a digit, split them unless followed by a digit, split `-` after a digit;
/// finally collapse whitespace to single spaces and trim (`' '.join(line.split())`).
///
/// Unlike sacreBLEU's BLEU pre-processing this does not right-strip the line first;
/// [`corpus_bleu`] does that before calling it (which matters for a line ending in `-\n`).
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line.replace("<skipped>", "");
    line = line.replace("-\n", "");
    line = line.replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"");
        line = line.replace("&amp;", "&");
        line = line.replace("&lt;", "<");
        line = line.replace("&gt;", ">");
    }

    // f' {line} '
    let mut chars: Vec<char> = Vec::with_capacity(line.len() + 2);
    chars.push(' ');
    chars.extend(line.chars());
    chars.push(' ');

    // (re.compile(r'([\{-\~\[-\` -\&\(-\+\:-\@\/])'), r' \1 ')
    let mut s: Vec<char> = Vec::with_capacity(chars.len() * 2);
    for &c in &chars {
        if is_13a_punct(c) {
            s.extend([' ', c, ' ']);
        } else {
            s.push(c);
        }
    }
    // (re.compile(r'([^0-9])([\.,])'), r'\1 \2 ')
    let s = sub_pairs(
        &s,
        |a| !is_digit(a),
        is_period_or_comma,
        |a, b, out| {
            out.extend([a, ' ', b, ' ']);
        },
    );
    // (re.compile(r'([\.,])([^0-9])'), r' \1 \2')
    let s = sub_pairs(
        &s,
        is_period_or_comma,
        |b| !is_digit(b),
        |a, b, out| {
            out.extend([' ', a, ' ', b]);
        },
    );
    // (re.compile(r'([0-9])(-)'), r'\1 \2 ')
    let s = sub_pairs(
        &s,
        is_digit,
        |b| b == '-',
        |a, b, out| {
            out.extend([a, ' ', b, ' ']);
        },
    );

    // ' '.join(line.split())
    let s: String = s.into_iter().collect();
    s.split(py_isspace).filter(|t| !t.is_empty()).collect::<Vec<_>>().join(" ")
}

/// A corpus BLEU score with the statistics sacreBLEU reports next to it.
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScore {
    /// BLEU on a 0..=100 scale.
    pub score: f64,
    /// Modified n-gram precisions for orders 1..=4, in percent (after "exp" smoothing).
    pub precisions: [f64; 4],
    /// Brevity penalty.
    pub bp: f64,
    /// Total number of hypothesis tokens.
    pub sys_len: usize,
    /// Total number of reference tokens.
    pub ref_len: usize,
}

/// sacreBLEU's BLEU pre-processing of one segment: `tokenizer(sent.rstrip())`, split into tokens.
fn preprocess(sent: &str) -> String {
    tokenize_13a(sent.trim_end_matches(py_isspace))
}

/// Counts of all n-grams of orders 1..=MAX_ORDER.
fn ngram_counts<'a>(tokens: &'a [&'a str]) -> HashMap<&'a [&'a str], usize> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        if tokens.len() < n {
            break;
        }
        for w in tokens.windows(n) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

/// Corpus BLEU of `hypotheses` against one reference each; Err(String) if the lengths differ.
///
/// Same result as `sacrebleu.corpus_bleu(hypotheses, [references]).score` with sacreBLEU's
/// defaults (see the module documentation). An empty corpus gives a score of 0 (sacreBLEU
/// itself raises on it), with `bp = 1` and zero precisions and lengths.
pub fn corpus_bleu(hypotheses: &[String], references: &[String]) -> Result<BleuScore, String> {
    if hypotheses.len() != references.len() {
        return Err(format!(
            "corpus_bleu: {} hypotheses but {} references (one reference per hypothesis is required)",
            hypotheses.len(),
            references.len()
        ));
    }

    let mut sys_len = 0usize;
    let mut ref_len = 0usize;
    let mut correct = [0usize; MAX_ORDER];
    let mut total = [0usize; MAX_ORDER];

    for (hyp, reference) in hypotheses.iter().zip(references) {
        let hyp = preprocess(hyp);
        let reference = preprocess(reference);
        let hyp_tokens: Vec<&str> = hyp.split(' ').filter(|t| !t.is_empty()).collect();
        let ref_tokens: Vec<&str> = reference.split(' ').filter(|t| !t.is_empty()).collect();
        sys_len += hyp_tokens.len();
        ref_len += ref_tokens.len();

        let ref_counts = ngram_counts(&ref_tokens);
        for (ngram, hyp_count) in ngram_counts(&hyp_tokens) {
            let n = ngram.len() - 1;
            total[n] += hyp_count;
            if let Some(&ref_count) = ref_counts.get(ngram) {
                correct[n] += hyp_count.min(ref_count);
            }
        }
    }

    Ok(compute_bleu(&correct, &total, sys_len, ref_len))
}

/// sacreBLEU's `BLEU.compute_bleu` with `smooth_method='exp'` and `effective_order=False`.
fn compute_bleu(correct: &[usize; MAX_ORDER], total: &[usize; MAX_ORDER], sys_len: usize, ref_len: usize) -> BleuScore {
    let mut bp = 1.0;
    if sys_len < ref_len {
        bp = if sys_len > 0 { (1.0 - ref_len as f64 / sys_len as f64).exp() } else { 0.0 };
    }

    let mut precisions = [0.0f64; MAX_ORDER];
    if correct.iter().all(|&c| c == 0) {
        return BleuScore { score: 0.0, precisions, bp, sys_len, ref_len };
    }

    let mut smooth_mteval = 1.0f64;
    for n in 0..MAX_ORDER {
        if total[n] == 0 {
            break;
        }
        if correct[n] == 0 {
            smooth_mteval *= 2.0;
            precisions[n] = 100.0 / (smooth_mteval * total[n] as f64);
        } else {
            precisions[n] = 100.0 * correct[n] as f64 / total[n] as f64;
        }
    }

    let log_sum = precisions.iter().fold(0.0f64, |acc, &p| acc + if p == 0.0 { LOG_ZERO } else { p.ln() });
    let score = bp * (log_sum / MAX_ORDER as f64).exp();
    BleuScore { score, precisions, bp, sys_len, ref_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn tokenizer_punctuation_and_numbers() {
        assert_eq!(tokenize_13a("Hello, world!"), "Hello , world !");
        assert_eq!(tokenize_13a("It costs $3.50 (or 1,000 yen)."), "It costs $ 3.50 ( or 1,000 yen ) .");
        assert_eq!(tokenize_13a("The U.S. economy"), "The U . S . economy");
        assert_eq!(tokenize_13a(".5 and 5."), ". 5 and 5 .");
        assert_eq!(tokenize_13a("pages 10-20, well-known"), "pages 10 - 20 , well-known");
        assert_eq!(tokenize_13a("don't stop"), "don't stop");
        assert_eq!(tokenize_13a("a/b+c=d"), "a / b + c = d");
    }

    #[test]
    fn tokenizer_entities_newlines_and_whitespace() {
        assert_eq!(tokenize_13a("Tom &amp; Jerry &quot;rock&quot;"), "Tom & Jerry \" rock \"");
        assert_eq!(tokenize_13a("&amp;lt; &amp;quot;"), "< & quot ;");
        assert_eq!(tokenize_13a("one <skipped> two"), "one two");
        assert_eq!(tokenize_13a("hyph-\nenated\nline"), "hyphenated line");
        assert_eq!(tokenize_13a("  lots \t of\u{a0}space\u{3000} "), "lots of space");
        assert_eq!(tokenize_13a("café — naïve"), "café — naïve");
        assert_eq!(tokenize_13a(""), "");
        assert_eq!(tokenize_13a("   "), "");
    }

    #[test]
    fn rstrip_happens_before_hyphen_join() {
        assert_eq!(preprocess("end-\n"), "end-");
        assert_eq!(tokenize_13a("end-\n"), "end");
    }

    #[test]
    fn perfect_and_disjoint() {
        let h = s(&["the cat sat on the mat", "a quick brown fox"]);
        let b = corpus_bleu(&h, &h).unwrap();
        assert!((b.score - 100.0).abs() < 1e-9);
        assert_eq!(b.bp, 1.0);
        let d = corpus_bleu(&s(&["x y z w"]), &s(&["a b c d"])).unwrap();
        assert_eq!(d.score, 0.0);
        assert_eq!(d.precisions, [0.0; 4]);
    }

    #[test]
    fn empty_corpus_and_length_mismatch() {
        let e = corpus_bleu(&[], &[]).unwrap();
        assert_eq!(e, BleuScore { score: 0.0, precisions: [0.0; 4], bp: 1.0, sys_len: 0, ref_len: 0 });
        assert!(corpus_bleu(&s(&["a"]), &[]).is_err());
    }
}
