//! `attn serve` (OpenAI-compatible HTTP server) and `attn bench-serve`
//! (the load generator that drives it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use attn_engine::{EngineConfig, SchedulerConfig};
use attn_models::load::AnyModel;
use attn_models::PagedLanguageModel;
use attn_nn::KvPool;
use attn_serve::api::Caps;
use attn_serve::metrics::Metrics;
use attn_serve::worker::{EmbedWorker, GenWorker};
use attn_serve::{AppState, EmbedModel, GenModel, HttpOptions, ServerLimits};

use crate::bench_serve::{self, BenchServeArgs};
use crate::common::{open_model_parallel, open_model_with, set_threads, DEFAULT_GENERATOR};
use attn_models::decoder::Parallel;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Models to serve: known names, .gguf files or model folders; repeat the
    /// flag for several (a text-generation model and an embedding model).
    /// Requests pick one by its name as given here.
    #[arg(short, long = "model", default_value = DEFAULT_GENERATOR)]
    pub models: Vec<String>,
    /// Address to listen on (0.0.0.0 for every interface)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the address is printed)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Memory for the paged KV cache of each generation model, like 2GiB or
    /// 512MB (default: a fifth of the memory available now, at most 4GiB)
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// Positions per KV cache block
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Sequences in the running batch at once
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Tokens per batched forward step (decodes count one each; long prompts
    /// are prefilled in chunks of what is left)
    #[arg(long, default_value_t = 512)]
    pub max_batched_tokens: usize,
    /// Requests that may wait for the batch beyond --max-num-seqs; more get 429
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// The largest max_tokens a request may ask for
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_cap: usize,
    /// The largest request body, in bytes
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Embeddings requests per embedding model that may be queued or
    /// running; more get 429
    #[arg(long, default_value_t = 64)]
    pub max_embedding_queue: usize,
    /// Seconds that in-flight requests get to finish after SIGTERM / Ctrl-C;
    /// then they end with an error (streams get an error event, a
    /// finish_reason and [DONE])
    #[arg(long, default_value_t = 30)]
    pub drain_timeout_s: u64,
    /// Require `Authorization: Bearer KEY` on /v1/* (/health and /metrics
    /// stay open). Default: the ATTN_API_KEY environment variable, if set
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Origins that browsers may call the API from (CORS), comma-separated
    /// or repeated; `*` allows any. Default: none (CORS off)
    #[arg(long, value_delimiter = ',', value_name = "ORIGIN")]
    pub allowed_origins: Vec<String>,
    /// Open connections at once; a connection beyond it is closed at once
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a connection gets to send a complete request head, counted
    /// from when the server waits for one: closes slow clients and idle
    /// keep-alive connections
    #[arg(long, default_value_t = 30)]
    pub header_timeout_s: u64,
    /// Seconds to wait for the next piece of a request body (read timeout);
    /// then 408
    #[arg(long, default_value_t = 30)]
    pub read_timeout_s: u64,
    /// Worker threads for the tensor kernels
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute with candle's quantized kernels (the reference path, as
    /// ATTN_KERNELS=candle) instead of attn's fused path, whose 8-bit batched
    /// kernel reads each weight once per step for all sequences
    #[arg(long)]
    pub no_batched_kernels: bool,
    /// Under mpirun/srun: split the generation model over the MPI ranks by
    /// rows of every matrix; rank 0 serves HTTP and schedules, every rank
    /// computes its part of each step
    #[arg(long, conflicts_with = "pipeline_parallel")]
    pub tensor_parallel: bool,
    /// Under mpirun/srun: split the generation model's layers into one stage
    /// per MPI rank; rank 0 serves HTTP and schedules
    #[arg(long)]
    pub pipeline_parallel: bool,
}

impl ServeArgs {
    fn parallel(&self, comm: &attn_dist::Comm) -> Parallel {
        if self.tensor_parallel {
            Parallel::Tensor(comm.clone())
        } else if self.pipeline_parallel {
            Parallel::Pipeline(comm.clone())
        } else {
            Parallel::None
        }
    }
}

/// Parses sizes like `512MB`, `2GiB`, `1.5G`, `1000000`.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("`{s}` is not a size like 512MB or 2GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => anyhow::bail!("unknown size unit `{other}` in `{s}` (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = n * mult as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        anyhow::bail!("`{s}` is not a positive size");
    }
    Ok(bytes as u64)
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn kv_bytes(args: &ServeArgs) -> anyhow::Result<u64> {
    match &args.kv_cache_memory {
        Some(s) => parse_size(s),
        None => Ok((mem_available().unwrap_or(4 << 30) / 5).clamp(64 << 20, 4 << 30)),
    }
}

fn engine_config<M: PagedLanguageModel>(model: &M, args: &ServeArgs, bytes: u64) -> anyhow::Result<EngineConfig> {
    if args.block_size == 0 {
        anyhow::bail!("--block-size must be at least 1");
    }
    let shape = model.kv_shape();
    let num_blocks = KvPool::blocks_for_bytes(shape, args.block_size, bytes);
    if num_blocks == 0 {
        anyhow::bail!(
            "--kv-cache-memory {bytes} bytes holds no block of {} positions ({} bytes each)",
            args.block_size,
            shape.bytes_per_token() * args.block_size
        );
    }
    Ok(EngineConfig {
        block_size: args.block_size,
        num_blocks,
        scheduler: SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_batched_tokens: args.max_batched_tokens,
            ..SchedulerConfig::default()
        },
    })
}

/// The name clients use: a known model's name, else the file or folder name.
pub fn served_name(arg: &str) -> String {
    if attn_models::registry::known(arg).is_some() {
        return arg.to_string();
    }
    let p = Path::new(arg);
    p.file_stem().map_or_else(|| arg.to_string(), |s| s.to_string_lossy().into_owned())
}

/// Loads the models and starts their worker threads; with a model split
/// over ranks (this is rank 0), its engine announces each step to them.
pub fn build_state(args: &ServeArgs, comm: &attn_dist::Comm) -> anyhow::Result<Arc<AppState>> {
    let split = args.tensor_parallel || args.pipeline_parallel;
    let metrics = Arc::new(Metrics::default());
    let mut generators = Vec::new();
    let mut encoders = Vec::new();
    for arg in &args.models {
        let name = served_name(arg);
        if generators.iter().any(|g: &GenModel| g.name == name) || encoders.iter().any(|e: &EmbedModel| e.name == name)
        {
            anyhow::bail!("model `{name}` is given twice");
        }
        let model = if split {
            open_model_parallel(arg, args.parallel(comm), &**comm)?
        } else {
            open_model_with(arg, args.no_batched_kernels || attn_models::load::candle_kernels_requested()?)?
        };
        match model {
            AnyModel::Generator(g) if split => {
                let g = *g;
                let bytes = kv_bytes(args)?;
                let cfg = engine_config(&g.model, args, bytes)?;
                let tokenizer = Arc::new(g.tokenizer);
                eprintln!(
                    "{name}: split over {} ranks; this rank's KV cache {} blocks x {} positions",
                    comm.size(),
                    cfg.num_blocks,
                    cfg.block_size
                );
                let model = attn_serve::dist::Leader::new(g.model, comm.clone(), cfg.block_size, cfg.num_blocks);
                let worker = GenWorker::spawn(name.clone(), model, tokenizer.clone(), cfg, metrics.clone())?;
                generators.push(GenModel { name, worker, tokenizer, chat_template: g.chat_template });
            }
            AnyModel::Generator(g) => {
                let g = *g;
                let bytes = kv_bytes(args)?;
                let cfg = engine_config(&g.model, args, bytes)?;
                let tokenizer = Arc::new(g.tokenizer);
                eprintln!(
                    "{name}: KV cache {} blocks x {} positions ({:.0} MiB, {} tokens)",
                    cfg.num_blocks,
                    cfg.block_size,
                    bytes as f64 / (1 << 20) as f64,
                    cfg.num_blocks * cfg.block_size
                );
                let worker = GenWorker::spawn(name.clone(), g.model, tokenizer.clone(), cfg, metrics.clone())?;
                generators.push(GenModel { name, worker, tokenizer, chat_template: g.chat_template });
            }
            AnyModel::Encoder(e) => {
                // bf16 AMX tiles where the CPU has them (ATTN_AMX=0: float32).
                let e = e.into_bf16()?;
                let worker = EmbedWorker::spawn(name.clone(), e, metrics.clone())?;
                encoders.push(EmbedModel { name, worker });
            }
            other => anyhow::bail!(
                "`{arg}` is a {} model; `attn serve` serves text-generation and embedding models",
                other.kind()
            ),
        }
    }
    let limits = ServerLimits {
        caps: Caps { max_tokens: args.max_tokens_cap, ..Caps::default() },
        max_queue: args.max_queue,
        max_body_bytes: args.max_body_bytes,
        max_embedding_queue: args.max_embedding_queue,
        ..ServerLimits::default()
    };
    Ok(Arc::new(AppState::new(generators, encoders, metrics, limits).with_http(http_options(args)?)))
}

/// The HTTP options from the flags (and ATTN_API_KEY).
pub fn http_options(args: &ServeArgs) -> anyhow::Result<HttpOptions> {
    let api_key = match &args.api_key {
        Some(k) => Some(k.clone()),
        None => std::env::var("ATTN_API_KEY").ok(),
    };
    if api_key.as_deref().is_some_and(|k| k.trim().is_empty() || k.trim() != k) {
        anyhow::bail!("the API key (--api-key or ATTN_API_KEY) must be non-empty, without surrounding spaces");
    }
    if args.max_connections == 0 {
        anyhow::bail!("--max-connections must be at least 1");
    }
    if args.header_timeout_s == 0 || args.read_timeout_s == 0 {
        anyhow::bail!("--header-timeout-s and --read-timeout-s must be at least 1");
    }
    for o in &args.allowed_origins {
        if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
            anyhow::bail!("--allowed-origins: `{o}` is not an origin like https://example.com (or *)");
        }
    }
    Ok(HttpOptions {
        api_key,
        allowed_origins: args.allowed_origins.clone(),
        max_connections: args.max_connections,
        header_timeout: Duration::from_secs(args.header_timeout_s),
        body_timeout: Duration::from_secs(args.read_timeout_s),
        ..HttpOptions::default()
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    eprintln!("shutting down: finishing in-flight requests, refusing new ones");
}

pub fn run(args: &ServeArgs, world: &attn_dist::World) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let split = args.tensor_parallel || args.pipeline_parallel;
    if split && args.models.len() != 1 {
        anyhow::bail!("a model split over ranks is served alone: give one -m/--model");
    }
    if split && world.size() == 1 {
        eprintln!("note: one rank (not started by mpirun/srun): the whole model runs in this process");
    }
    if world.rank() != 0 {
        // A worker rank: its part of the model follows rank 0's steps.
        let model = match open_model_parallel(&args.models[0], args.parallel(&world.comm), &*world.comm)? {
            AnyModel::Generator(g) => g.model,
            other => {
                anyhow::bail!("`{}` is a {} model; a split model must generate text", args.models[0], other.kind())
            }
        };
        // mpirun forwards SIGTERM/SIGINT to every rank: rank 0 drains its
        // requests (which need this rank) and then stops the others.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: setting the disposition of two signals to "ignore".
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            libc::signal(libc::SIGINT, libc::SIG_IGN);
        }
        attn_serve::dist::follow(&model, &*world.comm)?;
        return Ok(());
    }
    if args.max_num_seqs == 0 || args.max_batched_tokens < args.max_num_seqs {
        anyhow::bail!("--max-batched-tokens must be at least --max-num-seqs, and both at least 1");
    }
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("`{}:{}` is not a host:port to listen on", args.host, args.port))?;
    kv_bytes(args)?;
    let http = http_options(args)?;
    if let Some(w) = attn_serve::exposure_warning(addr.ip(), &http) {
        eprintln!("\n{w}\n");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // Bind first: a busy port fails at once, before the models load.
    let listener =
        rt.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| format!("cannot listen on {addr}"))?;
    let state = build_state(args, &world.comm)?;
    rt.block_on(async {
        let names: Vec<String> =
            attn_serve::model_names(&state).into_iter().map(|(n, k)| format!("{n} ({k})")).collect();
        let bound = listener.local_addr()?;
        eprintln!("serving {} on http://{bound} (OpenAI API under /v1; /health, /metrics)", names.join(", "));
        attn_serve::serve(state.clone(), listener, shutdown_signal(), Duration::from_secs(args.drain_timeout_s))
            .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchServeCmd {
    #[command(flatten)]
    pub bench: BenchServeArgs,
    /// Without --url: the server to start in-process, its KV cache memory
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
    /// Without --url: worker threads of the in-process server
    #[arg(long)]
    pub threads: Option<usize>,
    /// Instead of the load levels: time to first token of a long prompt,
    /// then of another prompt sharing its first N words (prefix caching)
    #[arg(long, value_name = "N")]
    pub prefix_words: Option<usize>,
    /// Without --url: the in-process server keeps candle's kernels
    #[arg(long)]
    pub no_batched_kernels: bool,
}

/// Time of a one-token completion (its time to first token), in seconds.
fn one_token(url: &str, model: &str, prompt: &str) -> anyhow::Result<f64> {
    let body = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0});
    let start = std::time::Instant::now();
    let mut request = ureq::post(&format!("{url}/v1/completions")).set("content-type", "application/json");
    if let Ok(key) = std::env::var("ATTN_API_KEY") {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let r = request.send_string(&body.to_string());
    let secs = start.elapsed().as_secs_f64();
    match r {
        Ok(resp) => {
            let _ = resp.into_string()?;
            Ok(secs)
        }
        Err(e) => anyhow::bail!("request failed: {e}"),
    }
}

fn metric(url: &str, name: &str) -> anyhow::Result<f64> {
    let text = ureq::get(&format!("{url}/metrics")).call()?.into_string()?;
    text.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("metric {name} missing"))
}

/// Prefix caching, measured: a long prompt, then others sharing its first
/// `words` words with a different ending.
fn prefix_check(url: &str, model: &str, words: usize) -> anyhow::Result<()> {
    let vocab = ["river", "stone", "light", "garden", "window", "morning", "silver", "quiet", "harbor", "letter"];
    let prefix: Vec<&str> = (0..words).map(|i| vocab[(i * 7 + i / 3) % vocab.len()]).collect();
    let prefix = prefix.join(" ");
    let cold = one_token(url, model, &format!("{prefix} Question one: what comes next?"))?;
    let hits0 = metric(url, "attn_prefix_cache_hits_total")?;
    let mut warm = Vec::new();
    for q in ["two", "three", "four"] {
        warm.push(one_token(url, model, &format!("{prefix} Question {q}: what comes next?"))?);
    }
    let hits = metric(url, "attn_prefix_cache_hits_total")? - hits0;
    let unrelated =
        one_token(url, model, &format!("{} Question five: what comes next?", prefix.replace("river", "lake")))?;
    warm.sort_by(f64::total_cmp);
    let w = warm[warm.len() / 2];
    println!("| prompt | time to first token |");
    println!("|---|---|");
    println!("| {words}-word prefix, first time (cold) | {:.0} ms |", cold * 1e3);
    println!("| same prefix, new question (median of 3) | {:.0} ms ({:.1}x faster) |", w * 1e3, cold / w);
    println!("| prefix changed in its first word (no hit) | {:.0} ms |", unrelated * 1e3);
    println!("\nprefix-cache hits over the three warm requests: {hits:.0} tokens");
    Ok(())
}

/// Drives `--url`, or starts a server on a free loopback port and drives it.
pub fn bench(cmd: &BenchServeCmd) -> anyhow::Result<()> {
    // Requests name the model as the server does: by file stem for a path
    // (a server started here, or one at --url serving the same file).
    let mut bench = cmd.bench.clone();
    if cmd.bench.url.is_none() || Path::new(&cmd.bench.model).exists() {
        bench.model = served_name(&cmd.bench.model);
    }
    let drive = |url: &str| -> anyhow::Result<Vec<bench_serve::LevelReport>> {
        match cmd.prefix_words {
            Some(w) => prefix_check(url, &bench.model, w).map(|_| Vec::new()),
            None => bench_serve::run_against(url, &bench),
        }
    };
    let reports = match &cmd.bench.url {
        Some(url) => drive(url)?,
        None => {
            let args = ServeArgs {
                models: vec![cmd.bench.model.clone()],
                host: "127.0.0.1".into(),
                port: 0,
                kv_cache_memory: cmd.kv_cache_memory.clone(),
                block_size: 16,
                max_num_seqs: 64,
                max_batched_tokens: 512,
                max_queue: 1024,
                max_tokens_cap: 4096,
                max_body_bytes: 4 << 20,
                max_embedding_queue: 1024,
                drain_timeout_s: 5,
                api_key: None,
                allowed_origins: Vec::new(),
                max_connections: 4096,
                header_timeout_s: 30,
                read_timeout_s: 30,
                threads: cmd.threads,
                no_batched_kernels: cmd.no_batched_kernels,
                tensor_parallel: false,
                pipeline_parallel: false,
            };
            set_threads(args.threads)?;
            let state = build_state(&args, &attn_dist::single())?;
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            let url = format!("http://{}", listener.local_addr()?);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = rt.spawn(attn_serve::serve(
                state,
                listener,
                async move {
                    let _ = stop_rx.await;
                },
                Duration::from_secs(5),
            ));
            eprintln!("started {} on {url}", cmd.bench.model);
            let r = drive(&url);
            let _ = stop_tx.send(());
            let _ = rt.block_on(server);
            r?
        }
    };
    if cmd.prefix_words.is_some() {
        return Ok(());
    }
    bench_serve::print_table(&reports, cmd.bench.json);
    let bad: usize = reports.iter().map(|r| r.failed + r.lost + r.duplicated).sum();
    if bad > 0 {
        anyhow::bail!("{bad} requests failed, were lost or were duplicated (see the table)");
    }
    Ok(())
}
