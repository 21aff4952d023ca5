//! Training-curve plots from metrics.jsonl.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use attn_train::plot::plot_metrics;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A plausible run: loss falling from ~7 with noise, an evaluation every 50
/// steps, plus fields and record kinds the plotter does not know.
fn synthetic_metrics(steps: u64, eval_every: u64, eval_extra: &str) -> String {
    let mut s = String::new();
    let mut noise = 0x2545_f491_u64;
    for step in 1..=steps {
        noise ^= noise << 13;
        noise ^= noise >> 7;
        noise ^= noise << 17;
        let jitter = (noise % 1000) as f64 / 1000.0 - 0.5;
        let loss = 1.8 + 5.2 * (-(step as f64) / 120.0).exp() + 0.35 * jitter;
        writeln!(
            s,
            r#"{{"kind":"train","step":{step},"loss":{loss},"lr":0.0003,"grad_norm":0.8,"tokens_per_s":1523.0,"elapsed_s":{},"epoch":0,"new_field":[1,2]}}"#,
            step as f64 * 0.27
        )
        .unwrap();
        if step % eval_every == 0 {
            let vloss = 2.0 + 5.0 * (-(step as f64) / 140.0).exp();
            writeln!(
                s,
                r#"{{"kind":"eval","step":{step},"split":"valid","loss":{vloss},"ppl":{}{eval_extra}}}"#,
                vloss.exp()
            )
            .unwrap();
        }
        if step % 200 == 0 {
            writeln!(s, r#"{{"kind":"checkpoint","step":{step},"path":"ckpt-{step}"}}"#).unwrap();
        }
    }
    s
}

fn write_run(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let run = dir.join(name);
    std::fs::create_dir_all(&run).unwrap();
    let path = run.join("metrics.jsonl");
    std::fs::write(&path, contents).unwrap();
    path
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.starts_with(PNG_SIGNATURE), "{} is not a PNG", path.display());
    assert!(bytes.len() > 5 * 1024, "{} is only {} bytes", path.display(), bytes.len());
    // IHDR: 1200 x 500.
    assert_eq!(&bytes[12..16], b"IHDR");
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1200);
    assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), 500);
    assert!(bytes.ends_with(b"IEND\xae\x42\x60\x82"));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    assert!(!Path::new(&tmp).exists(), "temporary file left behind");
}

/// Where test pictures go: a temp dir, or $ATTN_PLOT_TEST_OUT to keep them.
fn out_dir(tmp: &Path) -> PathBuf {
    match std::env::var_os("ATTN_PLOT_TEST_OUT") {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            PathBuf::from(d)
        }
        None => tmp.to_path_buf(),
    }
}

#[test]
fn plots_train_and_eval_curves() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = write_run(tmp.path(), "lm-tiny", &synthetic_metrics(600, 50, ""));
    let out = out_dir(tmp.path()).join("lm-tiny.png");
    plot_metrics(&metrics, &out, "lm-tiny").unwrap();
    assert_png(&out);
}

#[test]
fn plots_bleu_when_present() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = write_run(tmp.path(), "mt-small", &synthetic_metrics(400, 40, r#","bleu":12.3,"accuracy":0.5"#));
    let out = out_dir(tmp.path()).join("mt-small.png");
    // Empty title: the run directory's name is used.
    plot_metrics(&metrics, &out, "").unwrap();
    assert_png(&out);
}

#[test]
fn overwrites_an_existing_png() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = write_run(tmp.path(), "run", &synthetic_metrics(100, 25, r#","accuracy":0.81"#));
    let out = tmp.path().join("curves.png");
    std::fs::write(&out, b"old").unwrap();
    plot_metrics(&metrics, &out, "run").unwrap();
    assert_png(&out);
}

#[test]
fn only_train_lines_work() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = synthetic_metrics(300, u64::MAX, "");
    assert!(!text.contains("\"eval\""));
    let metrics = write_run(tmp.path(), "no-evals", &text);
    let out = out_dir(tmp.path()).join("no-evals.png");
    plot_metrics(&metrics, &out, "no-evals").unwrap();
    assert_png(&out);
}

#[test]
fn a_single_train_line_works() {
    let tmp = tempfile::tempdir().unwrap();
    let metrics = write_run(tmp.path(), "one", "{\"kind\":\"train\",\"step\":0,\"loss\":9.1}\n");
    let out = tmp.path().join("one.png");
    plot_metrics(&metrics, &out, "one").unwrap();
    assert!(std::fs::read(&out).unwrap().starts_with(PNG_SIGNATURE));
}

#[test]
fn malformed_line_is_an_error_naming_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = synthetic_metrics(5, 100, "");
    text.push_str("{\"kind\":\"train\",\"step\":6,\"loss\":\n"); // line 6: truncated
    text.push_str(&synthetic_metrics(2, 100, ""));
    let metrics = write_run(tmp.path(), "bad", &text);
    let out = tmp.path().join("bad.png");
    let err = plot_metrics(&metrics, &out, "bad").unwrap_err().to_string();
    assert!(err.contains("line 6"), "{err}");
    assert!(err.contains("metrics.jsonl"), "{err}");
    assert!(!out.exists());
}

#[test]
fn train_line_without_loss_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "{\"kind\":\"train\",\"step\":1,\"loss\":3.0}\n\n{\"kind\":\"train\",\"step\":2}\n";
    let metrics = write_run(tmp.path(), "bad", text);
    let err = plot_metrics(&metrics, &tmp.path().join("x.png"), "bad").unwrap_err().to_string();
    assert!(err.contains("line 3") && err.contains("loss"), "{err}");

    let text = "{\"kind\":\"train\",\"step\":\"one\",\"loss\":3.0}\n";
    let metrics = write_run(tmp.path(), "bad2", text);
    let err = plot_metrics(&metrics, &tmp.path().join("x.png"), "bad").unwrap_err().to_string();
    assert!(err.contains("line 1") && err.contains("step"), "{err}");

    let text = "{\"kind\":\"train\",\"step\":1,\"loss\":3.0}\n[1,2,3]\n";
    let metrics = write_run(tmp.path(), "bad3", text);
    let err = plot_metrics(&metrics, &tmp.path().join("x.png"), "bad").unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn no_train_lines_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "{\"kind\":\"eval\",\"step\":100,\"split\":\"valid\",\"loss\":1.9,\"ppl\":6.7}\n";
    let metrics = write_run(tmp.path(), "evals-only", text);
    let out = tmp.path().join("evals-only.png");
    let err = plot_metrics(&metrics, &out, "evals-only").unwrap_err().to_string();
    assert!(err.contains("no training records"), "{err}");
    assert!(!out.exists());

    let metrics = write_run(tmp.path(), "empty", "");
    let err = plot_metrics(&metrics, &out, "empty").unwrap_err().to_string();
    assert!(err.contains("no training records"), "{err}");
}

#[test]
fn missing_file_is_an_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope").join("metrics.jsonl");
    let err = plot_metrics(&missing, &tmp.path().join("x.png"), "x").unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
}

/// Without a font the curves are still drawn. The font is chosen once per
/// process, so this runs the test binary again with ATTN_PLOT_FONT=none.
#[test]
fn draws_without_a_font() {
    if std::env::var_os("ATTN_PLOT_NO_FONT_CHILD").is_some() {
        let dir = PathBuf::from(std::env::var_os("ATTN_PLOT_NO_FONT_CHILD").unwrap());
        let metrics = write_run(&dir, "no-font", &synthetic_metrics(300, 50, ""));
        plot_metrics(&metrics, &dir.join("no-font.png"), "no-font").unwrap();
        let only_train = write_run(&dir, "no-font-train", &synthetic_metrics(300, u64::MAX, ""));
        plot_metrics(&only_train, &dir.join("no-font-train.png"), "no-font-train").unwrap();
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = out_dir(tmp.path());
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "draws_without_a_font", "--nocapture", "--test-threads=1"])
        .env("ATTN_PLOT_FONT", "none")
        .env("ATTN_PLOT_NO_FONT_CHILD", &dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{}\n{stderr}", String::from_utf8_lossy(&output.stdout));
    assert!(stderr.contains("warning"), "{stderr}");
    assert_png(&dir.join("no-font.png"));
    assert!(std::fs::read(dir.join("no-font-train.png")).unwrap().starts_with(PNG_SIGNATURE));
}
