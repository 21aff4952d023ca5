//! Metrics as JSON lines (`RUN/metrics.jsonl`): one object per training log
//! step (`"kind": "train"`) and per evaluation (`"kind": "eval"`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use attn_nn::{Error, Result};

pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log for appending. `keep_through` (resume) first drops
    /// every line written after that step, so a resumed run's log reads as
    /// if it had never been interrupted.
    pub fn open(path: &Path, keep_through: Option<usize>) -> Result<Self> {
        match keep_through {
            Some(step) if path.exists() => {
                let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                let tmp = path.with_extension("jsonl.tmp");
                fs::write(&tmp, kept).map_err(|e| Error::io(&tmp, e))?;
                fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
            }
            None => {
                if path.exists() {
                    fs::remove_file(path).map_err(|e| Error::io(path, e))?;
                }
            }
            _ => {}
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        let mut line = value.to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Training losses by step from a metrics file (for comparisons and tests).
pub fn train_losses(path: &Path) -> Result<Vec<(usize, f64)>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value =
            serde_json::from_str(l).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))?;
        if v.get("kind").and_then(|k| k.as_str()) == Some("train") {
            if let (Some(s), Some(loss)) =
                (v.get("step").and_then(|s| s.as_u64()), v.get("loss").and_then(|x| x.as_f64()))
            {
                out.push((s as usize, loss));
            }
        }
    }
    Ok(out)
}
