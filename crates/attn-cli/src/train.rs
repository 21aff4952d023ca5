//! `attn train`, `attn eval` and `attn plot`.

use std::io::IsTerminal;
use std::path::PathBuf;

use attn_train::trainer::{describe, evaluate_model};
use attn_train::{train, TrainOptions};

use crate::common::{set_threads, set_training_threads};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Training config (TOML); see configs/ for examples
    #[arg(required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Run directory for checkpoints, metrics, plots and the trained model
    /// [default: runs/<config name>]
    #[arg(short, long)]
    pub out: Option<PathBuf>,
    /// Continue the run in this directory from its latest checkpoint
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Worker threads (default: all available CPUs; under mpirun, the CPUs
    /// of this rank's node shared among its ranks)
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Print the summary as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &TrainArgs, world: &attn_dist::World) -> anyhow::Result<()> {
    set_training_threads(a.threads)?;
    let (run_dir, resume) = match (&a.resume, &a.out, &a.config) {
        (Some(r), _, _) => (r.clone(), true),
        (None, Some(o), _) => (o.clone(), false),
        (None, None, Some(c)) => {
            let stem = c.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
            (PathBuf::from("runs").join(stem), false)
        }
        (None, None, None) => anyhow::bail!("give a config file, or --resume RUN_DIR"),
    };
    let s = train(&TrainOptions {
        config: a.config.clone(),
        run_dir,
        resume,
        progress: std::io::stderr().is_terminal(),
        comm: world.comm.clone(),
    })?;
    if world.rank() != 0 {
        return Ok(());
    }
    if a.json {
        let v = serde_json::json!({
            "run_dir": s.run_dir, "steps": s.steps, "stopped": s.stopped, "elapsed_s": s.elapsed_s,
            "tokens_per_s": s.tokens_per_s, "valid": s.valid.as_ref().map(|v| v.to_json(s.steps, "valid")),
        });
        println!("{v}");
    } else {
        println!(
            "trained {} steps in {:.1} min ({:.0} tokens/s), stopped by {}",
            s.steps,
            s.elapsed_s / 60.0,
            s.tokens_per_s,
            s.stopped
        );
        if let Some(v) = &s.valid {
            println!("{}", describe(v));
        }
        println!("model: {}", s.run_dir.join("model").display());
        println!("curves: {}", s.run_dir.join("curves.png").display());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A model folder written by `attn train` (RUN_DIR/model, or RUN_DIR)
    #[arg(short, long)]
    pub model: PathBuf,
    /// Which held-out split to score
    #[arg(long, default_value = "test", value_parser = ["test", "valid"])]
    pub split: String,
    /// Beam width for translation (1 = greedy only)
    #[arg(long, default_value_t = 4)]
    pub beam: usize,
    /// Translate at most this many pairs (default: the whole split)
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(short, long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn eval(a: &EvalArgs) -> anyhow::Result<()> {
    set_threads(a.threads)?;
    if a.beam == 0 {
        anyhow::bail!("--beam must be at least 1");
    }
    let dir = attn_models::trained::exported_dir(&a.model).unwrap_or_else(|| a.model.clone());
    let t = std::time::Instant::now();
    let (r, report) = evaluate_model(&dir, a.split == "test", a.beam, a.limit)?;
    let mut v = r.to_json(0, &a.split);
    v["beam"] = serde_json::json!(a.beam);
    v["seconds"] = serde_json::json!(t.elapsed().as_secs_f64());
    v["data"] = report;
    if a.json {
        println!("{v}");
    } else {
        println!("{} split: {}", a.split, describe(&r).replacen("valid ", "", 1));
        if let (Some(b), Some(g)) = (r.bleu, r.bleu_greedy) {
            println!("BLEU (sacreBLEU 13a): beam {} {b:.2}, greedy {g:.2}", a.beam);
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct PlotArgs {
    /// A run directory written by `attn train`
    pub run_dir: PathBuf,
    /// Output PNG [default: RUN_DIR/curves.png]
    #[arg(short, long)]
    pub out: Option<PathBuf>,
}

pub fn plot(a: &PlotArgs) -> anyhow::Result<()> {
    let metrics = a.run_dir.join("metrics.jsonl");
    if !metrics.exists() {
        anyhow::bail!("{}: no metrics.jsonl (not a run directory?)", a.run_dir.display());
    }
    let out = a.out.clone().unwrap_or_else(|| a.run_dir.join("curves.png"));
    let title = a.run_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    attn_train::plot::plot_metrics(&metrics, &out, &title)?;
    println!("{}", out.display());
    Ok(())
}
