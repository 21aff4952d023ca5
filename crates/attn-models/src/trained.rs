//! Models trained by `attn train`: the exported folder (`config.json` with
//! an `attn-*` model type, `model.safetensors`, `tokenizer.json`), the run
//! folder that holds it under `model/`, or a GGUF made of it by
//! `attn quantize` (matrices stay quantized; see [`crate::quantize`]).
//!
//! Training writes these files (attn-train); everything that runs them
//! (generation, perplexity, serving, evaluation) loads them from here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use attn_nn::{Error, Result, Weights};
use candle_core::{DType, Device};
use serde_json::json;

use crate::bert::{BertClassifier, BertConfig};
use crate::gguf::{GgufFile, GgufSource};
use crate::gpt::{Gpt, GptConfig};
use crate::hf_tokenizer::HfTokenizer;
use crate::sizes::{self, TensorShapes};
use crate::transformer::{Transformer, TransformerConfig};

/// Ids every tokenizer attn trains gives its special tokens.
pub const PAD_ID: u32 = 0;
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// A model's architecture and config, as written into checkpoints and the
/// exported `config.json`.
#[derive(Debug, Clone)]
pub enum ModelKind {
    Gpt(GptConfig),
    Transformer(TransformerConfig),
    Classifier { bert: BertConfig, num_labels: usize, dropout: f32 },
}

impl ModelKind {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            ModelKind::Gpt(c) => json!({"model_type": "attn-gpt", "config": c}),
            ModelKind::Transformer(c) => json!({"model_type": "attn-transformer", "config": c}),
            ModelKind::Classifier { bert, num_labels, dropout } => json!({
                "model_type": "attn-bert-classifier", "config": bert, "num_labels": num_labels, "dropout": dropout
            }),
        }
    }

    pub fn from_json(v: &serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |e: serde_json::Error| Error::format(path, format!("invalid model config: {e}"));
        let cfg = v.get("config").cloned().unwrap_or_default();
        match v.get("model_type").and_then(|m| m.as_str()) {
            Some("attn-gpt") => Ok(ModelKind::Gpt(serde_json::from_value(cfg).map_err(bad)?)),
            Some("attn-transformer") => Ok(ModelKind::Transformer(serde_json::from_value(cfg).map_err(bad)?)),
            Some("attn-bert-classifier") => Ok(ModelKind::Classifier {
                bert: serde_json::from_value(cfg).map_err(bad)?,
                num_labels: v.get("num_labels").and_then(|n| n.as_u64()).unwrap_or(2) as usize,
                dropout: v.get("dropout").and_then(|n| n.as_f64()).unwrap_or(0.1) as f32,
            }),
            other => Err(Error::format(path, format!("model_type {other:?} is not an attn-trained model"))),
        }
    }
}

impl ModelKind {
    /// Checks the config (sizes within [`sizes`]' limits) and its sizes
    /// against the tensors a file holds, before anything is allocated
    /// from them; errors name the config field and its value.
    pub fn check_tensors(&self, shapes: &TensorShapes) -> std::result::Result<(), String> {
        let check = |r: std::result::Result<(), String>| r;
        match self {
            ModelKind::Gpt(c) => {
                c.validate().map_err(|e| e.to_string())?;
                check(shapes.check_layers("n_layers", c.n_layers, "layers."))?;
                check(shapes.check_dim("vocab_size", c.vocab_size, "embed.weight", 0))?;
                check(shapes.check_dim("d_model", c.d_model, "embed.weight", 1))?;
                if let Some(m) = &c.moe {
                    let experts = shapes.groups("layers.0.moe.experts.").len();
                    if experts != m.n_experts {
                        return Err(format!(
                            "`moe.n_experts` = {}, but layer 0 of the file holds {experts} experts",
                            m.n_experts
                        ));
                    }
                }
                if let Some(i) = (0..c.n_layers).find(|&i| !c.is_moe_layer(i)) {
                    check(shapes.check_dim("d_ff", c.d_ff, &format!("layers.{i}.ffn.up_proj.weight"), 0))?;
                }
            }
            ModelKind::Transformer(c) => {
                c.validate().map_err(|e| e.to_string())?;
                let t = "transformer.";
                check(shapes.check_layers("n_encoder_layers", c.n_encoder_layers, &format!("{t}encoder.layers.")))?;
                check(shapes.check_layers("n_decoder_layers", c.n_decoder_layers, &format!("{t}decoder.layers.")))?;
                check(shapes.check_dim("src_vocab_size", c.src_vocab_size, "src_embed.weight", 0))?;
                check(shapes.check_dim("d_model", c.d_model, "src_embed.weight", 1))?;
                if !c.share_embeddings {
                    check(shapes.check_dim("tgt_vocab_size", c.tgt_vocab_size, "tgt_embed.weight", 0))?;
                }
                check(shapes.check_dim("d_ff", c.d_ff, &format!("{t}encoder.layers.0.linear1.weight"), 0))?;
            }
            ModelKind::Classifier { bert, num_labels, .. } => {
                bert.validate().map_err(|e| e.to_string())?;
                sizes::bounded_field("num_labels", *num_labels, sizes::MAX_VOCAB).map_err(|e| e.to_string())?;
                check(bert.check_hf_tensors(shapes))?;
                check(shapes.check_dim("num_labels", *num_labels, "classifier.weight", 0))?;
            }
        }
        Ok(())
    }
}

/// A built attn-trained model.
#[derive(Clone)]
pub enum Net {
    Gpt(Gpt),
    Transformer(Transformer),
    Classifier(BertClassifier),
}

impl Net {
    pub fn build(kind: &ModelKind, w: &Weights) -> Result<Net> {
        Ok(match kind {
            ModelKind::Gpt(c) => Net::Gpt(Gpt::load(w, c)?),
            ModelKind::Transformer(c) => Net::Transformer(Transformer::load(w, c)?),
            ModelKind::Classifier { bert, num_labels, dropout } => {
                Net::Classifier(BertClassifier::load(w, bert, *num_labels, *dropout)?)
            }
        })
    }
}

/// The exported model folder `path` stands for, when it is one: the folder
/// itself or a run folder's `model/`, whose `config.json` names an
/// `attn-*` model type.
pub fn exported_dir(path: &Path) -> Option<PathBuf> {
    let dir = if path.join("model").join("config.json").is_file() { path.join("model") } else { path.to_path_buf() };
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("model_type")?.as_str()?.starts_with("attn-").then_some(dir)
}

/// Reads the `config.json` of an exported folder.
pub fn read_kind(model_dir: &Path) -> Result<ModelKind> {
    let cj_path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&cj_path).map_err(|e| Error::io(&cj_path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&cj_path, format!("invalid JSON: {e}")))?;
    ModelKind::from_json(&v, &cj_path)
}

/// Checks an exported folder's config against its `model.safetensors`
/// (headers only); errors name `config.json`.
pub fn check_folder(model_dir: &Path, kind: &ModelKind) -> Result<()> {
    let shapes = TensorShapes::from_safetensors(&[model_dir.join("model.safetensors")])?;
    kind.check_tensors(&shapes).map_err(sizes::in_file(&model_dir.join("config.json")))
}

/// Checks the config stored in a GGUF written by `attn quantize` against
/// the file's tensors (headers only).
pub fn check_gguf(f: &GgufFile) -> Result<ModelKind> {
    let (cfg, _) = crate::quantize::attn_model_parts(f)?;
    let kind = ModelKind::from_json(&cfg, f.path())?;
    kind.check_tensors(&TensorShapes::from_gguf(&f.header)).map_err(sizes::in_file(f.path()))?;
    Ok(kind)
}

/// Builds an exported model from its folder (float32 weights).
pub fn load_net(model_dir: &Path, kind: &ModelKind, device: &Device) -> Result<Net> {
    let files = [model_dir.join("model.safetensors")];
    check_folder(model_dir, kind)?;
    let w = Weights::from_safetensors(&files, DType::F32, device)?;
    Net::build(kind, &w)
}

/// A model trained by attn and its tokenizer, from its exported folder (or
/// the run folder holding it).
pub fn load_folder(path: &Path, device: &Device) -> Result<(Net, HfTokenizer)> {
    let dir = exported_dir(path).unwrap_or_else(|| path.to_path_buf());
    let kind = read_kind(&dir)?;
    let net = load_net(&dir, &kind, device)?;
    Ok((net, HfTokenizer::from_file(&dir.join("tokenizer.json"), None)?))
}

/// The same from a GGUF written by `attn quantize`.
pub fn load_gguf(f: Arc<GgufFile>, device: &Device) -> Result<(Net, HfTokenizer)> {
    let path = f.path().to_path_buf();
    let kind = check_gguf(&f)?;
    let (_, tok) = crate::quantize::attn_model_parts(&f)?;
    let source = GgufSource::new(f, Default::default());
    let w = Weights::new(Arc::new(source), DType::F32, device);
    Ok((Net::build(&kind, &w)?, HfTokenizer::from_json(&tok, None, &path)?))
}

/// [`load_folder`] or [`load_gguf`], whichever `path` is.
pub fn load_exported(path: &Path, device: &Device) -> Result<(Net, HfTokenizer)> {
    if path.is_dir() {
        return load_folder(path, device);
    }
    load_gguf(Arc::new(GgufFile::open(path)?), device)
}
