use attn_models::gguf::GgufFile;
use attn_models::spm::SpmTokenizer;
use attn_models::Decoder;
use attn_models::{LanguageModel, Logits, SeqStep, Tokenizer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap();
    let prompt = std::env::args().nth(2).unwrap_or("The capital of France is".into());
    let t0 = std::time::Instant::now();
    let f = GgufFile::open(&path)?;
    let tok = SpmTokenizer::from_gguf(&f)?;
    let model = Decoder::from_gguf(&f)?;
    eprintln!("loaded in {:?}", t0.elapsed());
    let ids = tok.encode(&prompt, true)?;
    eprintln!("ids {:?}", ids);
    let mut cache = model.new_cache()?;
    let mut toks = ids.clone();
    let t0 = std::time::Instant::now();
    let mut step = ids.clone();
    for i in 0..20 {
        let logits = model.forward(&mut [SeqStep { tokens: &step, cache: &mut cache }], Logits::Last)?;
        let next = logits[0].argmax(0)?.to_scalar::<u32>()?;
        if i == 0 {
            eprintln!("prefill {:?}", t0.elapsed());
        }
        toks.push(next);
        step = vec![next];
    }
    eprintln!("total {:?}", t0.elapsed());
    println!("{}", tok.decode(&toks, false)?);
    Ok(())
}
