//! Qwen2 / Qwen2.5 decoders, from a GGUF file: their [`DecoderSpec`].
//!
//! Llama's block with biases on the q, k and v projections, RoPE in HF's
//! split-halves layout (llama.cpp's "neox" type: the converter keeps the
//! rows as HF stores them), and a separate output head in the larger models
//! (tied in the file when `output.weight` is absent).

use attn_nn::{Result, RopeLayout};

use crate::decoder::DecoderSpec;
use crate::gguf::GgufFile;

/// Reads the `qwen2.*` metadata of a GGUF file.
pub fn spec(f: &GgufFile) -> Result<DecoderSpec> {
    crate::llama::llama_like(f, "qwen2", RopeLayout::Halves, true)
}
