//! `attn serve` on the real models, with an API key, driven by the official
//! `openai` Python client (scripts/ci/openai_client.py), then stopped with
//! SIGTERM.
//!
//! The client lives in a virtualenv that .ci/run creates and names in
//! ATTN_TEST_PYTHON. Without that variable the test says so and does
//! nothing else: the rest of the suite needs no Python.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The server requires this key; the client sends it.
const KEY: &str = "ci-test-key";

#[test]
fn the_official_openai_client_works_against_attn_serve() {
    let Ok(python) = std::env::var("ATTN_TEST_PYTHON") else {
        eprintln!("skipped: set ATTN_TEST_PYTHON to a Python with the `openai` package (.ci/run does)");
        return;
    };
    let mut server = Command::new(env!("CARGO_BIN_EXE_attn"))
        .args([
            "serve",
            "-m",
            "gemma3-270m",
            "-m",
            "all-minilm-l6-v2",
            "-m",
            "qwen2.5-coder-0.5b-instruct",
            "--port",
            "0",
            "--kv-cache-memory",
            "256MiB",
        ])
        .env("ATTN_API_KEY", KEY)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start attn serve");
    // The server prints the address it bound.
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let start = Instant::now();
    let url = loop {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            _ => {
                let _ = server.kill();
                panic!("attn serve exited before listening: {:?}", server.wait());
            }
        };
        if let Some(at) = line.find("http://") {
            break line[at..].split_whitespace().next().unwrap().to_string();
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no address printed");
    };
    // Keep draining stderr so the server never blocks on it.
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/ci/openai_client.py");
    let out = Command::new(&python)
        .args([script, &url, "gemma3-270m", "all-minilm-l6-v2", "qwen2.5-coder-0.5b-instruct"])
        .env("ATTN_API_KEY", KEY)
        .output()
        .expect("run the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    // SIGTERM: the server drains and exits cleanly.
    let term = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(term.success());
    let status = server.wait().unwrap();
    let log = log.join().unwrap().join("\n");
    assert!(out.status.success(), "openai client checks failed:\n{stdout}\n{stderr}\nserver log:\n{log}");
    assert!(stdout.contains("all openai client checks passed"), "{stdout}");
    assert!(status.success(), "attn serve exited with {status} after SIGTERM:\n{log}");
    assert!(log.contains("shutting down"), "{log}");
}
