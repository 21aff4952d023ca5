//! A GPT trained by `attn train` is one more causal model: `generate`
//! (plain, beam, speculative with itself as the draft), `perplexity`,
//! `bench` and `serve` take its run folder, its exported folder, or the GGUF
//! `attn quantize` makes of it, exactly as they take a GGUF decoder.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn attn(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attn")).env("RAYON_NUM_THREADS", "1").args(args).output().unwrap()
}

fn ok_json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// Trains the CI-sized character GPT (40 steps) into a fresh run folder.
fn trained_run(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("attn-trained-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(root().join("configs/ci/shakespeare-tiny.toml")).unwrap();
    let data = std::fs::canonicalize(root().join("fixtures/corpora/shakespeare")).unwrap();
    let text: Vec<String> = text
        .lines()
        .map(|l| match l.split('=').next().unwrap_or("").trim() {
            "path" => format!("path = \"{}\"", data.display()),
            _ => l.to_string(),
        })
        .collect();
    let cfg = dir.join("gpt.toml");
    std::fs::write(&cfg, text.join("\n")).unwrap();
    let run = dir.join("run");
    let o = attn(&["train", cfg.to_str().unwrap(), "--out", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run
}

/// POSTs `body` to `url` (http://host:port/path) and returns status and body.
fn post(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let body = body.to_string();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status: u16 = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {resp}")))
}

#[test]
fn a_trained_gpt_runs_through_every_generation_command() {
    let run = trained_run("gpt");
    let run_s = run.to_str().unwrap();
    let model_s = run.join("model");
    let model_s = model_s.to_str().unwrap();

    // generate: the run folder and the exported folder are the same model.
    let greedy = ["--temperature", "0", "-n", "12", "--json"];
    let a = ok_json(&attn(&[&["generate", "To be", "-m", run_s][..], &greedy[..]].concat()));
    let b = ok_json(&attn(&[&["generate", "To be", "-m", model_s][..], &greedy[..]].concat()));
    assert_eq!(a["completion_ids"].as_array().unwrap().len(), 12, "{a}");
    assert_eq!(a["completion_ids"], b["completion_ids"]);

    // Speculative decoding with the model as its own draft, and with n-grams:
    // greedy output equals plain decoding's.
    let spec = ok_json(&attn(&[&["generate", "To be", "-m", run_s, "--draft", run_s][..], &greedy[..]].concat()));
    assert_eq!(spec["completion_ids"], a["completion_ids"]);
    assert!(spec["speculative"]["accepted"].as_u64().unwrap() > 0, "{spec}");
    let ngram = ok_json(&attn(&[&["generate", "To be", "-m", run_s, "--draft", "ngram"][..], &greedy[..]].concat()));
    assert_eq!(ngram["completion_ids"], a["completion_ids"]);

    // Beam search with one beam is greedy search.
    let beam = ok_json(&attn(&["generate", "To be", "-m", run_s, "--beam-width", "1", "-n", "12", "--json"]));
    assert_eq!(beam["beams"][0]["completion_ids"], a["completion_ids"]);

    // perplexity: a trained character model beats the uniform guess over
    // its vocabulary by far.
    let text = root().join("fixtures/perplexity.txt");
    let p = ok_json(&attn(&["perplexity", "-m", run_s, "--file", text.to_str().unwrap(), "--ctx", "32", "--json"]));
    let ppl = p["ppl"].as_f64().unwrap();
    let vocab = std::fs::read_to_string(run.join("model/config.json")).unwrap();
    let vocab: serde_json::Value = serde_json::from_str(&vocab).unwrap();
    let vocab = vocab["config"]["vocab_size"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < vocab / 2.0, "perplexity {ppl} with {vocab} tokens");

    // bench: speeds, and no MBU claim without a weight byte count.
    let v = ok_json(&attn(&["bench", "-m", run_s, "-p", "16", "-g", "8", "-r", "1", "--json"]));
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0 && v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);

    // chat needs a chat template, which a trained GPT does not have.
    let o = attn(&["chat", "-m", run_s]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no chat template"));

    // The GGUF `attn quantize` writes runs the same way.
    let gguf = run.join("gpt-q8.gguf");
    let o = attn(&["quantize", model_s, gguf.to_str().unwrap(), "--type", "q8_0"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let q = ok_json(&attn(&[&["generate", "To be", "-m", gguf.to_str().unwrap()][..], &greedy[..]].concat()));
    assert_eq!(q["completion_ids"].as_array().unwrap().len(), 12, "{q}");

    // serve: the completions endpoint gives the greedy text of `generate`.
    let mut server = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args(["serve", "-m", run_s, "--port", "0", "--kv-cache-memory", "16MiB", "--threads", "1"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let start = Instant::now();
    let url = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = server.kill();
            panic!("attn serve exited before listening: {:?}", server.wait());
        };
        if let Some(at) = line.find("http://") {
            break line[at..].split_whitespace().next().unwrap().trim_end_matches('/').to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no address printed");
    };
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let (status, body) = post(
        &format!("{url}/v1/completions"),
        &serde_json::json!({"model": "run", "prompt": "To be", "max_tokens": 12, "temperature": 0}),
    );
    let (chat_status, chat) = post(
        &format!("{url}/v1/chat/completions"),
        &serde_json::json!({"model": "run", "messages": [{"role": "user", "content": "hi"}]}),
    );
    let _ = server.kill();
    let _ = server.wait();
    let log = log.join().unwrap().join("\n");
    assert_eq!(status, 200, "{body}\n{log}");
    assert_eq!(body["choices"][0]["text"], a["text"], "{body}");
    assert_eq!(chat_status, 400, "{chat}");
    assert!(chat["error"]["message"].as_str().unwrap().contains("no chat template"), "{chat}");
    let _ = std::fs::remove_dir_all(run.parent().unwrap());
}
