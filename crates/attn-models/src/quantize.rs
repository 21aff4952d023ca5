//! `attn quantize`: a model to a quantized GGUF file.
//!
//! Inputs: a GGUF file (its matrices re-quantized, everything else and all
//! metadata kept), an HF BERT folder (all-MiniLM-L6-v2), or a model folder
//! written by `attn train`. The quantizers and the GGUF writer are candle's
//! (`QTensor::quantize`, `gguf_file::write`).
//!
//! Which tensors are quantized follows llama.cpp's `llama-quantize`: every
//! matrix except position and token-type embeddings and MoE routers;
//! vectors (norms, biases) stay F32. A matrix whose rows do not fill whole
//! blocks of the requested type gets llama.cpp's fallback: Q4_K -> Q5_0,
//! and F16 when even 32-value blocks do not fit.
//!
//! BERT files use llama.cpp's tensor names and `bert.*` keys, and carry
//! the vocabulary the way llama.cpp's converter writes it
//! (`tokenizer.ggml.*`) plus the whole `tokenizer.json` under the GGUF
//! spec's `tokenizer.huggingface.json` key, which is what attn tokenizes
//! with. Models trained by attn keep their parameter names, with
//! `general.architecture` = their `model_type` (`attn-gpt`, ...), the
//! exported `config.json` under `attn.config` and the tokenizer under
//! `tokenizer.huggingface.json`.
//!
//! The output is written to a temporary file beside it, checked by parsing
//! it back, and renamed into place, so a failure never leaves a half file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use attn_nn::{Error, Result, SafetensorsSource};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device};
use rayon::prelude::*;
use serde::Serialize;

use crate::bert::BertConfig;
use crate::gguf::{GgufFile, Value};

/// Metadata key holding the exported `config.json` of a model trained by attn.
pub const ATTN_CONFIG_KEY: &str = "attn.config";
/// The GGUF spec's key for a whole HF `tokenizer.json`.
pub const HF_TOKENIZER_KEY: &str = "tokenizer.huggingface.json";
/// Truncation length of a sentence encoder (sentence-transformers' `max_seq_length`).
pub const MAX_SEQ_LENGTH_KEY: &str = "attn.max_seq_length";
/// The BERT activation (llama.cpp assumes GELU and has no key for it).
pub const HIDDEN_ACT_KEY: &str = "attn.hidden_act";

/// A target type of `attn quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4K,
}

impl QuantType {
    pub const NAMES: &'static str = "q8_0, q4_0, q4_k";

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" => Ok(QuantType::Q8_0),
            "q4_0" => Ok(QuantType::Q4_0),
            "q4_k" => Ok(QuantType::Q4K),
            _ => Err(Error::input("quantize", format!("unknown type `{s}` (supported: {})", Self::NAMES))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4K => "q4_k",
        }
    }

    pub fn dtype(self) -> GgmlDType {
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4K => GgmlDType::Q4K,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_MOSTLY_*`).
    fn file_type(self) -> u32 {
        match self {
            QuantType::Q8_0 => 7,
            QuantType::Q4_0 => 2,
            QuantType::Q4K => 14, // Q4_K_S: Q4_K wherever it fits.
        }
    }

    /// The type a matrix with rows of `cols` values gets: the requested one
    /// when its blocks fit the rows, else llama.cpp's fallback (Q4_K ->
    /// Q5_0), else F16.
    pub fn for_row_length(self, cols: usize) -> GgmlDType {
        let want = self.dtype();
        if cols % want.block_size() == 0 {
            return want;
        }
        if self == QuantType::Q4K && cols % GgmlDType::Q5_0.block_size() == 0 {
            return GgmlDType::Q5_0;
        }
        GgmlDType::F16
    }
}

/// What `quantize` did.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeSummary {
    pub input: PathBuf,
    pub output: PathBuf,
    /// `gguf`, `bert folder` or `attn-trained folder`.
    pub input_kind: String,
    pub architecture: String,
    pub target: String,
    /// Tensors written, by GGML type name.
    pub tensor_types: BTreeMap<String, usize>,
    /// Matrices that got a fallback type (rows not a multiple of the block), with it.
    pub fallbacks: Vec<(String, String)>,
    /// Input tensors not written (BERT pooler and masked-LM heads, as llama.cpp drops them).
    pub dropped: Vec<String>,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

/// Where one output tensor comes from.
enum Src {
    /// A tensor of the input GGUF, by its name there.
    Gguf(String),
    /// A tensor of the input safetensors, by its name there.
    Safetensors(String),
}

struct Item {
    /// Name in the output file.
    name: String,
    src: Src,
    /// Quantize (a matrix) or keep in F32.
    quantize: bool,
}

enum Input {
    Gguf(Arc<GgufFile>),
    Safetensors(SafetensorsSource),
}

struct Plan {
    input: Input,
    kind: String,
    architecture: String,
    metadata: Vec<(String, Value)>,
    items: Vec<Item>,
    dropped: Vec<String>,
    input_bytes: u64,
}

/// Whether llama.cpp's quantizer would quantize a tensor of this (GGUF)
/// name and rank.
fn llama_cpp_quantizes(name: &str, rank: usize) -> bool {
    rank >= 2
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

/// Converts `input` to a GGUF file at `output` with matrices in `ty`.
pub fn quantize(input: &Path, output: &Path, ty: QuantType) -> Result<QuantizeSummary> {
    if !input.exists() {
        return Err(Error::io(input, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder")));
    }
    check_distinct(input, output)?;
    let plan = if input.is_dir() { plan_folder(input)? } else { plan_gguf(input)? };
    let Plan { input: source, kind, architecture, mut metadata, items, dropped, input_bytes } = plan;

    let mut fallbacks = Vec::new();
    let mut targets = Vec::with_capacity(items.len());
    for it in &items {
        let target = if it.quantize {
            let cols = source_shape(&source, &it.src)?.last().copied().unwrap_or(0);
            let t = ty.for_row_length(cols);
            if t != ty.dtype() {
                fallbacks.push((it.name.clone(), format!("{t:?}")));
            }
            t
        } else {
            GgmlDType::F32
        };
        targets.push(target);
    }
    // Tensors are independent: quantize them on all worker threads.
    let tensors: Vec<QTensor> =
        items.par_iter().zip(targets.par_iter()).map(|(it, &t)| convert(&source, it, t)).collect::<Result<_>>()?;

    metadata
        .retain(|(k, _)| k != "general.alignment" && k != "general.file_type" && k != "general.quantization_version");
    metadata.push(("general.file_type".into(), Value::U32(ty.file_type())));
    metadata.push(("general.quantization_version".into(), Value::U32(2)));
    let meta_c: Vec<(String, gguf_file::Value)> = metadata.iter().map(|(k, v)| (k.clone(), to_candle(v))).collect();
    let meta_refs: Vec<(&str, &gguf_file::Value)> = meta_c.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = items.iter().map(|i| i.name.as_str()).zip(tensors.iter()).collect();
    let output_bytes = write_atomic(output, &meta_refs, &tensor_refs)?;

    let mut tensor_types = BTreeMap::new();
    for t in &tensors {
        *tensor_types.entry(format!("{:?}", t.dtype())).or_insert(0) += 1;
    }
    Ok(QuantizeSummary {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        input_kind: kind,
        architecture,
        target: ty.name().to_string(),
        tensor_types,
        fallbacks,
        dropped,
        input_bytes,
        output_bytes,
    })
}

/// Refuses to write over the input.
fn check_distinct(input: &Path, output: &Path) -> Result<()> {
    let same = "OUT is the same path as IN; write the quantized model to another file";
    let inp = std::fs::canonicalize(input).map_err(|e| Error::io(input, e))?;
    if output.is_dir() {
        return Err(Error::input("quantize", format!("{} is a folder; OUT must be a file path", output.display())));
    }
    let out = if output.exists() {
        std::fs::canonicalize(output).map_err(|e| Error::io(output, e))?
    } else {
        let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let parent = std::fs::canonicalize(parent).map_err(|e| Error::io(parent, e))?;
        parent.join(output.file_name().ok_or_else(|| Error::input("quantize", "OUT has no file name"))?)
    };
    if inp == out {
        return Err(Error::input("quantize", same));
    }
    Ok(())
}

fn source_shape(source: &Input, src: &Src) -> Result<Vec<usize>> {
    match (source, src) {
        (Input::Gguf(f), Src::Gguf(n)) => {
            f.tensor_info(n).map(|i| i.shape()).ok_or_else(|| Error::MissingTensor { name: n.clone() })
        }
        (Input::Safetensors(s), Src::Safetensors(n)) => Ok(s.load_raw(n, &Device::Cpu)?.dims().to_vec()),
        _ => Err(Error::input("quantize", "internal: tensor source does not match the input")),
    }
}

/// One output tensor: quantized to `target`, or passed through / made F32.
fn convert(source: &Input, it: &Item, target: GgmlDType) -> Result<QTensor> {
    let dense = match (source, &it.src) {
        (Input::Gguf(f), Src::Gguf(n)) => {
            let q = f.qtensor(n, &Device::Cpu)?;
            if q.dtype() == GgmlDType::F32 && target == GgmlDType::F32 {
                return Ok(q);
            }
            q.dequantize(&Device::Cpu)?
        }
        (Input::Safetensors(s), Src::Safetensors(n)) => s.load_raw(n, &Device::Cpu)?.to_dtype(DType::F32)?,
        _ => return Err(Error::input("quantize", "internal: tensor source does not match the input")),
    };
    QTensor::quantize(&dense, target)
        .map_err(|e| Error::input("quantize", format!("tensor `{}` to {target:?}: {e}", it.name)))
}

fn write_atomic(output: &Path, metadata: &[(&str, &gguf_file::Value)], tensors: &[(&str, &QTensor)]) -> Result<u64> {
    let file_name = output.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = output.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<u64> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, metadata, tensors)?;
        let file = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        // Parse it back with attn's own bounds-checked reader before it
        // takes the output's name.
        let check = GgufFile::open(&tmp)?;
        if check.header.tensors.len() != tensors.len() {
            return Err(Error::format(&tmp, "written file does not list every tensor"));
        }
        let len = std::fs::metadata(&tmp).map_err(|e| Error::io(&tmp, e))?.len();
        std::fs::rename(&tmp, output).map_err(|e| Error::io(output, e))?;
        Ok(len)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn to_candle(v: &Value) -> gguf_file::Value {
    use gguf_file::Value as C;
    match v {
        Value::U8(x) => C::U8(*x),
        Value::I8(x) => C::I8(*x),
        Value::U16(x) => C::U16(*x),
        Value::I16(x) => C::I16(*x),
        Value::U32(x) => C::U32(*x),
        Value::I32(x) => C::I32(*x),
        Value::F32(x) => C::F32(*x),
        Value::Bool(x) => C::Bool(*x),
        Value::String(s) => C::String(s.clone()),
        Value::Array(a) => C::Array(a.iter().map(to_candle).collect()),
        Value::U64(x) => C::U64(*x),
        Value::I64(x) => C::I64(*x),
        Value::F64(x) => C::F64(*x),
    }
}

/// Architectures attn loads back from GGUF.
fn loadable_architecture(arch: &str) -> bool {
    matches!(arch, "gemma3" | "bert") || arch.starts_with("attn-")
}

fn plan_gguf(path: &Path) -> Result<Plan> {
    let f = Arc::new(GgufFile::open(path)?);
    let arch = f.header.architecture().ok_or_else(|| Error::format(path, "GGUF has no general.architecture"))?;
    if !loadable_architecture(arch) {
        return Err(Error::Unsupported(format!(
            "{}: GGUF architecture `{arch}` (attn quantizes gemma3, bert and models trained by attn)",
            path.display()
        )));
    }
    let architecture = arch.to_string();
    let metadata = f.header.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let items = f
        .header
        .tensors
        .iter()
        .map(|t| Item {
            name: t.name.clone(),
            src: Src::Gguf(t.name.clone()),
            quantize: quantizes(&architecture, &t.name, t.dims.len()),
        })
        .collect();
    let input_bytes = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
    Ok(Plan {
        input: Input::Gguf(f),
        kind: "gguf".into(),
        architecture,
        metadata,
        items,
        dropped: Vec::new(),
        input_bytes,
    })
}

/// The quantize-or-keep rule for a tensor of the output file.
fn quantizes(arch: &str, name: &str, rank: usize) -> bool {
    if arch.starts_with("attn-") {
        // MoE routers are small and decide which experts run: kept in F32.
        rank >= 2 && !name.ends_with("moe.gate.weight")
    } else {
        llama_cpp_quantizes(name, rank)
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn plan_folder(dir: &Path) -> Result<Plan> {
    // A run directory of `attn train` holds the exported model in `model/`.
    let dir = if !dir.join("config.json").exists() && dir.join("model").join("config.json").exists() {
        dir.join("model")
    } else {
        dir.to_path_buf()
    };
    let cfg_path = dir.join("config.json");
    if !cfg_path.exists() {
        return Err(Error::format(
            &dir,
            "no config.json: IN must be a GGUF file, an HF model folder or a model folder written by `attn train`",
        ));
    }
    let cfg_text = read_text(&cfg_path)?;
    let cfg: serde_json::Value =
        serde_json::from_str(&cfg_text).map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?;
    let model_type = cfg.get("model_type").and_then(|m| m.as_str()).unwrap_or("unknown").to_string();
    if model_type != "bert" && !model_type.starts_with("attn-") {
        return Err(Error::Unsupported(format!(
            "{}: model_type `{model_type}` (attn quantizes bert folders, models trained by attn, and GGUF files)",
            dir.display()
        )));
    }
    let files = crate::inspect::safetensors_files(&dir)?;
    let source = SafetensorsSource::open(&files)?;
    let mut input_bytes = 0;
    for f in &files {
        input_bytes += std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
    }
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.exists() {
        return Err(Error::format(&tok_path, "missing: the model folder needs its tokenizer.json"));
    }
    let tokenizer = read_text(&tok_path)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .filter(|n| n != "model")
        .or_else(|| dir.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| model_type.clone());
    let mut names: Vec<String> = source.names().cloned().collect();
    names.sort();
    if model_type == "bert" {
        let bert: BertConfig = serde_json::from_str(&cfg_text)
            .map_err(|e| Error::format(&cfg_path, format!("invalid BERT config: {e}")))?;
        bert.validate()?;
        let max_seq = match std::fs::read_to_string(dir.join("sentence_bert_config.json")) {
            Ok(t) => serde_json::from_str::<serde_json::Value>(&t)
                .ok()
                .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
                .map(|m| (m as usize).min(bert.max_position_embeddings)),
            Err(_) => None,
        };
        let mut metadata = bert_metadata(&bert, &name, max_seq);
        metadata.extend(bert_vocab_metadata(&tokenizer, &tok_path)?);
        metadata.push((HF_TOKENIZER_KEY.into(), Value::String(tokenizer)));
        let mut items = Vec::new();
        let mut dropped = Vec::new();
        for n in names {
            match bert_gguf_name(&n) {
                BertName::Tensor(g) => {
                    let rank = source.load_raw(&n, &Device::Cpu)?.rank();
                    items.push(Item { quantize: llama_cpp_quantizes(&g, rank), name: g, src: Src::Safetensors(n) });
                }
                BertName::Dropped => dropped.push(n),
                BertName::Unknown => {
                    return Err(Error::Unsupported(format!(
                        "{}: tensor `{n}` is not part of a BERT encoder attn can convert",
                        dir.display()
                    )))
                }
            }
        }
        return Ok(Plan {
            input: Input::Safetensors(source),
            kind: "bert folder".into(),
            architecture: "bert".into(),
            metadata,
            items,
            dropped,
            input_bytes,
        });
    }
    let metadata = vec![
        ("general.architecture".to_string(), Value::String(model_type.clone())),
        ("general.name".to_string(), Value::String(name)),
        (ATTN_CONFIG_KEY.to_string(), Value::String(cfg_text)),
        (HF_TOKENIZER_KEY.to_string(), Value::String(tokenizer)),
    ];
    let mut items = Vec::new();
    for n in names {
        // GGML limits tensor names to 63 bytes.
        if n.len() > 63 {
            return Err(Error::Unsupported(format!("tensor name `{n}` is longer than GGUF's 63 bytes")));
        }
        let rank = source.load_raw(&n, &Device::Cpu)?.rank();
        items.push(Item { quantize: quantizes(&model_type, &n, rank), name: n.clone(), src: Src::Safetensors(n) });
    }
    Ok(Plan {
        input: Input::Safetensors(source),
        kind: "attn-trained folder".into(),
        architecture: model_type,
        metadata,
        items,
        dropped: Vec::new(),
        input_bytes,
    })
}

enum BertName {
    Tensor(String),
    /// Not used for sentence embeddings (llama.cpp drops them too).
    Dropped,
    Unknown,
}

/// HF BERT name (relative to the layer or the model) -> llama.cpp's.
const BERT_LAYER_NAMES: &[(&str, &str)] = &[
    ("attention.self.query", "attn_q"),
    ("attention.self.key", "attn_k"),
    ("attention.self.value", "attn_v"),
    ("attention.output.dense", "attn_output"),
    ("attention.output.LayerNorm", "attn_output_norm"),
    ("intermediate.dense", "ffn_up"),
    ("output.dense", "ffn_down"),
    ("output.LayerNorm", "layer_output_norm"),
];
const BERT_GLOBAL_NAMES: &[(&str, &str)] = &[
    ("embeddings.word_embeddings", "token_embd"),
    ("embeddings.token_type_embeddings", "token_types"),
    ("embeddings.position_embeddings", "position_embd"),
    ("embeddings.LayerNorm", "token_embd_norm"),
];

fn bert_gguf_name(hf: &str) -> BertName {
    let n = hf.strip_prefix("bert.").unwrap_or(hf);
    if n == "embeddings.position_ids" || n.starts_with("pooler.") || n.starts_with("cls.") {
        return BertName::Dropped;
    }
    let (stem, suffix) = match n.rsplit_once('.') {
        Some((s, "weight" | "gamma")) => (s, "weight"),
        Some((s, "bias" | "beta")) => (s, "bias"),
        _ => return BertName::Unknown,
    };
    if let Some((_, g)) = BERT_GLOBAL_NAMES.iter().find(|(h, _)| *h == stem) {
        return BertName::Tensor(format!("{g}.{suffix}"));
    }
    if let Some(rest) = stem.strip_prefix("encoder.layer.") {
        if let Some((i, sub)) = rest.split_once('.') {
            if let (Ok(i), Some((_, g))) = (i.parse::<usize>(), BERT_LAYER_NAMES.iter().find(|(h, _)| *h == sub)) {
                return BertName::Tensor(format!("blk.{i}.{g}.{suffix}"));
            }
        }
    }
    BertName::Unknown
}

/// llama.cpp's name of the HF BERT parameter `hf`, if it has one.
pub fn bert_gguf_tensor_name(hf: &str) -> Option<String> {
    match bert_gguf_name(hf) {
        BertName::Tensor(n) => Some(n),
        _ => None,
    }
}

/// The model's parameter names (as [`crate::bert::Bert::load`] asks for
/// them) -> llama.cpp's tensor names, for loading a BERT GGUF.
pub fn bert_rename_map(n_layers: usize) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for suffix in ["weight", "bias"] {
        for (h, g) in BERT_GLOBAL_NAMES {
            m.insert(format!("{h}.{suffix}"), format!("{g}.{suffix}"));
        }
        for i in 0..n_layers {
            for (h, g) in BERT_LAYER_NAMES {
                m.insert(format!("encoder.layer.{i}.{h}.{suffix}"), format!("blk.{i}.{g}.{suffix}"));
            }
        }
    }
    m
}

fn bert_metadata(c: &BertConfig, name: &str, max_seq: Option<usize>) -> Vec<(String, Value)> {
    let u = |v: usize| Value::U32(v as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::String("bert".into())),
        ("general.name".to_string(), Value::String(name.to_string())),
        ("bert.context_length".to_string(), u(c.max_position_embeddings)),
        ("bert.embedding_length".to_string(), u(c.hidden_size)),
        ("bert.feed_forward_length".to_string(), u(c.intermediate_size)),
        ("bert.block_count".to_string(), u(c.num_hidden_layers)),
        ("bert.attention.head_count".to_string(), u(c.num_attention_heads)),
        ("bert.attention.layer_norm_epsilon".to_string(), Value::F32(c.layer_norm_eps as f32)),
        ("bert.attention.causal".to_string(), Value::Bool(false)),
        // llama.cpp's LLAMA_POOLING_TYPE_MEAN: sentence-transformers' pooling.
        ("bert.pooling_type".to_string(), Value::U32(1)),
        ("tokenizer.ggml.token_type_count".to_string(), u(c.type_vocab_size)),
        (HIDDEN_ACT_KEY.to_string(), Value::String(c.hidden_act.clone())),
    ];
    if let Some(s) = max_seq {
        m.push((MAX_SEQ_LENGTH_KEY.to_string(), u(s)));
    }
    m
}

/// The vocabulary as llama.cpp's converter writes it for BERT: WordPiece
/// tokens in "phantom space" form (`##x` -> `x`, other words get a leading
/// `▁`, special tokens unchanged), their types and the special ids.
fn bert_vocab_metadata(tokenizer_json: &str, path: &Path) -> Result<Vec<(String, Value)>> {
    let v: serde_json::Value =
        serde_json::from_str(tokenizer_json).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))?;
    let model = &v["model"];
    if model["type"].as_str() != Some("WordPiece") {
        // Only the HF tokenizer is stored; attn needs nothing else.
        return Ok(Vec::new());
    }
    let vocab = model["vocab"].as_object().ok_or_else(|| Error::format(path, "WordPiece model without a vocab map"))?;
    let mut tokens = vec![None; vocab.len()];
    for (tok, id) in vocab {
        let id = id.as_u64().map(|i| i as usize).filter(|&i| i < tokens.len());
        let id = id.ok_or_else(|| Error::format(path, format!("token `{tok}` has an id outside the vocabulary")))?;
        tokens[id] = Some(tok.clone());
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.ok_or_else(|| Error::format(path, format!("vocabulary has no token with id {i}"))))
        .collect::<Result<_>>()?;
    let special: std::collections::HashSet<&str> = v["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter().filter(|t| t["special"].as_bool() == Some(true)).filter_map(|t| t["content"].as_str()).collect()
        })
        .unwrap_or_default();
    // llama.cpp's token types: 1 normal, 3 control.
    let types: Vec<Value> =
        tokens.iter().map(|t| Value::I32(if special.contains(t.as_str()) { 3 } else { 1 })).collect();
    let phantom: Vec<Value> = tokens
        .iter()
        .map(|t| {
            Value::String(if special.contains(t.as_str()) {
                t.clone()
            } else if let Some(rest) = t.strip_prefix("##") {
                rest.to_string()
            } else {
                format!("\u{2581}{t}")
            })
        })
        .collect();
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("bert".into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(phantom)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
    ];
    for (key, tok) in [
        ("tokenizer.ggml.cls_token_id", "[CLS]"),
        ("tokenizer.ggml.seperator_token_id", "[SEP]"),
        ("tokenizer.ggml.padding_token_id", "[PAD]"),
        ("tokenizer.ggml.unknown_token_id", "[UNK]"),
        ("tokenizer.ggml.mask_token_id", "[MASK]"),
    ] {
        if let Some(id) = vocab.get(tok).and_then(|i| i.as_u64()) {
            m.push((key.to_string(), Value::U32(id as u32)));
        }
    }
    Ok(m)
}

/// The exported `config.json` and the tokenizer of a model trained by attn,
/// from a GGUF written by [`quantize`].
pub fn attn_model_parts(f: &GgufFile) -> Result<(serde_json::Value, String)> {
    let cfg = f.meta_str(ATTN_CONFIG_KEY)?;
    let cfg: serde_json::Value =
        serde_json::from_str(cfg).map_err(|e| Error::format(f.path(), format!("`{ATTN_CONFIG_KEY}`: {e}")))?;
    let tok = f.meta_str(HF_TOKENIZER_KEY)?.to_string();
    Ok((cfg, tok))
}
