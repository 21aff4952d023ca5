//! Pipeline parallelism on the real decoders, two stages as threads of this
//! process ([`attn_dist::local_group`]; `mpirun -np 2` runs the same code
//! over MPI): each stage holds its layers only, and the logits every rank
//! returns are one process's, so greedy decoding gives the same tokens.

use attn_models::decoder::{Decoder, Parallel};
use attn_models::{LanguageModel, Logits, SeqStep};
use attn_test_support::{fixture_json, greedy_tokens, ids, on_ranks, real_gguf};

fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// `long`: also the 1,000-token prompt, which the stages take in chunks
/// (pieces of 512 as one process does, cut into micro-batches of 128).
fn check(name: &str, fixture: &str, long: bool) {
    let f = real_gguf(name);
    let whole = Decoder::from_gguf(&f).unwrap();
    let stages: Vec<Decoder> = attn_dist::local_group(2)
        .into_iter()
        .map(|c| Decoder::from_gguf_parallel(&f, Parallel::Pipeline(c)).unwrap())
        .collect();
    // Each stage reads about half the weights.
    let (all, a, b) = (whole.decode_weight_bytes(), stages[0].decode_weight_bytes(), stages[1].decode_weight_bytes());
    assert!(a < all && b < all, "{name}: stage weights {a} and {b} of {all}");

    let reference = fixture_json(fixture);
    let mut positions = 0;
    for p in reference["teacher_forced"].as_array().unwrap() {
        let tokens = ids(&p["ids"]);
        if tokens.len() > 512 && !long {
            continue;
        }
        let run = |m: &Decoder| {
            let mut cache = m.new_cache().unwrap();
            m.forward(&mut [SeqStep { tokens: &tokens, cache: &mut cache }], Logits::All).unwrap().remove(0)
        };
        let one = run(&whole);
        let split = on_ranks(&stages, run);
        assert!(bits(&split[0]) == bits(&split[1]), "{name}: the stages returned different logits");
        let (x, y) =
            (one.argmax(1).unwrap().to_vec1::<u32>().unwrap(), split[0].argmax(1).unwrap().to_vec1::<u32>().unwrap());
        let worst = (&one - &split[0]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!(
            "{name} {}: top-1 {}/{}, max |logit diff| {worst}",
            p["name"],
            x.iter().zip(&y).filter(|(a, b)| a == b).count(),
            x.len()
        );
        assert!(bits(&split[0]) == bits(&one), "{name}: logits differ from one process's ({})", p["name"]);
        positions += tokens.len();
    }
    assert!(positions >= 300);
    for p in reference["teacher_forced"].as_array().unwrap().iter().take(3) {
        let prompt = &ids(&p["ids"])[..16];
        let want = greedy_tokens(&whole, prompt, 24);
        for got in on_ranks(&stages, |m| greedy_tokens(m, prompt, 24)) {
            assert_eq!(got, want, "{name}: greedy tokens from {}", p["name"]);
        }
    }
    // Several sequences in one call: packed into micro-batches.
    let prompts: Vec<Vec<u32>> =
        reference["teacher_forced"].as_array().unwrap().iter().take(4).map(|p| ids(&p["ids"])).collect();
    let batch = |m: &Decoder| {
        let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache().unwrap()).collect();
        let mut steps: Vec<SeqStep<'_, _>> =
            prompts.iter().zip(caches.iter_mut()).map(|(p, c)| SeqStep { tokens: p, cache: c }).collect();
        m.forward(&mut steps, Logits::Last).unwrap().iter().flat_map(bits).collect::<Vec<u32>>()
    };
    let want = batch(&whole);
    for got in on_ranks(&stages, batch) {
        assert!(got == want, "{name}: a batch of four prompts");
    }
    let times = on_ranks(&stages, |m| m.pipeline_times().unwrap());
    assert_eq!((times[0].layers.0, times[1].layers.1), (0, whole.spec().n_layers()));
    assert_eq!(times[0].layers.1, times[1].layers.0);
}

#[test]
fn smollm2_in_two_stages_decodes_as_one_process() {
    check("smollm2-135m-instruct", "smollm2_reference.json", true);
}

#[test]
fn qwen2_in_two_stages_decodes_as_one_process() {
    check("qwen2.5-coder-0.5b-instruct", "qwen2_reference.json", false);
}

#[test]
fn gemma3_in_two_stages_decodes_as_one_process() {
    check("gemma3-270m", "gemma3_reference.json", false);
}
