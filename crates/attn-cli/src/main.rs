//! `attn`: build, train, run and serve Transformer models.

mod info;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "attn", version, about = "A Transformer engine: build, train, run and serve Transformer models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Arguments of a command that is not built yet: accepted so that the
/// command can say so itself instead of failing on its flags.
#[derive(clap::Args)]
struct Planned {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt (not built yet)
    Generate(Planned),
    /// Interactive chat with a model's chat template (not built yet)
    Chat(Planned),
    /// Sentence embeddings from an encoder model (not built yet)
    Embed(Planned),
    /// Show the token ids and pieces of a text (not built yet)
    Tokenize(Planned),
    /// Perplexity of a model on a text file (not built yet)
    Perplexity(Planned),
    /// Measure prefill and decode speed (not built yet)
    Bench(Planned),
    /// Serve a model over an OpenAI-compatible HTTP API (not built yet)
    Serve(Planned),
    /// Train a model from a TOML config (not built yet)
    Train(Planned),
    /// Evaluate a model on a task (not built yet)
    Eval(Planned),
    /// Fetch a known model into the model cache (not built yet)
    Pull(Planned),
    /// Show what a model file holds: architecture, parameters, tensor types, memory
    Info(info::InfoArgs),
    /// Convert a model to a quantized GGUF (not built yet)
    Quantize(Planned),
}

fn not_built(name: &str) -> anyhow::Result<()> {
    anyhow::bail!("`attn {name}` is not built yet")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Info(args) => info::run(&args),
        Command::Generate(_) => not_built("generate"),
        Command::Chat(_) => not_built("chat"),
        Command::Embed(_) => not_built("embed"),
        Command::Tokenize(_) => not_built("tokenize"),
        Command::Perplexity(_) => not_built("perplexity"),
        Command::Bench(_) => not_built("bench"),
        Command::Serve(_) => not_built("serve"),
        Command::Train(_) => not_built("train"),
        Command::Eval(_) => not_built("eval"),
        Command::Pull(_) => not_built("pull"),
        Command::Quantize(_) => not_built("quantize"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
