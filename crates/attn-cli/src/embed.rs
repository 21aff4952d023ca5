//! `attn embed` and `attn tokenize`.

use std::path::PathBuf;

use attn_models::load::AnyModel;
use serde_json::json;

use crate::common::{open_model, set_threads, DEFAULT_ENCODER};

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Texts to embed
    texts: Vec<String>,
    /// A file with one text per line (instead of or in addition to TEXTS)
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// A known model name, an HF-style folder (config.json, *.safetensors, tokenizer.json) or a BERT GGUF from `attn quantize`
    #[arg(short, long, default_value = DEFAULT_ENCODER)]
    model: String,
    /// Sentences per forward pass
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Worker threads for the kernels (one group of sentences per thread on
    /// the packed path; ATTN_KERNELS=candle runs candle's padded path)
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print JSON (model, dimension, one embedding per text)
    #[arg(long)]
    json: bool,
    /// Run the linear layers as weight-only int8 (8-bit blocks of 32, activations quantized per row)
    #[arg(long, conflicts_with = "f32")]
    int8: bool,
    /// Keep the linear layers in float32 where the CPU has AMX (there the
    /// default rounds weights and activations to bf16 and sums in f32)
    #[arg(long)]
    f32: bool,
    /// Print the embedding speed (sentences/s, excluding loading) to stderr
    #[arg(long)]
    timing: bool,
}

pub fn embed(args: &EmbedArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let mut texts = args.texts.clone();
    if let Some(f) = &args.file {
        let content = std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        texts.extend(content.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    if texts.is_empty() {
        anyhow::bail!("nothing to embed: give texts as arguments or --file");
    }
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let enc = match open_model(&args.model)? {
        AnyModel::Encoder(e) => e,
        other => {
            anyhow::bail!("`{}` is a {} model; `attn embed` needs a sentence-embedding model", args.model, other.kind())
        }
    };
    let enc = if args.int8 {
        Box::new(enc.into_q8()?)
    } else if args.f32 {
        enc
    } else {
        Box::new(enc.into_bf16()?)
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let t0 = std::time::Instant::now();
    let emb = enc.embed(&refs, args.batch_size)?.to_vec2::<f32>()?;
    if args.timing {
        let s = t0.elapsed().as_secs_f64();
        eprintln!("[{} sentences in {:.3} s: {:.1} sentences/s]", texts.len(), s, texts.len() as f64 / s);
    }
    if args.json {
        let dim = emb.first().map_or(0, Vec::len);
        let items: Vec<_> = texts.iter().zip(&emb).map(|(t, e)| json!({"text": t, "embedding": e})).collect();
        println!("{}", serde_json::to_string(&json!({"model": args.model, "dim": dim, "data": items}))?);
    } else {
        for (t, e) in texts.iter().zip(&emb) {
            let v: Vec<String> = e.iter().map(|x| format!("{x:.6}")).collect();
            println!("{t}\t[{}]", v.join(", "));
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// The text to tokenize
    text: String,
    /// A known model name, a .gguf file or a model folder
    #[arg(short, long, default_value = crate::common::DEFAULT_GENERATOR)]
    model: String,
    /// Do not add BOS/EOS or other special tokens
    #[arg(long)]
    no_special: bool,
    /// Print JSON (ids and pieces)
    #[arg(long)]
    json: bool,
}

pub fn tokenize(args: &TokenizeArgs) -> anyhow::Result<()> {
    let model = open_model(&args.model)?;
    let tok = model.tokenizer();
    let ids = tok.encode(&args.text, !args.no_special)?;
    let pieces: Vec<String> = ids.iter().map(|&i| tok.piece(i).unwrap_or_default()).collect();
    if args.json {
        println!("{}", serde_json::to_string(&json!({"ids": ids, "pieces": pieces, "count": ids.len()}))?);
    } else {
        for (i, p) in ids.iter().zip(&pieces) {
            println!("{i:>7}  {p:?}");
        }
        eprintln!("{} tokens", ids.len());
    }
    Ok(())
}
