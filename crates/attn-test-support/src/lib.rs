//! What attn's tests share, written once: paths to the committed fixtures
//! and scratch directories ([`files`]), reading reference JSON ([`json`]),
//! comparing numbers ([`diff`]), plain nested-loop reference maths for the
//! nn blocks ([`reference`]), doubles that fail or block on purpose
//! ([`doubles`]), a toy language model and a byte-level
//! tokenizer ([`toy`]), a tiny random GPT ([`gpt`]), a tiny Gemma 3 GGUF
//! ([`tiny_gguf`]) and the real models of
//! the registry, pulled once into the model cache ([`real`]).
//!
//! A dev-dependency only. It depends on `attn-nn` and `attn-models` (never
//! on `attn-engine` or above): the integration tests of those two crates
//! and every crate's unit tests above them can use it; the unit tests of
//! `attn-nn` and `attn-models` themselves would see a second copy of their
//! crate's types, so helpers they need stay generic (candle tensors, slices).

pub mod diff;
pub mod doubles;
pub mod files;
pub mod gpt;
pub mod json;
pub mod ranks;
pub mod real;
pub mod reference;
pub mod tiny_gguf;
pub mod toy;

pub use diff::{assert_close, assert_tensor_close, cosine, max_abs_diff, rel_rms, tensor_max_abs_diff, to_vec};
pub use files::{fixture_json, fixture_path, fixture_text, process_temp_dir, set_threads, tempdir, workspace_root};
pub use gpt::tiny_gpt;
pub use json::{floats, ids};
pub use ranks::{greedy_tokens, on_ranks};
pub use real::{real_gguf, real_model};
