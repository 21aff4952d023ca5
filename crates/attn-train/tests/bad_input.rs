//! Bad configs, corpora and checkpoints give clear errors and never
//! overwrite anything good.

mod common;

use std::path::Path;

use attn_test_support::{tempdir, workspace_root};
use attn_train::{train, TrainConfig, TrainOptions};
use common::ci_config;

fn err_of(text: &str) -> String {
    match TrainConfig::parse(text, &workspace_root()) {
        Ok(_) => panic!("config accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

fn base() -> String {
    std::fs::read_to_string(workspace_root().join("configs/ci/shakespeare-tiny.toml")).unwrap()
}

#[test]
fn configs_are_validated_with_named_fields() {
    let b = base();
    let cases: &[(String, &str)] = &[
        (b.replace("seq_len = 32", "seq_len = 32\nsequence_length = 3"), "sequence_length"),
        (b.replace("lr = 1e-2", "lr = -1.0"), "train.lr"),
        (b.replace("d_model = 32", "d_model = 30"), "n_heads"),
        (b.replace("d_model = 32", "d_model = 32\nvocab_size = 100"), "model.vocab_size"),
        (b.replace("arch = \"gpt\"", "arch = \"transformer\""), "model.arch"),
        (b.replace("arch = \"gpt\"", "arch = \"lstm\""), "lstm"),
        (b.replace("max_len = 64", "max_len = 16"), "model.max_len"),
        (b.replace("batch_tokens = 256", "batch_tokens = 8"), "data.batch_tokens"),
        (b.replace("dropout = 0.1", "dropout = 1.5"), "dropout"),
        (b.replace("kind = \"char\"", "kind = \"bpe\""), "tokenizer.vocab_size"),
        (b.replace("max_steps = 40", "max_steps = 0"), "train.max_steps"),
        (b.replace("schedule = \"cosine\"", "schedule = \"linear\""), "linear"),
        (b.replace("format = \"text_dir\"", "format = \"ding\""), "data.format"),
        (b.replace("[train]", "[train]\nmetric = \"bleu\""), "train.metric"),
        (b.replace("[train]", "[train]\nema_decay = 1.0"), "train.ema_decay"),
        (b.replace("[train]", "[train]\nlayer_lr_decay = 0.0"), "train.layer_lr_decay"),
        (b.replace("warmup_steps = 5", "warmup_steps = 0").replace("\"cosine\"", "\"inverse_sqrt\""), "warmup_steps"),
    ];
    for (text, want) in cases {
        let e = err_of(text);
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
}

fn start(cfg: &Path, run_dir: &Path) -> attn_nn::Result<attn_train::TrainSummary> {
    train(&TrainOptions {
        config: Some(cfg.to_path_buf()),
        run_dir: run_dir.to_path_buf(),
        resume: false,
        progress: false,
        comm: attn_dist::single(),
    })
}

fn resume(run_dir: &Path) -> attn_nn::Result<attn_train::TrainSummary> {
    train(&TrainOptions {
        config: None,
        run_dir: run_dir.to_path_buf(),
        resume: true,
        progress: false,
        comm: attn_dist::single(),
    })
}

#[test]
fn missing_and_empty_corpora_are_errors() {
    let dir = tempdir("corpus");
    let cfg = ci_config("shakespeare-tiny", &dir, &[]);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let missing = dir.join("missing.toml");
    std::fs::write(&missing, text.replace("fixtures/corpora/shakespeare", "fixtures/corpora/nowhere")).unwrap();
    let e = start(&missing, &dir.join("r1")).unwrap_err().to_string();
    assert!(e.contains("nowhere"), "{e}");
    let empty_dir = dir.join("empty");
    std::fs::create_dir_all(&empty_dir).unwrap();
    std::fs::write(empty_dir.join("x_gut.txt"), "\n\n   \n").unwrap();
    let path_line = text.lines().find(|l| l.starts_with("path")).unwrap();
    let empty = dir.join("empty.toml");
    std::fs::write(&empty, text.replace(path_line, &format!("path = \"{}\"", empty_dir.display()))).unwrap();
    let e = start(&empty, &dir.join("r2")).unwrap_err().to_string();
    assert!(!e.is_empty(), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn checkpoints_are_verified_and_never_overwritten() {
    let dir = tempdir("ckpt");
    let cfg =
        ci_config("shakespeare-tiny", &dir, &[("max_steps", "12"), ("eval_every", "6"), ("checkpoint_every", "6")]);
    let run = dir.join("run");
    let first = start(&cfg, &run).unwrap();
    // A second fresh run into the same directory is refused.
    let e = start(&cfg, &run).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");

    // A checkpoint of a different model: the run's config now builds a wider model.
    let run2 = dir.join("run2");
    let cfg2 = ci_config("shakespeare-tiny", &dir.join("wide"), &[("d_model", "48"), ("max_steps", "12")]);
    std::fs::create_dir_all(run2.join("checkpoints")).unwrap();
    std::fs::write(run2.join("config.toml"), std::fs::read_to_string(&cfg2).unwrap()).unwrap();
    std::fs::copy(run.join("run.json"), run2.join("run.json")).unwrap();
    let src = run.join("checkpoints/step-00000006");
    let dst = run2.join("checkpoints/step-00000006");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["model.safetensors", "optimizer.safetensors", "checkpoint.json", "checkpoint.json.sha256"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let e = resume(&run2).unwrap_err().to_string();
    assert!(e.contains("different model"), "{e}");

    // Corrupt the latest checkpoint's weights: resume skips it (with a
    // warning naming the file) and goes on from the one before, to the same end.
    let corrupt = |step: &str| {
        let w = run.join(format!("checkpoints/step-{step}/model.safetensors"));
        let mut bytes = std::fs::read(&w).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0x55;
        std::fs::write(&w, &bytes).unwrap();
    };
    corrupt("00000012");
    let again = resume(&run).unwrap();
    assert_eq!(again.steps, 12);
    assert_eq!(again.valid.as_ref().unwrap().loss, first.valid.as_ref().unwrap().loss);
    // With every checkpoint corrupt, resume fails and names the file.
    corrupt("00000006");
    corrupt("00000012");
    let e = resume(&run).unwrap_err().to_string();
    assert!(e.contains("corrupt") && e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_diverging_run_stops_at_the_step_and_keeps_the_good_checkpoint() {
    let dir = tempdir("nan");
    let cfg = ci_config(
        "shakespeare-tiny",
        &dir,
        &[
            ("lr", "1e30"),
            ("clip_grad_norm", "1e30"),
            ("schedule", "\"constant\""),
            ("warmup_steps", "0"),
            ("checkpoint_every", "1"),
        ],
    );
    let run = dir.join("run");
    let e = start(&cfg, &run).unwrap_err().to_string();
    assert!(e.contains("diverged at step"), "{e}");
    assert!(e.contains("checkpoint"), "{e}");
    // Every checkpoint left is complete and loadable, none holds non-finite weights.
    for entry in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let p = entry.unwrap().path();
        assert!(p.file_name().unwrap().to_string_lossy().starts_with("step-"), "{p:?}");
        let t = candle_core::safetensors::load(p.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
        for (name, v) in t {
            let v = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name} in {p:?}");
        }
    }
    std::fs::remove_dir_all(dir).ok();
}
