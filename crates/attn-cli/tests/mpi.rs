//! attn as MPI ranks, started by `mpirun -np 2` (build with `--features mpi`;
//! CI installs OpenMPI and runs these).
//!
//! Data-parallel training: 2 ranks with half of every micro-batch each give
//! bit-identical weights to 1 process computing the same two halves in turn
//! (`train.shards = 2`), and match 1 process with the whole batches within
//! float tolerance; a rank killed mid-run ends the job with an error, and
//! the run resumes from its last checkpoint to the same end as an
//! uninterrupted one.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use attn_test_support::{fixture_path, tempdir, workspace_root};

/// The CI-sized character GPT, with `[train]` keys replaced or added.
fn config(dir: &Path, name: &str, train: &[(&str, &str)], dropout: &str) -> PathBuf {
    let text = std::fs::read_to_string(workspace_root().join("configs/ci/shakespeare-tiny.toml")).unwrap();
    let data = std::fs::canonicalize(fixture_path("corpora/shakespeare")).unwrap();
    let mut out = Vec::new();
    for l in text.lines() {
        let key = l.split('=').next().unwrap_or("").trim();
        if let Some((k, v)) = train.iter().find(|(k, _)| *k == key) {
            out.push(format!("{k} = {v}"));
            continue;
        }
        out.push(match key {
            "path" => format!("path = \"{}\"", data.display()),
            "dropout" => format!("dropout = {dropout}"),
            _ => l.to_string(),
        });
    }
    let mut text = out.join("\n");
    let extra: String = train
        .iter()
        .filter(|(k, _)| !text.lines().any(|l| l.split('=').next().unwrap_or("").trim() == *k))
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
    text = text.replacen("[train]\n", &format!("[train]\n{extra}"), 1);
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn attn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attn"))
}

/// `mpirun -np 2 attn ARGS`, one thread per rank.
fn mpirun(args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        // No ptrace-based single copy between ranks (refused in containers).
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .arg(env!("CARGO_BIN_EXE_attn"))
        .args(args);
    c
}

fn ok(mut c: Command) -> Output {
    let out = c.output().expect("mpirun (OpenMPI's openmpi-bin) must be installed for the mpi feature's tests");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        c,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn weights(run: &Path, step: usize) -> Vec<u8> {
    std::fs::read(run.join(format!("checkpoints/step-{step:08}/model.safetensors"))).unwrap()
}

fn tensors(bytes: &[u8]) -> Vec<(String, Vec<f32>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn two_ranks_train_the_same_bits_as_one_process_with_two_shards() {
    let dir = tempdir("mpi-dp");
    // Dropout on: each shard's masks are drawn from its own stream, the same
    // in both runs.
    let steps = [("max_steps", "12"), ("checkpoint_every", "6"), ("eval_every", "6")];
    let two = config(&dir, "two", &steps, "0.1");
    let mut sharded = steps.to_vec();
    sharded.push(("shards", "2"));
    let one = config(&dir, "one", &sharded, "0.1");
    let mpi_run = dir.join("mpi");
    let out = ok(mpirun(&["train", two.to_str().unwrap(), "-o", mpi_run.to_str().unwrap(), "--json"]));
    // Rank 0 alone reports.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with('{')).count(), 1, "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("data-parallel over 2 ranks"));
    // Two threads here, one per rank there: the thread count changes no bit.
    let one_run = dir.join("one-run");
    ok({
        let mut c = attn();
        c.args(["train", one.to_str().unwrap(), "-o", one_run.to_str().unwrap(), "-t", "2"]);
        c
    });
    for step in [6, 12] {
        assert!(weights(&mpi_run, step) == weights(&one_run, step), "weights differ at step {step}");
    }
    // The optimizer state too, and the metrics rank 0 logged.
    let moments = |r: &Path| std::fs::read(r.join("checkpoints/step-00000012/optimizer.safetensors")).unwrap();
    assert!(moments(&mpi_run) == moments(&one_run));
    let losses = |r: &Path| attn_train::metrics::train_losses(&r.join("metrics.jsonl")).unwrap();
    assert_eq!(losses(&mpi_run), losses(&one_run));
    assert_eq!(losses(&mpi_run).len(), 12);
}

#[test]
fn two_ranks_match_one_process_with_the_whole_batches() {
    let dir = tempdir("mpi-dp-full");
    // Without dropout the shards compute exactly the whole batch's
    // gradients, summed in another order.
    let cfg = config(&dir, "nodrop", &[("max_steps", "20"), ("checkpoint_every", "20"), ("eval_every", "20")], "0.0");
    let (mpi_run, whole) = (dir.join("mpi"), dir.join("whole"));
    ok(mpirun(&["train", cfg.to_str().unwrap(), "-o", mpi_run.to_str().unwrap()]));
    ok({
        let mut c = attn();
        c.args(["train", cfg.to_str().unwrap(), "-o", whole.to_str().unwrap(), "-t", "1"]);
        c
    });
    let (a, b) = (tensors(&weights(&mpi_run, 20)), tensors(&weights(&whole, 20)));
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs() / (1e-3 + y.abs()));
        }
    }
    assert!(worst < 1e-3, "largest relative difference after 20 steps: {worst}");
    assert!(worst > 0.0 || a == b);
}

/// The pids of the ranks mpirun started, by rank.
fn rank_pid(mpirun_pid: u32, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // ppid is the second field after the parenthesised command name.
        let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        if ppid != Some(mpirun_pid) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_from_its_last_checkpoint() {
    let dir = tempdir("mpi-kill");
    let steps = [("max_steps", "600"), ("checkpoint_every", "20"), ("eval_every", "200"), ("keep_checkpoints", "40")];
    let cfg = config(&dir, "long", &steps, "0.1");
    let (full, killed) = (dir.join("full"), dir.join("killed"));
    ok(mpirun(&["train", cfg.to_str().unwrap(), "-o", full.to_str().unwrap()]));

    let job = mpirun(&["train", cfg.to_str().unwrap(), "-o", killed.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !killed.join("checkpoints/step-00000040").exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint after 2 minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = rank_pid(job.id(), 1).expect("rank 1's process");
    // SAFETY: kill(2) on a pid this test's child started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let out = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job went on without rank 1");
    assert!(err.contains("rank 1") && err.contains("signal 9"), "mpirun's report: {err}");
    let ckpts: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    let last = ckpts.iter().max().unwrap().clone();
    assert!(last.as_str() < "step-00000600", "the kill came too late to test anything: {last}");

    ok(mpirun(&["train", "--resume", killed.to_str().unwrap()]));
    assert!(weights(&killed, 600) == weights(&full, 600), "resumed run ended elsewhere (killed after {last})");
    let losses = |r: &Path| attn_train::metrics::train_losses(&r.join("metrics.jsonl")).unwrap();
    assert_eq!(losses(&killed), losses(&full));
}

#[test]
fn a_config_error_ends_every_rank_with_one_clear_message() {
    let dir = tempdir("mpi-bad");
    let cfg = config(&dir, "bad", &[("max_steps", "4"), ("shards", "3")], "0.0");
    let out = mpirun(&["train", cfg.to_str().unwrap(), "-o", dir.join("run").to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.shards") && err.contains("not 2"), "{err}");
}

#[test]
fn commands_that_do_not_split_their_work_refuse_to_run_as_ranks() {
    let out = mpirun(&["tokenize", "-m", "/nonexistent.gguf", "hi"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not run as several MPI ranks"), "{err}");
}

fn completion_ids(out: &Output) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    v["completion_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// `mpirun -np 2 attn generate --tensor-parallel` and `--pipeline-parallel`
/// give one process's greedy tokens (the decoders' split logits are one
/// process's bits: crates/attn-models/tests/{tensor,pipeline}_parallel.rs).
#[test]
fn split_models_generate_the_tokens_of_one_process() {
    let model = attn_test_support::real_model("smollm2-135m-instruct");
    let model = model.to_str().unwrap();
    let prompt = "The three laws of motion are";
    let args = ["generate", "-m", model, "-n", "24", "--temperature", "0", "--json", prompt];
    let one = ok({
        let mut c = attn();
        c.args(args).args(["-t", "1"]);
        c
    });
    let want = completion_ids(&one);
    assert_eq!(want.len(), 24);
    for flag in ["--tensor-parallel", "--pipeline-parallel"] {
        let mut a = args.to_vec();
        a.push(flag);
        let out = ok(mpirun(&a));
        assert_eq!(completion_ids(&out), want, "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        if flag == "--pipeline-parallel" {
            assert!(err.contains("stage 1 (layers 16..30)") && err.contains("bubble"), "{err}");
        }
    }
    // The seed is rank 0's: sampled text is the same on every rank.
    let sampled = ["generate", "-m", model, "-n", "16", "--seed", "7", "--json", "--tensor-parallel", prompt];
    let a = completion_ids(&ok(mpirun(&sampled)));
    let b = completion_ids(&ok({
        let mut c = attn();
        c.args(&sampled[..sampled.len() - 2]).arg(prompt).args(["-t", "1"]);
        c
    }));
    assert_eq!(a, b);
}

/// A job that is killed if the test fails before it ends (a server's
/// ranks would otherwise outlive the test).
struct Job(std::process::Child);

impl Drop for Job {
    fn drop(&mut self) {
        // SIGTERM to mpirun ends every rank (SIGKILL would leave them).
        // SAFETY: kill(2) on this test's own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while let Ok(None) = self.0.try_wait() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.0.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.wait();
    }
}

/// `mpirun -np 2 attn serve --tensor-parallel` (and `--pipeline-parallel`):
/// rank 0 serves HTTP and schedules, rank 1 computes its part of each step;
/// concurrent requests (one continuous batch) get one process's greedy
/// text, and SIGTERM to rank 0 drains it and stops every rank cleanly.
#[test]
fn a_split_model_serves_concurrent_requests_and_stops_cleanly() {
    use std::io::{BufRead, BufReader};
    let model = attn_test_support::real_model("smollm2-135m-instruct");
    let model = model.to_str().unwrap();
    let prompt = "The three laws of motion are";
    let one = ok({
        let mut c = attn();
        c.args(["generate", "-m", model, "-n", "20", "--temperature", "0", "--json", prompt, "-t", "1"]);
        c
    });
    let want: serde_json::Value = serde_json::from_slice(&one.stdout).unwrap();
    let want = want["text"].as_str().unwrap().to_string();
    for flag in ["--tensor-parallel", "--pipeline-parallel"] {
        // By its registry name (the cached file), the name requests use.
        let mut job =
            Job(mpirun(&["serve", flag, "-m", "smollm2-135m-instruct", "--port", "0", "--kv-cache-memory", "64MiB"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap());
        let job = &mut job.0;
        let mut err = BufReader::new(job.stderr.take().unwrap());
        let mut url = None;
        let mut line = String::new();
        while err.read_line(&mut line).unwrap() > 0 {
            if let Some(at) = line.find("http://") {
                url = line[at + 7..].split_whitespace().next().map(|s| s.to_string());
                break;
            }
            line.clear();
        }
        let host = url.expect("the server's address");
        let body = format!(
            r#"{{"model":"smollm2-135m-instruct","prompt":{},"max_tokens":20,"temperature":0}}"#,
            serde_json::to_string(prompt).unwrap()
        );
        let texts: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|_| {
                    let (host, body) = (host.clone(), body.clone());
                    s.spawn(move || {
                        use std::io::{Read, Write};
                        let mut c = std::net::TcpStream::connect(&host).unwrap();
                        write!(
                            c,
                            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .unwrap();
                        let mut resp = String::new();
                        c.read_to_string(&mut resp).unwrap();
                        let json = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
                        let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {resp}"));
                        v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{resp}")).to_string()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for t in &texts {
            assert_eq!(t, &want, "{flag}");
        }
        let pid = rank_pid(job.id(), 0).expect("rank 0's process");
        // SAFETY: kill(2) on a pid this test's child started.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = job.try_wait().unwrap() {
                break s;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "the job did not stop");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{flag}: {status:?}");
    }
}
