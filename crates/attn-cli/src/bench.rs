//! `attn bench`: prefill and decode speed, time to first token, peak memory.

use std::time::Instant;

use attn_engine::sampler::argmax;
use attn_models::{LanguageModel, Logits, PagedLanguageModel, SeqStep, Tokenizer};
use serde_json::json;

use crate::common::{open_generator, set_threads, set_training_threads, threads_in_use, DEFAULT_GENERATOR};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A known model name, a .gguf file, or a model trained by `attn train` (its run or model folder)
    #[arg(short, long, default_value = DEFAULT_GENERATOR)]
    model: String,
    /// Prompt length for the prefill test
    #[arg(short = 'p', long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens generated one by one for the decode test
    #[arg(short = 'g', long, default_value_t = 128)]
    gen_tokens: usize,
    /// Worker threads for the tensor kernels
    #[arg(short, long)]
    threads: Option<usize>,
    /// Context already in the cache before the decode test (llama-bench's
    /// `-d`): decode runs at positions depth..depth + gen-tokens
    #[arg(short = 'd', long, default_value_t = 0)]
    depth: usize,
    /// Runs of each test; the mean is reported
    #[arg(short, long, default_value_t = 3)]
    repetitions: usize,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
    /// Measure training steps of the model a training config describes
    /// (synthetic full batches) instead of generation
    #[arg(long, value_name = "CONFIG")]
    train: Option<std::path::PathBuf>,
    /// Training bench: sequences per batch
    #[arg(long, default_value_t = 32)]
    rows: usize,
    /// Training bench: tokens per sequence (translation: per side)
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// Training bench: timed steps (after 2 untimed ones)
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Training bench: override the config's precision (f32, bf16, f16)
    #[arg(long)]
    precision: Option<String>,
    /// Only measure this machine's memory read bandwidth (GB/s)
    #[arg(long)]
    memory_bandwidth: bool,
}

/// Read bandwidth of this machine in GB/s: the best of several passes of
/// every worker thread summing its share of a 256 MiB buffer (far larger
/// than the caches), as a decode step streams its weights. Each thread
/// reads its share as four streams in step (as the matmul kernels read
/// four weight panels at once): one sequential stream per thread leaves
/// the hardware prefetchers idle part of the time and measured less.
pub fn measure_read_bandwidth() -> f64 {
    use rayon::prelude::*;
    const BYTES: usize = 256 << 20;
    const STREAMS: usize = 4;
    let buf: Vec<f32> = vec![1.0; BYTES / 4];
    let mut best = 0f64;
    for _ in 0..8 {
        let t = Instant::now();
        let chunk = buf.len() / rayon::current_num_threads().max(1);
        let s: f32 = buf
            .par_chunks(chunk.max(1 << 16))
            .map(|c| {
                let part = c.len() / STREAMS / 16 * 16;
                let mut acc = [[0f32; 16]; STREAMS];
                for i in (0..part).step_by(16) {
                    for (k, a) in acc.iter_mut().enumerate() {
                        let w = &c[k * part + i..k * part + i + 16];
                        for j in 0..16 {
                            a[j] += w[j];
                        }
                    }
                }
                let tail: f32 = c[STREAMS * part..].iter().sum();
                acc.iter().flatten().sum::<f32>() + tail
            })
            .sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(BYTES as f64 / secs / 1e9);
    }
    best
}

fn run_train_bench(args: &BenchArgs, path: &std::path::Path) -> anyhow::Result<()> {
    let mut cfg = attn_train::TrainConfig::load(path)?;
    if let Some(p) = &args.precision {
        cfg.train.precision = match p.as_str() {
            "f32" => attn_train::config::Precision::F32,
            "bf16" => attn_train::config::Precision::Bf16,
            "f16" => attn_train::config::Precision::F16,
            other => anyhow::bail!("--precision must be f32, bf16 or f16, got `{other}`"),
        };
    }
    let r = attn_train::trainer::bench_training(&cfg, args.rows, args.seq, args.steps, 2)?;
    let rss = peak_rss_mb();
    if args.json {
        let mut v = serde_json::to_value(&r)?;
        v["peak_rss_mb"] = json!(rss);
        v["threads"] = json!(threads_in_use());
        v["rows"] = json!(args.rows);
        v["seq"] = json!(args.seq);
        println!("{v}");
    } else {
        println!(
            "{} parameters, {:?}: {:.1} ms/step, {:.0} tokens/s ({} tokens/step, {} threads), peak RSS {:.0} MiB",
            r.parameters,
            r.precision,
            r.step_ms,
            r.tokens_per_s,
            r.tokens_per_step,
            threads_in_use(),
            rss.unwrap_or(0.0)
        );
    }
    Ok(())
}

/// Peak resident memory of this process in MiB (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(cfg) = &args.train {
        set_training_threads(args.threads)?;
        return run_train_bench(args, cfg);
    }
    set_threads(args.threads)?;
    if args.memory_bandwidth {
        let bw = measure_read_bandwidth();
        if args.json {
            println!("{}", json!({ "read_bandwidth_gb_s": bw, "threads": threads_in_use() }));
        } else {
            println!("memory read bandwidth  {bw:.1} GB/s ({} threads)", threads_in_use());
        }
        return Ok(());
    }
    if args.prompt_tokens == 0 || args.gen_tokens == 0 || args.repetitions == 0 {
        anyhow::bail!("--prompt-tokens, --gen-tokens and --repetitions must be at least 1");
    }
    // The bandwidth for MBU is measured before the model loads, so that its
    // 256 MiB buffer does not count in the peak memory reported below.
    let bw = measure_read_bandwidth();
    let g = open_generator(&args.model)?;
    let m = &g.model;
    if args.prompt_tokens.max(args.depth) + args.gen_tokens > m.context_length() {
        anyhow::bail!(
            "{} + {} tokens exceed the context length {}",
            args.prompt_tokens.max(args.depth),
            args.gen_tokens,
            m.context_length()
        );
    }
    // A fixed pseudo-random prompt (as llama-bench uses), BOS first where
    // the vocabulary adds one. Ids stay clear of the special tokens at
    // either end of large vocabularies.
    let vocab = m.vocab_size() as u64;
    let (lo, span) = if vocab > 4000 { (1000, vocab - 2000) } else { (4.min(vocab - 1), vocab - 4.min(vocab - 1)) };
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut prompt: Vec<u32> = (0..args.prompt_tokens.max(args.depth).max(1))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (lo + state % span) as u32
        })
        .collect();
    if let Some(bos) = g.tokenizer.bos_id().filter(|_| g.tokenizer.adds_bos()) {
        prompt[0] = bos;
    }
    let (mut prefill_s, mut decode_s, mut ttft_s) = (0.0, 0.0, 0.0);
    // One untimed warm-up pass (thread pools, page faults of the weights).
    {
        let mut cache = m.new_cache()?;
        m.forward(&mut [SeqStep { tokens: &prompt[..prompt.len().min(16)], cache: &mut cache }], Logits::Last)?;
    }
    for _ in 0..args.repetitions {
        let mut cache = m.new_cache()?;
        let t0 = Instant::now();
        let logits =
            m.forward(&mut [SeqStep { tokens: &prompt[..args.prompt_tokens], cache: &mut cache }], Logits::Last)?;
        prefill_s += t0.elapsed().as_secs_f64();
        let mut next = argmax(&logits[0].to_vec1::<f32>()?)?;
        ttft_s += t0.elapsed().as_secs_f64();

        // The decode test starts after `depth` tokens of context (one at least).
        let mut cache = m.new_cache()?;
        for chunk in prompt[..args.depth.max(1)].chunks(512) {
            m.forward(&mut [SeqStep { tokens: chunk, cache: &mut cache }], Logits::Last)?;
        }
        let t1 = Instant::now();
        for _ in 0..args.gen_tokens {
            let logits = m.forward(&mut [SeqStep { tokens: &[next], cache: &mut cache }], Logits::Last)?;
            next = argmax(&logits[0].to_vec1::<f32>()?)?;
        }
        decode_s += t1.elapsed().as_secs_f64();
    }
    let r = args.repetitions as f64;
    let prefill = args.prompt_tokens as f64 * r / prefill_s;
    let decode = args.gen_tokens as f64 * r / decode_s;
    let ttft_ms = ttft_s / r * 1e3;
    let peak = peak_rss_mb();
    // Memory-bandwidth utilisation of decode (the seed's MBU): bytes read
    // per token (every weight once, plus the KV cache at the mean context
    // length of the decode test) times tokens/s over the measured bandwidth.
    let mbu = m.decode_weight_bytes().map(|w| {
        let kv_per_pos = m.kv_shape().bytes_per_token() as f64;
        let mean_ctx = args.depth.max(1) as f64 + args.gen_tokens as f64 / 2.0;
        let bytes = w as f64 + kv_per_pos * mean_ctx;
        (bytes, bw, bytes * decode / (bw * 1e9))
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": g.name, "threads": threads_in_use(), "prompt_tokens": args.prompt_tokens,
                "gen_tokens": args.gen_tokens, "depth": args.depth, "repetitions": args.repetitions,
                "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode,
                "ttft_ms": ttft_ms, "peak_rss_mb": peak,
                "decode_bytes_per_token": mbu.map(|m| m.0), "read_bandwidth_gb_s": mbu.map(|m| m.1),
                "mbu": mbu.map(|m| m.2),
            }))?
        );
    } else {
        println!("model        {} ({} threads)", g.name, threads_in_use());
        println!("prefill      {prefill:8.1} tok/s  ({} tokens)", args.prompt_tokens);
        println!(
            "decode       {decode:8.1} tok/s  ({} tokens after {} of context)",
            args.gen_tokens,
            args.depth.max(1)
        );
        println!("first token  {ttft_ms:8.1} ms");
        if let Some(p) = peak {
            println!("peak memory  {p:8.1} MiB");
        }
        if let Some((bytes, bw, mbu)) = mbu {
            println!(
                "decode MBU   {:8.1} %   ({:.1} MB read per token, {bw:.1} GB/s measured read bandwidth)",
                mbu * 100.0,
                bytes / 1e6
            );
        }
    }
    Ok(())
}
