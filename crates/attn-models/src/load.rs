//! Opening whatever `-m/--model` points at.

use std::path::Path;

use attn_nn::{Error, Result};
use candle_core::Device;

use crate::bert::SentenceEncoder;
use crate::chat::{ChatTemplate, GEMMA3_TEMPLATE};
use crate::gemma3::Gemma3;
use crate::gguf::GgufFile;
use crate::lm::Tokenizer;
use crate::spm::SpmTokenizer;

/// A text-generation model with its tokenizer and chat template.
pub struct Generator {
    pub model: Gemma3,
    pub tokenizer: SpmTokenizer,
    pub chat_template: ChatTemplate,
    pub name: String,
}

pub enum AnyModel {
    Generator(Box<Generator>),
    Encoder(Box<SentenceEncoder>),
}

impl AnyModel {
    pub fn kind(&self) -> &'static str {
        match self {
            AnyModel::Generator(_) => "text generation (decoder-only)",
            AnyModel::Encoder(_) => "sentence embeddings (encoder-only)",
        }
    }

    pub fn tokenizer(&self) -> &dyn Tokenizer {
        match self {
            AnyModel::Generator(g) => &g.tokenizer,
            AnyModel::Encoder(e) => &e.tokenizer,
        }
    }
}

/// `ATTN_KERNELS=candle` computes GGUF models and float BERT encoders with
/// candle's kernels (the reference path) instead of attn's fused ones
/// (`fused`, the default).
pub fn candle_kernels_requested() -> Result<bool> {
    match std::env::var("ATTN_KERNELS") {
        Err(_) => Ok(false),
        Ok(v) if v == "fused" || v.is_empty() => Ok(false),
        Ok(v) if v == "candle" => Ok(true),
        Ok(v) => Err(Error::config("ATTN_KERNELS", format!("must be `fused` or `candle`, got `{v}`"))),
    }
}

/// Loads a GGUF file or an HF-style folder (kernels as `ATTN_KERNELS` says).
pub fn load_model(path: &Path, device: &Device) -> Result<AnyModel> {
    load_model_with(path, device, candle_kernels_requested()?)
}

/// [`load_model`], computing with candle's kernels when asked.
pub fn load_model_with(path: &Path, device: &Device, candle_kernels: bool) -> Result<AnyModel> {
    if path.is_dir() {
        let cfg = path.join("config.json");
        let text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg, format!("invalid JSON: {e}")))?;
        let kind = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("unknown");
        return match kind {
            "bert" => {
                let enc = SentenceEncoder::load(path, device)?;
                Ok(AnyModel::Encoder(Box::new(if candle_kernels { enc.with_candle_kernels() } else { enc })))
            }
            other => Err(Error::Unsupported(format!(
                "{}: model_type `{other}` in an HF folder (supported: bert; decoder-only models load from GGUF)",
                path.display()
            ))),
        };
    }
    let mut f = GgufFile::open(path)?;
    f.candle_kernels = candle_kernels;
    match f.header.architecture() {
        Some("gemma3") => {
            let tokenizer = SpmTokenizer::from_gguf(&f)?;
            let model = Gemma3::from_gguf(&f, device)?;
            let piece = |id: Option<u32>| id.and_then(|i| tokenizer.piece(i)).unwrap_or_default();
            let bos = piece(tokenizer.bos_id());
            let eos = piece(tokenizer.eos_ids().first().copied());
            let template = f.meta_opt("tokenizer.chat_template").and_then(|v| v.as_str()).unwrap_or(GEMMA3_TEMPLATE);
            let chat_template = ChatTemplate::new(template, &bos, &eos)?;
            let name = f.meta_opt("general.name").and_then(|v| v.as_str()).unwrap_or("gemma3").to_string();
            Ok(AnyModel::Generator(Box::new(Generator { model, tokenizer, chat_template, name })))
        }
        Some("bert") => Ok(AnyModel::Encoder(Box::new(SentenceEncoder::from_gguf(std::sync::Arc::new(f), device)?))),
        Some(other) if other.starts_with("attn-") => Err(Error::Unsupported(format!(
            "{}: a `{other}` model trained by attn; `attn generate` runs it",
            path.display()
        ))),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{other}` (supported: gemma3, bert, and models trained by attn)",
            path.display()
        ))),
        None => Err(Error::format(path, "GGUF has no general.architecture")),
    }
}
