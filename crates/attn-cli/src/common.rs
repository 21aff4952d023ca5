//! What several commands share: finding and loading `-m/--model`, thread
//! settings, sampling flags.

use attn_engine::SamplingParams;
use attn_models::load::{load_model, AnyModel, Generator};
use attn_models::registry::resolve_model;
use candle_core::Device;

pub const DEFAULT_GENERATOR: &str = "gemma3-270m";
/// `attn chat` needs an instruction-tuned model (Gemma 3 270M is a base model).
pub const DEFAULT_CHAT: &str = "qwen2.5-coder-0.5b-instruct";
pub const DEFAULT_ENCODER: &str = "all-minilm-l6-v2";

/// Sets the worker-thread count of the tensor kernels before any pool
/// starts: `--threads`, else the CPUs this process may run on.
///
/// Both pools are set explicitly: candle's own guess for its quantized-matmul
/// pool can exceed the CPUs actually available (measured on a 2-vCPU
/// machine: 0.9 decode tok/s by default, 25 tok/s with 2 threads), and its
/// workers spin at barriers, so oversubscription is ruinous.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    let t = match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(t) => t,
        None => default_threads(),
    };
    // Read by rayon (float matmul) and candle's barrier pool when they start.
    std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    Ok(())
}

/// [`set_threads`] for training: rayon gets the threads and candle's
/// barrier pool none besides the caller's.
///
/// In training, candle's pool runs only the elementwise ops that are left
/// (residual adds, gradient sums); the matmuls and the fused ops run on
/// rayon. Each job the pool finishes leaves its workers spinning for a
/// while, on the cores rayon's workers need: on 2 cores the de-en
/// Transformer trained at 2,509-2,701 tok/s with a 2-thread candle pool
/// and 2,892-2,926 tok/s with a 1-thread one (`attn bench --train
/// configs/de-en-transformer.toml --rows 32 --seq 24 -t 2`, alternating).
pub fn set_training_threads(threads: Option<usize>) -> anyhow::Result<()> {
    set_threads(threads)?;
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    Ok(())
}

pub fn threads_in_use() -> usize {
    std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or_else(default_threads)
}

static DEFAULT_THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// The thread count when `--threads` is absent: the CPUs this process may
/// run on, divided among the MPI ranks of its node when they share them
/// ([`attn_dist::World::default_threads`]).
pub fn set_default_threads(n: usize) {
    let _ = DEFAULT_THREADS.set(n.max(1));
}

fn default_threads() -> usize {
    DEFAULT_THREADS.get().copied().unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// [`open_model`], this rank's part under `parallel`. Rank 0 resolves (and
/// pulls) the model first, so that ranks sharing a model cache do not
/// download it at once.
pub fn open_model_parallel(
    arg: &str,
    parallel: attn_models::decoder::Parallel,
    comm: &dyn attn_dist::Collective,
) -> anyhow::Result<AnyModel> {
    let resolve = || resolve_model(arg, comm.rank() == 0 && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let path = if comm.rank() == 0 {
        let p = resolve();
        comm.barrier();
        p?
    } else {
        comm.barrier();
        resolve()?
    };
    Ok(attn_models::load::load_model_parallel(
        &path,
        &Device::Cpu,
        attn_models::load::candle_kernels_requested()?,
        parallel,
    )?)
}

/// Resolves (pulling known names on first use) and loads a model.
pub fn open_model(arg: &str) -> anyhow::Result<AnyModel> {
    let path = resolve_model(arg, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
    Ok(load_model(&path, &Device::Cpu)?)
}

/// [`open_model`] on candle's kernels (the reference path) when asked.
pub fn open_model_with(arg: &str, candle_kernels: bool) -> anyhow::Result<AnyModel> {
    let path = resolve_model(arg, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
    Ok(attn_models::load::load_model_with(&path, &Device::Cpu, candle_kernels)?)
}

pub fn open_generator(arg: &str) -> anyhow::Result<Box<Generator>> {
    match open_model(arg)? {
        AnyModel::Generator(g) => Ok(g),
        other => anyhow::bail!("`{arg}` is a {} model; this command needs a text-generation model", other.kind()),
    }
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(clap::Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate
    #[arg(short = 'n', long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 means greedy decoding
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: off)
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P (1: off)
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off)
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalise tokens already in the prompt or output (1: off)
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// OpenAI-style presence penalty in [-2, 2]
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI-style frequency penalty in [-2, 2]
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Seed for reproducible sampling (random when absent)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this text (repeatable)
    #[arg(long = "stop")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> anyhow::Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
        };
        p.validate()?;
        Ok(p)
    }
}
