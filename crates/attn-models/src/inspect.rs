//! What a model file holds: architecture, parameter count, tensor types and
//! the memory they need. Reads headers only; tensor data is not touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use attn_nn::{Error, Result};
use serde::Serialize;

use crate::gguf::GgufHeader;

#[derive(Debug, Clone, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// Totals for one tensor type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DtypeTotals {
    pub tensors: usize,
    pub parameters: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub path: PathBuf,
    /// `safetensors` or `gguf`.
    pub format: String,
    pub architecture: Option<String>,
    /// Where the architecture came from (config.json, GGUF metadata, tensor names).
    pub architecture_source: Option<String>,
    pub parameters: u64,
    /// Bytes of tensor data: the memory the weights need once loaded as stored.
    pub bytes: u64,
    pub dtypes: BTreeMap<String, DtypeTotals>,
    /// Selected metadata (GGUF key-values, safetensors `__metadata__`), arrays summarised.
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorSummary>,
}

/// Summarises a safetensors file, an HF-style folder (config.json +
/// *.safetensors) or a GGUF file.
pub fn inspect(path: &Path) -> Result<ModelSummary> {
    if path.is_dir() {
        return inspect_folder(path);
    }
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
        if n < 4 {
            return Err(Error::format(path, "file too short to be a model file"));
        }
    }
    if &magic == b"GGUF" {
        inspect_gguf(path)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        Err(Error::format(path, "has a .gguf extension but does not start with the GGUF magic"))
    } else {
        let mut s = inspect_safetensors(&[path.to_path_buf()])?;
        s.path = path.to_path_buf();
        if s.architecture.is_none() {
            if let Some(dir) = path.parent() {
                if let Some(arch) = config_architecture(dir)? {
                    s.architecture = Some(arch);
                    s.architecture_source = Some("config.json".into());
                }
            }
        }
        guess_architecture(&mut s);
        Ok(s)
    }
}

fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a file attn does not modify.
    unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))
}

fn add(s: &mut ModelSummary, t: TensorSummary) {
    let params: u64 = t.shape.iter().map(|&d| d as u64).product();
    let e = s.dtypes.entry(t.dtype.clone()).or_default();
    e.tensors += 1;
    e.parameters += params;
    e.bytes += t.bytes;
    s.parameters += params;
    s.bytes += t.bytes;
    s.tensors.push(t);
}

fn empty(path: &Path, format: &str) -> ModelSummary {
    ModelSummary {
        path: path.to_path_buf(),
        format: format.into(),
        architecture: None,
        architecture_source: None,
        parameters: 0,
        bytes: 0,
        dtypes: BTreeMap::new(),
        metadata: BTreeMap::new(),
        tensors: Vec::new(),
    }
}

fn inspect_safetensors(files: &[PathBuf]) -> Result<ModelSummary> {
    let mut s = empty(files.first().map(|p| p.as_path()).unwrap_or(Path::new("")), "safetensors");
    for path in files {
        let mmap = map(path)?;
        let st = safetensors::SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
        if let Some(m) = meta.metadata() {
            for (k, v) in m {
                s.metadata.insert(k.clone(), v.clone());
            }
        }
        let mut tensors = st.tensors();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, view) in tensors {
            add(
                &mut s,
                TensorSummary {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                    shape: view.shape().to_vec(),
                    bytes: view.data().len() as u64,
                },
            );
        }
    }
    if let Some(arch) = s.metadata.get("architecture").cloned() {
        s.architecture = Some(arch);
        s.architecture_source = Some("safetensors metadata".into());
    }
    Ok(s)
}

/// `architectures[0]` or `model_type` from a folder's config.json.
fn config_architecture(dir: &Path) -> Result<Option<String>> {
    let cfg = dir.join("config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(&cfg, format!("invalid JSON: {e}")))?;
    let arch = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .or_else(|| v.get("model_type").and_then(|m| m.as_str()));
    Ok(arch.map(str::to_string))
}

/// The `*.safetensors` files of an HF-style folder, sorted; none is an error.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::format(dir, "folder holds no *.safetensors file"));
    }
    Ok(files)
}

fn inspect_folder(dir: &Path) -> Result<ModelSummary> {
    let files = safetensors_files(dir)?;
    let mut s = inspect_safetensors(&files)?;
    s.path = dir.to_path_buf();
    if let Some(arch) = config_architecture(dir)? {
        s.architecture = Some(arch);
        s.architecture_source = Some("config.json".into());
    }
    guess_architecture(&mut s);
    Ok(s)
}

/// Recognises well-known parameter naming schemes when nothing says what
/// the model is.
fn guess_architecture(s: &mut ModelSummary) {
    if s.architecture.is_some() {
        return;
    }
    let has = |p: &str| s.tensors.iter().any(|t| t.name.contains(p));
    let guess = if has("transformer.encoder.layers.") && has("transformer.decoder.layers.") {
        Some("transformer-2017 (encoder-decoder, torch.nn.Transformer names)")
    } else if has("encoder.layer.") && has("attention.self.query") {
        Some("bert (encoder-only)")
    } else if has("layers.") && has("self_attn.q_proj") {
        Some("decoder-only (Llama-style names)")
    } else {
        None
    };
    if let Some(g) = guess {
        s.architecture = Some(g.to_string());
        s.architecture_source = Some("tensor names".into());
    }
}

fn inspect_gguf(path: &Path) -> Result<ModelSummary> {
    let mmap = map(path)?;
    let h = GgufHeader::parse(&mmap).map_err(|e| Error::format(path, e))?;
    let mut s = empty(path, "gguf");
    s.architecture = h.architecture().map(str::to_string);
    s.architecture_source = s.architecture.as_ref().map(|_| "GGUF metadata".to_string());
    s.metadata.insert("gguf.version".into(), h.version.to_string());
    for (k, v) in &h.metadata {
        s.metadata.insert(k.clone(), v.summary());
    }
    for t in &h.tensors {
        add(&mut s, TensorSummary { name: t.name.clone(), dtype: t.ty.name(), shape: t.shape(), bytes: t.size });
    }
    Ok(s)
}
