//! Checkpoints: everything a run needs to continue exactly where it was.
//!
//! `RUN/checkpoints/step-00001234/` holds `model.safetensors` (float32
//! master weights), `optimizer.safetensors` (AdamW moments) and
//! `checkpoint.json` (step, schedule position, data cursor, RNG, loss scale,
//! early-stopping state, the model config, parameter shapes and the sha256
//! of both tensor files), and `checkpoint.json.sha256`, the sha256 of the
//! manifest's own bytes. It is written under a temporary name and renamed
//! into place, so a crash at any moment leaves either the complete
//! checkpoint or none; loading verifies every checksum before it changes
//! anything. Resuming walks the checkpoints from newest to oldest and takes
//! the newest one that verifies ([`load_newest`]).
//!
//! Manifests of format 1 (before the manifest checksum) still load, their
//! tensor files verified as before and their own fields unverified, with a
//! warning.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use attn_nn::{Error, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::batch::Cursor;

/// The trainer's position, saved with every checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    /// The next batch to train on.
    pub cursor: Cursor,
    pub tokens_seen: u64,
    /// Training seconds so far (across resumes).
    pub elapsed_s: f64,
    /// Dynamic loss scale (f16) and steps since it last changed.
    pub loss_scale: f64,
    pub good_steps: u64,
    pub best_metric: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_without_improvement: usize,
    /// AdamW's update count (bias correction).
    pub adam_t: u64,
    /// Run seed. Dropout masks are drawn from a ChaCha stream seeded by
    /// (seed, step, micro-batch), and the data order by (seed, epoch), so
    /// the seed and the step/cursor above are the complete RNG state.
    pub seed: u64,
    /// Data-parallel shards per micro-batch (`train.shards`): part of the
    /// numerical recipe, kept so that a resumed run sums the same way.
    #[serde(default = "one")]
    pub shards: usize,
}

fn one() -> usize {
    1
}

impl TrainState {
    pub fn new(seed: u64) -> Self {
        TrainState {
            step: 0,
            cursor: Cursor::default(),
            tokens_seen: 0,
            elapsed_s: 0.0,
            loss_scale: 65536.0,
            good_steps: 0,
            best_metric: None,
            best_step: None,
            evals_without_improvement: 0,
            adam_t: 0,
            seed,
            shards: 1,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    state: TrainState,
    /// `arch` + the architecture's config.
    model: serde_json::Value,
    params: Vec<(String, Vec<usize>)>,
    /// sha256 of each tensor file.
    files: BTreeMap<String, String>,
}

/// Format 2 adds `checkpoint.json.sha256`; format 1 manifests still load.
const FORMAT: u32 = 2;
const OLDEST_FORMAT: u32 = 1;
const MANIFEST: &str = "checkpoint.json";
const MANIFEST_SUM: &str = "checkpoint.json.sha256";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn sync(path: &Path) -> Result<()> {
    fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

/// Writes `tensors` as safetensors at `path` and flushes it to disk.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path).map_err(|e| Error::format(path, format!("cannot write: {e}")))?;
    sync(path)
}

pub fn params_to_tensors(params: &[(String, Var)]) -> HashMap<String, Tensor> {
    params.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints under `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes half-written checkpoints a crash left behind.
pub fn clean_temporaries(dir: &Path) -> Result<()> {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                fs::remove_dir_all(e.path()).map_err(|err| Error::io(e.path(), err))?;
            }
        }
    }
    Ok(())
}

/// Writes a checkpoint atomically and keeps the newest `keep`.
pub fn save(
    dir: &Path,
    state: &TrainState,
    model: &serde_json::Value,
    params: &[(String, Var)],
    optimizer: &HashMap<String, Tensor>,
    keep: usize,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = step_dir_name(state.step);
    let tmp = dir.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut files = BTreeMap::new();
    for (file, tensors) in [("model.safetensors", &params_to_tensors(params)), ("optimizer.safetensors", optimizer)] {
        let p = tmp.join(file);
        save_tensors(tensors, &p)?;
        files.insert(file.to_string(), sha256_file(&p)?);
    }
    let manifest = Manifest {
        format: FORMAT,
        state: state.clone(),
        model: model.clone(),
        params: params.iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect(),
        files,
    };
    let mp = tmp.join(MANIFEST);
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| Error::format(&mp, e.to_string()))?;
    fs::write(&mp, &text).map_err(|e| Error::io(&mp, e))?;
    sync(&mp)?;
    // The manifest's own checksum, over its exact bytes (re-serialising
    // parsed floats is not guaranteed to give the same text back).
    let sp = tmp.join(MANIFEST_SUM);
    fs::write(&sp, format!("{}\n", sha256_hex(text.as_bytes()))).map_err(|e| Error::io(&sp, e))?;
    sync(&sp)?;
    let final_dir = dir.join(&name);
    if final_dir.exists() {
        // A checkpoint of this step from before a crash: replace it.
        fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync(dir)?;
    let all = list(dir)?;
    if all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(final_dir)
}

/// A verified checkpoint.
pub struct Loaded {
    pub state: TrainState,
    pub path: PathBuf,
    pub optimizer: HashMap<String, Tensor>,
    /// Why parts of it could not be verified (an old manifest format).
    pub warnings: Vec<String>,
}

/// Loads the checkpoint at `path` into `params` after checking that it
/// belongs to this model and that its manifest and files are intact.
/// Nothing is changed unless every check passes.
pub fn load(path: &Path, model: &serde_json::Value, params: &[(String, Var)]) -> Result<Loaded> {
    let mp = path.join(MANIFEST);
    if !path.is_dir() {
        return Err(Error::format(path, "not a checkpoint folder"));
    }
    if !mp.exists() {
        return Err(Error::format(path, format!("incomplete checkpoint: no {MANIFEST}")));
    }
    let bytes = fs::read(&mp).map_err(|e| Error::io(&mp, e))?;
    let m: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| Error::format(&mp, format!("corrupt checkpoint: {e}")))?;
    let mut warnings = Vec::new();
    match m.format {
        FORMAT => {
            let sp = path.join(MANIFEST_SUM);
            let recorded = match fs::read_to_string(&sp) {
                Ok(t) => t.trim().to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::format(path, format!("incomplete checkpoint: no {MANIFEST_SUM}")))
                }
                Err(e) => return Err(Error::io(&sp, e)),
            };
            let got = sha256_hex(&bytes);
            if got != recorded {
                return Err(Error::format(
                    &mp,
                    format!("corrupt checkpoint manifest: sha256 {got}, recorded {recorded} in {MANIFEST_SUM}"),
                ));
            }
        }
        OLDEST_FORMAT => warnings.push(format!(
            "{}: checkpoint format {OLDEST_FORMAT} has no manifest checksum; its fields are not verified",
            mp.display()
        )),
        other => {
            return Err(Error::format(
                &mp,
                format!("checkpoint format {other} (this attn reads {OLDEST_FORMAT} and {FORMAT})"),
            ))
        }
    }
    if &m.model != model {
        return Err(Error::format(
            &mp,
            format!("checkpoint of a different model: it holds {}, the config builds {}", m.model, model),
        ));
    }
    let want: Vec<(String, Vec<usize>)> = params.iter().map(|(n, v)| (n.clone(), v.dims().to_vec())).collect();
    if m.params != want {
        return Err(Error::format(&mp, "checkpoint of a different model: parameter names or shapes differ"));
    }
    for file in ["model.safetensors", "optimizer.safetensors"] {
        if !m.files.contains_key(file) {
            return Err(Error::format(&mp, format!("corrupt checkpoint manifest: no checksum for {file}")));
        }
    }
    for (file, sum) in &m.files {
        let p = path.join(file);
        if !p.exists() {
            return Err(Error::format(path, format!("incomplete checkpoint: no {file}")));
        }
        let got = sha256_file(&p)?;
        if &got != sum {
            return Err(Error::format(&p, format!("corrupt checkpoint file: sha256 {got}, recorded {sum}")));
        }
    }
    let mp = path.join("model.safetensors");
    let weights =
        candle_core::safetensors::load(&mp, &Device::Cpu).map_err(|e| Error::format(&mp, format!("corrupt: {e}")))?;
    let op = path.join("optimizer.safetensors");
    let optimizer =
        candle_core::safetensors::load(&op, &Device::Cpu).map_err(|e| Error::format(&op, format!("corrupt: {e}")))?;
    let mut values = Vec::with_capacity(params.len());
    for (name, var) in params {
        let t = weights.get(name).ok_or_else(|| Error::format(&mp, format!("missing tensor `{name}`")))?;
        if t.dims() != var.dims() {
            return Err(Error::format(
                &mp,
                format!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims()),
            ));
        }
        values.push((var, t));
    }
    for (var, t) in values {
        var.set(t)?;
    }
    Ok(Loaded { state: m.state, path: path.to_path_buf(), optimizer, warnings })
}

/// Loads the newest checkpoint under `dir` that verifies ([`load`]),
/// walking from newest to oldest. Each one skipped is reported through
/// `warn`, naming it and why; none valid is an error listing them all.
pub fn load_newest(
    dir: &Path,
    model: &serde_json::Value,
    params: &[(String, Var)],
    mut warn: impl FnMut(String),
) -> Result<Loaded> {
    let all = list(dir)?;
    if all.is_empty() {
        return Err(Error::format(dir, "no checkpoint to resume from"));
    }
    let mut skipped = Vec::new();
    for (_, path) in all.iter().rev() {
        match load(path, model, params) {
            Ok(loaded) => return Ok(loaded),
            Err(e) => {
                warn(format!("warning: skipping checkpoint {}: {e}", path.display()));
                skipped.push(e.to_string());
            }
        }
    }
    Err(Error::format(dir, format!("no valid checkpoint to resume from ({} tried: {})", all.len(), skipped.join("; "))))
}
