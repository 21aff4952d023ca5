//! Checks `attn_train::bleu` against sacreBLEU (fixtures/bleu_reference.json, produced by
//! `~/.venvs/torch/bin/python scripts/fixtures/bleu_reference.py`): every 13a tokenisation must be
//! identical and every corpus score, precision, brevity penalty and length must match to 1e-6.

use attn_train::bleu::{corpus_bleu, tokenize_13a, BleuScore};
use serde_json::Value;

const TOL: f64 = 1e-6;

fn fixture() -> Value {
    attn_test_support::fixture_json("bleu_reference.json")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().expect("array of strings").iter().map(|s| s.as_str().expect("string").to_string()).collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().expect("array of numbers").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn corpora(fx: &Value) -> &Vec<Value> {
    fx["corpora"].as_array().expect("corpora")
}

#[test]
fn fixture_is_what_we_expect() {
    let fx = fixture();
    let s = &fx["settings"];
    assert_eq!(s["tokenize"], "13a");
    assert_eq!(s["smooth_method"], "exp");
    assert_eq!(s["lowercase"], false);
    assert_eq!(s["use_effective_order"], false);
    assert_eq!(s["max_ngram_order"], 4);
    assert_eq!(s["num_refs"], 1);
    let main = &corpora(&fx)[0];
    assert_eq!(main["name"], "main");
    assert!(strings(&main["hypotheses"]).len() >= 35);
    assert!(corpora(&fx).len() >= 4);
}

#[test]
fn tokenization_matches_sacrebleu() {
    let fx = fixture();
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut check = |line: &str, expected: &str| {
        let got = tokenize_13a(line);
        if got != expected {
            failures.push(format!("{line:?}\n   expected {expected:?}\n        got {got:?}"));
        }
        checked += 1;
    };
    for c in corpora(&fx) {
        for (lines, toks) in [("hypotheses", "hyp_tokenized"), ("references", "ref_tokenized")] {
            let lines = strings(&c[lines]);
            let toks = strings(&c[toks]);
            assert_eq!(lines.len(), toks.len());
            for (l, t) in lines.iter().zip(&toks) {
                check(l, t);
            }
        }
    }
    for case in fx["tokenizer_cases"].as_array().expect("tokenizer_cases") {
        check(case["line"].as_str().unwrap(), case["tokenized"].as_str().unwrap());
    }
    assert!(failures.is_empty(), "{} of {checked} tokenisations differ:\n{}", failures.len(), failures.join("\n"));
    assert!(checked > 100);
}

fn assert_matches(what: &str, got: &BleuScore, expected: &Value) {
    let close = |field: &str, g: f64, e: f64| {
        assert!((g - e).abs() <= TOL, "{what}: {field}: got {g}, sacreBLEU {e} (diff {})", (g - e).abs());
    };
    close("score", got.score, expected["score"].as_f64().unwrap());
    close("bp", got.bp, expected["bp"].as_f64().unwrap());
    let precisions = f64s(&expected["precisions"]);
    assert_eq!(precisions.len(), 4);
    for (n, (&g, &e)) in got.precisions.iter().zip(&precisions).enumerate() {
        close(&format!("precision[{}]", n + 1), g, e);
    }
    assert_eq!(got.sys_len as u64, expected["sys_len"].as_u64().unwrap(), "{what}: sys_len");
    assert_eq!(got.ref_len as u64, expected["ref_len"].as_u64().unwrap(), "{what}: ref_len");
}

#[test]
fn corpus_scores_match_sacrebleu() {
    let fx = fixture();
    for c in corpora(&fx) {
        let name = c["name"].as_str().unwrap();
        let hyps = strings(&c["hypotheses"]);
        let refs = strings(&c["references"]);
        let got = corpus_bleu(&hyps, &refs).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_matches(name, &got, c);
    }
}

#[test]
fn one_sentence_corpora_match_sacrebleu() {
    // Each pair scored on its own with corpus_bleu (no effective order): exercises the brevity
    // penalty with sys_len = 0, the all-zero early return and the exp smoothing line by line.
    let fx = fixture();
    let mut checked = 0;
    for c in corpora(&fx) {
        let name = c["name"].as_str().unwrap();
        let hyps = strings(&c["hypotheses"]);
        let refs = strings(&c["references"]);
        let per_line = c["per_line"].as_array().expect("per_line");
        assert_eq!(per_line.len(), hyps.len());
        for (i, ((h, r), expected)) in hyps.iter().zip(&refs).zip(per_line).enumerate() {
            let got = corpus_bleu(std::slice::from_ref(h), std::slice::from_ref(r)).unwrap();
            assert_matches(&format!("{name}[{i}] {h:?} vs {r:?}"), &got, expected);
            checked += 1;
        }
    }
    assert!(checked > 50);
}

#[test]
fn empty_corpus_and_mismatched_lengths() {
    let b = corpus_bleu(&[], &[]).unwrap();
    assert_eq!(b.score, 0.0);
    assert_eq!(b.sys_len, 0);
    assert_eq!(b.ref_len, 0);
    let one = vec!["a b c".to_string()];
    assert!(corpus_bleu(&one, &[]).is_err());
    assert!(corpus_bleu(&[], &one).is_err());
}
