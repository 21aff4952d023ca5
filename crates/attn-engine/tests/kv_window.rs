//! Paged KV blocks outside a sliding window go back to the pool: Gemma 3's
//! weights with every layer made sliding (window 512), served by the engine
//! over a 1,500-token prompt, hold about a window's worth of blocks instead
//! of the whole sequence's, and generate what the contiguous cache (rings of
//! twice the window) generates.

use std::sync::Arc;

use attn_engine::{generate_from_ids, EngineConfig, EngineRequest, LlmEngine, SamplingParams, SchedulerConfig};
use attn_models::decoder::{Decoder, Kernels};
use attn_models::gguf::GgufFile;
use attn_models::registry::resolve_model;
use attn_models::spm::SpmTokenizer;
use attn_models::{PagedLanguageModel, Tokenizer};

#[test]
fn blocks_outside_an_all_layer_window_return_to_the_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    let path = resolve_model("gemma3-270m", false).expect("pull gemma3-270m");
    let f = GgufFile::open(&path).unwrap();
    let tok = Arc::new(SpmTokenizer::from_gguf(&f).unwrap());
    let mut spec = attn_models::gemma3::spec(&f).unwrap();
    for l in &mut spec.layers {
        l.window = Some(512);
    }
    let model = Decoder::load(&f, spec, Kernels::Blocks).unwrap();
    assert_eq!(model.kv_shape().window, Some(512));
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/perplexity.txt"))
        .unwrap()
        .repeat(2);
    let mut prompt = tok.encode(&text, true).unwrap();
    prompt.truncate(1500);
    let params = SamplingParams { max_tokens: 6, ..SamplingParams::greedy() };
    let want = generate_from_ids(&model, tok.as_ref(), prompt.clone(), &params, |_| {}).unwrap();

    let (bs, num_blocks) = (16, 100);
    let scheduler = SchedulerConfig { max_batched_tokens: 256, ..SchedulerConfig::default() };
    let mut e = LlmEngine::new(model, tok, EngineConfig { block_size: bs, num_blocks, scheduler }).unwrap();
    e.add_request(EngineRequest::new(prompt.clone(), params)).unwrap();
    let (mut got, mut peak) = (Vec::new(), 0);
    while e.has_work() {
        for o in e.step().map_err(|(e, _)| e).unwrap() {
            got.extend(o.token);
        }
        let s = e.stats();
        peak = peak.max(s.blocks.used);
    }
    let s = e.stats();
    eprintln!("peak blocks held {peak} of {num_blocks}; released outside the window: {}", s.window_freed_blocks);
    assert_eq!(got, want.completion_ids, "paged (window-freed blocks) vs contiguous (rings)");
    // 1506 positions would take 95 blocks; the window (512 = 32 blocks),
    // one prefill chunk (256 = 16 blocks) and a partial block are the most
    // ever held.
    assert!(peak <= 32 + 16 + 2, "held {peak} blocks");
    assert!(s.window_freed_blocks >= 95 - 34, "released {}", s.window_freed_blocks);
    assert_eq!(s.blocks.used, 0, "everything back at the end");
}
