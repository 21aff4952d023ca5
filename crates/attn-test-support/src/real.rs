//! The real pretrained models of the registry, for the tests that run
//! them: pulled into attn's model cache on first use (`.ci/run` pulls them
//! beforehand, so CI downloads each once and reuses the cache).

use std::path::PathBuf;

use attn_models::gguf::GgufFile;
use attn_models::registry::resolve_model;

use crate::files::set_threads;

/// The cached file or folder of registry model `name` (pulled if missing),
/// with candle's thread pool pinned to the CPUs ([`set_threads`]).
pub fn real_model(name: &str) -> PathBuf {
    set_threads();
    resolve_model(name, false).unwrap_or_else(|e| panic!("pull {name}: {e}"))
}

/// [`real_model`] opened as GGUF.
pub fn real_gguf(name: &str) -> GgufFile {
    let path = real_model(name);
    GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
