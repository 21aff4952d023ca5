//! `attn generate` and `attn chat`.

use std::io::{BufRead, IsTerminal, Read, Write};

use attn_engine::speculative::{validate_draft_tokens, SpecStats};
use attn_engine::{
    beam_search, generate_constrained, generate_from_ids, generate_speculative, BeamParams, Constraint,
    ConstraintFactory, Drafter, Generation, GrammarSpec, ModelDrafter, NgramDrafter, SamplingParams,
};
use attn_models::chat::Message;
use attn_models::{LanguageModel, Tokenizer};
use serde_json::json;

use attn_models::decoder::Parallel;
use attn_models::load::{AnyModel, CausalModel, Seq2Seq};

use crate::common::{open_generator, open_model_parallel, set_threads, SamplingArgs, DEFAULT_CHAT, DEFAULT_GENERATOR};

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The prompt (read from standard input when absent)
    prompt: Option<String>,
    /// A known model name, a .gguf file, a model folder, or a model trained by `attn train` (its run or model folder, or its GGUF)
    #[arg(short, long, default_value = DEFAULT_GENERATOR)]
    model: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Beam search with this many beams instead of sampling (deterministic)
    #[arg(long)]
    beam_width: Option<usize>,
    /// Beam search length penalty alpha (score = logprob / length^alpha)
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    /// Beam search: stop as soon as enough hypotheses have finished
    #[arg(long)]
    early_stopping: bool,
    /// Beam search: how many of the best hypotheses to print
    #[arg(long, default_value_t = 1)]
    n_best: usize,
    /// Speculative decoding: `ngram` (proposals looked up in the prompt and output so far)
    /// or a draft model sharing the tokenizer (a known name, a .gguf file, a model trained by `attn train`). Greedy output
    /// equals plain decoding's exactly on the default fused kernels (each row of a
    /// verification call is computed as it would be alone); candle's kernels
    /// (ATTN_KERNELS=candle) round a many-row call differently and can flip a near-tie
    #[arg(long, value_name = "MODEL|ngram")]
    draft: Option<String>,
    /// Speculative decoding: tokens proposed per step, all verified in one forward call
    #[arg(long, default_value_t = 4, value_name = "K")]
    draft_k: usize,
    /// With ATTN_KERNELS=candle: convert the matrices to the batched 8-bit kernel, whose
    /// cost barely grows with the rows of a call (the default fused path already uses it)
    #[arg(long)]
    batched_kernel: bool,
    /// Worker threads for the tensor kernels
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print one JSON object (text, token ids, finish reason, speeds) instead of streaming
    #[arg(long)]
    json: bool,
    /// Structured output: the text is a JSON value valid under the JSON schema in FILE
    /// (decoding is constrained token by token; generation stops when the value is complete)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["json_object", "grammar"])]
    json_schema: Option<std::path::PathBuf>,
    /// Structured output: the text is a JSON object (any keys and values)
    #[arg(long, conflicts_with = "grammar")]
    json_object: bool,
    /// Structured output: the text follows the Lark grammar in FILE (llguidance's dialect)
    #[arg(long, value_name = "FILE")]
    grammar: Option<std::path::PathBuf>,
    /// Under mpirun/srun: split the model over the MPI ranks by rows of every
    /// matrix (heads, FFN units, width, vocabulary); each rank holds its part
    /// of the weights and of the KV cache, and the logits equal one process's
    #[arg(long, conflicts_with = "pipeline_parallel")]
    tensor_parallel: bool,
    /// Under mpirun/srun: split the model's layers into one contiguous stage
    /// per MPI rank, micro-batches flowing stage to stage; prints each stage's
    /// waiting share (the pipeline bubble)
    #[arg(long)]
    pipeline_parallel: bool,
}

impl GenerateArgs {
    /// Whether the model is split over the ranks.
    pub fn parallel(&self) -> bool {
        self.tensor_parallel || self.pipeline_parallel
    }

    /// The grammar the structured-output flags ask for.
    fn grammar_spec(&self) -> anyhow::Result<Option<GrammarSpec>> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
        };
        if let Some(path) = &self.json_schema {
            let text = read("--json-schema", path)?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("--json-schema {}: not valid JSON: {e}", path.display()))?;
            return Ok(Some(GrammarSpec::JsonSchema(schema)));
        }
        if let Some(path) = &self.grammar {
            return Ok(Some(GrammarSpec::Lark(read("--grammar", path)?)));
        }
        Ok(self.json_object.then_some(GrammarSpec::JsonObject))
    }
}

fn read_prompt(arg: &Option<String>) -> anyhow::Result<String> {
    match arg {
        Some(p) => Ok(p.clone()),
        None => {
            if std::io::stdin().is_terminal() {
                anyhow::bail!("no prompt: give one as an argument or on standard input");
            }
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            Ok(s)
        }
    }
}

fn generation_json(g: &Generation, spec: Option<&Speculation>) -> serde_json::Value {
    let t = &g.timings;
    let mut v = json!({
        "text": g.text,
        "prompt_ids": g.prompt_ids,
        "completion_ids": g.completion_ids,
        "finish_reason": g.finish_reason.as_str(),
        "seed": g.seed,
        "prompt_tokens": g.prompt_ids.len(),
        "completion_tokens": g.completion_ids.len(),
        "prefill_tokens_per_s": t.prefill_tokens_per_s(),
        "decode_tokens_per_s": t.decode_tokens_per_s(),
        "prefill_ms": t.prefill.as_secs_f64() * 1e3,
        "decode_ms": t.decode.as_secs_f64() * 1e3,
    });
    if let Some(s) = spec {
        v["speculative"] = json!({
            "draft": s.name,
            "draft_k": s.k,
            "proposed": s.stats.proposed,
            "accepted": s.stats.accepted,
            "acceptance_rate": s.stats.acceptance_rate(),
            "target_calls": s.stats.target_calls,
            "draft_ms": s.stats.draft_time.as_secs_f64() * 1e3,
        });
    }
    v
}

/// What a speculative generation reports besides the plain result.
struct Speculation {
    name: String,
    k: usize,
    stats: SpecStats,
}

impl Speculation {
    /// The part of the timings line about the drafts.
    fn summary(&self) -> String {
        let s = &self.stats;
        format!(
            ", draft {} k {}: {}/{} accepted ({:.0}%), {} target calls",
            self.name,
            self.k,
            s.accepted,
            s.proposed,
            s.acceptance_rate() * 100.0,
            s.target_calls
        )
    }
}

/// Generates from `ids`, writing each text piece to stdout as it comes when `stream`.
fn generate_streaming<M: LanguageModel, T: Tokenizer + ?Sized>(
    model: &M,
    tokenizer: &T,
    ids: Vec<u32>,
    params: &SamplingParams,
    stream: bool,
) -> anyhow::Result<Generation> {
    Ok(generate_maybe_speculative(model, tokenizer, ids, params, stream, None)?.0)
}

/// Plain or (with a drafter) speculative generation, streamed to stdout when `stream`.
fn generate_maybe_speculative<M: LanguageModel, T: Tokenizer + ?Sized>(
    model: &M,
    tokenizer: &T,
    ids: Vec<u32>,
    params: &SamplingParams,
    stream: bool,
    draft: Option<(&str, usize, &mut dyn Drafter)>,
) -> anyhow::Result<(Generation, Option<Speculation>)> {
    let mut stdout = std::io::stdout().lock();
    let on_text = |piece: &str| {
        if stream {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    };
    let result = match draft {
        None => (generate_from_ids(model, tokenizer, ids, params, on_text)?, None),
        Some((name, k, drafter)) => {
            let s = generate_speculative(model, drafter, tokenizer, ids, params, k, on_text)?;
            (s.generation, Some(Speculation { name: name.to_string(), k, stats: s.stats }))
        }
    };
    stdout.flush()?;
    Ok(result)
}

pub fn run(args: &GenerateArgs, world: &attn_dist::World) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let mut params = args.sampling.params()?;
    let comm = world.comm.clone();
    let parallel = if args.tensor_parallel {
        Parallel::Tensor(comm.clone())
    } else if args.pipeline_parallel {
        Parallel::Pipeline(comm.clone())
    } else {
        Parallel::None
    };
    if args.parallel() && world.size() == 1 {
        eprintln!("note: one rank (not started by mpirun/srun): the whole model runs in this process");
    }
    if world.size() > 1 {
        // Every rank decodes the same tokens from the same logits: they
        // must draw with the same seed (rank 0's). Rank 0 alone prints.
        let mut seed = params.seed.unwrap_or_else(rand::random).to_le_bytes().to_vec();
        comm.broadcast(&mut seed, 0);
        params.seed = Some(u64::from_le_bytes(seed[..8].try_into()?));
        if world.rank() != 0 {
            silence_stdout();
        }
    }
    let prompt = read_prompt(&args.prompt)?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty");
    }
    let grammar = args.grammar_spec()?;
    if grammar.is_some() && (args.draft.is_some() || args.beam_width.is_some()) {
        anyhow::bail!(
            "--json-schema, --json-object and --grammar work with sampling and greedy decoding, not with --draft or --beam-width"
        );
    }
    if args.draft.is_some() {
        validate_draft_tokens(args.draft_k).map_err(|e| anyhow::anyhow!("--draft-k: {e}"))?;
        if args.beam_width.is_some() {
            anyhow::bail!("--draft and --beam-width do not combine: speculative decoding samples or decodes greedily");
        }
    }
    let mut g = match open_model_parallel(&args.model, parallel, &*comm)? {
        AnyModel::Generator(g) => g,
        AnyModel::Seq2Seq(m) => {
            if args.draft.is_some() {
                anyhow::bail!("--draft works with decoder-only models; {} is an encoder-decoder", m.name);
            }
            if grammar.is_some() {
                anyhow::bail!("structured output works with decoder-only models; {} is an encoder-decoder", m.name);
            }
            return run_seq2seq(args, &m, &prompt, &params);
        }
        AnyModel::Classifier(_) => {
            anyhow::bail!("`{}` is a classifier; score it with `attn eval -m {}`", args.model, args.model)
        }
        other => {
            anyhow::bail!("`{}` is a {} model; `attn generate` needs a text-generation model", args.model, other.kind())
        }
    };
    if args.batched_kernel {
        g.model = g.model.for_batched_serving()?;
    }
    let ids = g.tokenizer.encode(&prompt, true)?;
    if let Some(spec) = grammar {
        let mut constraint = ConstraintFactory::new(&g.tokenizer)?
            .compile(&spec)
            .map_err(|e| anyhow::anyhow!("structured output: {e}"))?;
        let result = generate_constrained(&g.model, &g.tokenizer, ids, &params, Some(&mut constraint), |piece| {
            if !args.json {
                print!("{piece}");
                let _ = std::io::stdout().flush();
            }
        })?;
        return print_generation(args, &result, None, Some(&constraint));
    }
    match args.draft.as_deref() {
        Some(name) if name != "ngram" => {
            // The draft runs one row per call: its own kernels suit it.
            let d = open_generator(name).map_err(|e| anyhow::anyhow!("--draft {name}: {e}"))?;
            if d.tokenizer.vocab_size() != g.tokenizer.vocab_size() || d.tokenizer.encode(&prompt, true)? != ids {
                anyhow::bail!(
                    "--draft {name}: its tokenizer ({} tokens) differs from the model's ({} tokens); \
                     a draft model must share the tokenizer",
                    d.tokenizer.vocab_size(),
                    g.tokenizer.vocab_size()
                );
            }
            let mut drafter = ModelDrafter::new(&d.model, g.model.vocab_size())?;
            decode_and_print(args, &g.model, &g.tokenizer, ids, &params, Some(&mut drafter))
        }
        _ => decode_and_print(args, &g.model, &g.tokenizer, ids, &params, None),
    }?;
    report_pipeline(&g.model, &*comm);
    Ok(())
}

/// Rank 0 prints each pipeline stage's layers and the share of its time in
/// forward calls it spent waiting for the other stages (the bubble).
fn report_pipeline(model: &CausalModel, comm: &dyn attn_dist::Collective) {
    let CausalModel::Decoder(d) = model else { return };
    let Some(t) = d.pipeline_times() else { return };
    let all = comm.all_gather(&[t.layers.0 as f32, t.layers.1 as f32, t.busy_s as f32, t.wait_s as f32]);
    if comm.rank() != 0 {
        return;
    }
    let mut parts = Vec::new();
    let (mut busy, mut wait) = (0.0, 0.0);
    for (stage, v) in all.chunks_exact(4).enumerate() {
        parts.push(format!(
            "stage {stage} (layers {}..{}) waited {:.0}% of {:.2} s",
            v[0],
            v[1],
            100.0 * v[3] / v[2].max(1e-9),
            v[2]
        ));
        busy += v[2] as f64;
        wait += v[3] as f64;
    }
    eprintln!("pipeline: {}; bubble {:.1}%", parts.join(", "), 100.0 * wait / busy.max(1e-9));
}

/// Sends this process's standard output to /dev/null (the ranks other than
/// 0 of a split model compute the same text).
fn silence_stdout() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        // SAFETY: dup2 onto fd 1 replaces stdout with an open file; nothing
        // holds a raw pointer into the old descriptor.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
    }
}

/// Translation with an encoder-decoder trained by `attn train`: the prompt
/// is the source sentence, the output its translation.
fn run_seq2seq(args: &GenerateArgs, m: &Seq2Seq, prompt: &str, params: &SamplingParams) -> anyhow::Result<()> {
    use attn_models::trained::{BOS_ID, EOS_ID};
    let device = candle_core::Device::Cpu;
    let mut src = m.tokenizer.encode(prompt, false)?;
    let max = m.model.config().max_len - 1;
    if src.len() > max {
        anyhow::bail!("the source has {} tokens; the model takes at most {max}", src.len());
    }
    src.push(EOS_ID);
    let ids = candle_core::Tensor::new(src.as_slice(), &device)?.unsqueeze(0)?;
    let dec = attn_models::ConditionedDecoder::new(&m.model, m.model.encode(&ids, None, false)?)?;
    decode_and_print(args, &dec, &m.tokenizer, vec![BOS_ID], params, None)
}

/// Beam search or sampling from `ids`, printed as text or JSON; speculative
/// with `model_draft`, or with the n-gram drafter when `--draft ngram`.
fn decode_and_print<M: LanguageModel, T: Tokenizer + ?Sized>(
    args: &GenerateArgs,
    model: &M,
    tokenizer: &T,
    ids: Vec<u32>,
    params: &SamplingParams,
    model_draft: Option<&mut dyn Drafter>,
) -> anyhow::Result<()> {
    if let Some(width) = args.beam_width {
        let bp = BeamParams {
            width,
            length_penalty: args.length_penalty,
            early_stopping: args.early_stopping,
            max_tokens: args.sampling.max_tokens,
            n_best: args.n_best,
        };
        bp.validate()?;
        let hyps = beam_search(model, &ids, &tokenizer.eos_ids(), &bp)?;
        let mut out = Vec::new();
        for h in &hyps {
            let text = tokenizer.decode(&h.tokens, true)?;
            out.push(json!({"text": text, "completion_ids": h.tokens, "logprob": h.logprob, "score": h.score,
                "finish_reason": h.finish_reason.as_str()}));
            if !args.json {
                if hyps.len() > 1 {
                    println!("--- score {:.4} (logprob {:.4})", h.score, h.logprob);
                }
                println!("{text}");
            }
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&json!({"prompt_ids": ids, "beams": out}))?);
        }
        return Ok(());
    }
    let mut ngram = NgramDrafter::default();
    let draft: Option<(&str, usize, &mut dyn Drafter)> = match (args.draft.as_deref(), model_draft) {
        (None, _) => None,
        (Some(name), Some(d)) => Some((name, args.draft_k, d)),
        (Some(_), None) => Some(("ngram", args.draft_k, &mut ngram)),
    };
    let (result, spec) = generate_maybe_speculative(model, tokenizer, ids, params, !args.json, draft)?;
    print_generation(args, &result, spec.as_ref(), None)
}

/// Prints a generation's JSON (with `--json`) or its timings line (the
/// text itself was streamed); with the grammar mask's cost per token when
/// the output was constrained.
fn print_generation(
    args: &GenerateArgs,
    result: &Generation,
    spec: Option<&Speculation>,
    constraint: Option<&Constraint>,
) -> anyhow::Result<()> {
    let mask = constraint.map(|c| mask_summary(c.mask_times()));
    if args.json {
        let mut v = generation_json(result, spec);
        if let Some(m) = mask {
            v["constraint"] = m;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!();
        let t = &result.timings;
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, finish: {}, seed {}{}]",
            result.prompt_ids.len(),
            t.prefill_tokens_per_s(),
            result.completion_ids.len(),
            t.decode_tokens_per_s(),
            result.finish_reason,
            result.seed,
            spec.map(Speculation::summary).unwrap_or_default()
        );
        if let Some(m) = mask {
            eprintln!(
                "[grammar mask: {} tokens, median {:.1} us, p95 {:.1} us per token]",
                m["masks"], m["mask_us_median"], m["mask_us_p95"]
            );
        }
    }
    Ok(())
}

/// Count, median, 95th percentile and total of the mask times (microseconds).
fn mask_summary(times: &[std::time::Duration]) -> serde_json::Value {
    let mut us: Vec<f64> = times.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let at = |q: f64| if us.is_empty() { 0.0 } else { us[((us.len() - 1) as f64 * q).round() as usize] };
    json!({"masks": us.len(), "mask_us_median": at(0.5), "mask_us_p95": at(0.95),
        "mask_ms_total": us.iter().sum::<f64>() / 1e3})
}

#[derive(clap::Args)]
pub struct ChatArgs {
    /// A known model name, a .gguf file or a model folder (an instruction-tuned one)
    #[arg(short, long, default_value = DEFAULT_CHAT)]
    model: String,
    /// A system prompt
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Worker threads for the tensor kernels
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print each reply as a JSON line instead of streaming text
    #[arg(long)]
    json: bool,
}

/// Reads user turns from standard input (one line each; `/reset` starts
/// over, `/exit` or end of input quits) and streams the model's replies.
pub fn chat(args: &ChatArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let params = args.sampling.params()?;
    let g = open_generator(&args.model)?;
    let Some(template) = &g.chat_template else {
        anyhow::bail!("`{}` has no chat template; use `attn generate` with it", args.model);
    };
    let interactive = std::io::stdin().is_terminal();
    let mut messages: Vec<Message> = args.system.iter().map(|s| Message::new("system", s)).collect();
    let base = messages.clone();
    if interactive {
        eprintln!("Chatting with {} (/reset to start over, /exit or Ctrl-D to quit)", g.name);
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages = base.clone();
                continue;
            }
            _ => {}
        }
        messages.push(Message::new("user", text));
        // The template writes the BOS itself; the typed text is read as
        // plain text, never as control tokens.
        let prompt = template.prompt(&messages, None, true)?;
        let ids = g.tokenizer.encode_chat(&prompt.text, &prompt.plain)?;
        let reply = generate_streaming(&g.model, &g.tokenizer, ids, &params, !args.json)?;
        if args.json {
            println!("{}", serde_json::to_string(&generation_json(&reply, None))?);
        } else {
            println!();
        }
        messages.push(Message::new("assistant", reply.text.trim()));
    }
    Ok(())
}
