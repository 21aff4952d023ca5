//! The model commands as a user runs them, on the real models (pulled into
//! the cache by .ci/run, or on first use).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn attn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attn")).args(args).output().expect("run attn")
}

fn attn_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn ok_json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn one_line_error(o: &Output, expect: &str) {
    assert!(!o.status.success(), "succeeded: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains(expect), "expected `{expect}` in: {e}");
}

fn temp(name: &str) -> PathBuf {
    attn_test_support::process_temp_dir("cli-models").join(name)
}

#[test]
fn generate_greedy_json_and_seeded_sampling() {
    let v = ok_json(&attn(&["generate", "The capital of France is", "-n", "8", "--temperature", "0", "--json"]));
    assert_eq!(v["completion_tokens"], 8);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["prompt_ids"][0], 2, "BOS first");
    assert!(!v["text"].as_str().unwrap().trim().is_empty());
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // HF transformers' greedy continuation of this prompt starts " the capital of"
    // (fixtures/gemma3_reference.json, greedy[0]).
    let ids: Vec<u64> = v["completion_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(&ids[..3], &[506, 5279, 529]);

    let run = |seed: &str| {
        ok_json(&attn(&["generate", "Once upon a time", "-n", "12", "--seed", seed, "--temperature", "1.0", "--json"]))
            ["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(run("7"), run("7"));
}

#[test]
fn generate_reads_the_prompt_from_stdin_and_stops_on_stop_strings() {
    let o = attn_stdin(
        &["generate", "-n", "30", "--temperature", "0", "--stop", "France", "--json"],
        "The capital of France is",
    );
    let v = ok_json(&o);
    assert_eq!(v["finish_reason"], "stop");
    assert!(!v["text"].as_str().unwrap().contains("France"));
}

#[test]
fn speculative_generation_gives_the_plain_tokens_and_reports_acceptance() {
    // candle's quantized kernel rounds a many-row call (verification)
    // differently from a one-row call (plain decode), which flips near-ties
    // on some prompts (with `--batched-kernel` the rows agree exactly, but
    // that kernel is slow in a debug build); this prompt has none in its
    // first 10 tokens (crates/attn-engine/tests/real_perplexity.rs).
    let prompt = "Numbers: one, two, three, four, five, six, seven, eight. Again: one, two, three,";
    let args = |extra: &[&str]| {
        let mut a = vec!["generate", prompt, "-n", "10", "--temperature", "0", "--json"];
        a.extend_from_slice(extra);
        ok_json(&attn(&a))
    };
    let plain = args(&[]);
    assert!(plain.get("speculative").is_none());
    let spec = args(&["--draft", "ngram", "--draft-k", "3"]);
    assert_eq!(spec["completion_ids"], plain["completion_ids"]);
    assert_eq!(spec["text"], plain["text"]);
    let s = &spec["speculative"];
    assert_eq!((s["draft"].as_str(), s["draft_k"].as_u64()), (Some("ngram"), Some(3)));
    let (proposed, accepted) = (s["proposed"].as_u64().unwrap(), s["accepted"].as_u64().unwrap());
    assert!(accepted > 0 && accepted <= proposed, "{s}");
    assert!(s["target_calls"].as_u64().unwrap() < 9, "{s}");

    one_line_error(&attn(&["generate", "hi", "--draft", "ngram", "--draft-k", "0"]), "--draft-k");
    one_line_error(&attn(&["generate", "hi", "--draft", "ngram", "--draft-k", "1000"]), "--draft-k");
    one_line_error(&attn(&["generate", "hi", "--draft", "ngram", "--beam-width", "2"]), "--beam-width");
    one_line_error(&attn(&["generate", "hi", "--draft", "/no/such/draft.gguf"]), "--draft");
    one_line_error(&attn(&["generate", "hi", "--draft", "all-minilm-l6-v2"]), "--draft");
}

#[test]
fn bad_generation_input_is_a_clear_error() {
    one_line_error(&attn(&["generate", "hi", "--temperature", "-1"]), "temperature");
    one_line_error(&attn(&["generate", "hi", "--top-p", "1.5"]), "top_p");
    one_line_error(&attn(&["generate", "hi", "--beam-width", "0"]), "width");
    one_line_error(&attn(&["generate", "hi", "-m", "no-such-model"]), "not a known model name");
    one_line_error(&attn(&["generate", "hi", "-m", "all-minilm-l6-v2"]), "needs a text-generation model");
    one_line_error(&attn(&["generate", "hi", "--threads", "0"]), "--threads");
    // Longer than Gemma 3's 32768-token context.
    let long = "word ".repeat(40_000);
    one_line_error(&attn_stdin(&["generate", "-n", "4"], &long), "context");
}

#[test]
fn broken_model_files_are_clear_errors() {
    let gemma = attn_test_support::real_model("gemma3-270m");
    let bytes = std::fs::read(&gemma).unwrap();
    let truncated = temp("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    one_line_error(&attn(&["generate", "hi", "-m", truncated.to_str().unwrap()]), "truncated");

    // An architecture attn does not run, and a supported one with no tokenizer or tensors.
    for (arch, expected) in [("mamba", "architecture `mamba`"), ("llama", "`llama.embedding_length` is missing")] {
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("general.architecture".to_string(), attn_models::gguf::Value::String(arch.into()));
        let other = temp(&format!("{arch}.gguf"));
        std::fs::write(&other, attn_models::gguf::write_gguf(&meta, &[]).unwrap()).unwrap();
        one_line_error(&attn(&["generate", "hi", "-m", other.to_str().unwrap()]), expected);
    }
}

#[test]
fn embed_tokenize_bench_and_perplexity() {
    let v = ok_json(&attn(&["embed", "A cat sits on the mat.", "A dog runs.", "--json"]));
    assert_eq!(v["dim"], 384);
    let a: Vec<f64> = v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let norm: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);

    let v = ok_json(&attn(&["tokenize", "Hello, world!", "--json"]));
    assert_eq!(v["ids"], serde_json::json!([2, 9259, 236764, 1902, 236888]));
    assert_eq!(v["pieces"][3], "▁world");

    let v = ok_json(&attn(&["bench", "-p", "16", "-g", "4", "-r", "1", "--threads", "2", "--json"]));
    assert_eq!(v["threads"], 2);
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0 && v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);

    let short = temp("short.txt");
    std::fs::write(&short, "Just a few words.").unwrap();
    one_line_error(&attn(&["perplexity", "--file", short.to_str().unwrap(), "--ctx", "128"]), "fewer than one chunk");
    one_line_error(&attn(&["embed"]), "nothing to embed");
}
