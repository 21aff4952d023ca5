//! Sizes read from a file's metadata or config, checked before anything is
//! allocated from them.
//!
//! A loader sizes layer lists, tables and buffers from numbers a file
//! claims (layer count, hidden size, heads, context length, ...). A hostile
//! or broken file claiming a billion layers must be an error that names the
//! key and its value, not an allocation that aborts the process. Two checks
//! run before a model is built, and `attn info` runs the same ones:
//!
//! - every size is within [`Limits`] no released model comes near;
//! - every size is consistent with the tensors the file holds: the layer
//!   count equals the number of layer groups present (`blk.0` .. `blk.N-1`,
//!   no gaps), and the sizes that shape a tensor match its stored shape.
//!
//! The tensors' shapes come from headers only ([`TensorShapes`]): no tensor
//! data is read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use attn_nn::{Error, Result};

use crate::gguf::GgufHeader;

/// Layers of any one stack.
pub const MAX_LAYERS: usize = 4096;
/// Attention heads (query or key/value).
pub const MAX_HEADS: usize = 1 << 10;
/// Size of one attention head.
pub const MAX_HEAD_DIM: usize = 1 << 12;
/// Model width (`hidden_size`, `d_model`, `embedding_length`).
pub const MAX_HIDDEN: usize = 1 << 16;
/// Width of the feed-forward layer.
pub const MAX_FFN: usize = 1 << 18;
/// Vocabulary size (token types and labels included).
pub const MAX_VOCAB: usize = 1 << 22;
/// Context length / position count.
pub const MAX_CONTEXT: usize = 1 << 24;
/// Experts of a mixture-of-experts layer.
pub const MAX_EXPERTS: usize = 1 << 10;
/// Elements of a table computed from sizes alone (sinusoidal positions,
/// RoPE tables: `max_len x width`): 1 GiB of f32.
pub const MAX_TABLE: usize = 1 << 28;

/// `value` if it is in `1..=max`, else a message naming `key` and `value`.
pub fn bounded(key: &str, value: u64, max: usize) -> std::result::Result<usize, String> {
    if value == 0 || value > max as u64 {
        return Err(format!("`{key}` = {value} is outside 1..={max}"));
    }
    Ok(value as usize)
}

/// [`bounded`] as a config error (for configs validated on their own).
pub fn bounded_field(field: &str, value: usize, max: usize) -> Result<usize> {
    if value == 0 || value > max {
        return Err(Error::config(field, format!("= {value} is outside 1..={max}")));
    }
    Ok(value)
}

/// The names and row-major shapes of a file's tensors, from its header.
#[derive(Debug, Clone, Default)]
pub struct TensorShapes {
    shapes: BTreeMap<String, Vec<usize>>,
}

impl TensorShapes {
    pub fn from_gguf(h: &GgufHeader) -> Self {
        TensorShapes { shapes: h.tensors.iter().map(|t| (t.name.clone(), t.shape())).collect() }
    }

    /// The tensors of safetensors files (their JSON headers only).
    pub fn from_safetensors(files: &[PathBuf]) -> Result<Self> {
        let mut shapes = BTreeMap::new();
        for path in files {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: read-only map of a file attn does not modify.
            let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
            for (name, info) in meta.tensors() {
                shapes.insert(name, info.shape.clone());
            }
        }
        Ok(TensorShapes { shapes })
    }

    /// The shape of `name`, if the file holds it.
    pub fn get(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    /// The distinct `N` of tensors named `{prefix}N.…`.
    pub fn groups(&self, prefix: &str) -> BTreeSet<usize> {
        self.shapes.keys().filter_map(|n| n.strip_prefix(prefix)?.split_once('.')?.0.parse::<usize>().ok()).collect()
    }

    /// Checks that `key` = `n` layers matches the groups `{prefix}0.` ..
    /// `{prefix}{n-1}.` the file holds, with none missing and none beyond.
    pub fn check_layers(&self, key: &str, n: usize, prefix: &str) -> std::result::Result<(), String> {
        let groups = self.groups(prefix);
        let held = groups.len();
        if held == n && groups.iter().next_back().is_none_or(|&last| last + 1 == n) {
            return Ok(());
        }
        let range = match (groups.first(), groups.last()) {
            (Some(a), Some(b)) => format!(" ({prefix}{a} to {prefix}{b})"),
            _ => String::new(),
        };
        let gap = if held > 0 && groups.last().is_some_and(|&l| l + 1 != held) {
            ", not numbered from 0 without gaps"
        } else {
            ""
        };
        Err(format!("`{key}` = {n}, but the file holds {held} layer groups `{prefix}N`{range}{gap}"))
    }

    /// Checks that dimension `axis` of tensor `name` is `value` (= `key`);
    /// a tensor the file lacks is left for the loader to report.
    pub fn check_dim(&self, key: &str, value: usize, name: &str, axis: usize) -> std::result::Result<(), String> {
        self.check_dim_as(&format!("`{key}` = {value}"), value, name, axis)
    }

    /// [`TensorShapes::check_dim`] for a size derived from keys, `what`
    /// saying how (`` `x.head_count` = 4 (x head size 32) ``).
    pub fn check_dim_as(&self, what: &str, value: usize, name: &str, axis: usize) -> std::result::Result<(), String> {
        match self.get(name) {
            Some(shape) if shape.get(axis) != Some(&value) => {
                Err(format!("{what} does not match tensor `{name}` of shape {shape:?}"))
            }
            _ => Ok(()),
        }
    }

    /// Checks that tensor `name` has exactly `expected` (when present).
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> std::result::Result<(), String> {
        match self.get(name) {
            Some(shape) if shape != expected => {
                Err(format!("tensor `{name}` has shape {shape:?}, expected {expected:?}"))
            }
            _ => Ok(()),
        }
    }
}

/// A message about the file at `path` as an error.
pub fn in_file(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::format(path, msg)
}
