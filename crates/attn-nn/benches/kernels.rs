//! Kernel benchmarks: quantized matmul per GGUF type (candle's `QMatMul`)
//! and attn's [`Q8Matrix`] panels (Q8_0, Q6_K, Q5_0, Q4_K, Q4_1, Q4_0, per
//! kernel), one activation row (decode), 64 and 512 rows (prefill);
//! attention, the standard path against the tiled kernel.
//!
//! `cargo bench -p attn-nn --bench kernels` measures; `cargo test -p attn-nn
//! --benches` (and so `cargo test --workspace`) runs each benchmark once in
//! criterion's test mode, only to prove it still runs. Numbers go to
//! BENCHMARKS.md, never into assertions.

use attn_nn::kernels::q8::{Kernel, Q8Acts, Q8Matrix};
use attn_nn::{causal_mask, flash_attention, scaled_dot_product_attention, FlashMask, SdpaOptions};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// Gemma 3 270M's FFN down projection: 2048 -> 640 (the k-quants need
/// the input width in multiples of 256).
const D_IN: usize = 2048;
const D_OUT: usize = 640;

fn matmul(c: &mut Criterion) {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 0.05, (D_OUT, D_IN), &dev).expect("weights");
    let mut g = c.benchmark_group("matmul_2048_to_640");
    for rows in [1usize, 64, 512] {
        let x = Tensor::randn(0f32, 1.0, (rows, D_IN), &dev).expect("activations");
        for (name, dtype) in [
            ("q4_k", GgmlDType::Q4K),
            ("q6_k", GgmlDType::Q6K),
            ("q8_0", GgmlDType::Q8_0),
            ("q4_0", GgmlDType::Q4_0),
            ("q4_1", GgmlDType::Q4_1),
        ] {
            let qt = QTensor::quantize(&w, dtype).expect("quantize");
            let mm = QMatMul::from_qtensor(qt).expect("qmatmul");
            g.bench_with_input(BenchmarkId::new(name, rows), &x, |b, x| b.iter(|| mm.forward(x).expect("matmul")));
        }
        // attn's panels from each type's bytes (as candle quantizes them),
        // with every kernel this CPU has except the slow portable reference:
        // at the file's width with VNNI, widened to 8 bits for AVX2.
        let attn: Vec<(&str, Q8Matrix)> = [
            ("attn_q8", GgmlDType::Q8_0, Q8Matrix::from_q8_0_bytes as fn(&[u8], usize, usize) -> _),
            ("attn_q6_k", GgmlDType::Q6K, Q8Matrix::from_q6_k_bytes),
            ("attn_q5", GgmlDType::Q5_0, Q8Matrix::from_q5_0_bytes),
            ("attn_q4_k", GgmlDType::Q4K, Q8Matrix::from_q4_k_bytes),
            ("attn_q4_1", GgmlDType::Q4_1, Q8Matrix::from_q4_1_bytes),
            ("attn_q4_0", GgmlDType::Q4_0, Q8Matrix::from_q4_0_bytes),
        ]
        .into_iter()
        .map(|(name, dtype, load)| {
            let bytes = QTensor::quantize(&w, dtype).expect("quantize").data().expect("bytes").to_vec();
            (name, load(&bytes, D_OUT, D_IN).expect(name))
        })
        .collect();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut acts = Q8Acts::default();
        acts.quantize(&xv, rows, D_IN).expect("quantize");
        for k in Kernel::available().into_iter().filter(|&k| k != Kernel::Portable) {
            for (name, m) in &attn {
                let mut out = vec![0f32; rows * D_OUT];
                g.bench_function(BenchmarkId::new(format!("{name}_{}", k.name()), rows), |b| {
                    b.iter(|| m.matmul_acts_with(&acts, &mut out, k).expect("matmul"))
                });
            }
        }
        g.bench_with_input(BenchmarkId::new("attn_q8_quantize_acts", rows), &xv, |b, xv| {
            b.iter(|| acts.quantize(xv, rows, D_IN).expect("quantize"))
        });
    }
    g.finish();
}

/// Causal self-attention of a Gemma 3 270M layer (4 query heads, 1 kv head,
/// head_dim 256) over a whole prompt.
fn attention(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (h, hkv, d) = (4, 1, 256);
    let opts = SdpaOptions { scale: 1.0 / (d as f64).sqrt(), softcap: None };
    let mut g = c.benchmark_group("attention_gemma_causal");
    g.sample_size(10);
    // `cargo bench` passes `--bench`; without it (criterion's test mode
    // under `cargo test`, where attn's own crates are built without
    // optimisation) one short length proves the benchmark runs.
    let lens: &[usize] = if std::env::args().any(|a| a == "--bench") { &[128, 512, 1024, 2048] } else { &[128] };
    for &len in lens {
        let q = Tensor::randn(0f32, 1.0, (1, h, len, d), &dev).expect("q");
        let k = Tensor::randn(0f32, 1.0, (1, hkv, len, d), &dev).expect("k");
        let v = Tensor::randn(0f32, 1.0, (1, hkv, len, d), &dev).expect("v");
        g.bench_function(BenchmarkId::new("standard", len), |b| {
            b.iter(|| {
                let mask = causal_mask(len, len, None, &dev).expect("mask");
                scaled_dot_product_attention(&q, &k, &v, Some(&mask), opts, None).expect("sdpa")
            })
        });
        let mask = FlashMask { causal: true, ..FlashMask::default() };
        g.bench_function(BenchmarkId::new("tiled", len), |b| {
            b.iter(|| flash_attention(&q, &k, &v, &mask, opts).expect("flash"))
        });
    }
    g.finish();
}

criterion_group!(benches, matmul, attention);
criterion_main!(benches);
