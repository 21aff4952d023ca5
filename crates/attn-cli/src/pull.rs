//! `attn pull`: fetch a known model into the cache.

use attn_models::registry::{attn_home, cached_path, known, pull, KNOWN_MODELS};

#[derive(clap::Args)]
pub struct PullArgs {
    /// A known model name (see --list)
    name: Option<String>,
    /// List the known models and whether they are cached
    #[arg(long)]
    list: bool,
    /// Download again even if the model is cached
    #[arg(long)]
    force: bool,
}

pub fn run(args: &PullArgs) -> anyhow::Result<()> {
    if args.list || args.name.is_none() {
        println!("model cache: {}", attn_home()?.display());
        for m in KNOWN_MODELS {
            let state = if cached_path(m)?.is_some() { "cached" } else { "not pulled" };
            let width = KNOWN_MODELS.iter().map(|m| m.name.len()).max().unwrap_or(0);
            println!("  {:<width$} {:<11} {}", m.name, state, m.description);
        }
        return Ok(());
    }
    let name = args.name.as_deref().unwrap_or_default();
    let Some(model) = known(name) else {
        let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        anyhow::bail!("unknown model `{name}` (known: {})", names.join(", "));
    };
    if !args.force {
        if let Some(p) = cached_path(model)? {
            println!("{}", p.display());
            return Ok(());
        }
    }
    let p = pull(model, std::io::IsTerminal::is_terminal(&std::io::stderr()))?;
    println!("{}", p.display());
    Ok(())
}
