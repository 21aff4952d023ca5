//! Where the tests find the committed fixtures and write scratch files, and
//! the thread count for tests that run the real models.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// The workspace root (this crate sits two levels below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `fixtures/NAME` at the workspace root.
pub fn fixture_path(name: &str) -> PathBuf {
    workspace_root().join("fixtures").join(name)
}

/// `fixtures/NAME` parsed as JSON (panics with the path if it cannot be read).
pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture_text(name)).unwrap_or_else(|e| panic!("fixtures/{name}: {e}"))
}

/// candle's default size for its quantized-matmul pool can exceed the CPUs
/// available, and its workers spin: pin it to the real count (unless
/// `CANDLE_NUM_THREADS` is set already).
pub fn set_threads() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
}

/// A new directory `attn-test-TAG-PID-N` under the system temp dir, unique
/// per call (N from the clock).
pub fn tempdir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let d = std::env::temp_dir().join(format!("attn-test-{tag}-{}-{}", std::process::id(), nanos % 1_000_000_007));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The directory `attn-TAG-PID` under the system temp dir, created if
/// missing: one per test process, shared by its tests.
pub fn process_temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("attn-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `fixtures/NAME` as text (panics with the path if it cannot be read).
pub fn fixture_text(name: &str) -> String {
    let p = fixture_path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
