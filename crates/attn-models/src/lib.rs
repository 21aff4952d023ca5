//! attn-models: model architectures built from the `attn-nn` blocks, and the
//! readers of the weight formats they load from.

pub mod gguf;
pub mod inspect;
pub mod lm;
pub mod transformer;

pub use transformer::{DecoderState, EncoderOutput, Transformer, TransformerConfig};
pub use lm::{LanguageModel, Logits, SeqStep, SequenceCache, Tokenizer};
