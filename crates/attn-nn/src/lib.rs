//! attn-nn: the Transformer building blocks every attn model is made of.
//!
//! Each block is a plain struct holding its weights with a `forward` method.
//! Blocks work on `[batch, seq, d_model]` activations; attention heads are
//! `[batch, heads, seq, head_dim]`. Everything here is differentiable when
//! built from trainable weights (see [`weights::ParamStore`]) and uses fused
//! kernels only when no gradient is being tracked.

pub mod attention;
pub mod dropout;
pub mod embedding;
pub mod error;
pub mod ffn;
pub mod grad_ops;
pub mod head;
pub mod infer;
pub mod kernels;
pub mod kv;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod paged;
pub mod rng;
pub mod rope;
pub mod weights;

pub use attention::{
    causal_mask, combine_masks, lengths_to_valid, padding_mask, scaled_dot_product_attention, AttentionConfig,
    ContiguousKvCache, CrossKv, KvCache, MultiHeadAttention, SdpaOptions,
};
pub use dropout::Dropout;
pub use embedding::{positions, LearnedPositionalEmbedding, SinusoidalPositionalEncoding, TokenEmbedding};
pub use error::{Error, Result};
pub use ffn::{Activation, FeedForward, FfnKind, FfnNames};
pub use head::{cross_entropy, OutputHead};
pub use kernels::flash::{flash_applies, flash_attention, flash_attention_f32, FlashMask, FlashShape};
pub use kv::{KvDtype, RawKv};
pub use linear::Linear;
pub use moe::{load_balancing_loss, MoeFeedForward, MoeOutput};
pub use norm::{LayerNorm, Norm, Residual, RmsNorm};
pub use paged::{AttendSpec, KvPool, KvShape, PagedCache, FREED_BLOCK};
pub use rope::{RopeLayout, RotaryEmbedding};
pub use weights::{Init, ParamStore, SafetensorsSource, WeightSource, Weights};
