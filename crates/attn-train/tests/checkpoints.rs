//! Checkpoint verification and the choice of the checkpoint to resume
//! from: the newest one that verifies, each one skipped named with why.

use std::collections::HashMap;
use std::path::Path;

use attn_train::checkpoint::{self, TrainState};
use candle_core::{Device, Tensor, Var};

fn params(v: f32) -> Vec<(String, Var)> {
    let t = Tensor::from_vec(vec![v; 6], (2, 3), &Device::Cpu).unwrap();
    vec![("w".to_string(), Var::from_tensor(&t).unwrap())]
}

fn value(params: &[(String, Var)]) -> f32 {
    params[0].1.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
}

fn model() -> serde_json::Value {
    serde_json::json!({"model_type": "test"})
}

/// Checkpoints of steps 10, 20 and 30 whose weights are 1, 2 and 3.
fn three_checkpoints(dir: &Path) {
    for step in [10, 20, 30] {
        let mut state = TrainState::new(1);
        state.step = step;
        state.tokens_seen = 100 * step as u64;
        let opt: HashMap<String, Tensor> =
            [("m.w".to_string(), Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap())].into();
        checkpoint::save(dir, &state, &model(), &params(step as f32 / 10.0), &opt, 5).unwrap();
    }
}

fn step_dir(dir: &Path, step: usize) -> std::path::PathBuf {
    dir.join(format!("step-{step:08}"))
}

#[test]
fn a_stray_empty_newest_folder_is_skipped_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    three_checkpoints(dir.path());
    std::fs::create_dir(step_dir(dir.path(), 40)).unwrap();
    let p = params(0.0);
    let mut warnings = Vec::new();
    let loaded = checkpoint::load_newest(dir.path(), &model(), &p, |w| warnings.push(w)).unwrap();
    assert_eq!(loaded.state.step, 30);
    assert_eq!(value(&p), 3.0);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("step-00000040") && warnings[0].contains("incomplete"), "{}", warnings[0]);
}

#[test]
fn a_manifest_with_a_tampered_field_is_refused_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    three_checkpoints(dir.path());
    let mp = step_dir(dir.path(), 30).join("checkpoint.json");
    let text = std::fs::read_to_string(&mp).unwrap();
    assert!(text.contains("\"tokens_seen\": 3000"));
    std::fs::write(&mp, text.replace("\"tokens_seen\": 3000", "\"tokens_seen\": 3001")).unwrap();

    let p = params(0.0);
    let e = checkpoint::load(&step_dir(dir.path(), 30), &model(), &p).err().expect("tampered manifest loaded");
    let e = e.to_string();
    assert!(e.contains("checkpoint.json") && e.contains("corrupt checkpoint manifest"), "{e}");
    assert_eq!(value(&p), 0.0, "a refused checkpoint changed the parameters");

    let mut warnings = Vec::new();
    let loaded = checkpoint::load_newest(dir.path(), &model(), &p, |w| warnings.push(w)).unwrap();
    assert_eq!((loaded.state.step, loaded.state.tokens_seen), (20, 2000));
    assert_eq!(value(&p), 2.0);
    assert!(warnings.len() == 1 && warnings[0].contains("step-00000030"), "{warnings:?}");

    // A missing manifest checksum is an incomplete checkpoint too.
    std::fs::remove_file(step_dir(dir.path(), 20).join("checkpoint.json.sha256")).unwrap();
    let mut warnings = Vec::new();
    let loaded = checkpoint::load_newest(dir.path(), &model(), &p, |w| warnings.push(w)).unwrap();
    assert_eq!(loaded.state.step, 10);
    assert!(warnings.len() == 2 && warnings[1].contains("checkpoint.json.sha256"), "{warnings:?}");
}

#[test]
fn no_valid_checkpoint_is_a_clear_error_naming_each() {
    let dir = tempfile::tempdir().unwrap();
    three_checkpoints(dir.path());
    for step in [10, 20, 30] {
        std::fs::write(step_dir(dir.path(), step).join("model.safetensors"), b"garbage").unwrap();
    }
    let p = params(0.0);
    let mut warnings = Vec::new();
    let e = checkpoint::load_newest(dir.path(), &model(), &p, |w| warnings.push(w)).err().unwrap().to_string();
    assert!(e.contains("no valid checkpoint") && e.contains("3 tried"), "{e}");
    assert!(e.contains("sha256"), "{e}");
    assert_eq!(warnings.len(), 3);
    assert_eq!(value(&p), 0.0);
}

/// A manifest written before manifest checksums (format 1) still loads,
/// its tensor files verified, with a warning that its fields are not.
#[test]
fn format_1_manifests_still_load_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    three_checkpoints(dir.path());
    let d = step_dir(dir.path(), 30);
    let text = std::fs::read_to_string(d.join("checkpoint.json")).unwrap();
    assert!(text.contains("\"format\": 2"));
    std::fs::write(d.join("checkpoint.json"), text.replace("\"format\": 2", "\"format\": 1")).unwrap();
    std::fs::remove_file(d.join("checkpoint.json.sha256")).unwrap();
    let p = params(0.0);
    let loaded = checkpoint::load(&d, &model(), &p).unwrap();
    assert_eq!(loaded.state.step, 30);
    assert!(loaded.warnings.len() == 1 && loaded.warnings[0].contains("not verified"), "{:?}", loaded.warnings);
    // A future format is refused, not guessed at.
    std::fs::write(d.join("checkpoint.json"), text.replace("\"format\": 2", "\"format\": 9")).unwrap();
    let e = checkpoint::load(&d, &model(), &p).err().unwrap().to_string();
    assert!(e.contains("format 9"), "{e}");
}
