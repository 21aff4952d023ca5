//! `attn perplexity`.

use std::io::Write;
use std::path::PathBuf;

use attn_engine::perplexity;
use attn_models::Tokenizer;
use serde_json::json;

use crate::common::{open_generator, set_threads, DEFAULT_GENERATOR};

/// Perplexity as llama.cpp's `llama-perplexity` computes it: the file is
/// tokenized with BOS (one trailing newline removed), cut into chunks of
/// --ctx tokens whose first token is replaced by BOS, each chunk run from an
/// empty cache, and the second half of each chunk scored (ctx/2 - 1 tokens
/// per chunk); ppl = exp(mean negative log-likelihood).
#[derive(clap::Args)]
pub struct PerplexityArgs {
    /// A known model name, a .gguf file, or a model trained by `attn train` (its run or model folder)
    #[arg(short, long, default_value = DEFAULT_GENERATOR)]
    model: String,
    /// The text file to score
    #[arg(short, long)]
    file: PathBuf,
    /// Tokens per chunk
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Worker threads for the tensor kernels
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

pub fn run(args: &PerplexityArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let mut text = std::fs::read_to_string(&args.file).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    if text.ends_with('\n') {
        text.pop();
    }
    let g = open_generator(&args.model)?;
    let ids = g.tokenizer.encode(&text, true)?;
    let start = std::time::Instant::now();
    let json = args.json;
    let p =
        perplexity(&g.model, &ids, args.ctx, g.tokenizer.bos_id().filter(|_| g.tokenizer.adds_bos()), |i, n, ppl| {
            if !json {
                if i == 0 {
                    eprintln!("{} tokens, {n} chunks of {}", ids.len(), args.ctx);
                }
                eprint!("[{}]{ppl:.4},", i + 1);
                let _ = std::io::stderr().flush();
            }
        })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "ppl": p.ppl, "mean_nll": p.mean_nll, "ctx": p.n_ctx, "chunks": p.n_chunks,
                "scored_tokens": p.n_scored, "tokens": ids.len(), "running": p.running,
                "seconds": start.elapsed().as_secs_f64(),
            }))?
        );
    } else {
        eprintln!();
        println!("perplexity {:.4} over {} tokens ({} chunks of {})", p.ppl, p.n_scored, p.n_chunks, p.n_ctx);
    }
    Ok(())
}
