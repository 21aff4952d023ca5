//! Shared helpers: the CI-sized configs under configs/ci, rewritten into a
//! temporary directory with absolute data paths and overrides.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use attn_test_support::workspace_root;

/// `configs/ci/NAME.toml` with `key = value` lines replaced (first match
/// after the given table header, or anywhere when the key is unique), the
/// corpus path made absolute, written into `dir`.
pub fn ci_config(name: &str, dir: &Path, overrides: &[(&str, &str)]) -> PathBuf {
    let src = workspace_root().join("configs/ci").join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&src).unwrap();
    let mut out = String::new();
    let mut applied = vec![false; overrides.len()];
    for line in text.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        let mut l = line.to_string();
        if key == "path" {
            let rel = line.split('"').nth(1).unwrap();
            let abs = std::fs::canonicalize(workspace_root().join("configs/ci").join(rel)).unwrap();
            l = format!("path = \"{}\"", abs.display());
        }
        for (i, (k, v)) in overrides.iter().enumerate() {
            if key == *k {
                l = format!("{k} = {v}");
                applied[i] = true;
            }
        }
        out.push_str(&l);
        out.push('\n');
    }
    // Keys the file does not set go into [train].
    let extra: String =
        overrides.iter().zip(&applied).filter(|(_, a)| !**a).map(|((k, v), _)| format!("{k} = {v}\n")).collect();
    let out = out.replacen("[train]\n", &format!("[train]\n{extra}"), 1);
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, out).unwrap();
    p
}
