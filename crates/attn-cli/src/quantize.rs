//! `attn quantize`.

use std::path::PathBuf;

use attn_models::quantize::{quantize, QuantType};

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// The model to convert: a GGUF file, an HF BERT folder, or a model folder written by `attn train`
    input: PathBuf,
    /// The GGUF file to write (replaced atomically)
    output: PathBuf,
    /// Target type of the matrices: q8_0, q4_0 or q4_k (rows that do not fill its blocks fall back: q4_k to q5_0, then f16)
    #[arg(long = "type")]
    ty: String,
    /// Worker threads
    #[arg(short, long)]
    threads: Option<usize>,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
}

pub fn run(a: &QuantizeArgs) -> anyhow::Result<()> {
    crate::common::set_threads(a.threads)?;
    let ty = QuantType::parse(&a.ty)?;
    let s = quantize(&a.input, &a.output, ty)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let types: Vec<String> = s.tensor_types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "{} ({}, {}) -> {} ({}): {:.1} MB -> {:.1} MB; tensors: {}",
        s.input.display(),
        s.input_kind,
        s.architecture,
        s.output.display(),
        s.target,
        s.input_bytes as f64 / 1e6,
        s.output_bytes as f64 / 1e6,
        types.join(", ")
    );
    if !s.fallbacks.is_empty() {
        let mut by_type = std::collections::BTreeMap::<&str, usize>::new();
        for (_, t) in &s.fallbacks {
            *by_type.entry(t.as_str()).or_default() += 1;
        }
        let list: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} to {t}")).collect();
        println!("rows not a multiple of the {} block: {}", s.target, list.join(", "));
    }
    if !s.dropped.is_empty() {
        println!("not written (unused for embeddings): {}", s.dropped.join(", "));
    }
    Ok(())
}
