//! attn-train: everything between a corpus on disk and a trained model.
//!
//! - [`data`]: corpora, deterministic splits, tokenizer training, batching
//!   by token budget with length bucketing, background prefetch.
//! - [`optim`]: AdamW with saveable state, learning-rate schedules,
//!   gradient clipping.
//! - [`checkpoint`]: atomic checkpoints (weights, optimiser, schedule, RNG,
//!   data cursor) and exact resume.
//! - [`metrics`], [`plot`]: JSON-lines metrics and PNG curves.
//! - [`bleu`]: corpus BLEU as sacreBLEU computes it.
//! - [`task`], [`trainer`]: the three kinds of training (language model,
//!   translation, classification) and the loop that drives them.

pub mod bleu;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod task;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{train, TrainOptions, TrainSummary};
