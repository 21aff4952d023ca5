//! The real decoders through the engine: perplexity on a committed text
//! against HF transformers computing it the llama.cpp way
//! (fixtures/*_reference.json) and against llama.cpp itself
//! (fixtures/decoder_llamacpp.json), and speculative decoding against plain
//! greedy decoding.

use attn_engine::{generate_from_ids, generate_speculative, perplexity, ModelDrafter, NgramDrafter, SamplingParams};
use attn_models::spm::SpmTokenizer;
use attn_models::Decoder;
use attn_models::{LanguageModel, Tokenizer};
use attn_test_support::{fixture_json, fixture_text, real_gguf};

/// The committed perplexity text, without its final newline.
fn perplexity_text() -> String {
    let mut text = fixture_text("perplexity.txt");
    if text.ends_with('\n') {
        text.pop();
    }
    text
}

#[test]
fn gemma3_perplexity_within_3_percent_of_hf() {
    let reference = fixture_json("gemma3_reference.json");
    let r = &reference["perplexity"];
    let text = perplexity_text();
    let f = real_gguf("gemma3-270m");
    let tok = SpmTokenizer::from_gguf(&f).unwrap();
    let model = Decoder::from_gguf(&f).unwrap();
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids.len() as u64, r["n_tokens_total"].as_u64().unwrap());
    let n_ctx = r["n_ctx"].as_u64().unwrap() as usize;
    let p = perplexity(&model, &ids, n_ctx, tok.bos_id(), |_, _, _| {}).unwrap();
    assert_eq!(p.n_chunks as u64, r["n_chunks"].as_u64().unwrap());
    assert_eq!(p.n_scored as u64, r["n_scored"].as_u64().unwrap());
    let reference_ppl = r["ppl"].as_f64().unwrap();
    let rel = (p.ppl - reference_ppl).abs() / reference_ppl;
    eprintln!("perplexity {:.4} vs HF {reference_ppl:.4} ({:.2}%)", p.ppl, rel * 100.0);
    assert!(rel < 0.03, "perplexity {} vs {reference_ppl}", p.ppl);
}

/// Perplexity of the two BPE models on the same text, the llama.cpp way:
/// within 2% of llama.cpp's own `llama-perplexity` on the same GGUF
/// (fixtures/decoder_llamacpp.json), and of HF transformers' float32 figure
/// (fixtures/*_reference.json), with the same tokens as HF.
fn perplexity_within_2_percent_of_llamacpp(name: &str, reference: &str) {
    use attn_models::load::ModelTokenizer;
    let hf = fixture_json(reference);
    let r = &hf["perplexity"];
    let llamacpp = fixture_json("decoder_llamacpp.json")["models"][name]["ppl"].as_f64().unwrap();
    let text = perplexity_text();
    let f = real_gguf(name);
    let tok = ModelTokenizer::from_gguf(&f).unwrap();
    let model = Decoder::from_gguf(&f).unwrap();
    let ids = tok.encode(&text, true).unwrap();
    assert_eq!(ids[..128], attn_test_support::ids(&r["first_chunk_ids"])[..], "first chunk's tokens");
    assert_eq!(ids.len() as u64, r["n_tokens_total"].as_u64().unwrap());
    // No BOS for these vocabularies: llama.cpp leaves each chunk's first token alone.
    assert!(!r["first_token_replaced_by_bos"].as_bool().unwrap());
    let n_ctx = r["n_ctx"].as_u64().unwrap() as usize;
    let p = perplexity(&model, &ids, n_ctx, None, |_, _, _| {}).unwrap();
    assert_eq!(p.n_chunks as u64, r["n_chunks"].as_u64().unwrap());
    assert_eq!(p.n_scored as u64, r["n_scored"].as_u64().unwrap());
    let hf_ppl = r["ppl"].as_f64().unwrap();
    let rel = (p.ppl - llamacpp).abs() / llamacpp;
    eprintln!(
        "{name}: perplexity {:.4} vs llama.cpp {llamacpp:.4} ({:.2}%), HF float32 {hf_ppl:.4}",
        p.ppl,
        rel * 100.0
    );
    assert!(rel < 0.02, "perplexity {} vs llama.cpp {llamacpp}", p.ppl);
    assert!((p.ppl - hf_ppl).abs() / hf_ppl < 0.02, "perplexity {} vs HF {hf_ppl}", p.ppl);
}

#[test]
fn smollm2_perplexity_within_2_percent_of_llamacpp() {
    perplexity_within_2_percent_of_llamacpp("smollm2-135m-instruct", "smollm2_reference.json");
}

#[test]
fn qwen2_perplexity_within_2_percent_of_llamacpp() {
    perplexity_within_2_percent_of_llamacpp("qwen2.5-coder-0.5b-instruct", "qwen2_reference.json");
}

/// Greedy speculative decoding gives plain greedy decoding's tokens, with
/// the n-gram drafter and with a draft model, on a prompt whose continuation
/// echoes it (so proposals are kept and rejected).
///
/// Exact equality needs the k + 1 rows of a verification call to get the
/// logits one-row decode steps get. candle's quantized kernel rounds a
/// many-row call differently from a one-row call, which could flip a
/// near-tie, but not on this prompt (the batched 8-bit kernel computes every
/// row the same way whatever the number of rows; it is too slow for a debug
/// build's test).
#[test]
fn gemma3_greedy_speculative_decoding_equals_plain_decoding() {
    let f = real_gguf("gemma3-270m");
    let tok = SpmTokenizer::from_gguf(&f).unwrap();
    let model = Decoder::from_gguf(&f).unwrap();
    let prompt = "Numbers: one, two, three, four, five, six, seven, eight. Again: one, two, three,";
    let ids = tok.encode(prompt, true).unwrap();
    let params = SamplingParams { max_tokens: 24, ..SamplingParams::greedy() };
    let plain = generate_from_ids(&model, &tok, ids.clone(), &params, |_| {}).unwrap();
    assert_eq!(plain.completion_ids.len(), 24, "{:?}", plain.text);

    let ngram =
        generate_speculative(&model, &mut NgramDrafter::default(), &tok, ids.clone(), &params, 4, |_| {}).unwrap();
    eprintln!("plain: {:?}\nngram: {:?}, {:?}", plain.text, ngram.generation.text, ngram.stats);
    assert_eq!(ngram.generation.completion_ids, plain.completion_ids);
    assert_eq!(ngram.generation.text, plain.text);
    assert!(ngram.stats.accepted > 0 && ngram.stats.target_calls < 23, "{:?}", ngram.stats);

    // The model as its own draft (one-row calls) against its verification calls.
    // (12 tokens: a draft model's calls are as slow as the target's here.)
    let mut drafter = ModelDrafter::new(&model, model.vocab_size()).unwrap();
    let short = SamplingParams { max_tokens: 12, ..params };
    let spec = generate_speculative(&model, &mut drafter, &tok, ids, &short, 3, |_| {}).unwrap();
    eprintln!("draft model: {:?}", spec.stats);
    assert_eq!(spec.generation.completion_ids, plain.completion_ids[..12]);
    assert!(spec.stats.accepted > spec.stats.proposed / 2, "{:?}", spec.stats);
}
