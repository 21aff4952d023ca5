//! Opening whatever `-m/--model` points at: the one place that tells
//! formats and architectures apart. Every causal language model (the GGUF
//! decoders, attn's own GPT) comes back as one type, [`CausalModel`], with
//! one tokenizer type, [`ModelTokenizer`]; the engine and the CLI never
//! ask which architecture they drive.

use std::path::Path;
use std::sync::Arc;

use attn_nn::{Error, KvShape, PagedCache, Result};
use candle_core::{Device, Tensor};

use crate::bert::{BertClassifier, SentenceEncoder};
use crate::bpe::BpeTokenizer;
use crate::chat::{ChatTemplate, GEMMA3_TEMPLATE};
use crate::decoder::{Decoder, Parallel, ARCHITECTURES};
use crate::gguf::GgufFile;
use crate::gpt::Gpt;
use crate::hf_tokenizer::HfTokenizer;
use crate::lm::{LanguageModel, LayerCaches, Logits, PagedLanguageModel, SeqStep, Tokenizer};
use crate::spm::SpmTokenizer;
use crate::trained::{self, Net};
use crate::transformer::Transformer;

/// A causal language model of any architecture attn runs.
#[derive(Clone)]
pub enum CausalModel {
    /// Gemma 3, Llama, Qwen2 from GGUF (the shared decoder).
    Decoder(Decoder),
    /// A GPT trained by `attn train`.
    Gpt(Gpt),
}

impl CausalModel {
    /// Bytes of weights one decode step reads, when known.
    pub fn decode_weight_bytes(&self) -> Option<usize> {
        match self {
            CausalModel::Decoder(d) => Some(d.decode_weight_bytes()),
            CausalModel::Gpt(_) => None,
        }
    }

    /// The same model with its matrices on the batched 8-bit kernel, whose
    /// cost per step barely grows with the number of sequences.
    pub fn for_batched_serving(&self) -> Result<Self> {
        match self {
            CausalModel::Decoder(d) => Ok(CausalModel::Decoder(d.for_batched_serving()?)),
            CausalModel::Gpt(g) => Ok(CausalModel::Gpt(g.clone())),
        }
    }
}

impl LanguageModel for CausalModel {
    type Cache = LayerCaches;

    fn new_cache(&self) -> Result<LayerCaches> {
        match self {
            CausalModel::Decoder(m) => m.new_cache(),
            CausalModel::Gpt(m) => m.new_cache(),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            CausalModel::Decoder(m) => m.vocab_size(),
            CausalModel::Gpt(m) => m.vocab_size(),
        }
    }

    fn context_length(&self) -> usize {
        match self {
            CausalModel::Decoder(m) => m.context_length(),
            CausalModel::Gpt(m) => m.context_length(),
        }
    }

    fn forward(&self, batch: &mut [SeqStep<'_, LayerCaches>], logits: Logits) -> Result<Vec<Tensor>> {
        match self {
            CausalModel::Decoder(m) => LanguageModel::forward(m, batch, logits),
            CausalModel::Gpt(m) => LanguageModel::forward(m, batch, logits),
        }
    }
}

impl PagedLanguageModel for CausalModel {
    fn kv_shape(&self) -> KvShape {
        match self {
            CausalModel::Decoder(m) => m.kv_shape(),
            CausalModel::Gpt(m) => m.kv_shape(),
        }
    }

    fn forward_paged(&self, batch: &mut [SeqStep<'_, PagedCache>], logits: Logits) -> Result<Vec<Tensor>> {
        match self {
            CausalModel::Decoder(m) => m.forward_paged(batch, logits),
            CausalModel::Gpt(m) => m.forward_paged(batch, logits),
        }
    }
}

/// A text-generation model with its tokenizer and chat template.
pub struct Generator {
    pub model: CausalModel,
    pub tokenizer: ModelTokenizer,
    /// The template chat requests render through (models trained by attn
    /// have none).
    pub chat_template: Option<ChatTemplate>,
    pub name: String,
}

/// An encoder-decoder trained by `attn train` (translation).
pub struct Seq2Seq {
    pub model: Transformer,
    pub tokenizer: HfTokenizer,
    pub name: String,
}

/// A sequence classifier trained by `attn train`.
pub struct Classifier {
    pub model: BertClassifier,
    pub tokenizer: HfTokenizer,
    pub name: String,
}

pub enum AnyModel {
    Generator(Box<Generator>),
    Seq2Seq(Box<Seq2Seq>),
    Encoder(Box<SentenceEncoder>),
    Classifier(Box<Classifier>),
}

impl AnyModel {
    pub fn kind(&self) -> &'static str {
        match self {
            AnyModel::Generator(_) => "text generation (decoder-only)",
            AnyModel::Seq2Seq(_) => "translation (encoder-decoder)",
            AnyModel::Encoder(_) => "sentence embeddings (encoder-only)",
            AnyModel::Classifier(_) => "sequence classification (encoder-only)",
        }
    }

    pub fn tokenizer(&self) -> &dyn Tokenizer {
        match self {
            AnyModel::Generator(g) => &g.tokenizer,
            AnyModel::Seq2Seq(m) => &m.tokenizer,
            AnyModel::Encoder(e) => &e.tokenizer,
            AnyModel::Classifier(c) => &c.tokenizer,
        }
    }
}

/// An attn-trained model and its tokenizer as an [`AnyModel`].
fn trained_model(net: Net, tokenizer: HfTokenizer, path: &Path) -> AnyModel {
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    match net {
        Net::Gpt(model) => AnyModel::Generator(Box::new(Generator {
            model: CausalModel::Gpt(model),
            tokenizer: ModelTokenizer::Hf(Box::new(tokenizer)),
            chat_template: None,
            name,
        })),
        Net::Transformer(model) => AnyModel::Seq2Seq(Box::new(Seq2Seq { model, tokenizer, name })),
        Net::Classifier(model) => AnyModel::Classifier(Box::new(Classifier { model, tokenizer, name })),
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

/// Checks every size the model at `path` declares (GGUF metadata,
/// `config.json`) against sane limits and against the tensors the file
/// holds, reading headers only: the checks [`load_model`] runs before it
/// allocates anything, with the same errors (`attn info` runs them).
/// Files of architectures attn does not run, and bare safetensors files,
/// have nothing to check.
pub fn check_model(path: &Path) -> Result<()> {
    if path.is_dir() {
        if let Some(dir) = trained::exported_dir(path) {
            return trained::check_folder(&dir, &trained::read_kind(&dir)?);
        }
        let cfg = path.join("config.json");
        if !cfg.is_file() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg, format!("invalid JSON: {e}")))?;
        if v.get("model_type").and_then(|m| m.as_str()) == Some("bert") {
            let bert: crate::bert::BertConfig =
                serde_json::from_value(v).map_err(|e| Error::format(&cfg, format!("invalid BERT config: {e}")))?;
            crate::bert::check_hf_folder(&bert, &cfg, &crate::inspect::safetensors_files(path)?)?;
        }
        return Ok(());
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let n = file.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n < 4 || &magic != b"GGUF" {
            return Ok(());
        }
    }
    let f = GgufFile::open(path)?;
    match f.header.architecture() {
        Some(arch) if ARCHITECTURES.contains(&arch) => Decoder::checked_spec(&f).map(|_| ()),
        Some("bert") => crate::bert::bert_config_from_gguf(&f).map(|_| ()),
        Some(other) if other.starts_with("attn-") => trained::check_gguf(&f).map(|_| ()),
        _ => Ok(()),
    }
}

/// Loads a GGUF file or an HF-style folder (kernels as `ATTN_KERNELS` says).
pub fn load_model(path: &Path, device: &Device) -> Result<AnyModel> {
    load_model_with(path, device, candle_kernels_requested()?)
}

/// [`load_model`], computing with candle's kernels when asked.
pub fn load_model_with(path: &Path, device: &Device, candle_kernels: bool) -> Result<AnyModel> {
    load_model_parallel(path, device, candle_kernels, Parallel::None)
}

/// [`load_model_with`], this rank's part of a decoder model under
/// `parallel` (tensor or pipeline parallelism over MPI ranks).
pub fn load_model_parallel(path: &Path, device: &Device, candle_kernels: bool, parallel: Parallel) -> Result<AnyModel> {
    let split = !matches!(parallel, Parallel::None);
    let not_split = || {
        Error::Unsupported(format!(
            "{}: only the decoder models ({}) run split over ranks",
            path.display(),
            ARCHITECTURES.join(", ")
        ))
    };
    if path.is_dir() {
        if split {
            return Err(not_split());
        }
        if trained::exported_dir(path).is_some() {
            let (net, tok) = trained::load_folder(path, device)?;
            return Ok(trained_model(net, tok, path));
        }
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
                "{}: model_type `{other}` in an HF folder (supported: bert and models trained by attn; \
                 decoder-only models load from GGUF)",
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
            // Every size checked against the tensors before the tokenizer
            // or the model allocates anything.
            Decoder::checked_spec(&f)?;
            let tokenizer = ModelTokenizer::from_gguf(&f)?;
            let model = CausalModel::Decoder(Decoder::from_gguf_parallel(&f, parallel)?);
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
            let chat_template =
                ChatTemplate::new(template, &bos, &eos)?.with_control_tokens(tokenizer.special_strings());
            let name = f.meta_opt("general.name").and_then(|v| v.as_str()).unwrap_or(arch).to_string();
            Ok(AnyModel::Generator(Box::new(Generator { model, tokenizer, chat_template: Some(chat_template), name })))
        }
        Some(_) if split => Err(not_split()),
        Some("bert") => Ok(AnyModel::Encoder(Box::new(SentenceEncoder::from_gguf(Arc::new(f), device)?))),
        Some(other) if other.starts_with("attn-") => {
            let (net, tok) = trained::load_gguf(Arc::new(f), device)?;
            Ok(trained_model(net, tok, path))
        }
        Some(other) => Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{other}` (supported: {}, bert, and models trained by attn)",
            path.display(),
            ARCHITECTURES.join(", ")
        ))),
        None => Err(Error::format(path, "GGUF has no general.architecture")),
    }
}

/// The tokenizer of a causal model: what a GGUF describes
/// (`tokenizer.ggml.model`), or the `tokenizer.json` of a model trained by attn.
pub enum ModelTokenizer {
    /// SentencePiece (`llama`: Gemma, Llama 2).
    Spm(SpmTokenizer),
    /// Byte-level BPE (`gpt2`: Llama 3, SmolLM2, Qwen2).
    Bpe(Box<BpeTokenizer>),
    /// An HF `tokenizer.json` (models trained by attn).
    Hf(Box<HfTokenizer>),
}

impl ModelTokenizer {
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        match f.meta_opt("tokenizer.ggml.model").and_then(|v| v.as_str()) {
            Some("llama") | None => Ok(ModelTokenizer::Spm(SpmTokenizer::from_gguf(f)?)),
            Some("gpt2") => Ok(ModelTokenizer::Bpe(Box::new(BpeTokenizer::from_gguf(f)?))),
            Some(other) => Err(Error::Unsupported(format!(
                "{}: tokenizer model `{other}` (supported: llama, gpt2)",
                f.path().display()
            ))),
        }
    }

    /// The control-token strings the tokenizer matches in text.
    pub fn special_strings(&self) -> Vec<String> {
        match self {
            ModelTokenizer::Spm(t) => t.special_strings(),
            ModelTokenizer::Bpe(t) => t.special_strings(),
            ModelTokenizer::Hf(_) => Vec::new(),
        }
    }

    fn inner(&self) -> &dyn Tokenizer {
        match self {
            ModelTokenizer::Spm(t) => t,
            ModelTokenizer::Bpe(t) => t.as_ref(),
            ModelTokenizer::Hf(t) => t.as_ref(),
        }
    }
}

impl Tokenizer for ModelTokenizer {
    fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner().encode(text, add_special)
    }

    fn encode_chat(&self, text: &str, plain: &[std::ops::Range<usize>]) -> Result<Vec<u32>> {
        self.inner().encode_chat(text, plain)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner().decode(ids, skip_special)
    }

    fn piece(&self, id: u32) -> Option<String> {
        self.inner().piece(id)
    }

    fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        self.inner().token_bytes(id)
    }

    fn is_special(&self, id: u32) -> bool {
        self.inner().is_special(id)
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
