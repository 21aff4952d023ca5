//! Tensor parallelism on the three real decoders, two ranks as threads of
//! this process ([`attn_dist::local_group`]; `mpirun -np 2` runs the same
//! code over MPI, crates/attn-cli/tests/mpi.rs): every logit of every
//! position of the reference prompts is bit-identical to one process's
//! (no sum is split across ranks), so greedy decoding gives the same tokens.

use attn_models::decoder::{Decoder, Parallel};
use attn_models::{LanguageModel, Logits, PagedLanguageModel, SeqStep};
use attn_test_support::{fixture_json, greedy_tokens, ids, on_ranks, real_gguf};

fn check(name: &str, fixture: &str, prompts: usize) {
    let f = real_gguf(name);
    let whole = Decoder::from_gguf(&f).unwrap();
    let parts: Vec<Decoder> = attn_dist::local_group(2)
        .into_iter()
        .map(|c| Decoder::from_gguf_parallel(&f, Parallel::Tensor(c)).unwrap())
        .collect();
    // Each rank's cache holds its share of the KV heads.
    let kv = whole.spec().n_kv_heads;
    let local: usize = parts.iter().map(|p| p.kv_shape().n_kv_heads).sum();
    assert!(local >= kv && parts.iter().all(|p| p.kv_shape().n_kv_heads < kv || kv == 1), "{name}: {local} of {kv}");

    let reference = fixture_json(fixture);
    let (mut agree, mut total, mut worst) = (0usize, 0usize, 0f32);
    for p in reference["teacher_forced"].as_array().unwrap().iter().take(prompts) {
        let tokens = ids(&p["ids"]);
        let all = |m: &Decoder| {
            let mut cache = m.new_cache().unwrap();
            m.forward(&mut [SeqStep { tokens: &tokens, cache: &mut cache }], Logits::All).unwrap().remove(0)
        };
        let one = all(&whole);
        let split = on_ranks(&parts, all);
        // Every rank ends the call with the same logits, one process's bits.
        let bits = |t: &candle_core::Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        assert!(bits(&split[0]) == bits(&split[1]), "{name}: the ranks' logits differ");
        assert!(bits(&split[0]) == bits(&one), "{name}: logits differ from one process's ({})", p["name"]);
        let a = one.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let b = split[0].argmax(1).unwrap().to_vec1::<u32>().unwrap();
        agree += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        total += a.len();
        worst = worst.max((&one - &split[0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap());
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "{name}: tensor-parallel top-1 agreement {agree}/{total} ({:.2}%), max |logit diff| {worst}",
        100.0 * rate
    );
    assert!(total >= 300, "{total} positions");
    assert_eq!(agree, total);

    // Greedy decoding from each prompt's start gives the same tokens.
    for p in reference["teacher_forced"].as_array().unwrap().iter().take(3) {
        let prompt = &ids(&p["ids"])[..16];
        let want = greedy_tokens(&whole, prompt, 24);
        for got in on_ranks(&parts, |m| greedy_tokens(m, prompt, 24)) {
            assert_eq!(got, want, "{name}: greedy tokens from {}", p["name"]);
        }
    }
}

#[test]
fn smollm2_split_over_two_ranks_decodes_as_one_process() {
    check("smollm2-135m-instruct", "smollm2_reference.json", 4);
}

#[test]
fn qwen2_split_over_two_ranks_decodes_as_one_process() {
    check("qwen2.5-coder-0.5b-instruct", "qwen2_reference.json", 4);
}

#[test]
fn gemma3_split_over_two_ranks_decodes_as_one_process() {
    check("gemma3-270m", "gemma3_reference.json", 4);
}
