//! Corpora, splits, tokenizers and batches.

pub mod corpus;
pub mod batch;
pub mod split;
pub mod tokenize;
