//! Perplexity of Gemma 3 270M on a committed text against HF transformers
//! computing it the llama.cpp way (fixtures/gemma3_reference.json).

use attn_engine::perplexity;
use attn_models::gemma3::Gemma3;
use attn_models::gguf::GgufFile;
use attn_models::registry::resolve_model;
use attn_models::spm::SpmTokenizer;
use attn_models::Tokenizer;
use candle_core::Device;

/// candle's default size for its quantized-matmul pool can exceed the CPUs
/// available, and its workers spin: pin it to the real count.
fn set_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

#[test]
fn gemma3_perplexity_within_3_percent_of_hf() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}gemma3_reference.json")).unwrap()).unwrap();
    let r = &reference["perplexity"];
    let mut text = std::fs::read_to_string(format!("{root}perplexity.txt")).unwrap();
    if text.ends_with('\n') {
        text.pop();
    }
    set_threads();
    let path = resolve_model("gemma3-270m", false).expect("pull gemma3-270m");
    let f = GgufFile::open(&path).unwrap();
    let tok = SpmTokenizer::from_gguf(&f).unwrap();
    let model = Gemma3::from_gguf(&f, &Device::Cpu).unwrap();
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
