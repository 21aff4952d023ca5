//! `attn info`: what a model file holds.

use std::path::PathBuf;

use attn_models::inspect::{inspect, ModelSummary};
use attn_models::load::check_model;

#[derive(clap::Args)]
pub struct InfoArgs {
    /// A .safetensors file, an HF-style folder (config.json + *.safetensors) or a .gguf file
    path: PathBuf,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
    /// List every tensor with its type and shape
    #[arg(long)]
    tensors: bool,
}

pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let mut s = inspect(&args.path)?;
    // A file whose declared sizes do not fit its tensors (or any sane
    // model) is refused with the error loading it would give.
    check_model(&args.path)?;
    if args.json {
        if !args.tensors {
            s.tensors.clear();
        }
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    print!("{}", render(&s, args.tensors));
    Ok(())
}

/// `1234567` -> `1.23M`.
fn count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}K", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}B", n as f64 / 1e9),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn render(s: &ModelSummary, tensors: bool) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let arch = match (&s.architecture, &s.architecture_source) {
        (Some(a), Some(src)) => format!("{a} (from {src})"),
        (Some(a), None) => a.clone(),
        _ => "unknown".into(),
    };
    let _ = writeln!(o, "path          {}", s.path.display());
    let _ = writeln!(o, "format        {}", s.format);
    let _ = writeln!(o, "architecture  {arch}");
    let _ = writeln!(o, "parameters    {} ({})", count(s.parameters), s.parameters);
    let _ = writeln!(o, "memory        {} ({} bytes of tensor data)", bytes(s.bytes), s.bytes);
    let _ = writeln!(o, "tensors       {}", s.tensors.len());
    let _ = writeln!(o, "types");
    for (dtype, t) in &s.dtypes {
        let _ = writeln!(
            o,
            "  {dtype:<6} {:>5} tensors {:>10} params {:>11}",
            t.tensors,
            count(t.parameters),
            bytes(t.bytes)
        );
    }
    if !s.metadata.is_empty() {
        let _ = writeln!(o, "metadata");
        for (k, v) in &s.metadata {
            let _ = writeln!(o, "  {k} = {v}");
        }
    }
    if tensors {
        let _ = writeln!(o, "tensor list");
        for t in &s.tensors {
            let _ = writeln!(o, "  {:<60} {:<6} {:?}", t.name, t.dtype, t.shape);
        }
    }
    o
}
