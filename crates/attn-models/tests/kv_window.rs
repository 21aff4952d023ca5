//! Gemma 3 (15 of its 18 layers slide over 512 positions) on sequences
//! longer than the window: the contiguous cache's rings of `2 * 512`
//! positions give the logits of a cache that keeps every position, and the
//! paged cache (f16 blocks) gives the contiguous cache's logits; a rollback
//! past what a ring keeps is an error, a short one is not.

use std::sync::Arc;

use attn_models::gguf::GgufFile;
use attn_models::registry::resolve_model;
use attn_models::spm::SpmTokenizer;
use attn_models::{Decoder, LanguageModel, Logits, PagedLanguageModel, SeqStep, SequenceCache, Tokenizer};
use attn_nn::{KvDtype, KvPool, PagedCache};
use candle_core::Tensor;

fn set_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

fn gemma() -> (Decoder, Vec<u32>) {
    set_threads();
    let path = resolve_model("gemma3-270m", false).expect("pull gemma3-270m");
    let f = GgufFile::open(&path).unwrap();
    let tok = SpmTokenizer::from_gguf(&f).unwrap();
    let model = Decoder::from_gguf(&f).unwrap();
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/perplexity.txt"))
        .unwrap()
        .repeat(2);
    let mut ids = tok.encode(&text, true).unwrap();
    assert!(ids.len() >= 1500, "{} tokens", ids.len());
    ids.truncate(1500);
    (model, ids)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn argmax(a: &Tensor) -> u32 {
    a.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

#[test]
fn gemma3_window_rings_and_paged_blocks_match_a_full_cache_over_1500_tokens() {
    let (model, ids) = gemma();
    assert_eq!(model.kv_dtype(), KvDtype::F16);
    assert_eq!(model.kv_shape().window, None, "three global layers read every position");
    let mut ring = model.new_cache().unwrap();
    let mut full = model.new_cache().unwrap().keeping_every_position();
    let pool = Arc::new(KvPool::new(model.kv_shape(), 16, 100).unwrap());
    let mut paged = PagedCache::new(pool);
    // Blocks in a scrambled order.
    paged.block_table_mut().extend((0..94u32).map(|i| (i * 37 + 11) % 100));
    // A chunk longer than the window (split into pieces by the rings), one
    // shorter, decode steps, and a chunk crossing the ring's wrap.
    let chunks = [700usize, 300, 1, 1, 1, 47, 1, 400, 1, 1, 1, 1, 1, 44];
    assert_eq!(chunks.iter().sum::<usize>(), ids.len());
    let (mut worst_ring, mut worst_paged) = (0f32, 0f32);
    let mut at = 0;
    for n in chunks {
        let step = &ids[at..at + n];
        let a = model.forward(&mut [SeqStep { tokens: step, cache: &mut ring }], Logits::Last).unwrap();
        let b = model.forward(&mut [SeqStep { tokens: step, cache: &mut full }], Logits::Last).unwrap();
        let c = model.forward_paged(&mut [SeqStep { tokens: step, cache: &mut paged }], Logits::Last).unwrap();
        assert_eq!(argmax(&a[0]), argmax(&b[0]), "ring vs full at {at}");
        assert_eq!(argmax(&a[0]), argmax(&c[0]), "ring vs paged at {at}");
        worst_ring = worst_ring.max(max_diff(&a[0], &b[0]));
        worst_paged = worst_paged.max(max_diff(&a[0], &c[0]));
        at += n;
    }
    eprintln!("max abs logit diff over 1500 tokens: ring vs full {worst_ring}, paged vs ring {worst_paged}");
    assert!(worst_ring < 1e-3, "ring vs full cache: {worst_ring}");
    assert!(worst_paged < 1e-3, "paged vs contiguous: {worst_paged}");
    // The rings hold 2 x 512 positions in 15 layers; the global layers 1500.
    let per_pos = 2 * model.spec().n_kv_heads * model.spec().head_dim * 2;
    assert_eq!(ring.kv_bytes(), (15 * 1024 + 3 * 1500) * per_pos);
    assert_eq!(full.kv_bytes(), 18 * 1500 * per_pos);

    // Rolling back 3 positions (a rejected speculative draft) and redoing
    // them gives the same logits; going back past the ring is refused and
    // leaves the cache as it was.
    let e = ring.truncate(1500 - 600).unwrap_err();
    assert!(e.to_string().contains("cannot roll back"), "{e}");
    assert_eq!(SequenceCache::len(&ring), 1500);
    ring.truncate(1497).unwrap();
    full.truncate(1497).unwrap();
    let a = model.forward(&mut [SeqStep { tokens: &ids[1497..], cache: &mut ring }], Logits::All).unwrap();
    let b = model.forward(&mut [SeqStep { tokens: &ids[1497..], cache: &mut full }], Logits::All).unwrap();
    assert!(max_diff(&a[0], &b[0]) < 1e-3);
}
