//! BERT encoder (all-MiniLM-L6-v2 and friends) and sentence embeddings the
//! way sentence-transformers computes them: mean pooling over the attention
//! mask, then L2 normalisation.
//!
//! Parameter names are HF's (`embeddings.*`, `encoder.layer.{i}.*`), with or
//! without a `bert.` prefix.
//!
//! One model, two ways to run the same block wiring: [`Bert::forward_t`] on
//! tensors (right-padded batches, differentiable: training and fine-tuning,
//! and the reference), and [`Bert::forward_packed`] on plain rows for
//! inference, where a batch is packed without padding (`[tokens, hidden]`)
//! and every block picks its own kernel (`gemm` or the 8-bit block matmul
//! for the projections, one pass for residual + LayerNorm and for the
//! activation, attention per sequence over its own rows: see the blocks'
//! `forward_rows` / `forward_packed` in `attn-nn`).

use std::path::Path;
use std::sync::Arc;

use attn_nn::{
    lengths_to_valid, Activation, AttentionConfig, Dropout, Error, FeedForward, LayerNorm, Linear, MultiHeadAttention,
    Norm, Residual, Result, SafetensorsSource, TokenEmbedding, WeightSource, Weights,
};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::gguf::{GgufFile, GgufSource};
use crate::hf_tokenizer::HfTokenizer;
use crate::sizes::{self, TensorShapes};

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_type_vocab() -> usize {
    2
}

/// The fields of an HF BERT `config.json` that the model needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl BertConfig {
    /// Checks every field: sizes within [`sizes`]' limits (errors name the
    /// field and its value), and their consistency.
    pub fn validate(&self) -> Result<()> {
        for (f, v, max) in [
            ("vocab_size", self.vocab_size, sizes::MAX_VOCAB),
            ("hidden_size", self.hidden_size, sizes::MAX_HIDDEN),
            ("num_hidden_layers", self.num_hidden_layers, sizes::MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, sizes::MAX_HEADS),
            ("intermediate_size", self.intermediate_size, sizes::MAX_FFN),
            ("max_position_embeddings", self.max_position_embeddings, sizes::MAX_CONTEXT),
            ("type_vocab_size", self.type_vocab_size, sizes::MAX_VOCAB),
        ] {
            sizes::bounded_field(f, v, max)?;
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(Error::config(
                "hidden_size",
                format!(
                    "({}) must be divisible by num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        Activation::from_name(&self.hidden_act)?;
        Ok(())
    }

    /// Checks the sizes against the tensors a file holds, before anything
    /// is allocated from them: the layer count against the layer groups
    /// (`layer_prefix`N), the other sizes against the tensors they shape.
    /// `name` maps an HF parameter name (no `bert.` prefix) to the file's,
    /// `key` a config field to what the file calls it.
    pub fn check_tensors(
        &self,
        shapes: &TensorShapes,
        layer_prefix: &str,
        name: &dyn Fn(&str) -> String,
        key: &dyn Fn(&str) -> String,
    ) -> std::result::Result<(), String> {
        shapes.check_layers(&key("num_hidden_layers"), self.num_hidden_layers, layer_prefix)?;
        let word = name("embeddings.word_embeddings.weight");
        shapes.check_dim(&key("vocab_size"), self.vocab_size, &word, 0)?;
        shapes.check_dim(&key("hidden_size"), self.hidden_size, &word, 1)?;
        let positions = name("embeddings.position_embeddings.weight");
        shapes.check_dim(&key("max_position_embeddings"), self.max_position_embeddings, &positions, 0)?;
        let types = name("embeddings.token_type_embeddings.weight");
        shapes.check_dim(&key("type_vocab_size"), self.type_vocab_size, &types, 0)?;
        let up = name("encoder.layer.0.intermediate.dense.weight");
        shapes.check_dim(&key("intermediate_size"), self.intermediate_size, &up, 0)
    }

    /// [`BertConfig::check_tensors`] for HF-named weights (with or without
    /// the `bert.` prefix), fields named as in `config.json`.
    pub fn check_hf_tensors(&self, shapes: &TensorShapes) -> std::result::Result<(), String> {
        let prefix = if shapes.get("bert.embeddings.word_embeddings.weight").is_some() { "bert." } else { "" };
        self.check_tensors(shapes, &format!("{prefix}encoder.layer."), &|n| format!("{prefix}{n}"), &|k| k.to_string())
    }
}

#[derive(Debug, Clone)]
struct BertLayer {
    attn: MultiHeadAttention,
    ffn: FeedForward,
    res_attn: Residual,
    res_ffn: Residual,
}

#[derive(Debug, Clone)]
pub struct Bert {
    cfg: BertConfig,
    word: TokenEmbedding,
    position: TokenEmbedding,
    token_type: TokenEmbedding,
    embed_norm: LayerNorm,
    layers: Vec<BertLayer>,
    /// Hidden dropout (after the embeddings and every sublayer), training only.
    dropout: Dropout,
}

impl Bert {
    pub fn load(w: &Weights, cfg: &BertConfig) -> Result<Self> {
        cfg.validate()?;
        let w = if w.contains("bert.embeddings.word_embeddings.weight") { w.pp("bert") } else { w.clone() };
        let d = cfg.hidden_size;
        let e = w.pp("embeddings");
        let act = Activation::from_name(&cfg.hidden_act)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = w.pp("encoder.layer").pp(i);
            let a = l.pp("attention");
            let lin = |w: &Weights, i: usize, o: usize| Linear::load(w, i, o, true);
            let attn = MultiHeadAttention::new(
                AttentionConfig::mha(d, cfg.num_attention_heads),
                lin(&a.pp("self.query"), d, d)?,
                lin(&a.pp("self.key"), d, d)?,
                lin(&a.pp("self.value"), d, d)?,
                lin(&a.pp("output.dense"), d, d)?,
            )?;
            let ffn = FeedForward::new(
                None,
                lin(&l.pp("intermediate.dense"), d, cfg.intermediate_size)?,
                lin(&l.pp("output.dense"), cfg.intermediate_size, d)?,
                act,
                Dropout::new(0.0)?,
            )?;
            let ln = |w: &Weights| LayerNorm::load(w, d, cfg.layer_norm_eps, true);
            layers.push(BertLayer {
                attn,
                ffn,
                res_attn: Residual::Post(Norm::Layer(ln(&a.pp("output.LayerNorm"))?)),
                res_ffn: Residual::Post(Norm::Layer(ln(&l.pp("output.LayerNorm"))?)),
            });
        }
        Ok(Bert {
            word: TokenEmbedding::load(&e.pp("word_embeddings"), cfg.vocab_size, d, false)?,
            position: TokenEmbedding::new(
                e.pp("position_embeddings").get(&[cfg.max_position_embeddings, d], "weight")?,
                false,
            )?,
            token_type: TokenEmbedding::new(
                e.pp("token_type_embeddings").get(&[cfg.type_vocab_size, d], "weight")?,
                false,
            )?,
            embed_norm: LayerNorm::load(&e.pp("LayerNorm"), d, cfg.layer_norm_eps, true)?,
            layers,
            cfg: cfg.clone(),
            dropout: Dropout::new(0.0)?,
        })
    }

    /// The same model with every linear layer in 8-bit blocks (weight-only
    /// int8 inference; see [`attn_nn::kernels::q8`]).
    pub fn to_q8(&self) -> Result<Self> {
        self.map_linears(&|l: &Linear| l.to_q8())
    }

    /// The same model with every dense linear layer in bf16 AMX tiles where
    /// the CPU has them ([`Linear::to_bf16`]; unchanged elsewhere).
    pub fn to_bf16(&self) -> Result<Self> {
        self.map_linears(&|l: &Linear| l.to_bf16())
    }

    fn map_linears(&self, f: &impl Fn(&Linear) -> Result<Linear>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| Ok(BertLayer { attn: l.attn.map_linears(f)?, ffn: l.ffn.map_linears(f)?, ..l.clone() }))
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert { layers, ..self.clone() })
    }

    /// Sets the hidden dropout used by [`Bert::forward_t`] in training.
    pub fn with_dropout(mut self, p: f32) -> Result<Self> {
        self.dropout = Dropout::new(p)?;
        Ok(self)
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// Hidden states `[batch, seq, hidden]` of right-padded `ids`
    /// `[batch, seq]` with `lengths` real tokens each.
    pub fn forward(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        self.forward_t(ids, lengths, false)
    }

    /// [`Bert::forward`] with hidden dropout when `train`.
    pub fn forward_t(&self, ids: &Tensor, lengths: &[usize], train: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if lengths.len() != b {
            return Err(Error::input("bert", format!("{} lengths for a batch of {b}", lengths.len())));
        }
        if t > self.cfg.max_position_embeddings {
            return Err(Error::input(
                "bert",
                format!("{t} tokens exceed the {} positions of the model", self.cfg.max_position_embeddings),
            ));
        }
        let pos = self.position.table().narrow(0, 0, t)?;
        let typ = self.token_type.table().get(0)?;
        let x = self.word.forward(ids)?.broadcast_add(&pos)?.broadcast_add(&typ)?;
        let mut x = self.dropout.forward(&self.embed_norm.forward(&x)?, train)?;
        let drop = |y: Tensor| self.dropout.forward(&y, train);
        for l in &self.layers {
            x = l.res_attn.forward(&x, |h| drop(l.attn.forward_padded(h, lengths, train)?))?;
            x = l.res_ffn.forward(&x, |h| drop(l.ffn.forward(h, train)?))?;
        }
        Ok(x)
    }

    /// Last hidden states of the sequences `ids` for inference, packed
    /// without padding: `[sum of lengths, hidden]`, sequence `s` in rows
    /// `offsets[s] .. offsets[s + 1]`. Returns the states and the offsets.
    /// The same network as [`Bert::forward_t`] (no dropout, no autograd).
    pub fn forward_packed(&self, ids: &[Vec<u32>]) -> Result<(Vec<f32>, Vec<usize>)> {
        let d = self.cfg.hidden_size;
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
        let mut x = vec![0f32; total * d];
        self.word.add_rows(&ids.concat(), &mut x)?;
        let positions: Vec<u32> = ids.iter().flat_map(|s| 0..s.len() as u32).collect();
        self.position.add_rows(&positions, &mut x)?;
        self.token_type.add_rows(&vec![0; total], &mut x)?;
        self.embed_norm.forward_rows(&mut x, None)?;
        for l in &self.layers {
            l.res_attn.forward_rows(&mut x, |h, y| l.attn.forward_packed(h, &offsets, y))?;
            l.res_ffn.forward_rows(&mut x, |h, y| l.ffn.forward_rows(h, total, y))?;
        }
        Ok((x, offsets))
    }

    /// Mean-pooled, L2-normalised embeddings `[ids.len(), hidden]` of the
    /// sequences `ids` ([`Bert::forward_packed`]). The sequences run in
    /// chunks of about [`EMBED_CHUNK_ROWS`] tokens (whole sequences, in
    /// order), each chunk's whole forward on one thread and the chunks
    /// spread over rayon's threads as they free up: the blocks keep their
    /// kernels on that thread (on 2 cores a 2-thread `gemm` over the whole
    /// batch ran only 1.1-1.4x faster than one thread), a chunk's buffers
    /// stay in the core's cache (MiniLM, 256 sentences of 64 tokens, batch
    /// 32, AMX path, 2 threads: one 1,024-row group per thread 173-246
    /// sentences/s, chunks of 256 rows 203-272 in the same runs, chunks of
    /// 128 a further 5-10%), and uneven lengths balance themselves.
    /// A sentence's embedding does not depend on the other sentences of its
    /// batch beyond float rounding (tested).
    pub fn embed_packed(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let d = self.cfg.hidden_size;
        let mut chunks: Vec<std::ops::Range<usize>> = Vec::new();
        let (mut start, mut rows) = (0, 0);
        for (i, s) in ids.iter().enumerate() {
            if rows > 0 && rows + s.len() > EMBED_CHUNK_ROWS {
                chunks.push(start..i);
                (start, rows) = (i, 0);
            }
            rows += s.len();
        }
        if start < ids.len() {
            chunks.push(start..ids.len());
        }
        let run = |c: &std::ops::Range<usize>| {
            let (x, offsets) = self.forward_packed(&ids[c.clone()])?;
            Ok(attn_nn::kernels::fast::mean_pool_packed(&x, d, &offsets, true))
        };
        let pooled: Vec<Vec<f32>> = if rayon::current_num_threads() > 1 && chunks.len() > 1 {
            // Longest chunks first, so that a long one does not end up last.
            let mut order: Vec<usize> = (0..chunks.len()).collect();
            order.sort_by_key(|&c| std::cmp::Reverse(ids[chunks[c].clone()].iter().map(Vec::len).sum::<usize>()));
            let mut done = order.par_iter().map(|&c| Ok((c, run(&chunks[c])?))).collect::<Result<Vec<_>>>()?;
            done.sort_by_key(|(c, _)| *c);
            done.into_iter().map(|(_, p)| p).collect()
        } else {
            chunks.iter().map(run).collect::<Result<Vec<_>>>()?
        };
        Ok(pooled.concat())
    }
}

/// Tokens per chunk of [`Bert::embed_packed`].
pub const EMBED_CHUNK_ROWS: usize = 128;

/// Mean of `hidden` `[b, t, d]` over the first `lengths[i]` positions of
/// each row (no normalisation): `[b, d]`.
pub fn mean_pool(hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    let (_, t, _) = hidden.dims3()?;
    let valid = lengths_to_valid(lengths, t, hidden.device())?.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&valid)?.sum(1)?;
    let count = valid.sum(1)?.clamp(1e-9, f64::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

/// A BERT encoder with a classification head on the mean-pooled hidden
/// states (the pooling its sentence-transformers checkpoint was trained
/// with): `classifier(dropout(mean_pool(bert(x))))`. The head is
/// `classifier.weight` `[num_labels, hidden]` and `classifier.bias`.
#[derive(Debug, Clone)]
pub struct BertClassifier {
    pub bert: Bert,
    head: Linear,
    dropout: Dropout,
}

impl BertClassifier {
    pub fn load(w: &Weights, cfg: &BertConfig, num_labels: usize, dropout: f32) -> Result<Self> {
        if num_labels < 2 {
            return Err(Error::config("num_labels", format!("must be at least 2, got {num_labels}")));
        }
        let bert = Bert::load(w, cfg)?.with_dropout(dropout)?;
        let head = Linear::load(&w.pp("classifier"), cfg.hidden_size, num_labels, true)?;
        Ok(BertClassifier { bert, head, dropout: Dropout::new(dropout)? })
    }

    pub fn num_labels(&self) -> usize {
        self.head.out_features()
    }

    /// Class logits `[batch, num_labels]`.
    pub fn forward(&self, ids: &Tensor, lengths: &[usize], train: bool) -> Result<Tensor> {
        let h = self.bert.forward_t(ids, lengths, train)?;
        let pooled = self.dropout.forward(&mean_pool(&h, lengths)?, train)?;
        self.head.forward(&pooled)
    }
}

/// Mean of `hidden` `[b, t, d]` over the first `lengths[i]` positions of
/// each row, then L2-normalised: `[b, d]`.
pub fn mean_pool_normalize(hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
    let (_, t, _) = hidden.dims3()?;
    let valid = lengths_to_valid(lengths, t, hidden.device())?.to_dtype(hidden.dtype())?.unsqueeze(2)?;
    let sum = hidden.broadcast_mul(&valid)?.sum(1)?;
    let count = valid.sum(1)?.clamp(1e-9, f64::MAX)?;
    let mean = sum.broadcast_div(&count)?;
    let norm = mean.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(mean.broadcast_div(&norm)?)
}

/// A sentence-transformers model: BERT, tokenizer and the truncation length.
///
/// [`SentenceEncoder::embed`] runs the packed inference path
/// ([`Bert::embed_packed`]) on the CPU, else the tensor forward;
/// [`SentenceEncoder::embed_candle`] always runs the tensor forward on
/// candle's kernels with padded batches (the reference).
pub struct SentenceEncoder {
    pub model: Bert,
    pub tokenizer: HfTokenizer,
    pub max_seq_length: usize,
    device: Device,
    packed: bool,
}

/// Checks an HF BERT folder's config (read from `cfg_path`) against the
/// tensors of its safetensors `files`, reading headers only.
pub fn check_hf_folder(cfg: &BertConfig, cfg_path: &Path, files: &[std::path::PathBuf]) -> Result<()> {
    cfg.validate().map_err(|e| Error::format(cfg_path, e.to_string()))?;
    let shapes = TensorShapes::from_safetensors(files)?;
    cfg.check_hf_tensors(&shapes).map_err(sizes::in_file(cfg_path))
}

/// The config of a BERT GGUF (llama.cpp's `bert.*` keys and tensor names),
/// every size bounded and checked against the file's tensors (headers only).
pub fn bert_config_from_gguf(f: &GgufFile) -> Result<BertConfig> {
    let bad = sizes::in_file(f.path());
    let n = |k: &str, max: usize| sizes::bounded(k, f.meta_u64(k)?, max).map_err(&bad);
    let rows = |name: &str| {
        f.tensor_info(name).map(|i| i.shape()[0]).ok_or_else(|| Error::MissingTensor { name: name.to_string() })
    };
    let cfg = BertConfig {
        vocab_size: rows("token_embd.weight")?,
        hidden_size: n("bert.embedding_length", sizes::MAX_HIDDEN)?,
        num_hidden_layers: n("bert.block_count", sizes::MAX_LAYERS)?,
        num_attention_heads: n("bert.attention.head_count", sizes::MAX_HEADS)?,
        intermediate_size: n("bert.feed_forward_length", sizes::MAX_FFN)?,
        max_position_embeddings: n("bert.context_length", sizes::MAX_CONTEXT)?,
        type_vocab_size: rows("token_types.weight")?,
        hidden_act: f.meta_opt(crate::quantize::HIDDEN_ACT_KEY).and_then(|v| v.as_str()).unwrap_or("gelu").to_string(),
        layer_norm_eps: f.meta_f64("bert.attention.layer_norm_epsilon")?,
    };
    cfg.validate().map_err(|e| bad(e.to_string()))?;
    let key = |field: &str| {
        match field {
            "num_hidden_layers" => "bert.block_count",
            "hidden_size" => "bert.embedding_length",
            "intermediate_size" => "bert.feed_forward_length",
            "max_position_embeddings" => "bert.context_length",
            "vocab_size" => "vocabulary size (token_embd.weight rows)",
            "type_vocab_size" => "token types (token_types.weight rows)",
            other => other,
        }
        .to_string()
    };
    let name = |hf: &str| crate::quantize::bert_gguf_tensor_name(hf).unwrap_or_else(|| hf.to_string());
    cfg.check_tensors(&TensorShapes::from_gguf(&f.header), "blk.", &name, &key).map_err(bad)?;
    Ok(cfg)
}

#[derive(Deserialize)]
struct SbertConfig {
    max_seq_length: usize,
}

impl SentenceEncoder {
    /// Loads an HF-style folder: `config.json`, `*.safetensors`,
    /// `tokenizer.json`, and `sentence_bert_config.json` for the truncation
    /// length (falling back to the model's positions).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let read_json = |name: &str| -> Result<Option<String>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&p).map(Some).map_err(|e| Error::io(&p, e))
        };
        let cfg_path = dir.join("config.json");
        let cfg_text =
            read_json("config.json")?.ok_or_else(|| Error::format(&cfg_path, "missing: not an HF model folder"))?;
        let cfg: BertConfig = serde_json::from_str(&cfg_text)
            .map_err(|e| Error::format(&cfg_path, format!("invalid BERT config: {e}")))?;
        let files = crate::inspect::safetensors_files(dir)?;
        check_hf_folder(&cfg, &cfg_path, &files)?;
        let max_seq_length = match read_json("sentence_bert_config.json")? {
            Some(t) => {
                let s: SbertConfig = serde_json::from_str(&t)
                    .map_err(|e| Error::format(dir.join("sentence_bert_config.json"), e.to_string()))?;
                s.max_seq_length.min(cfg.max_position_embeddings)
            }
            None => cfg.max_position_embeddings,
        };
        let source: Arc<dyn WeightSource> = Arc::new(SafetensorsSource::open(&files)?);
        let weights = Weights::new(source, DType::F32, device);
        let model = Bert::load(&weights, &cfg)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::format(&tok_path, "missing: the folder needs a tokenizer.json"));
        }
        let tokenizer = HfTokenizer::from_file(&tok_path, Some(max_seq_length))?;
        Ok(SentenceEncoder { model, tokenizer, max_seq_length, device: device.clone(), packed: device.is_cpu() })
    }

    /// Loads a BERT GGUF as `attn quantize` writes it: llama.cpp's tensor
    /// names and `bert.*` keys, mean pooling, and the HF tokenizer under
    /// `tokenizer.huggingface.json`.
    pub fn from_gguf(f: Arc<GgufFile>, device: &Device) -> Result<Self> {
        // Sizes first: nothing below is allocated from an unchecked one.
        let path = f.path().to_path_buf();
        if let Some(p) = f.meta_opt("bert.pooling_type").and_then(|v| v.as_u64()) {
            if p != 1 {
                return Err(Error::Unsupported(format!(
                    "{}: bert.pooling_type {p} (attn's sentence embeddings use mean pooling, type 1)",
                    path.display()
                )));
            }
        }
        let cfg = bert_config_from_gguf(&f)?;
        let max_seq_length = f
            .meta_opt(crate::quantize::MAX_SEQ_LENGTH_KEY)
            .and_then(|v| v.as_u64())
            .map_or(cfg.max_position_embeddings, |m| (m as usize).min(cfg.max_position_embeddings));
        let json = f.meta_opt(crate::quantize::HF_TOKENIZER_KEY).and_then(|v| v.as_str()).ok_or_else(|| {
            Error::format(
                &path,
                format!(
                    "no `{}` in the metadata: attn tokenizes BERT with the HF tokenizer.json                      (`attn quantize` stores it there)",
                    crate::quantize::HF_TOKENIZER_KEY
                ),
            )
        })?;
        let tokenizer = HfTokenizer::from_json(json, Some(max_seq_length), &path)?;
        let source: Arc<dyn WeightSource> =
            Arc::new(GgufSource::new(f.clone(), crate::quantize::bert_rename_map(cfg.num_hidden_layers)));
        let model = Bert::load(&Weights::new(source, DType::F32, device), &cfg)?;
        Ok(SentenceEncoder { model, tokenizer, max_seq_length, device: device.clone(), packed: device.is_cpu() })
    }

    /// The same encoder with every linear layer in 8-bit blocks
    /// ([`attn_nn::kernels::q8`]): weight-only int8, activations quantized per row.
    pub fn into_q8(mut self) -> Result<Self> {
        self.model = self.model.to_q8()?;
        Ok(self)
    }

    /// The same encoder with its dense linear layers as bf16 AMX tiles
    /// where the CPU has them ([`attn_nn::kernels::amx`]: bf16 weights and
    /// activations, f32 sums; about 16x the f32 multiply rate), unchanged
    /// elsewhere, and on candle's padded path (the float32 reference).
    /// `attn embed` and `attn serve` use it unless asked for float32.
    pub fn into_bf16(mut self) -> Result<Self> {
        if self.packed {
            self.model = self.model.to_bf16()?;
        }
        Ok(self)
    }

    /// The same encoder without the packed path: [`SentenceEncoder::embed`]
    /// runs the tensor forward on candle's kernels (`ATTN_KERNELS=candle`).
    pub fn with_candle_kernels(mut self) -> Self {
        self.packed = false;
        self
    }

    /// Whether [`SentenceEncoder::embed`] runs the packed path.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Normalised sentence embeddings `[n, hidden]` of `texts`, run in
    /// batches of `batch_size` (on the packed path unless turned off).
    pub fn embed(&self, texts: &[&str], batch_size: usize) -> Result<Tensor> {
        if !self.packed {
            return self.embed_candle(texts, batch_size);
        }
        if texts.is_empty() {
            return Err(Error::input("embed", "no texts"));
        }
        let d = self.model.config().hidden_size;
        let mut out = Vec::with_capacity(texts.len() * d);
        for chunk in texts.chunks(batch_size.max(1)) {
            let ids = self.tokenizer.encode_batch(chunk)?;
            out.extend(self.model.embed_packed(&ids)?);
        }
        Ok(Tensor::from_vec(out, (texts.len(), d), &self.device)?)
    }

    /// [`SentenceEncoder::embed`] on candle's kernels (padded batches): the
    /// reference path.
    pub fn embed_candle(&self, texts: &[&str], batch_size: usize) -> Result<Tensor> {
        if texts.is_empty() {
            return Err(Error::input("embed", "no texts"));
        }
        let mut out = Vec::new();
        for chunk in texts.chunks(batch_size.max(1)) {
            let ids = self.tokenizer.encode_batch(chunk)?;
            let lengths: Vec<usize> = ids.iter().map(|v| v.len()).collect();
            let t = lengths.iter().copied().max().unwrap_or(1).max(1);
            let mut flat = vec![0u32; chunk.len() * t];
            for (i, row) in ids.iter().enumerate() {
                flat[i * t..i * t + row.len()].copy_from_slice(row);
            }
            let ids = Tensor::from_vec(flat, (chunk.len(), t), &self.device)?;
            let hidden = self.model.forward(&ids, &lengths)?;
            out.push(mean_pool_normalize(&hidden, &lengths)?);
        }
        Ok(Tensor::cat(&out, 0)?)
    }
}
