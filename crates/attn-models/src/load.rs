//! Opening whatever `-m/--model` points at.

use std::path::Path;

use attn_nn::{Error, Result};
use candle_core::Device;

use crate::bert::SentenceEncoder;
use crate::bpe::BpeTokenizer;
use crate::chat::{ChatTemplate, GEMMA3_TEMPLATE};
use crate::decoder::{Decoder, ARCHITECTURES};
use crate::gguf::GgufFile;
use crate::lm::Tokenizer;
use crate::spm::SpmTokenizer;

/// A text-generation model with its tokenizer and chat template.
pub struct Generator {
    pub model: Decoder,
    pub tokenizer: GgufTokenizer,
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
        Some(arch) if ARCHITECTURES.contains(&arch) => {
            if !device.is_cpu() {
                return Err(Error::Unsupported(format!("{arch} models run on the CPU only")));
            }
            let tokenizer = GgufTokenizer::from_gguf(&f)?;
            let model = Decoder::from_gguf(&f)?;
            let piece = |id: Option<u32>| id.and_then(|i| tokenizer.piece(i)).unwrap_or_default();
            let bos = piece(tokenizer.bos_id());
            let eos = piece(tokenizer.eos_ids().first().copied());
            let template =
                match f.meta_opt("tokenizer.chat_template").and_then(|v| v.as_str()) {
                    Some(t) => t,
                    None if arch == "gemma3" => GEMMA3_TEMPLATE,
                    None => return Err(Error::format(
                        path,
                        "the GGUF has no chat template (tokenizer.chat_template), and only Gemma 3 has a built-in one",
                    )),
                };
            let chat_template = ChatTemplate::new(template, &bos, &eos)?;
            let name = f.meta_opt("general.name").and_then(|v| v.as_str()).unwrap_or(arch).to_string();
            Ok(AnyModel::Generator(Box::new(Generator { model, tokenizer, chat_template, name })))
        }
        Some("bert") => Ok(AnyModel::Encoder(Box::new(SentenceEncoder::from_gguf(std::sync::Arc::new(f), device)?))),
        Some(other) if other.starts_with("attn-") => Err(Error::Unsupported(format!(
            "{}: a `{other}` model trained by attn; `attn generate` runs it",
            path.display()
        ))),
        Some(other) => Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{other}` (supported: {}, bert, and models trained by attn)",
            path.display(),
            ARCHITECTURES.join(", ")
        ))),
        None => Err(Error::format(path, "GGUF has no general.architecture")),
    }
}

/// The tokenizer a GGUF describes (`tokenizer.ggml.model`).
pub enum GgufTokenizer {
    /// SentencePiece (`llama`: Gemma, Llama 2).
    Spm(SpmTokenizer),
    /// Byte-level BPE (`gpt2`: Llama 3, SmolLM2, Qwen2).
    Bpe(Box<BpeTokenizer>),
}

impl GgufTokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        match f.meta_opt("tokenizer.ggml.model").and_then(|v| v.as_str()) {
            Some("llama") | None => Ok(GgufTokenizer::Spm(SpmTokenizer::from_gguf(f)?)),
            Some("gpt2") => Ok(GgufTokenizer::Bpe(Box::new(BpeTokenizer::from_gguf(f)?))),
            Some(other) => Err(Error::Unsupported(format!(
                "{}: tokenizer model `{other}` (supported: llama, gpt2)",
                f.path().display()
            ))),
        }
    }

    fn inner(&self) -> &dyn Tokenizer {
        match self {
            GgufTokenizer::Spm(t) => t,
            GgufTokenizer::Bpe(t) => t.as_ref(),
        }
    }
}

impl Tokenizer for GgufTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner().encode(text, add_special)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner().decode(ids, skip_special)
    }

    fn piece(&self, id: u32) -> Option<String> {
        self.inner().piece(id)
    }

    fn vocab_size(&self) -> usize {
        self.inner().vocab_size()
    }

    fn bos_id(&self) -> Option<u32> {
        self.inner().bos_id()
    }

    fn eos_ids(&self) -> Vec<u32> {
        self.inner().eos_ids()
    }

    fn adds_bos(&self) -> bool {
        self.inner().adds_bos()
    }
}
