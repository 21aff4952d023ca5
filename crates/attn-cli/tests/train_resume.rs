//! A training process killed with SIGKILL and resumed produces the same
//! losses and the same final weights as an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use attn_test_support::{fixture_path, workspace_root};

fn config(dir: &Path) -> PathBuf {
    config_with(dir, 240)
}

fn config_with(dir: &Path, max_steps: usize) -> PathBuf {
    let text = std::fs::read_to_string(workspace_root().join("configs/ci/shakespeare-tiny.toml")).unwrap();
    let data = std::fs::canonicalize(fixture_path("corpora/shakespeare")).unwrap();
    let text = text
        .lines()
        .map(|l| match l.split('=').next().unwrap_or("").trim() {
            "path" => format!("path = \"{}\"", data.display()),
            "max_steps" => format!("max_steps = {max_steps}"),
            "eval_every" => "eval_every = 80".into(),
            "checkpoint_every" => "checkpoint_every = 20".into(),
            // The weight average is part of the state a resume must restore.
            "[train]" => "[train]\nema_decay = 0.99".into(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let p = dir.join("resume.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn attn() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_attn"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn final_weights(run: &Path) -> Vec<u8> {
    last_weights(run, 240)
}

fn last_weights(run: &Path, step: usize) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step:08}/model.safetensors"))).unwrap()
}

/// Moments and weight average of the last checkpoint, and the exported
/// (averaged) best model.
fn final_state(run: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(run.join("checkpoints/step-00000240/optimizer.safetensors")).unwrap(),
        std::fs::read(run.join("model/model.safetensors")).unwrap(),
    )
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["kind"] == "train").then(|| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        })
        .collect()
}

#[test]
fn sigkill_then_resume_matches_an_uninterrupted_run() {
    let dir = std::env::temp_dir().join(format!("attn-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config(&dir);
    let (full, killed) = (dir.join("full"), dir.join("killed"));

    let st = attn().args(["train", "-t", "1"]).arg(&cfg).arg("--out").arg(&full).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));

    let mut child = attn().args(["train", "-t", "1"]).arg(&cfg).arg("--out").arg(&killed).spawn().unwrap();
    let t0 = Instant::now();
    // Kill once a checkpoint past step 40 exists and before the run ends.
    loop {
        let n = std::fs::read_dir(killed.join("checkpoints"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("step-")).count()
            })
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(30)); // kill mid-step, possibly mid-checkpoint
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("summary.json").exists(), "the killed run must not have finished");

    let st = attn().args(["train", "-t", "1", "--resume"]).arg(&killed).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let stderr = String::from_utf8_lossy(&st.stderr);
    assert!(stderr.contains("resuming at step"), "{stderr}");

    assert_eq!(losses(&full), losses(&killed), "per-step training losses");
    assert_eq!(losses(&full).len(), 240);
    assert!(final_weights(&full) == final_weights(&killed), "final weights differ");
    let (full_state, killed_state) = (final_state(&full), final_state(&killed));
    assert!(full_state.0 == killed_state.0, "optimiser state and weight average differ");
    assert!(full_state.1 == killed_state.1, "exported (averaged) models differ");
    std::fs::remove_dir_all(&dir).ok();
}

/// A stray empty newest checkpoint folder and a checkpoint whose manifest
/// was edited are skipped, each with a warning naming it and why, and the
/// run resumes from the newest valid one and ends as an uninterrupted run.
#[test]
fn resume_skips_a_stray_folder_and_a_tampered_manifest() {
    let dir = std::env::temp_dir().join(format!("attn-resume-skip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = config_with(&dir, 60);
    let (full, broken) = (dir.join("full"), dir.join("broken"));
    let st = attn().args(["train", "-t", "1"]).arg(&cfg).arg("--out").arg(&full).output().unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));

    // The same run, then its last checkpoint replaced by an empty folder
    // and the one before it edited.
    let st = Command::new("cp").arg("-r").arg(&full).arg(&broken).status().unwrap();
    assert!(st.success());
    let ckpt = broken.join("checkpoints");
    std::fs::remove_dir_all(ckpt.join("step-00000060")).unwrap();
    std::fs::create_dir(ckpt.join("step-00000060")).unwrap();
    let mp = ckpt.join("step-00000040/checkpoint.json");
    let text = std::fs::read_to_string(&mp).unwrap();
    let tampered = text.replacen("\"step\": 40", "\"step\": 41", 1);
    assert_ne!(text, tampered);
    std::fs::write(&mp, tampered).unwrap();

    let st = attn().args(["train", "-t", "1", "--resume"]).arg(&broken).output().unwrap();
    let stderr = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{stderr}");
    assert!(stderr.contains("skipping checkpoint") && stderr.contains("step-00000060"), "{stderr}");
    assert!(stderr.contains("incomplete checkpoint"), "{stderr}");
    assert!(stderr.contains("step-00000040") && stderr.contains("corrupt checkpoint manifest"), "{stderr}");
    assert!(stderr.contains("resuming at step 20"), "{stderr}");

    assert_eq!(losses(&full), losses(&broken), "per-step training losses");
    assert_eq!(losses(&full).len(), 60);
    assert!(last_weights(&full, 60) == last_weights(&broken, 60), "final weights differ");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn train_cli_reports_bad_input_in_one_line() {
    let out = attn().args(["train", "/nonexistent/config.toml"]).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.starts_with("error:") && e.contains("/nonexistent/config.toml"), "{e}");
    let out = attn().args(["train", "--resume", "/nonexistent/run"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to resume"));
    let out = attn().args(["plot", "/nonexistent/run"]).output().unwrap();
    assert!(!out.status.success());
    let out = attn().args(["eval", "-m", "/nonexistent/model"]).output().unwrap();
    assert!(!out.status.success());
}
