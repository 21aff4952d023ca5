//! Perplexity the way llama.cpp's `llama-perplexity` computes it.
//!
//! The text is tokenized once (with BOS) and cut into chunks of `n_ctx`
//! tokens; each chunk's first token is replaced by BOS and the chunk is run
//! from an empty cache. Only the second half of each chunk is scored (each
//! scored token then has at least `n_ctx / 2` tokens of context): the
//! logits at positions `n_ctx/2 .. n_ctx-2` predict tokens `n_ctx/2 + 1 ..
//! n_ctx-1`, i.e. `n_ctx/2 - 1` tokens per chunk. The result is
//! `exp(mean negative log-likelihood)` over all scored tokens. Tokens after
//! the last full chunk are not used.

use attn_models::{LanguageModel, Logits, SeqStep};
use attn_nn::{Error, Result};
use candle_core::{DType, Tensor, D};

#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    pub ppl: f64,
    pub mean_nll: f64,
    pub n_ctx: usize,
    pub n_chunks: usize,
    pub n_scored: usize,
    /// Running perplexity after each chunk (what llama.cpp prints as `[i]ppl`).
    pub running: Vec<f64>,
}

/// Scores `tokens` (the whole text, BOS first). `on_chunk(i, n, running_ppl)`
/// reports progress.
pub fn perplexity<M: LanguageModel>(
    model: &M,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<Perplexity> {
    if n_ctx < 4 {
        return Err(Error::config("ctx", format!("must be at least 4, got {n_ctx}")));
    }
    if n_ctx > model.context_length() {
        return Err(Error::config(
            "ctx",
            format!("{n_ctx} exceeds the model's context length {}", model.context_length()),
        ));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(Error::input(
            "perplexity",
            format!("the text has {} tokens, fewer than one chunk of {n_ctx}; use a smaller --ctx", tokens.len()),
        ));
    }
    let first = n_ctx / 2;
    let (mut sum, mut count) = (0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    for c in 0..n_chunks {
        let mut chunk = tokens[c * n_ctx..(c + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let mut cache = model.new_cache()?;
        let logits = model.forward(&mut [SeqStep { tokens: &chunk, cache: &mut cache }], Logits::All)?;
        let logits = logits.into_iter().next().ok_or_else(|| Error::input("perplexity", "model returned no logits"))?;
        // Positions first .. n_ctx-2 predict the next token of the chunk.
        let scored = logits.narrow(0, first, n_ctx - 1 - first)?.to_dtype(DType::F32)?;
        let logp = candle_nn::ops::log_softmax(&scored, D::Minus1)?;
        let targets: Vec<u32> = chunk[first + 1..].to_vec();
        let idx = Tensor::from_vec(targets, (n_ctx - 1 - first, 1), logp.device())?;
        let nll: f32 = logp.gather(&idx, 1)?.sum_all()?.to_scalar::<f32>()?;
        sum -= nll as f64;
        count += n_ctx - 1 - first;
        let ppl = (sum / count as f64).exp();
        running.push(ppl);
        on_chunk(c, n_chunks, ppl);
    }
    let mean_nll = sum / count as f64;
    Ok(Perplexity { ppl: mean_nll.exp(), mean_nll, n_ctx, n_chunks, n_scored: count, running })
}
