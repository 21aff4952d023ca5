//! Times one batched decode step of a GGUF decoder at several batch sizes. `cargo run --release -p attn-models --example batch_decode -- MODEL.gguf`
use std::time::Instant;

use attn_models::gguf::GgufFile;
use attn_models::Decoder;
use attn_models::{LanguageModel, Logits, SeqStep};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: batch_decode MODEL.gguf")?;
    let f = GgufFile::open(&path)?;
    let model = Decoder::from_gguf(&f)?;
    let model = if std::env::args().nth(2).as_deref() == Some("q8") {
        let t = Instant::now();
        let m = model.for_batched_serving()?;
        eprintln!("converted to 8-bit blocks in {:?}", t.elapsed());
        m
    } else {
        model
    };
    for b in [1usize, 4, 16, 64] {
        let mut caches: Vec<_> = (0..b).map(|_| model.new_cache()).collect::<Result<_, _>>()?;
        let prompts: Vec<Vec<u32>> = (0..b).map(|i| (0..20).map(|j| 1000 + (i * 31 + j) as u32).collect()).collect();
        let mut steps: Vec<SeqStep<'_, _>> =
            caches.iter_mut().zip(&prompts).map(|(c, p)| SeqStep { tokens: p, cache: c }).collect();
        model.forward(&mut steps, Logits::Last)?;
        let toks: Vec<Vec<u32>> = (0..b).map(|i| vec![2000 + i as u32]).collect();
        let n = 5;
        let t = Instant::now();
        for _ in 0..n {
            let mut steps: Vec<SeqStep<'_, _>> =
                caches.iter_mut().zip(&toks).map(|(c, p)| SeqStep { tokens: p, cache: c }).collect();
            model.forward(&mut steps, Logits::Last)?;
        }
        let per = t.elapsed().as_secs_f64() / n as f64;
        println!("batch {b:2}: step {:.1} ms ({:.1} tok/s)", per * 1e3, b as f64 / per);
    }
    Ok(())
}
