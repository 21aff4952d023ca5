//! BERT's fused inference path: the same encoder as [`crate::bert::Bert`]
//! computed on plain `f32` buffers, for sentence embeddings.
//!
//! Why: through candle, a batch of 32 sentences pads every sentence to the
//! longest one and runs about twenty tensor ops per layer, each allocated
//! and each a separate pass, with masked attention over the padding. Here
//! the batch is packed without padding (`[total_tokens, hidden]`), each
//! matmul is one `gemm` call over all the batch's tokens (AVX-512 where
//! the CPU has it; q, k and v as one `[3 * hidden, hidden]` matrix), bias,
//! residual and LayerNorm are one pass per row, bias and GELU another, and
//! attention runs per sequence over its own rows only (no mask, no padding).
//!
//! Threads: a batch of several sentences is split into one group per
//! thread, balanced by estimated cost, and each group runs the whole
//! forward on its own thread with single-threaded kernels (measured on 2
//! cores: a 2-thread `gemm` over the whole batch ran only about 1.1-1.4x
//! faster than one thread; independent groups avoid its synchronisation).
//! A single sentence splits its matmuls over the threads instead.
//!
//! A sentence's embedding does not depend on which other sentences share
//! its batch beyond float rounding (tested; on the development machine it
//! is bit-for-bit the same).

use attn_nn::fast_bert::{self, matmul_xwt, EncAct, EncAttn, Par};
use attn_nn::{Activation, Error, Result, Weights};
use rayon::prelude::*;

use crate::bert::BertConfig;

#[derive(Debug)]
struct FastLayer {
    /// `[3 * hidden, hidden]`: query, key and value rows stacked.
    wqkv: Vec<f32>,
    bqkv: Vec<f32>,
    wo: Vec<f32>,
    bo: Vec<f32>,
    ln1_w: Vec<f32>,
    ln1_b: Vec<f32>,
    /// `[intermediate, hidden]`
    wi: Vec<f32>,
    bi: Vec<f32>,
    /// `[hidden, intermediate]`
    wd: Vec<f32>,
    bd: Vec<f32>,
    ln2_w: Vec<f32>,
    ln2_b: Vec<f32>,
}

/// The weights of the fused path (float32, row-major as HF stores them).
#[derive(Debug)]
pub struct FastBert {
    cfg: BertConfig,
    act: EncAct,
    /// `[vocab, hidden]`
    word: Vec<f32>,
    /// `[max_positions, hidden]`
    position: Vec<f32>,
    /// Row 0 of the token-type table (single-segment input).
    token_type0: Vec<f32>,
    emb_ln_w: Vec<f32>,
    emb_ln_b: Vec<f32>,
    layers: Vec<FastLayer>,
}

fn vec_of(w: &Weights, shape: &[usize], name: &str) -> Result<Vec<f32>> {
    Ok(w.get(shape, name)?.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl FastBert {
    /// Reads the float weights of an HF BERT (names as [`crate::bert::Bert::load`]
    /// reads them, with or without the `bert.` prefix). `Ok(None)` when the
    /// activation has no fused kernel.
    pub fn load(w: &Weights, cfg: &BertConfig) -> Result<Option<Self>> {
        cfg.validate()?;
        let act = match Activation::from_name(&cfg.hidden_act)? {
            Activation::GeluErf => EncAct::GeluErf,
            Activation::GeluTanh => EncAct::GeluTanh,
            Activation::Relu => EncAct::Relu,
            Activation::Silu => EncAct::Silu,
        };
        let w = if w.contains("bert.embeddings.word_embeddings.weight") { w.pp("bert") } else { w.clone() };
        let (d, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let e = w.pp("embeddings");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = w.pp("encoder.layer").pp(i);
            let a = l.pp("attention");
            let mut wqkv = Vec::with_capacity(3 * d * d);
            let mut bqkv = Vec::with_capacity(3 * d);
            for p in ["self.query", "self.key", "self.value"] {
                wqkv.extend(vec_of(&a.pp(p), &[d, d], "weight")?);
                bqkv.extend(vec_of(&a.pp(p), &[d], "bias")?);
            }
            layers.push(FastLayer {
                wqkv,
                bqkv,
                wo: vec_of(&a.pp("output.dense"), &[d, d], "weight")?,
                bo: vec_of(&a.pp("output.dense"), &[d], "bias")?,
                ln1_w: vec_of(&a.pp("output.LayerNorm"), &[d], "weight")?,
                ln1_b: vec_of(&a.pp("output.LayerNorm"), &[d], "bias")?,
                wi: vec_of(&l.pp("intermediate.dense"), &[inter, d], "weight")?,
                bi: vec_of(&l.pp("intermediate.dense"), &[inter], "bias")?,
                wd: vec_of(&l.pp("output.dense"), &[d, inter], "weight")?,
                bd: vec_of(&l.pp("output.dense"), &[d], "bias")?,
                ln2_w: vec_of(&l.pp("output.LayerNorm"), &[d], "weight")?,
                ln2_b: vec_of(&l.pp("output.LayerNorm"), &[d], "bias")?,
            });
        }
        let token_type = vec_of(&e.pp("token_type_embeddings"), &[cfg.type_vocab_size, d], "weight")?;
        Ok(Some(FastBert {
            act,
            word: vec_of(&e.pp("word_embeddings"), &[cfg.vocab_size, d], "weight")?,
            position: vec_of(&e.pp("position_embeddings"), &[cfg.max_position_embeddings, d], "weight")?,
            token_type0: token_type[..d].to_vec(),
            emb_ln_w: vec_of(&e.pp("LayerNorm"), &[d], "weight")?,
            emb_ln_b: vec_of(&e.pp("LayerNorm"), &[d], "bias")?,
            layers,
            cfg: cfg.clone(),
        }))
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Last hidden states of the sequences `ids`, packed: `[sum of lengths,
    /// hidden]`, sequence `s` in rows `offsets[s] .. offsets[s + 1]`.
    /// Returns the states and the offsets. Kernels split over rayon's threads.
    pub fn forward_packed(&self, ids: &[Vec<u32>]) -> Result<(Vec<f32>, Vec<usize>)> {
        self.forward_packed_with(ids, Par::Inner)
    }

    /// [`FastBert::forward_packed`] with the kernels' threading as `par` says.
    pub fn forward_packed_with(&self, ids: &[Vec<u32>], par: Par) -> Result<(Vec<f32>, Vec<usize>)> {
        let d = self.cfg.hidden_size;
        let inter = self.cfg.intermediate_size;
        let mut offsets = Vec::with_capacity(ids.len() + 1);
        offsets.push(0usize);
        for s in ids {
            if s.len() > self.cfg.max_position_embeddings {
                return Err(Error::input(
                    "bert",
                    format!(
                        "{} tokens exceed the {} positions of the model",
                        s.len(),
                        self.cfg.max_position_embeddings
                    ),
                ));
            }
            offsets.push(offsets[offsets.len() - 1] + s.len());
        }
        let total = offsets[ids.len()];
        let eps = self.cfg.layer_norm_eps as f32;
        // Embeddings: word + position + token type 0, then LayerNorm.
        let mut x = vec![0f32; total * d];
        let mut rows = x.chunks_exact_mut(d);
        for s in ids {
            for (p, &id) in s.iter().enumerate() {
                let id = id as usize;
                if id >= self.cfg.vocab_size {
                    return Err(Error::input(
                        "bert",
                        format!("token id {id} outside the vocabulary of {}", self.cfg.vocab_size),
                    ));
                }
                let row = rows.next().expect("one row per token");
                let (wr, pr) = (&self.word[id * d..(id + 1) * d], &self.position[p * d..(p + 1) * d]);
                for (((o, a), b), c) in row.iter_mut().zip(wr).zip(pr).zip(&self.token_type0) {
                    *o = a + b + c;
                }
            }
        }
        fast_bert::add_layer_norm_rows(&mut x, &[], &[], &self.emb_ln_w, &self.emb_ln_b, eps, par);
        let heads = self.cfg.num_attention_heads;
        let attn = EncAttn { n_heads: heads, head_dim: d / heads, scale: 1.0 / ((d / heads) as f32).sqrt() };
        let mut qkv = vec![0f32; total * 3 * d];
        let mut ctx = vec![0f32; total * d];
        let mut h = vec![0f32; total * d];
        let mut mid = vec![0f32; total * inter];
        for l in &self.layers {
            matmul_xwt(&x, total, d, &l.wqkv, 3 * d, &mut qkv, par)?;
            fast_bert::add_bias_rows(&mut qkv, &l.bqkv);
            fast_bert::attend_packed(&qkv, &offsets, &attn, &mut ctx, par)?;
            matmul_xwt(&ctx, total, d, &l.wo, d, &mut h, par)?;
            // x = LN(ctx·Woᵀ + bo + x)
            fast_bert::add_layer_norm_rows(&mut h, &l.bo, &x, &l.ln1_w, &l.ln1_b, eps, par);
            std::mem::swap(&mut x, &mut h);
            matmul_xwt(&x, total, d, &l.wi, inter, &mut mid, par)?;
            fast_bert::bias_act_rows(&mut mid, &l.bi, self.act, par);
            matmul_xwt(&mid, total, inter, &l.wd, d, &mut h, par)?;
            fast_bert::add_layer_norm_rows(&mut h, &l.bd, &x, &l.ln2_w, &l.ln2_b, eps, par);
            std::mem::swap(&mut x, &mut h);
        }
        Ok((x, offsets))
    }

    /// Mean-pooled, L2-normalised embeddings `[ids.len(), hidden]`: one
    /// group of sequences per thread (see the module notes).
    pub fn embed_ids(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let d = self.cfg.hidden_size;
        let threads = rayon::current_num_threads();
        if threads < 2 || ids.len() < 2 {
            let (x, offsets) = self.forward_packed_with(ids, Par::Inner)?;
            return Ok(fast_bert::mean_pool_normalize_packed(&x, d, &offsets));
        }
        let groups = self.balanced_groups(ids, threads);
        let pooled = groups
            .par_iter()
            .map(|g| {
                let seqs: Vec<Vec<u32>> = g.iter().map(|&i| ids[i].clone()).collect();
                let (x, offsets) = self.forward_packed_with(&seqs, Par::Serial)?;
                Ok(fast_bert::mean_pool_normalize_packed(&x, d, &offsets))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; ids.len() * d];
        for (g, p) in groups.iter().zip(&pooled) {
            for (&i, row) in g.iter().zip(p.chunks_exact(d)) {
                out[i * d..(i + 1) * d].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    /// Splits sequence indices into at most `n` groups of about equal cost
    /// (longest first, each to the cheapest group so far). Cost of a
    /// sequence of `l` tokens: its matmul work `l * (4 d² + 2 d i)` plus
    /// attention `2 l² d`.
    fn balanced_groups(&self, ids: &[Vec<u32>], n: usize) -> Vec<Vec<usize>> {
        let (d, i) = (self.cfg.hidden_size as u64, self.cfg.intermediate_size as u64);
        let cost = |l: usize| {
            let l = l as u64;
            l * (4 * d * d + 2 * d * i) + 2 * l * l * d
        };
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&s| std::cmp::Reverse(ids[s].len()));
        let n = n.min(ids.len()).max(1);
        let mut groups = vec![Vec::new(); n];
        let mut load = vec![0u64; n];
        for s in order {
            let g = (0..n).min_by_key(|&g| load[g]).unwrap_or(0);
            load[g] += cost(ids[s].len());
            groups[g].push(s);
        }
        groups.retain(|g| !g.is_empty());
        groups
    }
}
