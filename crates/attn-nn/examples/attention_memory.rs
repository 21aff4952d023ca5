//! One attention call of a long sequence, for measuring speed and peak
//! memory of the standard and the tiled path in a process of its own:
//!
//! ```text
//! cargo run --release -p attn-nn --example attention_memory -- --len 8192 --path tiled --shape gemma
//! ```
//!
//! `--shape gemma`: Gemma 3 270M's attention (4 query heads, 1 kv head,
//! head_dim 256), causal, as in prefill. `--shape minilm`: all-MiniLM-L6-v2's
//! (12 heads, head_dim 32), with a key-padding mask, as in the encoder.
//! Prints the time of the call and the process's peak resident memory
//! (VmHWM) before and after it.

use attn_nn::{
    causal_mask, flash_attention, lengths_to_valid, padding_mask, scaled_dot_product_attention, FlashMask, SdpaOptions,
};
use candle_core::{Device, Tensor};
use std::time::Instant;

fn vm_hwm_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.into())
    };
    let len: usize = arg("--len", "4096").parse()?;
    let path = arg("--path", "tiled");
    let shape = arg("--shape", "gemma");
    let (heads, kv_heads, head_dim, causal) = match shape.as_str() {
        "gemma" => (4, 1, 256, true),
        "minilm" => (12, 12, 32, false),
        other => return Err(format!("unknown --shape {other} (gemma or minilm)").into()),
    };
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (1, heads, len, head_dim), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, kv_heads, len, head_dim), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, kv_heads, len, head_dim), &dev)?;
    let opts = SdpaOptions { scale: 1.0 / (head_dim as f64).sqrt(), softcap: None };
    let lengths = [len];
    let before = vm_hwm_mib();
    let start = Instant::now();
    let out = match path.as_str() {
        "standard" => {
            let mask = if causal {
                causal_mask(len, len, None, &dev)?
            } else {
                padding_mask(&lengths_to_valid(&lengths, len, &dev)?)?
            };
            scaled_dot_product_attention(&q, &k, &v, Some(&mask), opts, None)?
        }
        "tiled" => {
            let mask = if causal {
                FlashMask { causal: true, ..FlashMask::default() }
            } else {
                FlashMask { key_lengths: Some(&lengths), ..FlashMask::default() }
            };
            flash_attention(&q, &k, &v, &mask, opts)?
        }
        other => return Err(format!("unknown --path {other} (standard or tiled)").into()),
    };
    let secs = start.elapsed().as_secs_f64();
    let checksum = out.sum_all()?.to_scalar::<f32>()?;
    println!(
        "shape={shape} len={len} path={path} seconds={secs:.3} peak_rss_mib={:.0} inputs_rss_mib={before:.0} checksum={checksum:.3}",
        vm_hwm_mib()
    );
    Ok(())
}
