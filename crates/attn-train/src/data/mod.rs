//! Corpora, splits, tokenizers and batches.

pub mod batch;
pub mod corpus;
pub mod split;
pub mod tokenize;
