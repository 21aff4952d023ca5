//! attn-models: model architectures built from the `attn-nn` blocks, and the
//! readers of the weight formats they load from.

pub mod bert;
pub mod bpe;
pub mod chat;
pub mod decoder;
pub mod gemma3;
pub mod gguf;
pub mod gpt;
pub mod hf_tokenizer;
pub mod inspect;
pub mod llama;
pub mod lm;
pub mod load;
pub mod quantize;
pub mod qwen2;
pub mod registry;
pub mod sizes;
pub mod spm;
pub mod trained;
pub mod transformer;

pub use decoder::{Decoder, DecoderSpec};
pub use lm::{KvStore, LanguageModel, LayerCaches, Logits, PagedLanguageModel, SeqStep, SequenceCache, Tokenizer};
pub use transformer::{ConditionedDecoder, DecoderState, EncoderOutput, Transformer, TransformerConfig};
