//! Every hot loop of inference, in one folder. The blocks (`Linear`, the
//! norms, RoPE, the FFN, attention; see [`crate::infer`]) pick among these
//! from the weights' type and the CPU; model files never name a kernel.
//!
//! - [`fast`]: float32 kernels: the `gemm` matmul (`x W^T`), RMSNorm, RoPE
//!   (halves and interleaved), the gated activations (GeGLU-tanh, SwiGLU),
//!   the one `dot`/`axpy`/`exp`, and the attention kernel that reads any KV
//!   layout through [`fast::KvRows`] (contiguous buffers, paged block tables).
//! - [`q8`]: block-quantized matmul at the file's own width (Q8_0, Q5_0,
//!   Q4_0, Q4_1, Q4_K, Q6_K) on AVX-512 VNNI, AVX2 or portable code, bit
//!   identical across the three.
//! - [`logits`]: the loops over a whole vocabulary row of every decoding
//!   step (checks, max, softmax sums, argmax, top-n), on the same `exp`.
//! - [`flash`]: tiled ("flash") attention on candle tensors, for the
//!   tensor-level blocks (training-side models, the 2017 Transformer).
//!
//! The paged KV pool itself ([`crate::paged`]) is a data structure; its rows
//! are read by the attention kernel here.

pub mod amx;
pub mod fast;
pub mod flash;
pub mod logits;
pub mod q8;
