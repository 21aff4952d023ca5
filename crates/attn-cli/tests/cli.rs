//! The `attn` program as a user runs it.

use std::path::PathBuf;
use std::process::{Command, Output};

use attn_test_support::{fixture_path, process_temp_dir};

fn attn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attn")).args(args).output().expect("run attn")
}

fn fixture(name: &str) -> String {
    fixture_path(name).display().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn temp(name: &str) -> PathBuf {
    process_temp_dir("cli-test").join(name)
}

#[test]
fn help_lists_every_subcommand() {
    let o = attn(&["--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for cmd in [
        "generate",
        "chat",
        "embed",
        "tokenize",
        "perplexity",
        "bench",
        "serve",
        "bench-serve",
        "train",
        "eval",
        "pull",
        "info",
        "quantize",
        "plot",
    ] {
        assert!(out.lines().any(|l| l.trim_start().starts_with(cmd)), "`{cmd}` missing from --help:\n{out}");
    }
}

#[test]
fn unknown_flags_of_built_commands_are_usage_errors() {
    for cmd in ["train", "eval", "plot", "serve", "bench-serve", "quantize"] {
        let o = attn(&[cmd, "--whatever", "x"]);
        assert!(!o.status.success(), "{cmd} succeeded");
        assert!(stderr(&o).contains("--whatever"), "{}", stderr(&o));
    }
}

#[test]
fn serve_and_bench_serve_reject_bad_flags_clearly() {
    let o = attn(&["serve", "--kv-cache-memory", "lots"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a size"), "{}", stderr(&o));
    let o = attn(&["serve", "--host", "not a host"]);
    assert!(stderr(&o).contains("not a host:port"), "{}", stderr(&o));
    let o = attn(&["serve", "--max-num-seqs", "8", "--max-batched-tokens", "4"]);
    assert!(stderr(&o).contains("--max-batched-tokens"), "{}", stderr(&o));
    let o = attn(&["serve", "-m", "/no/such/model.gguf"]);
    assert!(!o.status.success());
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    // Nothing listens on port 9: every request fails, and the command says so.
    let o = attn(&["bench-serve", "--url", "http://127.0.0.1:9", "--concurrency", "1", "--requests", "2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("2 requests failed"), "{}", stderr(&o));
}

#[test]
fn info_on_safetensors_json() {
    let o = attn(&["info", &fixture("transformer_2017.safetensors"), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["format"], "safetensors");
    assert!(v["architecture"].as_str().unwrap().starts_with("transformer-2017"));
    // 138 float tensors (68 parameters + 68 gradients + 2 outputs) and 5 int64 inputs.
    assert_eq!(v["dtypes"]["F32"]["tensors"], 138);
    assert_eq!(v["dtypes"]["I64"]["tensors"], 5);
    let params = v["parameters"].as_u64().unwrap();
    let bytes = v["bytes"].as_u64().unwrap();
    assert_eq!(bytes, (params - 63) * 4 + 63 * 8);
}

#[test]
fn info_on_hf_folder_reads_config() {
    let dir = temp("folder");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("moe.safetensors"), dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"architectures": ["MixtralForCausalLM"]}"#).unwrap();
    let o = attn(&["info", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("MixtralForCausalLM (from config.json)"), "{out}");
}

#[test]
fn bad_input_is_one_clear_line() {
    let cases: Vec<(Vec<String>, &str)> = {
        let corrupt = temp("corrupt.safetensors");
        std::fs::write(&corrupt, b"\x10\0\0\0\0\0\0\0{\"a\": 1}garbage").unwrap();
        let truncated = temp("truncated.safetensors");
        let full = std::fs::read(fixture("moe.safetensors")).unwrap();
        std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
        let fake_gguf = temp("fake.gguf");
        std::fs::write(&fake_gguf, b"not a gguf at all").unwrap();
        let empty_dir = temp("empty-dir");
        std::fs::create_dir_all(&empty_dir).unwrap();
        vec![
            (vec!["info".into(), "/no/such/model.gguf".into()], "No such file"),
            (vec!["info".into(), corrupt.display().to_string()], "not a valid safetensors file"),
            (vec!["info".into(), truncated.display().to_string()], "not a valid safetensors file"),
            (vec!["info".into(), fake_gguf.display().to_string()], "GGUF magic"),
            (vec!["info".into(), empty_dir.display().to_string()], "no *.safetensors"),
        ]
    };
    for (args, expect) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = attn(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(e.starts_with("error: ") && e.contains(expect), "{args:?}: {e}");
    }
    let o = attn(&["info", "--bogus-flag", "x"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--bogus-flag"));
}

#[test]
fn serve_warns_when_listening_beyond_loopback_without_a_key() {
    // The warning comes right after binding, before the (missing) model loads.
    let args = ["serve", "--host", "0.0.0.0", "--port", "0", "-m", "/no/such/model.gguf"];
    let o = Command::new(env!("CARGO_BIN_EXE_attn")).args(args).env_remove("ATTN_API_KEY").output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("WARNING: listening on 0.0.0.0 without an API key"), "{}", stderr(&o));
    let o = Command::new(env!("CARGO_BIN_EXE_attn")).args(args).env("ATTN_API_KEY", "k").output().unwrap();
    assert!(!stderr(&o).contains("WARNING"), "{}", stderr(&o));
    let o = attn(&["serve", "--allowed-origins", "evil", "-m", "/no/such/model.gguf"]);
    assert!(stderr(&o).contains("--allowed-origins"), "{}", stderr(&o));
    let o = attn(&["serve", "--api-key", "", "-m", "/no/such/model.gguf"]);
    assert!(stderr(&o).contains("API key"), "{}", stderr(&o));
    let help = String::from_utf8_lossy(&attn(&["serve", "--help"]).stdout).into_owned();
    for flag in ["--api-key", "--allowed-origins", "--max-connections", "--header-timeout-s", "--read-timeout-s"] {
        assert!(help.contains(flag), "{flag} in:\n{help}");
    }
}

/// `bench-serve -m PATH.gguf` names the model as the server does (by file
/// stem): every request used to fail with an unknown model.
#[test]
fn bench_serve_runs_on_a_gguf_path() {
    let path = attn_test_support::real_model("smollm2-135m-instruct");
    assert_eq!(path.extension().and_then(|e| e.to_str()), Some("gguf"), "{}", path.display());
    let path = path.display().to_string();
    let args = ["bench-serve", "-m", &path, "--concurrency", "1", "--requests", "2", "--max-tokens", "2"];
    let o = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(args)
        .args(["--kv-cache-memory", "64MiB", "--json"])
        .env_remove("ATTN_API_KEY")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
}

/// A GGUF claiming a billion layers (and one claiming one layer fewer than
/// it holds): `attn info` and `attn generate` refuse it with an error that
/// names the key and the value and exit with status 1, not a signal.
#[test]
fn info_and_generate_refuse_hostile_gguf_sizes() {
    use attn_models::gguf::Value;
    use attn_test_support::tiny_gguf::tiny_gemma3_gguf;
    let cases = [
        ("billion-layers.gguf", Value::U32(1_000_000_000), "`gemma3.block_count` = 1000000000"),
        ("one-layer.gguf", Value::U32(1), "`gemma3.block_count` = 1, but the file holds 2 layer groups"),
    ];
    for (name, value, message) in cases {
        let p = temp(name);
        std::fs::write(&p, tiny_gemma3_gguf(&[("gemma3.block_count", value)])).unwrap();
        let path = p.to_str().unwrap();
        for args in [vec!["info", path], vec!["generate", "-m", path, "-n", "1", "hi"]] {
            let o = attn(&args);
            let e = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {:?}\n{e}", o.status);
            assert!(e.starts_with("error:") && e.contains(message) && e.contains(name), "{args:?}: {e}");
            assert!(!e.contains("panicked") && !e.contains("memory allocation"), "{args:?}: {e}");
        }
    }
}

/// A build without the `mpi` feature, started by an MPI launcher as one of
/// several ranks, refuses instead of running the whole job on every rank.
#[cfg(not(feature = "mpi"))]
#[test]
fn started_as_an_mpi_rank_without_mpi_support_is_a_clear_error() {
    for (k, v) in [("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"), ("PMI_SIZE", "PMI_RANK")] {
        let out =
            Command::new(env!("CARGO_BIN_EXE_attn")).args(["tokenize", "hi"]).env(k, "2").env(v, "1").output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("built without MPI support") && err.contains("rank 1 of 2") && err.contains("--features mpi"),
            "{err}"
        );
    }
}
